"""Writing the synthetic benchmark: chunks of samples rendered in parallel, in index order, into
DIR/train (2D labels only), DIR/test (3D truth, masks), DIR/truth (the train split's truth, for
evaluating pseudo-labels; training never reads it) and DIR/dataset.json.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from fitting.errors import BadInput
from trainer.data.synth import SynthConfig, render_chunk
from trainer.data.tables import SAMPLES_SCHEMA, make_table, write_table

CHUNK = 16   # samples per body-model batch and per task; fixed, so output never depends on workers
SPLIT_DIRS = ("train", "test", "truth")


class ShardWriter:
    """Collects sample rows and writes DIR/part-XXXXX.parquet every `shard_size` rows."""

    def __init__(self, directory: Path, shard_size: int):
        self.directory, self.shard_size = directory, shard_size
        self.rows: list[dict] = []
        self.shards = 0
        self.count = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        columns = {name: [row.get(name) for row in self.rows] for name in self.rows[0]}
        write_table(make_table(columns, SAMPLES_SCHEMA), self.directory / f"part-{self.shards:05d}.parquet")
        self.shards += 1
        self.count += len(self.rows)
        self.rows = []


def _sample_row(record: dict, split: str) -> dict:
    row = {
        "sample_id": record["sample_id"], "dataset": "synth", "image": record["image"],
        "center": record["center"], "scale": float(record["scale"]), "keypoints": record["keypoints"],
        "has_smpl": False,  # the test split's truth is for evaluation, never supervision
    }
    if split == "test":
        row.update(pose=record["pose"], betas=record["betas"], joints3d=record["joints3d"],
                   mask=record["mask"], part_mask=record["part_mask"])
    return row


def _truth_row(record: dict) -> dict:
    # keypoints here are the clean projections, confidence 1 wherever they fall inside the crop
    return {
        "sample_id": record["sample_id"], "dataset": "synth", "keypoints": record["clean"],
        "has_smpl": True, "pose": record["pose"], "betas": record["betas"], "joints3d": record["joints3d"],
    }


def _init_worker() -> None:
    torch.set_num_threads(1)


def _chunks(cfg: SynthConfig) -> list[tuple[str, int, int]]:
    jobs = []
    for split, n in (("train", cfg.num_train), ("test", cfg.num_test)):
        jobs += [(split, start, min(start + CHUNK, n)) for start in range(0, n, CHUNK)]
    return jobs


def _run(cfg: SynthConfig, jobs: list, workers: int) -> Iterator[tuple[str, list[dict]]]:
    """Render the jobs and yield (split, records) in job order."""
    if workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for split, start, stop in jobs:
                yield split, render_chunk(cfg, split, start, stop)
        finally:
            torch.set_num_threads(threads)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
        pending: deque = deque()
        queue = iter(jobs)
        for job in queue:
            pending.append((job[0], pool.submit(render_chunk, cfg, *job)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            split, future = pending.popleft()
            job = next(queue, None)
            if job is not None:
                pending.append((job[0], pool.submit(render_chunk, cfg, *job)))
            yield split, future.result()


def _prepare(out: Path, overwrite: bool) -> None:
    existing = [out / d for d in SPLIT_DIRS if (out / d).is_dir() and any((out / d).glob("*.parquet"))]
    if (existing or (out / "dataset.json").exists()) and not overwrite:
        raise BadInput(f"{out} already holds a dataset; pass --overwrite to replace it")
    for directory in existing:
        for path in directory.glob("*.parquet"):
            path.unlink()
    if (out / "dataset.json").exists():
        (out / "dataset.json").unlink()


def generate(cfg: SynthConfig, out_dir: str | os.PathLike, workers: int | None = None,
             progress: bool = True, overwrite: bool = False) -> dict:
    """Render the benchmark into `out_dir`; returns (and writes as dataset.json) the summary."""
    out = Path(out_dir)
    workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))
    _prepare(out, overwrite)
    writers = {d: ShardWriter(out / d, cfg.shard_size) for d in SPLIT_DIRS}
    jobs = _chunks(cfg)
    total = cfg.num_train + cfg.num_test
    started = time.perf_counter()
    visible = []
    with tqdm(total=total, desc="synth", unit="img", disable=None if progress else True, leave=False) as bar:
        for split, records in _run(cfg, jobs, workers):
            for record in records:
                writers[split].add(_sample_row(record, split))
                if split == "train":
                    writers["truth"].add(_truth_row(record))
                visible.append(float(np.mean(record["keypoints"][:, 2] > 0)))
            bar.update(len(records))
    for writer in writers.values():
        writer.flush()
    seconds = time.perf_counter() - started
    summary = {
        "config": cfg.to_dict(),
        "counts": {d: w.count for d, w in writers.items()},
        "shards": {d: w.shards for d, w in writers.items()},
        "seconds": round(seconds, 3),
        "samples_per_s": round(total / seconds, 2) if seconds > 0 else None,
        "workers": workers,
        "mean_labelled_keypoints": round(float(np.mean(visible)) * 49, 2) if visible else 0.0,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
