"""SMPLify benchmark: the fast solver (Levenberg-Marquardt) against SPIN's Adam on the same
keypoints, side by side in one run. Prints JSON.

People: poses from the pose sampler (a seed family apart from the prior's), shapes N(0, 1),
facing the camera within +-45 degrees of yaw, scaled to fill the 224-px crop. Keypoints are the
body model's 49 keypoints projected with pixel noise, some dropped (confidence 0). For each batch
size, each initialization (the mean pose with the camera guessed from the keypoints, or the
truth plus noise) and each solver it reports fits/s (median over repeats of wall time, and of
process CPU time, which a shared machine disturbs less), the final loss, the fraction valid,
MPJPE / PA-MPJPE (mm) over the 14 LSP joints and the iterations per sample; then, per batch and
initialization, lm / adam ratios of fits/s and the differences in loss, PA-MPJPE and validity.
A third arm, `spin`, is SPIN's SMPLify as published: Adam on the same objective with the whole
mesh skinned at every step (`forward: mesh`); it runs from the mean initialization at the batch
sizes of --spin-batches (it is slow), and lm / spin is the speed-up over SPIN's SMPLify.
Repeats fit disjoint batches, the two solvers alternating on the same people. Near the truth,
a check runs Adam with 10x the body-stage steps, to tell a solver's error from the energy's.
A last table times the keypoint forward+backward of the full mesh against the keypoint-only body.

    python bench/smplify.py --threads 1 [--batches 1,64,512,4096] [--out bench/results/smplify_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import roma
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fitting.body_model import BodyModel, load_body_model  # noqa: E402
from fitting.camera import perspective_projection  # noqa: E402
from fitting.geometry import similarity_align  # noqa: E402
from fitting.keypoint_body import KeypointBody  # noqa: E402
from fitting.keypoints import KEYPOINT_NAMES, LSP14  # noqa: E402
from fitting.pose_sampler import sample_body_poses  # noqa: E402
from fitting.priors import load_prior  # noqa: E402
from fitting.smplify import FitInit, SmplifyConfig, default_mean_pose, fit  # noqa: E402

LSP_HIPS = [LSP14.index(KEYPOINT_NAMES.index(n)) for n in ("Right Hip", "Left Hip")]


def make_people(model: BodyModel, n: int, seed: int, noise_px: float, drop: float, device) -> dict:
    rng = np.random.default_rng(seed)
    body = torch.as_tensor(sample_body_poses(n, rng))
    upright = torch.tensor([[math.pi, 0.0, 0.0]]).expand(n, 3)
    turn = torch.as_tensor(np.c_[rng.normal(0, 0.08, n), rng.uniform(-math.pi / 4, math.pi / 4, n),
                                 rng.normal(0, 0.08, n)], dtype=torch.float32)
    pose = torch.cat([roma.rotvec_composition([upright, turn]), body], dim=1)
    betas = torch.as_tensor(rng.normal(size=(n, 10)), dtype=torch.float32)
    depth = 2 * 5000 / (224 * rng.uniform(0.75, 1.0, n))
    cam_t = torch.as_tensor(np.c_[rng.normal(0, 0.05, (n, 2)), depth], dtype=torch.float32)
    pose, betas, cam_t = pose.to(device), betas.to(device), cam_t.to(device)
    with torch.no_grad():
        joints3d = KeypointBody(model)(pose, betas)
    pixels = perspective_projection(joints3d, cam_t)
    pixels = pixels + noise_px * torch.as_tensor(rng.standard_normal(pixels.shape), dtype=torch.float32, device=device)
    seen = torch.as_tensor(rng.random((n, 49)) >= drop, device=device)
    keypoints = torch.cat([pixels * seen[..., None], seen[..., None].float()], dim=-1)  # dropped: zeros
    near = FitInit(
        pose + 0.1 * torch.as_tensor(rng.standard_normal(pose.shape), dtype=torch.float32, device=device),
        betas + 0.3 * torch.as_tensor(rng.standard_normal(betas.shape), dtype=torch.float32, device=device),
        cam_t * torch.as_tensor(np.c_[np.ones((n, 2)), 1 + 0.05 * rng.standard_normal(n)], dtype=torch.float32,
                                device=device)
        + torch.as_tensor(np.c_[0.02 * rng.standard_normal((n, 2)), np.zeros(n)], dtype=torch.float32, device=device),
    )
    return {"joints3d": joints3d, "keypoints": keypoints, "near": near}


def errors_mm(model: BodyModel, pose: torch.Tensor, betas: torch.Tensor, joints3d: torch.Tensor) -> tuple[float, float]:
    """Mean MPJPE (pelvis = mid-hips) and PA-MPJPE over the 14 LSP joints, in mm."""
    with torch.no_grad():
        pred = KeypointBody(model)(pose, betas)[:, LSP14]   # the model's keypoints, without the mesh
    gt = joints3d[:, LSP14]
    pred_c = pred - pred[:, LSP_HIPS].mean(1, keepdim=True)
    gt_c = gt - gt[:, LSP_HIPS].mean(1, keepdim=True)
    mpjpe = (pred_c - gt_c).norm(dim=-1).mean()
    pa = (similarity_align(pred, gt) - gt).norm(dim=-1).mean()
    return 1000 * float(mpjpe), 1000 * float(pa)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


SOLVERS = ("adam", "lm")


def solver_config(base: SmplifyConfig, solver: str, forward: str = "keypoints") -> SmplifyConfig:
    """`base` with every stage solved by `solver` (what `--solver` does in the pipeline)."""
    data = base.to_dict()
    data["stages"] = [{**stage, "solver": solver} for stage in data["stages"]]
    return SmplifyConfig.from_dict({**data, "forward": forward})


def run_case(model, prior, people, batch: int, init_kind: str, repeats: int, configs: dict, device) -> list[dict]:
    """Both solvers on the same `repeats` disjoint batches (batch 1 still averages over people)."""
    runs = {name: {"wall": [], "cpu": [], "results": []} for name in configs}
    slices = [slice(r * batch, (r + 1) * batch) for r in range(repeats)]
    for sl in slices:
        kp, near = people["keypoints"][sl], people["near"]
        init = None if init_kind == "mean" else FitInit(near.pose[sl], near.betas[sl], near.cam_t[sl])
        for name, config in configs.items():
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            result = fit(model, prior, kp, init=init, config=config)
            sync(device)
            runs[name]["wall"].append(time.perf_counter() - wall)
            runs[name]["cpu"].append(time.process_time() - cpu)
            runs[name]["results"].append(result)
    gt = torch.cat([people["joints3d"][sl] for sl in slices])
    if init_kind == "mean":
        init_pose = default_mean_pose(prior).to(device).expand(len(gt), -1)
        init_betas = torch.zeros(len(gt), 10, device=device)
    else:
        init_pose = torch.cat([people["near"].pose[sl] for sl in slices])
        init_betas = torch.cat([people["near"].betas[sl] for sl in slices])
    init_mpjpe, init_pa = errors_mm(model, init_pose, init_betas, gt)
    rows = []
    for name, run in runs.items():
        results = run["results"]
        pose = torch.cat([r.pose for r in results])
        betas = torch.cat([r.betas for r in results])
        loss = torch.cat([r.loss for r in results])
        valid = torch.cat([r.valid for r in results])
        iterations = torch.cat([r.iterations for r in results]).float()
        mpjpe, pa = errors_mm(model, pose, betas, gt)
        wall, cpu = statistics.median(run["wall"]), statistics.median(run["cpu"])
        rows.append({
            "solver": name, "batch": batch, "init": init_kind, "repeats": repeats, "people": len(gt),
            "seconds_median": round(wall, 4), "fits_per_s": round(batch / wall, 2),
            "cpu_seconds_median": round(cpu, 4), "fits_per_cpu_s": round(batch / cpu, 2),
            "loss_mean": round(float(loss[torch.isfinite(loss)].mean()), 3),
            "loss_median": round(float(loss.median()), 3),
            "valid_fraction": round(float(valid.float().mean()), 4),
            "mpjpe_mm": round(mpjpe, 1), "pa_mpjpe_mm": round(pa, 1),
            "init_mpjpe_mm": round(init_mpjpe, 1), "init_pa_mpjpe_mm": round(init_pa, 1),
            "iterations_mean": round(float(iterations.mean()), 1), "iterations_max": int(iterations.max()),
        })
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def compare(rows: list[dict], baseline: str = "adam") -> list[dict]:
    """lm against `baseline` per batch and initialization where both ran: speed ratios and
    quality differences (negative loss and PA-MPJPE differences favour lm)."""
    out = []
    for lm in (r for r in rows if r["solver"] == "lm"):
        adam = next((r for r in rows if r["solver"] == baseline and r["batch"] == lm["batch"]
                     and r["init"] == lm["init"]), None)
        if adam is None:
            continue
        out.append({
            "batch": lm["batch"], "init": lm["init"], "baseline": baseline,
            "speedup": round(lm["fits_per_s"] / adam["fits_per_s"], 2),
            "cpu_speedup": round(lm["fits_per_cpu_s"] / adam["fits_per_cpu_s"], 2),
            "loss_mean_diff": round(lm["loss_mean"] - adam["loss_mean"], 3),
            "pa_mpjpe_diff_mm": round(lm["pa_mpjpe_mm"] - adam["pa_mpjpe_mm"], 1),
            "valid_fraction_diff": round(lm["valid_fraction"] - adam["valid_fraction"], 4),
            "at_least_as_good": (lm["loss_mean"] <= adam["loss_mean"] and lm["pa_mpjpe_mm"] <= adam["pa_mpjpe_mm"]
                                 and lm["valid_fraction"] >= adam["valid_fraction"]),
        })
    return out


def compare_same_solver(rows: list[dict]) -> list[dict]:
    """Adam on the keypoint-only body against SPIN's whole-mesh Adam: the speed the forward path
    alone buys, and a check that the fits agree."""
    out = []
    for spin in (r for r in rows if r["solver"] == "spin"):
        adam = next(r for r in rows if r["solver"] == "adam" and r["batch"] == spin["batch"] and r["init"] == spin["init"])
        out.append({"batch": spin["batch"], "init": spin["init"],
                    "speedup": round(adam["fits_per_s"] / spin["fits_per_s"], 2),
                    "cpu_speedup": round(adam["fits_per_cpu_s"] / spin["fits_per_cpu_s"], 2),
                    "loss_mean_diff": round(adam["loss_mean"] - spin["loss_mean"], 3),
                    "pa_mpjpe_diff_mm": round(adam["pa_mpjpe_mm"] - spin["pa_mpjpe_mm"], 1)})
    return out


def converged_adam(model, prior, people, batch: int, factor: int, device) -> dict:
    """Near the truth, is the gap in PA-MPJPE between the solvers the solver's or the energy's?
    Adam with `factor` times SPIN's body-stage steps against both defaults, on the same people."""
    near, sl = people["near"], slice(0, batch)
    init = FitInit(near.pose[sl], near.betas[sl], near.cam_t[sl])
    long = solver_config(SmplifyConfig(), "adam").to_dict()
    long["stages"][1]["iterations"] *= factor
    out = {"batch": batch, "init": "near", "adam_body_iterations": long["stages"][1]["iterations"]}
    for name, config in (("adam", solver_config(SmplifyConfig(), "adam")), ("lm", SmplifyConfig()),
                         ("adam_long", SmplifyConfig.from_dict(long))):
        result = fit(model, prior, people["keypoints"][sl], init=init, config=config)
        _, pa = errors_mm(model, result.pose, result.betas, people["joints3d"][sl])
        out[name] = {"loss_mean": round(float(result.loss.mean()), 3), "pa_mpjpe_mm": round(pa, 1)}
    return out


