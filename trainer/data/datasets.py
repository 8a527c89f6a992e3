"""A data root: many datasets side by side, each ingested once, never overwritten.

    ROOT/train/<dataset>-part-XXXXX.parquet       samples shards of the training datasets
    ROOT/test/<dataset>-part-XXXXX.parquet        the evaluation datasets
    ROOT/_quarantine/<split>/<dataset>.parquet    rows that did not become samples, with the reason
    ROOT/_datasets/<split>/<dataset>.json         the ingest record, written last: source, format,
                                                  protocol, row counts
    ROOT/_staging/                                an ingest in progress (never read)

Readers take only shard names (`trainer.data.tables.SHARD_NAME`) from a split folder, so nothing
else in the root is ever read as samples. The built-in benchmark's folder (train/, test/, truth/
with part-XXXXX shards) is a data root of one dataset.

SPIN's preprocessed files are known by name (`SPIN_FILES`): a file ingests under SPIN's dataset
key and split unless the user names others.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from fitting.errors import BadInput
from trainer.data import storage
from trainer.data.storage import Location
from trainer.data.tables import QUARANTINE_SCHEMA, SHARD_NAME, is_shard, read_table

SPLITS = ("train", "test")
QUARANTINE_DIR = "_quarantine"
RECORDS_DIR = "_datasets"
STAGING_DIR = "_staging"

# SPIN's preprocessed files (its config.py DATASET_FILES) -> (dataset key, split).
SPIN_FILES: dict[str, tuple[str, str]] = {
    "h36m_train.npz": ("h36m", "train"),
    "lsp_dataset_original_train.npz": ("lsp-orig", "train"),
    "mpii_train.npz": ("mpii", "train"),
    "coco_2014_train.npz": ("coco", "train"),
    "hr-lspet_train.npz": ("lspet", "train"),
    "mpi_inf_3dhp_train.npz": ("mpi-inf-3dhp", "train"),
    "h36m_valid_protocol1.npz": ("h36m-p1", "test"),
    "h36m_valid_protocol2.npz": ("h36m-p2", "test"),
    "mpi_inf_3dhp_valid.npz": ("mpi-inf-3dhp", "test"),
    "mpi_inf_3dhp_test.npz": ("mpi-inf-3dhp", "test"),
    "3dpw_test.npz": ("3dpw", "test"),
    "lsp_dataset_test.npz": ("lsp", "test"),
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def dataset_and_split(source: str | Path, dataset: str | None, split: str | None) -> tuple[str, str]:
    """The dataset name and split an ingest writes: the user's, else SPIN's for its file names,
    else the file's stem and 'train'. BadInput for a name that cannot be a shard prefix."""
    known = SPIN_FILES.get(Path(source).name)
    name = dataset or (known[0] if known else Path(source).stem)
    split = split or (known[1] if known else "train")
    if split not in SPLITS:
        raise BadInput(f"--split must be one of {', '.join(SPLITS)}, got '{split}'")
    if not _NAME.match(name) or "part-" in name:
        raise BadInput(f"dataset name '{name}' must be letters, digits, '.', '_' or '-' (not starting "
                       "with a symbol, no 'part-'): pass --dataset NAME")
    return name, split


def record_path(root: Location, split: str, dataset: str) -> Location:
    return storage.join(root, RECORDS_DIR, split, f"{dataset}.json")


def quarantine_path(root: Location, split: str, dataset: str) -> Location:
    return storage.join(root, QUARANTINE_DIR, split, f"{dataset}.parquet")


def staging_dir(root: Path, split: str, dataset: str) -> Path:
    return Path(root) / STAGING_DIR / split / dataset


def dataset_shards(root: Location, split: str, dataset: str) -> list[Location]:
    """The shards of one dataset in a split folder (in order)."""
    folder = storage.join(root, split)
    return [p for p in storage.list_dir(folder) if _dataset_of(storage.basename(p)) == dataset]


def _dataset_of(name: str) -> str | None:
    match = SHARD_NAME.match(name)
    return match.group("dataset") if match else None


def check_new_dataset(root: Location, split: str, dataset: str) -> None:
    """BadInput unless `dataset` is new to ROOT/split: a second ingest never overwrites the first."""
    record = record_path(root, split, dataset)
    if storage.exists(record):
        previous = read_record(record)
        raise BadInput(f"dataset '{dataset}' is already in {storage.join(root, split)} (ingested from "
                       f"{previous.get('source', '?')}); nothing was written: pass --dataset NAME to add it "
                       "under another name, or remove its shards and record first")
    if dataset_shards(root, split, dataset):
        raise BadInput(f"{storage.join(root, split)} holds shards of '{dataset}' from an unfinished ingest: "
                       f"remove {dataset}-part-*.parquet there and ingest again")


def read_record(path: Location) -> dict[str, Any]:
    try:
        return json.loads(storage.read_text(path))
    except json.JSONDecodeError as exc:
        raise BadInput(f"{path}: corrupt ingest record") from exc


def write_record(root: Location, split: str, dataset: str, record: dict[str, Any]) -> None:
    storage.write_text(record_path(root, split, dataset), json.dumps(record, indent=2, sort_keys=True) + "\n")


def records(root: Location) -> dict[tuple[str, str], dict[str, Any]]:
    """(split, dataset) -> ingest record, for every finished ingest in the root."""
    out = {}
    for split in SPLITS:
        for path in storage.list_dir(storage.join(root, RECORDS_DIR, split)):
            name = storage.basename(path)
            if name.endswith(".json"):
                out[(split, name[:-5])] = read_record(path)
    return out


def rows_per_dataset(paths: list[Location]) -> Counter:
    """Samples per dataset over some shards (reads one column of each)."""
    counts: Counter = Counter()
    for path in paths:
        counts.update(storage.read_parquet(path, columns=["dataset"]).column("dataset").to_pylist())
    return counts


def quarantined_per_dataset(root: Location, split: str) -> Counter:
    counts: Counter = Counter()
    for path in storage.list_dir(storage.join(root, QUARANTINE_DIR, split)):
        name = storage.basename(path)
        if name.endswith(".parquet"):
            counts[name[: -len(".parquet")]] = storage.parquet_metadata(path).num_rows
    return counts


def describe_root(root: Location) -> list[dict[str, Any]]:
    """One row per (split, dataset) of a data root: samples, quarantined, protocol, source."""
    root = storage.location(root)
    if not storage.is_dir(root):
        raise BadInput(f"data directory not found: {root}")
    found = records(root)
    rows = []
    for split in (*SPLITS, "truth"):
        folder = storage.join(root, split)
        shards = [p for p in storage.list_dir(folder) if is_shard(storage.basename(p))]
        quarantined = quarantined_per_dataset(root, split)
        counts = rows_per_dataset(shards)
        for dataset in sorted(set(counts) | set(quarantined)):
            record = found.get((split, dataset), {})
            rows.append({"split": split, "dataset": dataset, "samples": counts.get(dataset, 0),
                         "quarantined": quarantined.get(dataset, 0), "protocol": record.get("protocol", ""),
                         "source": record.get("source", "")})
    if not rows:
        raise BadInput(f"no samples in {root} (expected shards in train/ or test/)")
    return rows


def read_quarantine(root: Location, split: str, dataset: str):
    path = quarantine_path(root, split, dataset)
    return read_table(path, QUARANTINE_SCHEMA) if storage.exists(path) else QUARANTINE_SCHEMA.empty_table()
