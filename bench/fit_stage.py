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

With --device cuda the round runs on the GPU (fit.device cuda): the in-process fitter on the GPU
against Ray rounds whose actors hold a whole GPU or share it by fraction (--gpu-shares; 0.5 is two
actors on one GPU), with each round's device plan and the devices its actors reported, read from
its _SUCCESS.json. No 10x round there: --rows is already sized for a GPU.

    python bench/fit_stage.py [--rows 512] [--repeats 3] [--out bench/results/fit_stage_cpu.json]
    python bench/fit_stage.py --device cuda --rows 131072 --shard-rows 8192 --batch-size 8192 \
        --repeats 1 --gpu-shares 1,0.5 --out bench/results/fit_stage_gpu.json
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
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SMPLIFY = {"stages": [{"name": "camera", "iterations": 20}, {"name": "body", "iterations": 40}]}
BATCH = 128
CHUNK = 16384  # people made per body-model call: bounded memory at GPU sizes


def make_data(out: Path, rows: int, shard_rows: int, seed: int = 7, device: str = "cpu") -> None:
    import numpy as np
    import torch

    from fitting.body_model import load_body_model
    from fitting.camera import pixels_to_normalized
    from smplify import make_people  # bench/smplify.py
    from trainer.data.tables import SAMPLES_SCHEMA, make_table, write_shards

    model = load_body_model(device=device)
    keypoints = torch.cat([make_people(model, min(CHUNK, rows - start), seed + i, noise_px=2.0, drop=0.1,
                                       device=device)["keypoints"].cpu()
                           for i, start in enumerate(range(0, rows, CHUNK))])
    keypoints = pixels_to_normalized(keypoints, 224).numpy()
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


def measure(mode: str, data: Path, work: Path, actors: int, device: str = "cpu", batch: int = BATCH,
            share: float = -1.0) -> dict:
    """One measurement, in this (fresh) process. On a GPU, `share` is each actor's GPU fraction and
    the actor count follows from it (actors 0)."""
    import pyarrow.parquet as pq
    import torch

    torch.set_num_threads(1)
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in (data / "train").glob("*.parquet"))
    if mode == "inprocess":
        from pipeline.config import RunConfig, run_models
        from pipeline.fit_stage import FitterSpec, ShardFitter

        commits, modes = [], Counter()
        with PeakRss() as rss:
            start = time.perf_counter()
            fitter = ShardFitter(FitterSpec(round_index=0, run=str(work), smplify=SMPLIFY, models=run_models(RunConfig()),
                                            device=device, threads=1, batch_size=batch))
            for path in sorted((data / "train").glob("*.parquet")):
                table = fitter.fit_shard(str(path))
                commits.append((time.time(), len(table)))
                modes.update(table.column("fit_mode").to_pylist())
            seconds = time.perf_counter() - start
        round_notes = {"fit_modes": dict(modes)}
    else:
        from pipeline import rundir
        from pipeline.config import RunConfig
        from pipeline.fit_stage import fit_round
        from pipeline.ray_session import ensure_ray

        ensure_ray(None, progress=False)
        fit = {"batch_size": batch, "num_actors": actors, "smplify": SMPLIFY}
        if device == "cuda":
            fit.update(device="cuda", gpus_per_actor=share)
        config = RunConfig.from_dict({"data": str(data), "fit": fit})
        with PeakRss() as rss:
            start = time.perf_counter()
            fit_round(work, 0, config, progress=False)
            seconds = time.perf_counter() - start
        commits = [(p.stat().st_mtime, pq.ParquetFile(p).metadata.num_rows)
                   for p in (work / "round=0" / "fits").glob("part-*.parquet")]
        success = rundir.read_success(work, 0, "fits")
        actors = success["device_plan"]["actors"]
        round_notes = {"device_plan": success["device_plan"], "fit_modes": success["fit_modes"],
                       "actor_devices": [{k: a[k] for k in ("device", "device_name", "gpu_ids", "rows") if k in a}
                                         for a in success["actors"]]}
    return {"mode": mode, "device": device, "share": share, "actors": actors, "rows": rows, "seconds": seconds,
            "samples_per_s": rows / seconds, "steady_samples_per_s": steady_rate(commits, actors),
            "peak_rss_mb": rss.peak / 2**20, **round_notes}


def steady_rate(commits: list[tuple[float, int]], actors: int) -> float | None:
    """Rows per second between the `actors`-th shard commit and the last: start-up excluded."""
    commits = sorted(commits)
    if len(commits) <= actors:
        return None
    span = commits[-1][0] - commits[actors - 1][0]
    return sum(rows for _, rows in commits[actors:]) / span if span > 0 else None


def run_child(mode: str, data: Path, actors: int, device: str = "cpu", batch: int = BATCH, share: float = -1.0) -> dict:
    with tempfile.TemporaryDirectory() as work:
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--data", str(data), "--work", work,
                              "--actors", str(actors), "--device", device, "--batch-size", str(batch),
                              "--share", str(share)],
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
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=BATCH, help="samples per SMPLify batch")
    parser.add_argument("--gpu-shares", default="1,0.5",
                        help="with --device cuda: each Ray round's GPU fraction per actor (0.5: two actors on a GPU)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--actors", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--share", type=float, default=-1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.data, args.work, args.actors, args.device, args.batch_size,
                                 args.share)))
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():  # before minutes of data making: never a CPU figure under a GPU name
            print("error: --device cuda: no CUDA device is visible to torch", file=sys.stderr)
            sys.exit(2)
        write(gpu_benchmark(args), args.out)
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
    write(result, args.out)


def gpu_benchmark(args: argparse.Namespace) -> dict:
    """The fit round on the GPU through Ray, at each GPU share, against the same fitter in-process
    on the GPU; interleaved repeats, medians."""
    import torch

    shares = [float(s) for s in args.gpu_shares.split(",") if s]
    labels = {share: f"ray_share_{share:g}" for share in shares}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_data(data, args.rows, args.shard_rows, device="cuda")
        runs: dict[str, list[dict]] = {"inprocess": [], **{label: [] for label in labels.values()}}
        for _ in range(args.repeats):
            runs["inprocess"].append(run_child("inprocess", data, 1, "cuda", args.batch_size))
            for share, label in labels.items():
                runs[label].append(run_child("ray", data, 0, "cuda", args.batch_size, share))
    rate = {k: median_of(v, "samples_per_s") for k, v in runs.items()}
    steady = {k: median_of(v, "steady_samples_per_s") if all(r["steady_samples_per_s"] for r in v) else None
              for k, v in runs.items()}
    ratios = {label: rate[label] / rate["inprocess"] for label in labels.values()}
    steady_ratios = {label: steady[label] / steady["inprocess"] if steady[label] and steady["inprocess"] else None
                     for label in labels.values()}
    best = max(ratios, key=ratios.get)
    return {
        "benchmark": "fit_stage_gpu",
        "command": "python bench/fit_stage.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
                    "device_name": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                    "torch": torch.__version__},
        "smplify": SMPLIFY, "batch_size": args.batch_size, "rows": args.rows, "shard_rows": args.shard_rows,
        "repeats": args.repeats, "samples_per_s_median": rate, "ratio_vs_inprocess": ratios,
        "steady_samples_per_s_median": steady, "steady_ratio_vs_inprocess": steady_ratios,
        "best": best, "target": {"ratio_vs_inprocess": ">= 0.9"}, "reached": ratios[best] >= 0.9,
        "runs": runs,
    }


def write(result: dict, out: Path | None) -> None:
    text = json.dumps(result, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
