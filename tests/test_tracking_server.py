"""MLflow as a team runs it: a real `mlflow server` on 127.0.0.1, started by the test, and the
SQLite store under a run directory. A finished run leaves no MLflow run RUNNING, a killed attempt's
step runs end FAILED when the step resumes, and artifacts never land in the working directory."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline import rundir
from tests.servers import mlflow_server, stop_group

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


def run_config(path: Path, data: Path) -> Path:
    stages = [{"name": "camera", "iterations": 20, "solver": "adam"}, {"name": "body", "iterations": 40, "solver": "adam"}]
    path.write_text(yaml.safe_dump({
        "data": str(data), "rounds": 1, "train_preset": "tiny", "train": {"steps": 4},
        "fit": {"batch_size": 16, "num_actors": 1, "smplify": {"stages": stages}},
    }))
    return path


def spin(args: list[str], cwd: Path, env: dict[str, str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)


@pytest.mark.slow
@pytest.mark.fault("`run` against a real `mlflow server`, killed during fit round 0, then resumed",
                   "parent FINISHED; the killed attempt's fit child FAILED; no run RUNNING; artifacts in the server's store")
def test_run_against_a_tracking_server_leaves_no_run_running(tiny_benchmark, tracking_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from tests.test_cluster import reshard

    reshard(tiny_benchmark, tmp_path / "data", rows=16, limit=32)
    config = run_config(tmp_path / "config.yaml", tmp_path / "data")
    cwd = tmp_path / "cwd"  # where a user starts the command: nothing may appear here
    cwd.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_server.uri, "PYTHONPATH": str(ROOT)}
    run = tmp_path / "run"
    args = ["run", "--run", str(run), "--config", str(config)]

    first = spin(args, cwd, env)  # killed while it fits round 0
    fits = run / "round=0" / "fits"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and first.poll() is None and not list(fits.glob("part-*.parquet")):
        time.sleep(0.1)
    assert first.poll() is None, first.stderr.read()[-2000:]
    stop_group(first, grace=0)
    # on a loaded machine Ray can hand back both shards at once, and the kill land after the marker
    done_at_kill = rundir.is_done(run, 0, "fits")
    second = spin(args, cwd, env)
    _, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-3000:]

    client = MlflowClient(tracking_server.uri)
    experiment = client.get_experiment_by_name("spin-pipeline")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`spin.run_dir` = '{run.resolve()}'")
    assert len(runs) == 1, "one parent run per run directory"
    parent = runs[0]
    children = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    status = sorted((c.info.run_name, c.info.status) for c in children)
    assert parent.info.status == "FINISHED"
    fit_children = sorted(s for name, s in status if name == "fit-round0")
    if done_at_kill:  # the killed attempt's child ended FINISHED, or FAILED when the kill came before its end
        assert fit_children in (["FAILED"], ["FINISHED"]), status
    else:
        assert fit_children == ["FAILED", "FINISHED"], status
    assert not [c for c in children if c.info.status == "RUNNING"], status
    assert list(cwd.iterdir()) == [], "files appeared in the working directory"
    stored = [p for p in tracking_server.artifacts.rglob("*") if p.is_file()]
    assert stored, "no artifact reached the server's store"


@pytest.mark.fault("a step logs artifacts with the SQLite store from another working directory",
                   "artifacts under the run directory; nothing in the working directory")
def test_sqlite_artifacts_stay_under_the_run_directory(tmp_path, monkeypatch):
    from pipeline.tracking import Tracker

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(tmp_path / "run", "spin-pipeline")
    child = tracker.child("fit-round0")
    tracker.log_dict(child, {"rows": 1}, "summary.json")
    tracker.finish(child)
    location = tracker.client.get_run(child).info.artifact_uri
    assert Path(location.removeprefix("file://")).resolve().is_relative_to((tmp_path / "run").resolve()), location
    assert list(cwd.iterdir()) == []


@pytest.mark.fault("a run killed after a step's `_SUCCESS.json`, before the step's MLflow child ended",
                   "the next command that finds the step done ends that child FAILED")
def test_a_done_step_ends_a_child_left_running(tmp_path, monkeypatch):
    from pipeline.tracking import Tracker, finished_step

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    tracker = Tracker(run, "spin-pipeline")
    left = tracker.child("fit-round0")
    rundir.mark_done(run, 0, "fits", {"rows": 3})
    summary = finished_step(run, 0, "fits", tracker, "fit-round0")
    assert summary["skipped"] and summary["rows"] == 3
    assert tracker.client.get_run(left).info.status == "FAILED"
