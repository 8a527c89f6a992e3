"""A run directory that tells the truth: one writer per step, a step marked done only when every
input shard has its rows, and a failed command that changes nothing."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import rundir
from tests.test_upfront_checks import run_cli

ROOT = Path(__file__).resolve().parents[1]
FAST = {"stages": [{"name": "camera", "iterations": 5}, {"name": "body", "iterations": 10}]}
SLOW = {"stages": [{"name": "camera", "iterations": 40, "solver": "adam"},
                   {"name": "body", "iterations": 80, "solver": "adam"}]}


def small_samples(tiny_benchmark: Path, dst: Path, shards: int = 2, rows: int = 16) -> Path:
    (dst / "train").mkdir(parents=True)
    table = pq.read_table(sorted((tiny_benchmark / "train").glob("*.parquet")))
    for i in range(shards):
        pq.write_table(table.slice(rows * i, rows), dst / "train" / f"part-{i:05d}.parquet")
    return dst


def write_config(path: Path, data: Path, smplify: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"data": str(data), "train_preset": "tiny", "train": {"steps": 4},
                                    "fit": {"batch_size": 8, "num_actors": 1, "smplify": smplify}}))
    return path


@pytest.mark.slow
@pytest.mark.fault("two `fit --round 0` on the same run at once",
                   "the second stops at once with one line naming the writer (host, pid); the first finishes")
def test_a_second_writer_of_a_step_is_refused(tiny_benchmark, tmp_path):
    data = small_samples(tiny_benchmark, tmp_path / "data", shards=3)
    config = write_config(tmp_path / "config.yaml", data, SLOW)
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "pipeline.cli", "fit", "--round", "0", "--run", str(run), "--config", str(config)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    first = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not rundir.step_dir(run, 0, "fits").exists():
            time.sleep(0.1)  # the first writer has begun
        second = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, "the second writer ran"
        assert "pid" in second.stderr and len(second.stderr.strip().splitlines()) == 1, second.stderr
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


@pytest.mark.slow
@pytest.mark.fault("a fits file with half its shard's rows (another writer's leftovers) and no `_SUCCESS.json`",
                   "the resumed round refits that shard; `_SUCCESS.json` counts every input row")
def test_success_marker_needs_every_input_row(tiny_benchmark, tmp_path):
    from pipeline.config import RunConfig
    from pipeline.fit_stage import fit_round

    data = small_samples(tiny_benchmark, tmp_path / "data")
    config = RunConfig.from_dict({"data": str(data), "fit": {"batch_size": 8, "smplify": FAST}})
    run = tmp_path / "run"
    first = fit_round(run, 0, config, progress=False)
    fits = rundir.step_dir(run, 0, "fits")
    rundir.clear_success(run, 0, "fits")
    half = pq.read_table(fits / "part-00001.parquet").slice(0, 8)
    pq.write_table(half, fits / "part-00001.parquet")
    summary = fit_round(run, 0, config, progress=False)
    assert summary["rows"] + summary["quarantined"] == 32 == first["rows"] + first["quarantined"]
    assert pq.read_metadata(fits / "part-00001.parquet").num_rows + summary["quarantined"] >= 16


@pytest.mark.fault("`eval --data OTHER` fails (no round 0 yet)", "RUN/config.yaml is unchanged")
def test_a_failed_command_leaves_the_config_alone(tiny_benchmark, tmp_path, capsys):
    data = small_samples(tiny_benchmark, tmp_path / "data")
    other = small_samples(tiny_benchmark, tmp_path / "other")
    run = tmp_path / "run"
    write_config(run / "config.yaml", data, FAST)
    before = (run / "config.yaml").read_text()
    code, err = run_cli(["eval", "--round", "0", "--data", other, "--run", run], capsys)
    assert code == 2, err
    assert (run / "config.yaml").read_text() == before


@pytest.mark.slow
@pytest.mark.fault("a later step of a run gets other data than its earlier steps (`fit --data OTHER`)",
                   "one line, exit 2, naming both; `--force` redoes the step with the new data")
def test_a_step_with_other_data_than_the_run_is_refused(tiny_benchmark, tmp_path, capsys):
    data = small_samples(tiny_benchmark, tmp_path / "data")
    other = small_samples(tiny_benchmark, tmp_path / "other", shards=1)
    run = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", data, FAST)
    code, err = run_cli(["fit", "--round", "0", "--run", run, "--config", config], capsys)
    assert code == 0, err
    saved = (run / "config.yaml").read_text()
    code, err = run_cli(["fit", "--round", "0", "--data", other, "--run", run], capsys)
    assert code == 2 and str(other) in err and str(data) in err, err
    assert (run / "config.yaml").read_text() == saved
    code, err = run_cli(["fit", "--round", "0", "--data", other, "--run", run, "--force"], capsys)
    assert code == 0, err
    assert rundir.read_success(run, 0, "fits")["rows"] + rundir.read_success(run, 0, "fits")["quarantined"] == 16
