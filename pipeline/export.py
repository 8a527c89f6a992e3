"""`spin-pipeline export`: a round's best fits in the files SPIN and its users read.

    spin-static-fits  per training dataset, SPIN's `data/static_fits/<dataset>_fits.npy`: float32
                      (N, 82), pose (72, axis-angle, global orientation first) then betas (10), one
                      row per row of the dataset's source file, in its order. A row without a fit
                      (quarantined at ingest or in the fit) is zeros; the .npz says which.
    npz               one file: dataset, imgname, source_row, sample_id, pose (N, 72), betas
                      (N, 10), camera (N, 3, weak perspective [s, tx, ty] as SPIN's eval.py writes
                      it), cam_t (N, 3), loss (N,, NaN without a fit), valid, has_fit; datasets in
                      name order, each in its source's row order.

Columns, units and conventions: docs/fits.md.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from fitting.camera import translation_to_weak_perspective
from fitting.errors import BadInput
from pipeline import rundir
from pipeline.config import load_config
from trainer.data import datasets, storage
from trainer.data.ingest import source_row
from trainer.data.tables import shard_paths, to_numpy

FORMATS = ("spin-static-fits", "npz")


def _empty(n: int) -> dict[str, np.ndarray]:
    return {
        "sample_id": np.full(n, "", dtype=object), "imgname": np.full(n, "", dtype=object),
        "source_row": np.arange(n, dtype=np.int64), "pose": np.zeros((n, 72), np.float32),
        "betas": np.zeros((n, 10), np.float32), "cam_t": np.zeros((n, 3), np.float32),
        "loss": np.full(n, np.nan, np.float32), "valid": np.zeros(n, bool), "has_fit": np.zeros(n, bool),
    }


def dataset_rows(run: storage.Location, round_index: int, only: str | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per training dataset, every source row with its best fit of round N (see the module
    docstring): rows in the source's order, the ingest record giving their number."""
    config = load_config(storage.join(run, "config.yaml"))
    if not config.data:
        raise BadInput(f"{run}/config.yaml names no data root")
    fits = rundir.read_fits(run, round_index)
    fit_row = {sid: i for i, sid in enumerate(fits.column("sample_id").to_pylist())}
    arrays = {k: to_numpy(fits, k) for k in ("pose", "betas", "cam_t", "loss", "valid")}
    columns = ["sample_id", "dataset", "source_row", "imgname"]
    samples: dict[str, list[tuple]] = {}
    for path in shard_paths(config.data, "train"):
        present = storage.parquet_metadata(path).schema.to_arrow_schema().names
        table = storage.read_parquet(path, columns=[c for c in columns if c in present])
        values = [table.column(c).to_pylist() if c in table.column_names else [None] * len(table) for c in columns]
        for sid, name, row, image in zip(*values):
            samples.setdefault(name, []).append((sid, row, image))
    records = {name: r for (split, name), r in datasets.records(config.data).items() if split == "train"}
    names = sorted(samples if only is None else [only])
    if only is not None and only not in samples:
        raise BadInput(f"dataset '{only}' has no training samples in {config.data} (it has: {', '.join(sorted(samples))})")
    out = {}
    for name in names:
        rows = samples[name]
        if any(r is None for _, r, _ in rows):  # no source order (the built-in benchmark): the shards' order
            rows = [(sid, i, image) for i, (sid, _, image) in enumerate(rows)]
        n = int(records.get(name, {}).get("rows", max(r for _, r, _ in rows) + 1))
        table = _empty(n)
        for sid, r, image in rows:
            table["sample_id"][r], table["imgname"][r] = sid, image or ""
            if sid in fit_row:
                i = fit_row[sid]
                for key in arrays:
                    table[key][r] = arrays[key][i]
                table["has_fit"][r] = True
        lost = datasets.read_quarantine(config.data, "train", name)
        for sid, image in zip(lost.column("sample_id").to_pylist(), lost.column("source").to_pylist()):
            table["sample_id"][source_row(sid)], table["imgname"][source_row(sid)] = sid, image
        out[name] = table
    return out


def static_fits(table: dict[str, np.ndarray]) -> np.ndarray:
    """(N, 82) float32: pose then betas (SPIN's FitsDict layout), zeros where there is no fit."""
    return np.concatenate([table["pose"], table["betas"]], axis=1).astype(np.float32)


def npz_arrays(tables: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    joined = {k: np.concatenate([t[k] for t in tables.values()]) for k in next(iter(tables.values()))}
    camera = translation_to_weak_perspective(torch.as_tensor(joined["cam_t"], dtype=torch.float64)).numpy()
    camera[~joined["has_fit"]] = 0.0
    return {
        "dataset": np.concatenate([np.full(len(t["pose"]), name) for name, t in tables.items()]).astype(str),
        "imgname": joined["imgname"].astype(str), "sample_id": joined["sample_id"].astype(str),
        "source_row": joined["source_row"], "pose": joined["pose"], "betas": joined["betas"],
        "camera": camera.astype(np.float32), "cam_t": joined["cam_t"], "loss": joined["loss"],
        "valid": joined["valid"], "has_fit": joined["has_fit"],
    }


def export_fits(run: str | Path, round_index: int, fmt: str, out: str | Path, dataset: str | None = None) -> dict[str, Any]:
    """Write the export; returns what was written (per dataset: rows, with a fit, valid). Nothing is
    written when any target exists."""
    if fmt not in FORMATS:
        raise BadInput(f"--format must be one of {', '.join(FORMATS)}")
    run, out = storage.location(run), Path(out)
    tables = dataset_rows(run, round_index, dataset)
    if fmt == "npz" or dataset is not None:
        suffix = ".npz" if fmt == "npz" else ".npy"
        if out.suffix != suffix:
            raise BadInput(f"--out for --format {fmt}{' --dataset' if fmt != 'npz' else ''} is a {suffix} file, got {out}")
        targets = {"all": out}
    else:  # one file per dataset, SPIN's static_fits folder
        targets = {name: out / f"{name}_fits.npy" for name in tables}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing:
        raise BadInput(f"{existing[0]} exists; nothing was written (choose another --out)")
    out_dir = out.parent if "all" in targets else out
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "npz":
        np.savez(out, **npz_arrays(tables))
    else:
        for name, table in tables.items():
            np.save(targets["all" if "all" in targets else name], static_fits(table))
    return {
        "round": round_index, "format": fmt, "out": str(out),
        "datasets": {name: {"rows": len(t["pose"]), "fitted": int(t["has_fit"].sum()), "valid": int(t["valid"].sum())}
                     for name, t in tables.items()},
    }


@click.command("export")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="Run directory or URI.")
@click.option("--round", "round_index", type=int, required=True, help="Export round N's best fits.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True)
@click.option("--out", required=True, type=click.Path(), help="A folder (spin-static-fits), or the .npy / .npz file.")
@click.option("--dataset", default=None, help="Only this training dataset (spin-static-fits: --out is then its .npy).")
def export(run_dir, round_index, fmt, out, dataset):
    """Export round N's best fits: SPIN's static fits (OUT/<dataset>_fits.npy, (N, 82) pose then
    betas in the source file's row order, for SPIN's data/static_fits/) or one .npz with imgname,
    pose, betas, camera, loss and valid. Existing files are never replaced."""
    click.echo(json.dumps(export_fits(run_dir, round_index, fmt, out, dataset)))
