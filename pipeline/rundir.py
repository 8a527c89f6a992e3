"""The run directory contract:

    RUN/config.yaml                      the resolved configuration
    RUN/round=N/fits/part-XXXXX.parquet  best fits after round N, one file per input shard
    RUN/round=N/fits/quarantine/...      samples that could not be fitted, with reasons
    RUN/round=N/fits/_SUCCESS.json       written last
    RUN/round=N/model/checkpoint.pt      regressor N
    RUN/round=N/model/_SUCCESS.json
    RUN/round=N/eval/_SUCCESS.json       metrics of regressor N and fits N on the test split

A step is done when its _SUCCESS.json exists; readers ignore a round without one.
"""
from __future__ import annotations

import json
import os
import subprocess
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

from fitting.errors import BadInput

STEPS = ("fits", "model", "eval")
SUCCESS = "_SUCCESS.json"


def step_dir(run: Path, round_index: int, step: str) -> Path:
    if step not in STEPS:
        raise ValueError(f"unknown step {step}")
    return Path(run) / f"round={round_index}" / step


def is_done(run: Path, round_index: int, step: str) -> bool:
    return (step_dir(run, round_index, step) / SUCCESS).exists()


def read_success(run: Path, round_index: int, step: str) -> dict[str, Any]:
    path = step_dir(run, round_index, step) / SUCCESS
    if not path.exists():
        raise BadInput(f"round {round_index} has no finished {step} step ({path} missing)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BadInput(f"{path}: corrupt success marker") from exc


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=float))
    os.replace(tmp, path)


def mark_done(run: Path, round_index: int, step: str, summary: dict[str, Any]) -> None:
    write_json_atomic(step_dir(run, round_index, step) / SUCCESS, {**summary, "code_version": code_version()})


def clear_success(run: Path, round_index: int, step: str) -> None:
    path = step_dir(run, round_index, step) / SUCCESS
    if path.exists():
        path.unlink()


def finished_rounds(run: Path, step: str) -> list[int]:
    run = Path(run)
    rounds = []
    for child in run.glob("round=*"):
        try:
            index = int(child.name.split("=", 1)[1])
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
