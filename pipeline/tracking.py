"""MLflow tracking: one parent run per pipeline run, one child run per step, metrics by round.

Uses MlflowClient with explicit run ids (no global active-run stack), so a resumed pipeline
appends to the same parent run. SQLite under the run directory by default, with the artifacts
beside it (RUN/mlartifacts); MLFLOW_TRACKING_URI (or the config) points at a team server, which
keeps the artifacts in its own store, and which a run on an object store needs: SQLite cannot live
there.

Every run ends: the parent FINISHED when `run` ends (FAILED if it raised), a step's child FINISHED
or FAILED with its step. A child that a killed attempt left RUNNING is marked FAILED when its step
starts again, under the step's lease, so it is never a live writer's.
mlflow is imported where it is used: it takes seconds, and commands that do not track skip it.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import click

from fitting.errors import BadInput
from pipeline import rundir
from trainer.data import storage
from trainer.data.storage import Location

PARENT_ID_FILE = "mlflow_run_id.txt"


def resolve_tracking_uri(run: Location | None, configured: str = "") -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if run is None:
        return "sqlite:///mlflow.db"
    if storage.is_uri(run):
        raise BadInput(f"run {run} is not a local directory, so it cannot hold the SQLite tracking store: "
                       "set MLFLOW_TRACKING_URI (or tracking.tracking_uri in the config) to an MLflow server")
    Path(run).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(run).resolve() / 'mlflow.db'}"


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store's file (MLflow would
    choose $CWD/mlruns), or where a tracking server puts them (None)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            k = re.sub(r"[^\w./\- ]", "_", str(k))  # MLflow's key alphabet ('lsp-orig,mpii' in a mix)
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = str(value)[:500]


def _numeric(values: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            for k, v in _numeric(value).items():
                out[f"{key}.{k}"] = v
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


def metric_name(key: str) -> str:
    """A key MLflow accepts: keys can hold free text (quarantine reasons), which may not."""
    return re.sub(r"[^\w\-. :/]", "_", key)[:250]


class Tracker:
    """The pipeline's MLflow parent run and its children."""

    def __init__(self, run: Location, experiment: str, tracking_uri: str = "", run_name: str | None = None,
                 params: dict[str, Any] | None = None):
        from mlflow.tracking import MlflowClient

        self.run_dir = storage.location(run)
        self.uri = resolve_tracking_uri(self.run_dir, tracking_uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else \
            self.client.create_experiment(experiment, artifact_location=artifact_location(self.uri))
        id_file = storage.join(self.run_dir, PARENT_ID_FILE)
        self.parent_id = storage.read_text(id_file).strip() if storage.is_file(id_file) else ""
        if not self.parent_id or not self._exists(self.parent_id):
            where = self.run_dir.resolve() if isinstance(self.run_dir, Path) else self.run_dir
            created = self.client.create_run(self.experiment_id, run_name=run_name or storage.basename(self.run_dir),
                                             tags={"spin.run_dir": str(where)})
            self.parent_id = created.info.run_id
            storage.write_text(id_file, self.parent_id)
            if params:
                self.log_params(self.parent_id, params)

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:  # noqa: BLE001 - a stale id from another tracking store
            return False

    @contextmanager
    def active(self) -> Iterator["Tracker"]:
        """The parent run is RUNNING while the block runs (again, when a run resumes), FINISHED
        after it, FAILED when it raises (KILLED on Ctrl-C)."""
        self.client.update_run(self.parent_id, status="RUNNING")
        with self._ending(self.parent_id):
            yield self

    @contextmanager
    def step(self, name: str, params: dict[str, Any] | None = None) -> Iterator[str]:
        """A child run for one step, ended with the step. Call it holding the step's lease."""
        self.fail_unfinished(name)
        child = self.child(name, params)
        with self._ending(child):
            yield child

    @contextmanager
    def _ending(self, run_id: str) -> Iterator[None]:
        try:
            yield
        except KeyboardInterrupt:
            self.finish(run_id, "KILLED")
            raise
        except BaseException:
            self.finish(run_id, "FAILED")
            raise
        self.finish(run_id)

    def fail_unfinished(self, name: str) -> None:
        """Children for step `name` still RUNNING: left by attempts that were killed."""
        query = (f"tags.mlflow.parentRunId = '{self.parent_id}' and tags.`spin.step` = '{name}' "
                 "and attributes.status = 'RUNNING'")
        for run in self.client.search_runs([self.experiment_id], filter_string=query):
            self.finish(run.info.run_id, "FAILED")

    def child(self, name: str, params: dict[str, Any] | None = None) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"mlflow.parentRunId": self.parent_id, "spin.step": name})
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        flat: dict[str, str] = {}
        _flatten("", params, flat)
        for key, value in flat.items():
            self.client.log_param(run_id, key, value)

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(metric_name(k), v, now, step) for k, v in _numeric(metrics).items()]
        for start in range(0, len(batch), 500):
            self.client.log_batch(run_id, metrics=batch[start:start + 500])

    def log_artifact(self, run_id: str, path: Path, folder: str | None = None) -> None:
        if Path(path).exists():
            self.client.log_artifact(run_id, str(path), folder)

    def log_dict(self, run_id: str, payload: dict[str, Any], name: str) -> None:
        self.client.log_text(run_id, json.dumps(payload, indent=2, sort_keys=True, default=str), name)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)


