"""A fit round on Ray Data: a dataset of the pending sample shards, one row per shard, feeds an
actor pool; each actor reads its shard, fits every sample with batched SMPLify, keeps the better of
the new fit and the previous round's best fit, and the driver commits one best-fit parquet file per
input shard as soon as that shard comes back.

Shards, not rows, are the unit of work: Ray 2.60's read_parquet plans small files as a single read
task and block, which put a whole round on one actor and held every commit to the end (measured by
bench/fit_stage.py). One shard per task keeps the actors busy in parallel, memory bounded by a
shard, and each commit as early as its shard.

Round 0 starts SMPLify from the mean pose (static fits); round N >= 1 from regressor N-1's
prediction. Samples with ground truth take it as their fit, as SPIN does.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import sys
import time
from collections import Counter, defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import click
import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from fitting.errors import BadInput
from fitting.solvers import SOLVERS
from pipeline import rundir
from pipeline.best_fit import BatchFitter
from pipeline.config import (
    FIT_DEVICES,
    FitStageConfig,
    RunConfig,
    check_run_models,
    resolve_config,
    run_models,
    save_run_config,
)
from pipeline.console import is_verbose, stderr_to
from pipeline.lease import Lease
from pipeline.ray_session import available_cpus, available_gpus, ensure_ray
from pipeline.report import step_line
from pipeline.tracking import Tracker, finished_step, step_run
from trainer.data import storage
from trainer.data.storage import Location
from trainer.data.tables import FITS_SCHEMA, QUARANTINE_SCHEMA, shard_paths, write_table

FIT_COLUMNS = ["sample_id", "keypoints", "has_smpl", "pose", "betas"]


@dataclass
class FitterSpec:
    """Everything an actor needs to build its fitter; plain data so that Ray can ship it."""
    round_index: int
    run: str                      # a local path or a URI
    smplify: dict[str, Any]
    models: dict[str, dict[str, str]]   # the run's body model and prior, pinned (config.run_models)
    checkpoint: str = ""          # regressor N-1; empty for round 0
    device: str = "cpu"
    threads: int = 1
    columns: tuple[str, ...] = tuple(FIT_COLUMNS)   # what to read from a shard
    batch_size: int = 256                           # samples per SMPLify batch


class ShardFitter:
    """Ray Data actor: holds the body model, the prior and (round >= 1) the regressor; called with
    rows of shard paths, it returns the fitted rows of those shards. An actor planned for a GPU
    that sees none stops the round (BadInput); it never fits on the CPU instead."""

    def __init__(self, spec: FitterSpec):
        torch.set_num_threads(max(1, spec.threads))
        self.spec = spec
        worker = ray_worker()
        if spec.device.startswith("cuda") and not torch.cuda.is_available():
            raise BadInput(f"a fit actor planned for a GPU sees none: torch.cuda.is_available() is false on "
                           f"{platform.node()} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, "
                           f"Ray's GPU ids {worker.get('gpu_ids')})")
        self.fitter = BatchFitter(spec, worker)

    def __call__(self, shards: pa.Table) -> pa.Table:
        return pa.concat_tables([self.fit_shard(path) for path in shards.column("path").to_pylist()])

    def fit_shard(self, path: str) -> pa.Table:
        rows = storage.read_parquet(path, columns=list(self.spec.columns))
        rows = rows.append_column("path", pa.array([path] * len(rows), pa.string()))
        size = self.spec.batch_size
        return pa.concat_tables([self.fitter.fit_table(rows.slice(start, size)) for start in range(0, len(rows), size)])


def ray_worker() -> dict[str, Any]:
    """This Ray actor's id and the GPUs Ray gave it ({} outside an actor, a Ray driver included)."""
    import ray

    actor = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
    return {"actor": actor, "gpu_ids": [str(i) for i in ray.get_gpu_ids()]} if actor else {}


