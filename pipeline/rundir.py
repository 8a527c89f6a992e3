"""The run directory contract:

    RUN/config.yaml                      the resolved configuration
    RUN/round=N/fits/part-XXXXX.parquet  best fits after round N, one file per input shard
                                         (named as the shard: <dataset>-part-XXXXX.parquet)
    RUN/round=N/fits/quarantine/...      samples that could not be fitted, with reasons
    RUN/round=N/fits/_SUCCESS.json       written last, once every input shard has all its rows
    RUN/round=N/model/checkpoint.pt      regressor N
    RUN/round=N/model/quarantine.parquet samples whose images could not be read in training
    RUN/round=N/model/_SUCCESS.json
    RUN/round=N/eval/_SUCCESS.json       metrics of regressor N and fits N on the test split
    RUN/round=N/STEP/_LEASE.json         the writer of an unfinished step (pipeline.lease)
    RUN/logs/ray.log                     what Ray printed during the fit rounds (without --verbose)

A step is done when its _SUCCESS.json exists; readers ignore a round without one. RUN/config.yaml
is written by a step that succeeds, just before its _SUCCESS.json.
RUN is a local path or a URI (s3://bucket/runs/exp1): see trainer.data.storage.
"""
from __future__ import annotations

import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa

from fitting.errors import BadInput
from trainer.data import storage
from trainer.data.storage import Location
from trainer.data.tables import FITS_SCHEMA, QUARANTINE_SCHEMA, concat, is_shard, read_table

STEPS = ("fits", "model", "eval")
SUCCESS = "_SUCCESS.json"
LEASE = "_LEASE.json"


def step_dir(run: Location, round_index: int, step: str) -> Location:
    """RUN/round=N/step: a Path for a local run, a URI for a remote one."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step}")
    if round_index < 0:
        raise BadInput(f"round {round_index}: rounds are numbered from 0")
    return storage.join(run, f"round={round_index}", step)


def staging_dir(run: Location, round_index: int, step: str) -> Path:
    """Where a step writes its local files: the step folder itself for a local run, else a stable
    local folder whose files are uploaded when the step finishes."""
    return storage.staging_dir(step_dir(run, round_index, step))


def publish(staging: Path, run: Location, round_index: int, step: str, names: list[str]) -> None:
    """Upload files of a step's staging folder to the run (nothing to do for a local run)."""
    if not storage.is_uri(run):
        return
    target = step_dir(run, round_index, step)
    for name in names:
        storage.upload(staging / name, storage.join(target, name))


def ray_log(run: Location) -> Path:
    """RUN/logs/ray.log, or a local stand-in for a run on an object store."""
    return storage.staging_dir(storage.join(run, "logs")) / "ray.log"


def is_done(run: Location, round_index: int, step: str) -> bool:
    return storage.is_file(storage.join(step_dir(run, round_index, step), SUCCESS))


def read_success(run: Location, round_index: int, step: str) -> dict[str, Any]:
    path = storage.join(step_dir(run, round_index, step), SUCCESS)
    if not storage.is_file(path):
        raise BadInput(f"round {round_index} has no finished {step} step ({path} missing)")
    try:
        return json.loads(storage.read_text(path))
    except json.JSONDecodeError as exc:
        raise BadInput(f"{path}: corrupt success marker") from exc


def write_json_atomic(path: Location, payload: dict[str, Any]) -> None:
    storage.write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=float))


def mark_done(run: Location, round_index: int, step: str, summary: dict[str, Any]) -> None:
    payload = {**summary, "code_version": code_version()}
    write_json_atomic(storage.join(step_dir(run, round_index, step), SUCCESS), payload)


def clear_success(run: Location, round_index: int, step: str) -> None:
    storage.delete(storage.join(step_dir(run, round_index, step), SUCCESS))


def clear_step(run: Location, round_index: int, step: str) -> None:
    """Everything a step wrote, its _SUCCESS.json first (so that readers drop it at once); the
    lease of the writer that redoes it stays."""
    clear_success(run, round_index, step)
    folder = step_dir(run, round_index, step)
    for path in storage.list_dir(folder):
        if storage.basename(path) != LEASE:
            storage.delete(path)
    for path in storage.list_dir(folder, kind="dir"):
        storage.delete_dir(path)


def finished_rounds(run: Location, step: str) -> list[int]:
    rounds = []
    for child in storage.list_dir(run, kind="dir"):
        name = storage.basename(child)
        if not name.startswith("round="):
            continue
        try:
            index = int(name.split("=", 1)[1])
        except ValueError:
            continue
        if is_done(run, index, step):
            rounds.append(index)
    return sorted(rounds)


def code_version() -> str:
    version = metadata.version("spin-pipeline")
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{version}+{sha}" if sha else version


def committed_shards(out_dir: Location) -> list[str]:
    """Names of the shards whose fits file exists."""
    return [storage.basename(p) for p in storage.list_dir(out_dir) if is_shard(storage.basename(p))]


def shard_rows(out_dir: Location) -> dict[str, int]:
    """Rows of each fits file in a fits folder, plus its quarantined rows, by shard name (read from
    the files' footers)."""
    rows = {name: storage.parquet_metadata(storage.join(out_dir, name)).num_rows for name in committed_shards(out_dir)}
    for path in storage.list_dir(storage.join(out_dir, "quarantine")):
        name = storage.basename(path)
        if name in rows:
            rows[name] += storage.parquet_metadata(path).num_rows
    return rows


def complete_shards(out_dir: Location, expected: dict[str, int]) -> set[str]:
    """The input shards (name -> input rows) whose fits and quarantined rows add up to their input:
    a fits file with other counts (left by a writer of other data, or cut short) is not done."""
    return {name for name, rows in shard_rows(out_dir).items() if expected.get(name) == rows}


def check_complete(out_dir: Location, expected: dict[str, int]) -> None:
    """RuntimeError unless every input shard, and nothing else, is complete in `out_dir`."""
    found = shard_rows(out_dir)
    wrong = sorted(n for n, rows in expected.items() if found.get(n) != rows)
    extra = sorted(set(found) - set(expected))
    if wrong or extra:
        detail = [f"{n}: {found.get(n, 'no file')} of {expected[n]} rows" for n in wrong[:5]]
        detail += [f"{n}: not an input shard" for n in extra[:5]]
        raise RuntimeError(f"{out_dir} is incomplete, so it is not marked done: {'; '.join(detail)}")


def read_fits(run: Location, round_index: int) -> pa.Table:
    """The best-fit table of a finished round (all shards)."""
    if not is_done(run, round_index, "fits"):
        raise BadInput(f"round {round_index} has no finished fits in {run}")
    out_dir = step_dir(run, round_index, "fits")
    paths = [p for p in storage.list_dir(out_dir) if is_shard(storage.basename(p))]
    return concat([read_table(p, FITS_SCHEMA) for p in paths], FITS_SCHEMA)


def read_quarantine(out_dir: Location) -> pa.Table:
    paths = [p for p in storage.list_dir(storage.join(out_dir, "quarantine")) if str(p).endswith(".parquet")]
    return concat([read_table(p, QUARANTINE_SCHEMA) for p in paths], QUARANTINE_SCHEMA)