@contextmanager
def step_run(tracker: Tracker | None, name: str, params: dict[str, Any] | None = None) -> Iterator[str | None]:
    """`tracker.step(name, params)`, or nothing (None) without a tracker."""
    if tracker is None:
        yield None
        return
    with tracker.step(name, params) as child:
        yield child


def finished_step(run: Location, round_index: int, step: str, tracker: Tracker | None, name: str) -> dict[str, Any]:
    """A done step's summary, marked skipped. A child run of it still RUNNING belongs to an attempt
    killed between marking the step done and ending its run: it is ended FAILED."""
    if tracker is not None:
        tracker.fail_unfinished(name)
    return {**rundir.read_success(run, round_index, step), "skipped": True}


def compare_runs(tracking_uri: str, experiment: str, run_names: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Parent runs of `experiment` with their latest per-round metrics."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    frame = mlflow.search_runs(experiment_names=[experiment], output_format="pandas")
    if frame.empty:
        return []
    parent_col = "tags.mlflow.parentRunId"
    if parent_col in frame:
        frame = frame[frame[parent_col].isna()]
    names = set(run_names)
    rows = []
    for _, row in frame.sort_values("start_time").iterrows():
        name = row.get("tags.mlflow.runName", row["run_id"])
        if names and name not in names:
            continue
        get = lambda key: row.get(f"metrics.{key}")  # noqa: E731
        rows.append({
            "run": name, "rounds": get("rounds_done"), "acceptance": get("fit_acceptance"),
            "fit_pa_mpjpe": get("fit_pa_mpjpe"), "reg_mpjpe": get("reg_mpjpe"), "reg_pa_mpjpe": get("reg_pa_mpjpe"),
        })
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no runs)"
    keys = list(rows[0])
    def cell(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    table = [keys] + [[cell(r[k]) for k in keys] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(keys))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in table)


@click.command("compare")
@click.option("--experiment", default="spin-pipeline", show_default=True, help="MLflow experiment to read.")
@click.option("--run", "run_dir", type=click.Path(file_okay=False), help="A run directory: read its own SQLite store.")
@click.option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else RUN/mlflow.db, else ./mlflow.db).")
@click.option("--name", "names", multiple=True, help="Only these run names (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def compare(experiment, run_dir, tracking_uri, names, as_json):
    """MLflow runs side by side: rounds, fit acceptance, fit PA-MPJPE, regressor MPJPE/PA-MPJPE."""
    local = Path(run_dir) if run_dir and not storage.is_uri(run_dir) else None
    if local and not local.is_dir():
        raise BadInput(f"run directory not found: {run_dir}")
    if local and not tracking_uri and not (local / "mlflow.db").exists():
        raise BadInput(f"{run_dir} has no mlflow.db")
    # a run on an object store has no SQLite store: its MLflow server must be given
    uri = tracking_uri or resolve_tracking_uri(storage.location(run_dir) if run_dir else None)
    rows = compare_runs(uri, experiment, names)
    click.echo(json.dumps(rows, indent=2) if as_json else format_rows(rows))