@dataclass(frozen=True)
class DevicePlan:
    """How a fit round uses the cluster: `actors` actors, each holding `cpus_per_actor` CPUs and
    `gpus_per_actor` GPUs (a fraction: that many actors share a GPU) and fitting on `device`,
    out of the CPUs and GPUs Ray had free."""
    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    device: str
    free_cpus: float
    free_gpus: float

    def line(self) -> str:
        each = f"{self.cpus_per_actor:g} CPUs" + (f" and {self.gpus_per_actor:g} GPU" if self.gpus_per_actor else "")
        return (f"{self.actors} actor{'s' if self.actors > 1 else ''} on {self.device}, {each} each "
                f"(Ray had {self.free_cpus:g} CPUs and {self.free_gpus:g} GPUs free)")


def plan_devices(fit: FitStageConfig, cpus: float, gpus: float) -> DevicePlan:
    """The actors of a round for a cluster with `cpus` and `gpus` free. A round that asks for GPUs
    (fit.device 'cuda' or gpus_per_actor > 0) gets them or fails here: Ray would otherwise wait
    for them forever, and a fit never moves to the CPU on its own."""
    wanted = fit.device == "cuda" or fit.gpus_per_actor > 0
    if wanted and gpus <= 0:
        why = "fit.device: cuda" if fit.device == "cuda" else f"fit.gpus_per_actor: {fit.gpus_per_actor:g}"
        raise BadInput(f"the fit round asks for GPUs ({why}) but Ray has none free "
                       f"(set fit.device: cpu to fit on the CPUs)")
    if fit.device == "cpu":
        share = 0.0
    elif fit.gpus_per_actor >= 0:
        share = float(fit.gpus_per_actor)
    else:  # -1: a whole GPU per actor where there is one
        share = min(1.0, gpus) if gpus > 0 else 0.0
    if share > gpus:
        raise BadInput(f"fit.gpus_per_actor {share:g} is more than the {gpus:g} GPUs Ray has free")
    if fit.num_actors > 0:
        actors = fit.num_actors
    elif share > 0:
        actors = max(1, math.floor(gpus / share + 1e-9))
    else:
        actors = max(1, int(cpus))
    if share > 0 and actors * share > gpus + 1e-9:
        raise BadInput(f"{actors} fit actors at {share:g} GPU each need {actors * share:g} GPUs, Ray has {gpus:g} free "
                       f"(the pool would wait for them forever): fewer actors or a smaller fit.gpus_per_actor")
    if fit.cpus_per_actor and actors * fit.cpus_per_actor > cpus + 1e-9:
        raise BadInput(f"{actors} fit actors at {fit.cpus_per_actor:g} CPUs each need {actors * fit.cpus_per_actor:g} "
                       f"CPUs, Ray has {cpus:g} free: fewer actors or a smaller fit.cpus_per_actor")
    # Leave one logical CPU free for Ray Data's own tasks: an actor pool that takes every CPU
    # can deadlock them. Actors ask for fractions instead.
    cpus_per_actor = fit.cpus_per_actor or max(0.1, (cpus - 1.0) / actors)
    return DevicePlan(actors=actors, cpus_per_actor=round(cpus_per_actor, 3), gpus_per_actor=share,
                      device="cuda" if share > 0 else "cpu", free_cpus=cpus, free_gpus=gpus)


def make_spec(run: Location, round_index: int, config: RunConfig, device: str, threads: int,
              columns: list[str] | None = None, models: dict[str, dict[str, str]] | None = None) -> FitterSpec:
    checkpoint = ""
    if round_index > 0:
        checkpoint = str(storage.join(rundir.step_dir(run, round_index - 1, "model"), "checkpoint.pt"))
    return FitterSpec(round_index=round_index, run=str(run), smplify=config.smplify.to_dict(),
                      models=models or run_models(config), checkpoint=checkpoint, device=device, threads=threads,
                      columns=tuple(columns or FIT_COLUMNS), batch_size=config.fit.batch_size)


def fit_columns(round_index: int) -> list[str]:
    """What the actors read from a shard: round N >= 1 also predicts from the images."""
    return FIT_COLUMNS + (["image", "image_uri"] if round_index > 0 else [])


