"""The alternating driver: fit 0, train 0, (eval 0), fit 1, train 1, ... Each step is skipped when
its _SUCCESS.json exists, so `run` resumes at the first unfinished step. Also the `train`, `run`
and `eval` commands.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from fitting.errors import BadInput
from fitting.solvers import SOLVERS
from pipeline import rundir
from pipeline.config import (
    RunConfig,
    check_run_models,
    data_dir,
    load_run_body_model,
    load_run_prior,
    resolve_config,
    run_models,
    run_params,
    save_run_config,
)
from pipeline.evaluation import check_evaluation, evaluate_round
from pipeline.fit_stage import fit_round
from pipeline.lease import Lease
from pipeline.report import format_metrics, headline, round_table, step_line
from pipeline.tracking import Tracker, finished_step, step_run
from trainer.data import storage
from trainer.data.storage import Location
from trainer.data.datasets import rows_per_dataset
from trainer.data.tables import shard_paths
from trainer.dataset import mixing_probabilities
from trainer.train import check_compile, resolve_device, train_regressor
from trainer.train_config import TRAIN_PRESETS


def train_round(run: Location, round_index: int, config: RunConfig, tracker: Tracker | None = None,
                force: bool = False) -> dict[str, Any]:
    """Train regressor N on round N's fits (resuming a killed attempt), holding the step's lease."""
    if rundir.is_done(run, round_index, "model") and not force:
        return finished_step(run, round_index, "model", tracker, f"train-round{round_index}")
    fits = rundir.read_fits(run, round_index)
    train_config = config.training
    models = run_models(config)
    init = start_of(run, round_index, config)
    out_dir = rundir.staging_dir(run, round_index, "model")  # a run on an object store trains locally
    with Lease(rundir.step_dir(run, round_index, "model"), f"round {round_index} model") as lease:
        rundir.clear_success(run, round_index, "model")
        params = {"round": round_index, **train_config.to_dict(), "models": models}
        with step_run(tracker, f"train-round{round_index}", params) as child:
            log = (lambda metrics, step: tracker.log_metrics(child, metrics, step)) if child else None
            summary = train_regressor(train_config, [data_dir(config, "train")], fits, out_dir,
                                      load_run_body_model(models), init_from=init, prior=load_run_prior(models),
                                      log_metrics=log, mix=config.mix)
            summary = {**summary, "round": round_index, "models": models}
            rundir.publish(out_dir, run, round_index, "model", summary_files(out_dir))  # before _SUCCESS.json
            if child:  # before the marker: a kill after it leaves only the child's end undone
                # which weights the backbone started from (ImageNet or SPIN file, and its hash), and the mixing
                tracker.log_params(child, {"backbone_weights": summary["backbone_weights"], "mix": config.mix})
                tracker.log_dict(child, summary, "summary.json")
            lease.check()
            save_run_config(run, config)
            rundir.mark_done(run, round_index, "model", summary)
    return summary


def summary_files(out_dir: Path) -> list[str]:
    """The files of a finished training step that the run keeps."""
    return [name for name in ("checkpoint.pt", "quarantine.parquet") if (out_dir / name).exists()]


def start_of(run: Location, round_index: int, config: RunConfig) -> str | None:
    """Where regressor N starts: regressor N-1 (N >= 1), else the run's `init_from` (SPIN's
    checkpoint as 'spin:FILE', or a checkpoint of this project), else the backbone's weights."""
    if round_index == 0:
        return config.init_from or None
    if not rundir.is_done(run, round_index - 1, "model"):
        raise BadInput(f"round {round_index} warm-starts from regressor {round_index - 1}, which is not trained")
    return str(storage.local_copy(storage.join(rundir.step_dir(run, round_index - 1, "model"), "checkpoint.pt")))


def check_mix(config: RunConfig) -> dict[str, float]:
    """The mixing probabilities of the run's training data (one column per shard read), so that a
    `mix` that does not fit the data stops a run before any work."""
    counts = rows_per_dataset(shard_paths(config.data, "train"))
    return mixing_probabilities(counts, config.mix)


def eval_round(run: Location, round_index: int, config: RunConfig, tracker: Tracker | None = None,
               force: bool = False) -> dict[str, Any]:
    """Regressor N and fits N against ground truth; writes metrics and overlay pictures."""
    if rundir.is_done(run, round_index, "eval") and not force:
        return finished_step(run, round_index, "eval", tracker, f"eval-round{round_index}")
    out_dir = rundir.staging_dir(run, round_index, "eval")  # pictures are drawn locally, then uploaded
    models = run_models(config)
    check_evaluation(config, models)
    with Lease(rundir.step_dir(run, round_index, "eval"), f"round {round_index} eval") as lease:
        with step_run(tracker, f"eval-round{round_index}", {"round": round_index, "models": models}) as child:
            metrics = evaluate_round(run, round_index, config, models, out_dir)
            rundir.publish(out_dir, run, round_index, "eval", sorted(p.name for p in out_dir.glob("*.png")))
            if child:  # before the marker: a kill after it leaves only the child's end undone
                tracker.log_metrics(child, metrics, step=round_index)
                for png in sorted(out_dir.glob("*.png")):
                    tracker.log_artifact(child, png)
            lease.check()
            save_run_config(run, config)
            rundir.mark_done(run, round_index, "eval", metrics)
    if tracker:
        tracker.log_metrics(tracker.parent_id, headline(metrics), step=round_index)
    return metrics


