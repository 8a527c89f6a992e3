"""Fit-stage benchmark: the Ray fit stage against the same fitter in-process, 2 actors against 1,
and peak memory at 1x against 10x the data. Prints JSON; ratios are against baselines measured in
the same run.

Every measurement runs in a fresh subprocess (its own Ray session, clean peak-RSS accounting);
throughput is the median over repeats, reported two ways: over the whole round (Ray's start-up and
the actors' model loading included) and in steady state, from the commit times of the shards
(rows committed after the first `actors` shards over the time from that commit to the last), which
is what a long round on a cluster sees. A 10x round, once per mode, gives the whole-round ratios
where start-up is a small share. Samples carry keypoints only (round 0 reads no images), from
the pose sampler through the built-in body model, with pixel noise and dropped keypoints.

    python bench/fit_stage.py [--rows 512] [--repeats 3] [--out bench/results/fit_stage_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SMPLIFY = {"stages": [{"name": "camera", "iterations": 20}, {"name": "body", "iterations": 40}]}
BATCH = 128


def make_data(out: Path, rows: int, shard_rows: int, seed: int = 7) -> None:
    import numpy as np
    import torch

    from fitting.body_model import load_body_model
    from fitting.camera import pixels_to_normalized
    from smplify import make_people  # bench/smplify.py
    from trainer.data.tables import SAMPLES_SCHEMA, make_table, write_shards

    people = make_people(load_body_model(), rows, seed, noise_px=2.0, drop=0.1, device="cpu")
    keypoints = pixels_to_normalized(people["keypoints"], 224).numpy()
    keypoints[..., :2] *= keypoints[..., 2:] > 0  # dropped keypoints sit at 0 with confidence 0
    table = make_table({"sample_id": [f"bench-{i:06d}" for i in range(rows)], "dataset": ["bench"] * rows,
                        "keypoints": keypoints.astype(np.float32), "has_smpl": np.zeros(rows, bool)}, SAMPLES_SCHEMA)
    write_shards(table, out / "train", shard_rows)
    del torch


class PeakRss:
    """Peak of the summed RSS of this process and all its descendants (Ray's raylet and workers)."""

    def __init__(self, interval: float = 0.1):
        import psutil

        self.root, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for proc in [self.root, *self.root.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def measure(mode: str, data: Path, work: Path, actors: int) -> dict:
    """One measurement, in this (fresh) process."""
    import pyarrow.parquet as pq
    import torch

    torch.set_num_threads(1)
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in (data / "train").glob("*.parquet"))
    if mode == "inprocess":
        from pipeline.config import RunConfig, run_models
        from pipeline.fit_stage import FitterSpec, ShardFitter

        commits = []
        with PeakRss() as rss:
            start = time.perf_counter()
            fitter = ShardFitter(FitterSpec(round_index=0, run=str(work), smplify=SMPLIFY, models=run_models(RunConfig()),
                                            threads=1, batch_size=BATCH))
            for path in sorted((data / "train").glob("*.parquet")):
                commits.append((time.time(), len(fitter.fit_shard(str(path)))))
            seconds = time.perf_counter() - start
    else:
        from pipeline.config import RunConfig
        from pipeline.fit_stage import fit_round
        from pipeline.ray_session import ensure_ray

        ensure_ray(None, progress=False)
        config = RunConfig.from_dict({"data": str(data), "fit": {
            "batch_size": BATCH, "num_actors": actors, "smplify": SMPLIFY}})
        with PeakRss() as rss:
            start = time.perf_counter()
            fit_round(work, 0, config, progress=False)
            seconds = time.perf_counter() - start
        commits = [(p.stat().st_mtime, pq.ParquetFile(p).metadata.num_rows)
                   for p in (work / "round=0" / "fits").glob("part-*.parquet")]
    return {"mode": mode, "actors": actors, "rows": rows, "seconds": seconds,
            "samples_per_s": rows / seconds, "steady_samples_per_s": steady_rate(commits, actors),
            "peak_rss_mb": rss.peak / 2**20}


def steady_rate(commits: list[tuple[float, int]], actors: int) -> float | None:
    """Rows per second between the `actors`-th shard commit and the last: start-up excluded."""
    commits = sorted(commits)
    if len(commits) <= actors:
        return None
    span = commits[-1][0] - commits[actors - 1][0]
    return sum(rows for _, rows in commits[actors:]) / span if span > 0 else None


def run_child(mode: str, data: Path, actors: int) -> dict:
    with tempfile.TemporaryDirectory() as work:
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--data", str(data),
                              "--work", work, "--actors", str(actors)],
                             capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    # Ray may print after the result at shutdown: take the child's own line
    return json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith('{"mode"')))


def median_of(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=512, help="rows at 1x")
    parser.add_argument("--shard-rows", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--actors", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.data, args.work, args.actors)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        one, ten = Path(tmp) / "x1", Path(tmp) / "x10"
        make_data(one, args.rows, args.shard_rows)
        make_data(ten, 10 * args.rows, args.shard_rows)
        runs: dict[str, list[dict]] = {"inprocess": [], "ray_1_actor": [], "ray_2_actors": []}
        for _ in range(args.repeats):  # interleaved, so that load drifts hit every mode alike
            runs["inprocess"].append(run_child("inprocess", one, 1))
            runs["ray_1_actor"].append(run_child("ray", one, 1))
            runs["ray_2_actors"].append(run_child("ray", one, 2))
        # a 10x round once per mode: the whole-round ratios once start-up is a small share
        big = {"inprocess": run_child("inprocess", ten, 1), "ray_1_actor": run_child("ray", ten, 1),
               "ray_2_actors": run_child("ray", ten, 2)}
    rate = {k: median_of(v, "samples_per_s") for k, v in runs.items()}
    steady = {k: median_of(v, "steady_samples_per_s") for k, v in runs.items()}
    rss_1x = median_of(runs["ray_2_actors"], "peak_rss_mb")
    result = {
        "benchmark": "fit_stage",
        "command": "python bench/fit_stage.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()},
        "smplify": SMPLIFY, "batch_size": BATCH, "rows_1x": args.rows, "repeats": args.repeats,
        "samples_per_s_median": rate,
        "ratio_ray_1_actor_vs_inprocess": rate["ray_1_actor"] / rate["inprocess"],
        "ratio_2_actors_vs_1": rate["ray_2_actors"] / rate["ray_1_actor"],
        "steady_samples_per_s_median": steady,
        "steady_ratio_ray_1_actor_vs_inprocess": steady["ray_1_actor"] / steady["inprocess"],
        "steady_ratio_2_actors_vs_1": steady["ray_2_actors"] / steady["ray_1_actor"],
        "samples_per_s_10x": {k: v["samples_per_s"] for k, v in big.items()},
        "ratio_ray_1_actor_vs_inprocess_10x": big["ray_1_actor"]["samples_per_s"] / big["inprocess"]["samples_per_s"],
        "ratio_2_actors_vs_1_10x": big["ray_2_actors"]["samples_per_s"] / big["ray_1_actor"]["samples_per_s"],
        "peak_rss_mb": {"x1": rss_1x, "x10": big["ray_2_actors"]["peak_rss_mb"]},
        "ratio_peak_rss_10x_vs_1x": big["ray_2_actors"]["peak_rss_mb"] / rss_1x,
        "targets": {"ratio_ray_1_actor_vs_inprocess": ">= 0.9", "ratio_2_actors_vs_1": ">= 1.8 where cores allow",
                    "ratio_peak_rss_10x_vs_1x": "<= 1.2"},
        "runs": runs, "run_10x": big,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