def check_inputs(run: Location, round_index: int, shards: list[Location], columns: list[str]) -> dict[str, int]:
    """Everything about the round's inputs that can be known before Ray starts; returns each
    shard's row count by file name.

    The previous round is done (round N >= 1); shard file names are unique; every shard has the
    first one's columns, among them sample_id and keypoints; every page of the columns the actors
    read decodes (a footer can be intact over a corrupt page); sample ids are present and unique
    across shards."""
    if round_index > 0:
        for step in ("fits", "model"):
            if not rundir.is_done(run, round_index - 1, step):
                raise BadInput(f"round {round_index} needs round {round_index - 1}'s {step} step first")
    names = [storage.basename(p) for p in shards]
    if len(set(names)) != len(names):
        raise BadInput("sample shards must have unique file names")
    rows, owners = {}, {}
    first: list[str] | None = None
    for path, name in zip(shards, names):
        try:
            present = storage.parquet_metadata(path).schema.to_arrow_schema().names
        except Exception as exc:  # noqa: BLE001 - any parquet failure is a corrupt input
            raise BadInput(f"{path}: corrupt parquet file ({' '.join(str(exc).split())[:160]})") from exc
        first = first or present
        if set(present) != set(first):
            raise BadInput(f"{path}: its columns differ from {names[0]}'s (missing {sorted(set(first) - set(present))}, "
                           f"extra {sorted(set(present) - set(first))})")
        for required in ("sample_id", "keypoints"):
            if required not in present:
                raise BadInput(f"{path}: no '{required}' column")
        table = _read_pages(path, [c for c in columns if c in present])
        ids = table.column("sample_id")
        if ids.null_count:
            raise BadInput(f"{path}: {ids.null_count} rows without a sample_id")
        for sample_id in ids.to_pylist():
            if sample_id in owners:
                raise BadInput(f"{path}: duplicate sample_id {sample_id!r} (also in {owners[sample_id]})")
            owners[sample_id] = name
        rows[name] = len(table)
    return rows


