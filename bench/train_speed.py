"""Training throughput per backbone: the train step (forward, SPIN's losses through the body
model, backward, Adam) against the data loader (decode, SPIN augmentation, resize) that feeds it.

Prints JSON: per backbone the median train-step time and images/s, the loader's images/s with
0 workers and with the preset's workers, and loader_vs_train = loader images/s / train images/s
(>= 1 means the loader keeps up). Without --data it makes JPEG crops of the synthetic preset's
size in a temporary folder.

The keypoints backbone has no loader: its rows are the whole training step as the trainer takes
it (gather and augment a batch of keypoints, forward, SPIN's losses, backward, Adam), on random
keypoints and fits, per batch size: samples/s (wall, median step), samples per CPU-second of this
process (less sensitive to other tenants), with the `keypoints` preset's settings, the same step
compiled (`train.compile`, as the ablation runs it; its first step, the compile, reported apart)
and, as the baseline, the step without bf16 autocast and with the losses posing the whole mesh
(`mesh_body`). The three are timed in turns of 5 steps in one process, so that a noisy machine's
slow spells fall on all of them alike.

    python bench/train_speed.py [--data DIR] [--backbones small,resnet18,resnet50] [--out FILE]
    python bench/train_speed.py --device cuda --batch-size 64 --workers 8   # a GPU machine
    python bench/train_speed.py --backbones keypoints --kp-batches 512,1024 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fitting.body_model import builtin_body_model_path, load_body_model  # noqa: E402
from trainer.augment import AugmentConfig  # noqa: E402
from trainer.data.samples import encode_image  # noqa: E402
from trainer.data.tables import SAMPLES_SCHEMA, fits_table, make_table, write_shards  # noqa: E402
from trainer.dataset import SamplesDataset, StepBatchSampler, make_loader, read_samples  # noqa: E402
from trainer.dataset import KeypointBatches  # noqa: E402
from trainer.losses import LossWeights, compute_losses, loss_body  # noqa: E402
from trainer.model import Regressor, normalize_images  # noqa: E402
from trainer.train import _build_regressor, step_loss_function, train_step  # noqa: E402
from trainer.train_config import train_config  # noqa: E402

# backbone -> (input resolution, batch size, stored crop size, loader workers): the presets' choices
SETUPS = {
    "small": (96, 32, 128, 1),
    "resnet18": (224, 16, 224, 2),
    "resnet50": (224, 16, 224, 2),
}


def make_data(root: Path, n: int, crop: int, seed: int = 0) -> tuple[Path, object]:
    """n smooth random JPEG crops with random keypoints, and fits for all of them."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        small = rng.uniform(0, 255, size=(crop // 8, crop // 8, 3)).astype(np.uint8)
        image = cv2.resize(small, (crop, crop), interpolation=cv2.INTER_CUBIC)
        image = np.clip(image + rng.normal(scale=8, size=image.shape), 0, 255).astype(np.uint8)
        images.append(encode_image(image, quality=90))
    keypoints = np.concatenate([rng.uniform(-0.8, 0.8, (n, 49, 2)), np.ones((n, 49, 1))], axis=2)
    ids = [f"bench-{i}" for i in range(n)]
    samples = make_table({"sample_id": ids, "dataset": ["bench"] * n, "image": images,
                          "keypoints": keypoints, "has_smpl": [False] * n}, SAMPLES_SCHEMA)
    write_shards(samples, root / "train", shard_size=max(n // 2, 1))
    pose = rng.normal(scale=0.2, size=(n, 72))
    pose[:, 0] += np.pi
    fits = fits_table(ids, pose=pose, betas=rng.normal(size=(n, 10)), cam_t=[0.0, 0.0, 50.0], loss=1.0,
                      joint_loss=0.0, valid=True, betas_ok=True, found_in_round=0, init="mean", iterations=0)
    return root, fits


def loader_rate(dataset: SamplesDataset, batch_size: int, workers: int, batches: int) -> float:
    """Images per second of the training loader, after its first batch (worker start-up)."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed=0, start=0, stop=batches + 1)
    it = iter(make_loader(dataset, sampler, num_workers=workers))
    next(it)
    start = time.perf_counter()
    count = sum(len(b["image"]) for b in it)
    return count / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(backbone: str, img_res: int, batch: dict, body, steps: int,
               device: torch.device) -> tuple[float, list[float]]:
    """Median seconds of a full train step on a fixed batch, after one warm-up step."""
    torch.manual_seed(0)
    regressor = Regressor(backbone, img_res, backbone_weights="none").to(device).train()
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    optimizer = torch.optim.Adam(regressor.parameters(), lr=5e-5)
    weights = LossWeights()
    times = []
    for _ in range(steps + 1):
        sync(device)
        start = time.perf_counter()
        out = regressor(normalize_images(batch["image"]))
        loss = compute_losses(out, batch, body, weights).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), times[1:]


def keypoint_data(n: int, seed: int = 0) -> tuple[object, object]:
    """A keypoint-only samples table (no images) of n rows and fits for all of them."""
    rng = np.random.default_rng(seed)
    keypoints = np.concatenate([rng.uniform(-0.8, 0.8, (n, 49, 2)), rng.uniform(size=(n, 49, 1)) > 0.1], axis=2)
    ids = [f"kp-{i}" for i in range(n)]
    samples = make_table({"sample_id": ids, "dataset": ["bench"] * n, "keypoints": keypoints,
                          "has_smpl": [False] * n}, SAMPLES_SCHEMA)
    pose = rng.normal(scale=0.2, size=(n, 72))
    pose[:, 0] += np.pi
    fits = fits_table(ids, pose=pose, betas=rng.normal(size=(n, 10)), cam_t=[0.0, 0.0, 50.0], loss=1.0,
                      joint_loss=0.0, valid=True, betas_ok=True, found_in_round=0, init="mean", iterations=0)
    return samples, fits


def keypoint_stepper(body, batch_size: int, device: torch.device, autocast: str = "bf16", mesh_body: bool = False,
                     compile: bool | None = None) -> tuple[dict, Callable[[int], tuple[float, float]]]:
    """The trainer's keypoint step (`KeypointBatches.batch` + `train_step`) with the keypoints
    preset at `batch_size` (compiled as the preset says unless `compile` is given) -> (what it is,
    step(i) -> (wall seconds, CPU seconds of this process))."""
    overrides = {"batch_size": batch_size, "autocast": autocast, "device": str(device)}
    config = train_config("keypoints", overrides if compile is None else {**overrides, "compile": compile})
    samples, fits = keypoint_data(batch_size * 4)
    dataset = SamplesDataset(samples, fits, augment=config.augment, seed=0)
    batches = KeypointBatches(dataset, config.augment, seed=0, compile=config.compile)
    torch.manual_seed(0)
    regressor = _build_regressor(config, None)[0].to(device).train()
    optimizer = torch.optim.Adam(regressor.parameters(), lr=config.lr, fused=True)
    losses_body = body if mesh_body else loss_body(body, config.weights)
    losses = step_loss_function(config)
    sampler = iter(StepBatchSampler(len(dataset), batch_size, 0, 0, 1 << 30))   # the trainer's batches, lazily

    def step(i: int) -> tuple[float, float]:
        keys = next(sampler)
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        batch = {k: v.to(device) for k, v in batches.batch(keys, i).items()}
        train_step(regressor, optimizer, batch, losses_body, config, None, i, losses)
        sync(device)
        return time.perf_counter() - start, time.process_time() - cpu_start

    about = {"backbone": "keypoints", "batch_size": batch_size, "autocast": autocast, "compile": config.compile,
             "loss_body": type(losses_body).__name__, "threads": torch.get_num_threads()}
    return about, step


def keypoint_rates(steppers: dict[str, tuple[dict, Callable]], steps: dict[str, int], turn: int = 5) -> dict[str, dict]:
    """Each stepper's first step (a compile, if any) and one more warm-up, then their timed steps
    in turns (`turn` steps of each in turn, so that a noisy machine's slow spells fall on all of
    them alike) -> per name: median wall seconds per step, samples/s, samples per CPU-second."""
    first = {name: step(0)[0] for name, (_, step) in steppers.items()}
    for _, step in steppers.values():
        step(1)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steppers}
    done = 2
    while any(len(times[name]) < steps[name] for name in steppers):
        for name, (_, step) in steppers.items():
            for _ in range(min(turn, steps[name] - len(times[name]))):
                times[name].append(step(done))
                done += 1
    results = {}
    for name, (about, _) in steppers.items():
        wall = [t for t, _ in times[name]]
        median, batch_size = statistics.median(wall), about["batch_size"]
        results[name] = {**about, "first_step_s": round(first[name], 2), "train_step_s_median": round(median, 4),
                         "train_step_s": [round(t, 4) for t in wall],
                         "train_samples_per_s": round(batch_size / median, 1),
                         "train_samples_per_s_best": round(batch_size / min(wall), 1),
                         "train_samples_per_cpu_s": round(batch_size * len(wall) / sum(c for _, c in times[name]), 1)}
    return results


def keypoint_results(body, batch_sizes: list[int], steps: int, device: torch.device) -> list[dict]:
    """Per batch size: the preset's step, the same step compiled and the baseline (float32, mesh
    body), timed in turns, with the ratios."""
    results = []
    for batch_size in batch_sizes:
        steppers = {"preset": keypoint_stepper(body, batch_size, device),
                    "compiled": keypoint_stepper(body, batch_size, device, compile=True),
                    "baseline": keypoint_stepper(body, batch_size, device, autocast="none", mesh_body=True,
                                                 compile=False)}
        rates = keypoint_rates(steppers, {"preset": steps, "compiled": steps, "baseline": max(3, steps // 5)})
        preset, compiled, baseline = rates["preset"], rates["compiled"], rates["baseline"]
        preset["compiled"] = compiled
        preset["compiled_vs_preset"] = round(compiled["train_samples_per_s"] / preset["train_samples_per_s"], 2)
        preset["baseline"] = baseline
        preset["vs_baseline"] = round(preset["train_samples_per_s"] / baseline["train_samples_per_s"], 2)
        preset["vs_baseline_cpu"] = round(preset["train_samples_per_cpu_s"] / baseline["train_samples_per_cpu_s"], 2)
        results.append(preset)
        print(json.dumps({k: v for k, v in preset.items() if k not in ("train_step_s", "baseline", "compiled")}),
              file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="a samples directory (DIR or DIR/train); default: generated")
    parser.add_argument("--backbones", default="small,resnet18,resnet50,keypoints")
    parser.add_argument("--kp-batches", default="512,2048", help="batch sizes of the keypoints backbone")
    parser.add_argument("--kp-steps", type=int, default=20, help="timed train steps per keypoints batch size")
    parser.add_argument("--steps", type=int, default=3, help="timed train steps per backbone")
    parser.add_argument("--loader-batches", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="where the train step runs (the loader stays on the CPU)")
    parser.add_argument("--batch-size", type=int, default=0, help="override the preset's batch size (0: keep)")
    parser.add_argument("--workers", type=int, default=0, help="override the preset's loader workers (0: keep)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    body_name = "built-in"
    if builtin_body_model_path().is_file():
        body = load_body_model()
    else:  # before the built-in model exists: a random SMPL-sized one
        from fitting.body_model import BodyModel
        from tests.toy_body import make_toy_smpl
        body, body_name = BodyModel(make_toy_smpl()), "random SMPL-sized (6890 vertices)"
    body = body.to(device)
    load_before = [round(x, 2) for x in os.getloadavg()]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbones.split(","):
            if backbone == "keypoints":
                results += keypoint_results(body, [int(b) for b in args.kp_batches.split(",")], args.kp_steps, device)
                continue
            img_res, batch_size, crop, workers = SETUPS[backbone]
            batch_size, workers = args.batch_size or batch_size, args.workers or workers
            n = batch_size * (args.loader_batches + 1)
            if args.data:
                samples, fits = read_samples([args.data]), None
            else:
                root, fits = make_data(Path(tmp) / f"{backbone}", n, crop)
                samples = read_samples([root])
            dataset = SamplesDataset(samples, fits, img_res, augment=AugmentConfig(), seed=0)
            loader0 = loader_rate(dataset, batch_size, 0, args.loader_batches)
            loader_n = loader_rate(dataset, batch_size, workers, args.loader_batches)
            batch = next(iter(make_loader(dataset, StepBatchSampler(len(dataset), batch_size, 0, 0, 1))))
            median, times = train_rate(backbone, img_res, batch, body, args.steps, device)
            train_ips = batch_size / median
            results.append({
                "backbone": backbone, "img_res": img_res, "batch_size": batch_size, "stored_crop": crop,
                "train_step_s_median": round(median, 4), "train_step_s": [round(t, 4) for t in times],
                "train_images_per_s": round(train_ips, 2),
                # the fastest step: what the machine does when the other tenants leave it alone
                "train_images_per_s_best": round(batch_size / min(times), 2),
                "loader_images_per_s_0_workers": round(loader0, 1),
                "loader_workers": workers, "loader_images_per_s": round(loader_n, 1),
                "loader_vs_train": round(loader_n / train_ips, 2),
            })
            print(json.dumps(results[-1]), file=sys.stderr)
    report = {
        "benchmark": "train_speed", "command": "python " + " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]},
        "load_average_before": load_before, "body_model": body_name, "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