def run_pipeline(run: Location, config: RunConfig, rounds: int, ray_address: str | None = None,
                 force: bool = False, progress: bool = True, tracker: Tracker | None = None) -> list[dict[str, Any]]:
    """Fit and train (and evaluate) round after round, skipping finished steps; one line per step.
    Everything that can be checked is checked before round 0. The MLflow parent run is RUNNING while
    this runs and FINISHED (or FAILED) when it returns (or raises)."""
    if config.mix:
        check_mix(config)
    models = run_models(config)
    check_run_models(models)
    check_evaluation(config, models)  # a test split the body model cannot score fails here, not after round 0
    check_compile(config.training, resolve_device(config.training.device))
    tracker = tracker or Tracker(run, config.tracking.experiment, config.tracking.tracking_uri,
                                 params=run_params(config))
    results = []
    with tracker.active():
        for r in range(rounds):
            start = time.perf_counter()
            fit_summary = fit_round(run, r, config, ray_address=ray_address, force=force, progress=progress,
                                    tracker=tracker)
            click.echo(step_line("fit", r, fit_summary))
            train_summary = train_round(run, r, config, tracker, force=force)
            click.echo(step_line("train", r, train_summary))
            row = {"round": r, "fit": fit_summary, "train": train_summary}
            if config.evaluate:
                row["eval"] = eval_round(run, r, config, tracker, force=force)
                click.echo(step_line("eval", r, row["eval"]))
            row["seconds"] = round(time.perf_counter() - start, 1)
            results.append(row)
        tracker.log_metrics(tracker.parent_id, {"rounds_done": rounds}, step=rounds - 1)
    return results


_common = [
    click.option("--data", type=click.Path(file_okay=False), help="Samples directory or URI (train/ and test/ splits)."),
    click.option("--run", "run_dir", type=click.Path(file_okay=False), required=True, help="Run directory or URI (s3://...)."),
    click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Run YAML (default RUN/config.yaml when present)."),
]


def common_options(func):
    for option in reversed(_common):
        func = option(func)
    return func


@click.command("train")
@click.option("--round", "round_index", type=int, required=True, help="Train regressor N on round N's best fits.")
@common_options
@click.option("--preset", type=click.Choice(list(TRAIN_PRESETS)), help="Trainer preset.")
@click.option("--steps", type=int, help="Training steps (overrides the preset).")
@click.option("--device", help="cpu, cuda or auto.")
@click.option("--init-from", help="Where regressor 0 starts: spin:FILE (SPIN's model_checkpoint.pt) or a checkpoint.")
@click.option("--force", is_flag=True, help="Retrain even if regressor N exists.")
def train(round_index, data, run_dir, config_path, preset, steps, device, init_from, force):
    """Train regressor N on RUN/round=N/fits, warm-starting from regressor N-1 (regressor 0 from
    --init-from, e.g. spin:data/model_checkpoint.pt, else from the backbone's ImageNet weights).

    Writes RUN/round=N/model/checkpoint.pt and _SUCCESS.json; resumes from its last checkpoint.
    """
    run = storage.location(run_dir)
    config = resolve_config(run, config_path, {"data": data, "train_preset": preset, "train.steps": steps,
                                               "train.device": device, "init_from": init_from}, force=force)
    if not rundir.is_done(run, round_index, "fits"):
        raise BadInput(f"round {round_index} has no finished fits in {run}: run `spin-pipeline fit --round {round_index}` first")
    tracker = Tracker(run, config.tracking.experiment, config.tracking.tracking_uri, params=run_params(config))
    summary = train_round(run, round_index, config, tracker, force=force)
    checkpoint = storage.join(rundir.step_dir(run, round_index, "model"), "checkpoint.pt")
    click.echo(f"{step_line('train', round_index, summary)}: {checkpoint}")


@click.command("run")
@click.option("--rounds", type=int, help="Number of fit/train rounds (default: the config's, 3).")
@common_options
@click.option("--ray-address", default=None, help="Ray cluster address; default a local Ray.")
@click.option("--preset", type=click.Choice(list(TRAIN_PRESETS)), help="Trainer preset.")
@click.option("--solver", type=click.Choice(sorted(SOLVERS)), help="SMPLify solver.")
@click.option("--init-from", help="Where regressor 0 starts: spin:FILE (SPIN's model_checkpoint.pt) or a checkpoint.")
@click.option("--force", is_flag=True, help="Redo every step, even finished ones.")
def run(rounds, data, run_dir, config_path, ray_address, preset, solver, init_from, force):
    """The alternating driver: fit 0, train 0, eval 0, fit 1, ... Resumes at the first step without
    _SUCCESS.json; logs a parent MLflow run with a child per step."""
    path = storage.location(run_dir)
    config = resolve_config(path, config_path, {"data": data, "rounds": rounds, "train_preset": preset,
                                                "fit.solver": solver, "init_from": init_from}, force=force)
    results = run_pipeline(path, config, config.rounds, ray_address=ray_address, force=force)
    click.echo(round_table(results))


@click.command("eval")
@click.option("--round", "round_index", type=int, required=True, help="Evaluate regressor N and fits N.")
@common_options
@click.option("--force", is_flag=True, help="Re-evaluate even if done.")
def evaluate(round_index, data, run_dir, config_path, force):
    """MPJPE, PA-MPJPE, PCK/AUC (before/after alignment) and segmentation of regressor N on the test
    split, and the 3D error of round N's fits against the held-out truth. Writes
    RUN/round=N/eval/_SUCCESS.json and overlay PNGs."""
    run = storage.location(run_dir)
    config = resolve_config(run, config_path, {"data": data}, force=force)
    metrics = eval_round(run, round_index, config, None, force=force)
    click.echo(format_metrics(metrics))