def time_forward(model: BodyModel, batch: int, repeats: int, device) -> dict:
    """Keypoints forward+backward: the full mesh (BodyModel) vs the keypoint-only body."""
    body = KeypointBody(model)
    pose = (0.3 * torch.randn(batch, 72, device=device)).requires_grad_(True)
    betas = torch.zeros(batch, 10, device=device, requires_grad=True)
    out = {}
    for name, fn in (("full_mesh", lambda: model(pose, betas).keypoints), ("keypoint_body", lambda: body(pose, betas))):
        fn().sum().backward()  # warm-up
        samples = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            fn().sum().backward()
            sync(device)
            samples.append(time.perf_counter() - start)
        out[f"{name}_ms"] = round(1000 * statistics.median(samples), 3)
    out["speedup"] = round(out["full_mesh_ms"] / out["keypoint_body_ms"], 1)
    return {"batch": batch, "support_vertices": body.num_support, **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,64,512,4096")
    parser.add_argument("--repeats", default="5,3,2,1", help="repeats per batch size")
    parser.add_argument("--seed", type=int, default=1000, help="pose seed (the built-in prior uses 0)")
    parser.add_argument("--noise-px", type=float, default=2.0)
    parser.add_argument("--drop", type=float, default=0.1, help="fraction of keypoints dropped")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="body model .npz (default: the built-in)")
    parser.add_argument("--spin-batches", default="1,64,512",
                        help="batch sizes at which SPIN's whole-mesh Adam also runs ('' to skip)")
    parser.add_argument("--converged-batch", type=int, default=64,
                        help="people for the check against Adam run 10x longer (0: skip)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    repeats = [int(r) for r in args.repeats.split(",")]
    repeats = (repeats + [repeats[-1]] * len(batches))[:len(batches)]
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = load_body_model(args.model, device=device)
    prior = load_prior(device=device)
    base = SmplifyConfig()
    configs = {name: solver_config(base, name) for name in SOLVERS}
    spin = {"spin": solver_config(base, "adam", forward="mesh")}
    spin_batches = {int(b) for b in args.spin_batches.split(",") if b}
    count = max(b * r for b, r in zip(batches, repeats))
    people = make_people(model, count, args.seed, args.noise_px, args.drop, device)
    load_start = round(os.getloadavg()[0], 2)

    rows = []
    for batch, reps in zip(batches, repeats):
        arms = {**configs, **(spin if batch in spin_batches else {})}
        for config in arms.values():  # warm-up
            short = config.to_dict()
            short["stages"] = [{**stage, "iterations": 2} for stage in short["stages"]]
            fit(model, prior, people["keypoints"][:batch], config=SmplifyConfig.from_dict(short))
        for init_kind in ("mean", "near"):
            rows.extend(run_case(model, prior, people, batch, init_kind, reps,
                                 arms if init_kind == "mean" else configs, device))

    report = {
        "benchmark": "smplify",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_1m_at_start": load_start,
                    "load_average_1m_at_end": round(os.getloadavg()[0], 2),
                    "torch": torch.__version__, "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "model": {"path": model.name if args.model else "built-in", "vertices": model.num_vertices},
        "data": {"seed": args.seed, "noise_px": args.noise_px, "drop": args.drop, "yaw_deg": 45,
                 "near_init": "pose + N(0, 0.1) rad, betas + N(0, 0.3), depth x (1 + N(0, 0.05)), xy + N(0, 0.02) m"},
        "smplify": {name: config.to_dict() for name, config in {**configs, **spin}.items()},
        "lm_vs_spin": compare(rows, "spin"),
        "lm_vs_adam": compare(rows),
        "adam_vs_spin": compare_same_solver(rows),
        "fits": rows,
        "near_truth_vs_adam_run_longer": (converged_adam(model, prior, people, args.converged_batch, 10, device)
                                          if args.converged_batch else None),
        "keypoint_forward": [time_forward(model, b, 10, device) for b in (64, 512)],
    }
    emit(report, args.out)


def emit(report: dict, out: str | None) -> None:
    """Print the report as JSON and, with `out`, write it there too."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


if __name__ == "__main__":
    main()
