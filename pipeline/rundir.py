"""The run directory contract:

    RUN/config.yaml                      the resolved configuration
    RUN/round=N/fits/part-XXXXX.parquet  best fits after round N, one file per input shard
    RUN/round=N/fits/quarantine/...      samples that could not be fitted, with reasons
    RUN/round=N/fits/_SUCCESS.json       written last
    RUN/round=N/model/checkpoint.pt      regressor N
    RUN/round=N/model/_SUCCESS.json
    RUN/round=N/eval/_SUCCESS.json       metrics of regressor N and fits N on the test split

A step is done when its _SUCCESS.json exists; readers ignore a round without one.
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
from trainer.data.tables import FITS_SCHEMA, QUARANTINE_SCHEMA, concat, read_table

STEPS = ("fits", "model", "eval")
SUCCESS = "_SUCCESS.json"


def step_dir(run: Location, round_index: int, step: str) -> Location:
    """RUN/round=N/step: a Path for a local run, a URI for a remote one."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step}")
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
    """Names of the shards whose fits file exists (a finished shard)."""
    return [storage.basename(p) for p in storage.list_dir(out_dir) if storage.basename(p).endswith(".parquet")]


def read_fits(run: Location, round_index: int) -> pa.Table:
    """The best-fit table of a finished round (all shards)."""
    if not is_done(run, round_index, "fits"):
        raise BadInput(f"round {round_index} has no finished fits in {run}")
    out_dir = step_dir(run, round_index, "fits")
    paths = [p for p in storage.list_dir(out_dir) if _is_part(storage.basename(p))]
    return concat([read_table(p, FITS_SCHEMA) for p in paths], FITS_SCHEMA)


def _is_part(name: str) -> bool:
    return name.startswith("part-") and name.endswith(".parquet")


def read_quarantine(out_dir: Location) -> pa.Table:
    paths = [p for p in storage.list_dir(storage.join(out_dir, "quarantine")) if str(p).endswith(".parquet")]
    return concat([read_table(p, QUARANTINE_SCHEMA) for p in paths], QUARANTINE_SCHEMA)