def _read_pages(path: Location, columns: list[str]) -> pa.Table:
    try:
        return storage.read_parquet(path, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise BadInput(f"{path}: corrupt parquet file ({' '.join(str(exc).split())[:160]})") from exc


def fit_round(
    run: Location, round_index: int, config: RunConfig, ray_address: str | None = None,
    force: bool = False, progress: bool = True, tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Run (or resume) fit round `round_index`; a finished round is a no-op unless `force`.
    Holds the step's lease while it writes; marks the round done only when every input shard has
    all its rows."""
    run = storage.location(run)
    out_dir = rundir.step_dir(run, round_index, "fits")
    if rundir.is_done(run, round_index, "fits") and not force:
        return finished_step(run, round_index, "fits", tracker, f"fit-round{round_index}")
    if not config.data:
        raise BadInput("no data directory: pass --data DIR or set `data` in the config")
    shards = shard_paths(config.data, "train")
    expected = check_inputs(run, round_index, shards, fit_columns(round_index))
    models = run_models(config)
    check_run_models(models)
    with Lease(out_dir, f"round {round_index} fits") as lease:
        if force:
            rundir.clear_step(run, round_index, "fits")
        elif rundir.is_done(run, round_index, "fits"):  # finished by another writer meanwhile
            return finished_step(run, round_index, "fits", tracker, f"fit-round{round_index}")
        params = {"round": round_index, **config.fit.to_dict(), "models": models}
        with step_run(tracker, f"fit-round{round_index}", params) as child:
            done = rundir.complete_shards(out_dir, expected)  # what a killed attempt already wrote in full
            pending = [p for p in shards if storage.basename(p) not in done]
            start = time.perf_counter()
            notes: dict[str, Any] = {"loaded": []}
            if pending:
                notes = _fit_shards(run, round_index, config, models, pending, expected, out_dir, ray_address,
                                    progress, lease)
            rundir.check_complete(out_dir, expected)
            summary = summarize(out_dir, shards)
            summary.update(round=round_index, seconds=round(time.perf_counter() - start, 2),
                           shards_fitted_now=len(pending), shards=len(shards), models=models, **notes)
            if pending and not is_verbose():
                summary["ray_log"] = str(rundir.ray_log(run))
            if child:  # before the marker: a kill after it leaves only the child's end undone
                tracker.log_metrics(child, summary, step=round_index)
                tracker.log_params(child, device_params(summary))
                tracker.log_dict(child, summary, "fits_success.json")
            lease.check()
            save_run_config(run, config)
            rundir.mark_done(run, round_index, "fits", summary)
    return summary


def _fit_shards(run, round_index, config, models, pending, expected, out_dir, ray_address, progress,
                lease) -> dict[str, Any]:
    """Fit the pending shards on Ray; returns the round's notes (RoundNotes.summary): the device
    plan, and what each actor loaded and fitted on."""
    expected = {storage.basename(p): expected[storage.basename(p)] for p in pending}
    for name in [n for n, rows in expected.items() if rows == 0]:  # nothing to fit, and no row would commit it
        commit_shard(out_dir, name, FITS_SCHEMA.empty_table(), lease)
    pending = [p for p in pending if expected[storage.basename(p)] > 0]
    if not pending:
        return {"loaded": []}
    # Ray's own output goes to RUN/logs/ray.log unless --verbose; the console gets a bar by shard
    with (nullcontext(sys.stderr) if is_verbose() else stderr_to(rundir.ray_log(run))) as console:
        ensure_ray(ray_address, progress)
        plan = plan_devices(config.fit, available_cpus(), available_gpus())  # before the pool: it would wait
        print(f"fit round {round_index} plan: {plan.line()}", file=console, flush=True)
        with tqdm(total=sum(expected[storage.basename(p)] for p in pending), desc=f"fit round {round_index}",
                  unit="fit", file=console, disable=None if progress else True, leave=False) as bar:
            notes = _run_actor_pool(run, round_index, config, models, plan, pending, expected, out_dir, bar, lease)
    missing = sorted(set(expected) - rundir.complete_shards(out_dir, expected))
    if missing:
        raise RuntimeError(f"fit round {round_index}: shards not completed: {missing}")
    return notes.summary(plan)


class RoundNotes:
    """What the actors report beside the fits rows, over a round: the models they loaded, each
    actor's device (with the rows it fitted) and how SMPLify ran (mode and device, by rows)."""

    def __init__(self) -> None:
        self.loaded: set[str] = set()
        self.workers: Counter[str] = Counter()
        self.modes: Counter[str] = Counter()

    def add(self, block: pa.Table) -> None:
        self.loaded.update(block.column("models").unique().to_pylist())
        for column, counter in (("worker", self.workers), ("fit_mode", self.modes)):
            for item in block.column(column).value_counts().to_pylist():
                counter[item["values"]] += item["counts"]

    def summary(self, plan: DevicePlan) -> dict[str, Any]:
        return {"loaded": [json.loads(text) for text in sorted(self.loaded)], "device_plan": asdict(plan),
                "actors": [{**json.loads(text), "rows": rows} for text, rows in sorted(self.workers.items())],
                "fit_modes": {mode: rows for mode, rows in sorted(self.modes.items()) if mode}}


def device_params(summary: dict[str, Any]) -> dict[str, Any]:
    """A fit round's device plan and the devices its actors fitted on, as tracking parameters
    (empty where the round fitted nothing now)."""
    if "device_plan" not in summary:
        return {}
    return {"device_plan": summary["device_plan"],
            "fitted_on": ",".join(sorted({actor["device"] for actor in summary["actors"]}))}


def actor_bad_input(exc: BaseException) -> str | None:
    """The message of a BadInput that a Ray actor raised while it started, from the error that
    Ray Data raises in its place (it keeps the actor's traceback as text only); None if none."""
    found = re.findall(r"BadInput: ([^\n]+)", str(exc))
    return found[-1].strip() if found else None


def _run_actor_pool(run, round_index, config, models, plan: DevicePlan, pending, expected, out_dir,
                    bar: tqdm, lease: Lease) -> RoundNotes:
    """Fit the pending shards on an actor pool and commit each shard as soon as all its rows are
    back; the bar counts the fits. Returns what the actors reported."""
    import ray  # here, not at the top: Ray reads its environment at import, which ensure_ray sets

    # Whole CPUs only: an actor running more torch threads than the CPUs it holds competes with
    # the driver and raylet (measured by bench/fit_stage.py: 2 threads on 2 cores ran slower than 1).
    threads = max(1, int(plan.cpus_per_actor))
    present = set(storage.parquet_metadata(pending[0]).schema.to_arrow_schema().names)
    spec = make_spec(run, round_index, config, plan.device, threads,
                     [c for c in fit_columns(round_index) if c in present], models)
    ds = ray.data.from_items([{"path": str(p)} for p in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(
        ShardFitter, fn_constructor_kwargs={"spec": spec}, batch_size=1,
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor or None,
    )  # Ray Data restarts a crashed actor and retries its shard; Python errors are handled inside
    buffers: dict[str, list[pa.Table]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    notes = RoundNotes()
    try:
        for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            notes.add(block)
            for name, part in split_by_shard(block):
                buffers[name].append(part)
                counts[name] += len(part)
                if counts[name] == expected[name]:
                    commit_shard(out_dir, name, pa.concat_tables(buffers.pop(name)), lease)
                    bar.update(counts[name])
    except Exception as exc:  # noqa: BLE001 - only an actor's BadInput becomes one here
        message = actor_bad_input(exc)
        if message is None:
            raise
        raise BadInput(message) from None
    return notes


def split_by_shard(block: pa.Table) -> list[tuple[str, pa.Table]]:
    names = np.asarray([os.path.basename(p) for p in block.column("shard").to_pylist()])
    return [(name, block.filter(pa.array(names == name))) for name in dict.fromkeys(names.tolist())]


def commit_shard(out_dir: Location, name: str, rows: pa.Table, lease: Lease) -> None:
    """Quarantine first, then the fits file: the two together account for every input row of the
    shard, which is what marks it done. Both are atomic (a rename locally, one PUT on an object
    store); a quarantine file left by an earlier attempt goes when this one has none."""
    lease.check()
    reasons = rows.column("reason").to_pylist() if len(rows) else []
    bad = np.array([r is not None for r in reasons], dtype=bool)
    quarantine = storage.join(out_dir, "quarantine", name)
    if bad.any():
        quarantined = rows.filter(pa.array(bad))
        table = pa.table({
            "sample_id": quarantined.column("sample_id"),
            "source": pa.array([name] * len(quarantined)),
            "reason": quarantined.column("reason"),
        }, schema=QUARANTINE_SCHEMA)
        write_table(table, quarantine)
    else:
        storage.delete(quarantine)
    fits = rows.filter(pa.array(~bad)).select(FITS_SCHEMA.names).cast(FITS_SCHEMA) if len(rows) else FITS_SCHEMA.empty_table()
    write_table(fits, storage.join(out_dir, name))


def datasets_of(shards: list[Location]) -> dict[str, str]:
    """sample_id -> dataset over samples shards (two columns of each)."""
    out: dict[str, str] = {}
    for path in shards:
        table = storage.read_parquet(path, columns=["sample_id", "dataset"])
        out.update(zip(table.column("sample_id").to_pylist(), table.column("dataset").to_pylist()))
    return out


def per_dataset(sample_ids: list[str], valid: np.ndarray, quarantined: list[str],
                dataset_of: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Fits, acceptance and quarantined samples per dataset."""
    names = np.asarray([dataset_of.get(s, "?") for s in sample_ids])
    lost = [dataset_of.get(s, "?") for s in quarantined]
    out = {}
    for name in sorted(set(names.tolist()) | set(lost)):
        mine = names == name
        out[name] = {"rows": int(mine.sum()), "acceptance_rate": float(valid[mine].mean()) if mine.any() else 0.0,
                     "quarantined": lost.count(name)}
    return out


def summarize(out_dir: Location, shards: list[Location]) -> dict[str, Any]:
    """Counts, acceptance and losses of a complete fits folder (see rundir.check_complete), also per
    dataset of the input shards."""
    columns = ["sample_id", "loss", "valid", "betas_ok", "found_in_round", "init"]
    tables = [storage.read_parquet(storage.join(out_dir, storage.basename(p)), columns=columns) for p in shards]
    table = pa.concat_tables(tables) if tables else None
    quarantine = rundir.read_quarantine(out_dir)
    summary: dict[str, Any] = {"rows": 0, "quarantined": len(quarantine)}
    if table is None or len(table) == 0:
        return summary
    loss = table.column("loss").to_numpy()
    valid = table.column("valid").to_numpy(zero_copy_only=False)
    found = table.column("found_in_round").to_numpy()
    init = np.asarray(table.column("init").to_pylist())
    summary.update(
        rows=len(table),
        acceptance_rate=float(valid.mean()),
        betas_ok_rate=float(table.column("betas_ok").to_numpy(zero_copy_only=False).mean()),
        loss_quantiles={q: float(np.quantile(loss, float(q))) for q in ("0.1", "0.5", "0.9")},
        loss_mean=float(loss.mean()),
        found_in_round={str(int(r)): int((found == r).sum()) for r in np.unique(found)},
        init={str(k): int((init == k).sum()) for k in np.unique(init)},
        per_dataset=per_dataset(table.column("sample_id").to_pylist(), np.asarray(valid, bool),
                                quarantine.column("sample_id").to_pylist(), datasets_of(shards)),
        quarantine_reasons=dict(zip(*np.unique(quarantine.column("reason").to_pylist(), return_counts=True)))
        if len(quarantine) else {},
    )
    summary["quarantine_reasons"] = {str(k): int(v) for k, v in summary["quarantine_reasons"].items()}
    return summary


@click.command("fit")
@click.option("--round", "round_index", type=int, required=True, help="Round N: 0 fits from the mean pose, N>=1 from regressor N-1.")
@click.option("--data", type=click.Path(file_okay=False), help="Samples directory or URI (its train/ split is fitted).")
@click.option("--run", "run_dir", type=click.Path(file_okay=False), required=True, help="Run directory or URI, e.g. s3://bucket/runs/exp1 (created if needed).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Run YAML; default RUN/config.yaml when present.")
@click.option("--ray-address", default=None, help="Ray cluster address ('auto' inside a cluster); default: a local Ray sized to this machine.")
@click.option("--batch-size", type=int, help="Samples per SMPLify batch in an actor.")
@click.option("--num-actors", type=int, help="Actor pool size (default: one per core or GPU).")
@click.option("--gpus-per-actor", type=float,
              help="GPUs per actor; a fraction shares a GPU (0.25: four actors on one). Default: 1 where Ray has GPUs.")
@click.option("--device", type=click.Choice(FIT_DEVICES),
              help="Where actors fit: cuda fails without a GPU instead of using the CPU; auto uses GPUs where Ray has them.")
@click.option("--solver", type=click.Choice(sorted(SOLVERS)), help="SMPLify solver: lm (fast) or adam (SPIN's).")
@click.option("--force", is_flag=True, help="Redo the round even if it finished.")
def fit(round_index, data, run_dir, config_path, ray_address, batch_size, num_actors, gpus_per_actor, device, solver,
        force):
    """One SMPLify fit round over the sample shards, on Ray.

    Writes RUN/round=N/fits/part-XXXXX.parquet (one per input shard, committed as each completes),
    quarantines samples that cannot be fitted with a reason, then RUN/round=N/fits/_SUCCESS.json.
    A killed round resumes where it stopped; a finished one is a no-op without --force.
    """
    run = storage.location(run_dir)
    config = resolve_config(run, config_path, {"data": data, "fit.batch_size": batch_size,
                                               "fit.num_actors": num_actors, "fit.gpus_per_actor": gpus_per_actor,
                                               "fit.device": device, "fit.solver": solver}, force=force)
    summary = fit_round(run, round_index, config, ray_address=ray_address, force=force)
    click.echo(step_line("fit", round_index, summary))
