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

On a GPU (--device cuda) the LM fit also runs in each mode of --lm-modes (`lm_dynamic`,
`lm_static`, `lm_graph`; `lm` is the default 'auto', which on a GPU records CUDA graphs and
fits batches of up to cpu_batch_max samples on the CPU); each row says the mode and the device
that ran. A graph arm's first call per batch size records the graph and is timed apart
(`first_call_seconds`). --quality-people N fits the first N people again on the CPU with the
CPU's default (mode 'dynamic'), and `equal_quality` sets loss, validity and PA-MPJPE of every LM
arm beside the CPU's on the same people; --cpu-baseline-batches times the CPU's LM fit at those
batch sizes in the same run (`vs_cpu`); `graph_vs_eager` divides the graph arm's fits/s by the
eager arms'. Each batch size runs on its own: a failure is
recorded under `errors` and the next size runs; with --budget-s, sizes that would start after
the budget are listed under `skipped`. With --out the JSON is rewritten after every batch size.

    python bench/smplify.py --threads 1 [--batches 1,64,512,4096] [--out bench/results/smplify_cpu.json]
    python bench/smplify.py --device cuda --batches 1,64,4096,16384,65536 --repeats 5,3,2,2,1 \
        --lm-modes auto,dynamic,static,graph --adam-batches '' --spin-batches '' --converged-batch 0 \
        --forward-batches '' --quality-people 4096 --cpu-baseline-batches 1,64 --budget-s 150
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
from fitting.smplify import FitInit, FitResult, Smplify, SmplifyConfig, default_mean_pose, fit  # noqa: E402

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


def init_of(people: dict, init_kind: str, sl: slice) -> FitInit | None:
    near = people["near"]
    return None if init_kind == "mean" else FitInit(near.pose[sl], near.betas[sl], near.cam_t[sl])


def quality(model, results: list[FitResult], joints3d: torch.Tensor) -> dict:
    """Loss, validity, MPJPE / PA-MPJPE and iterations of fits of the people in joints3d."""
    pose = torch.cat([r.pose for r in results]).to(joints3d.device)
    betas = torch.cat([r.betas for r in results]).to(joints3d.device)
    loss = torch.cat([r.loss for r in results]).cpu()
    valid = torch.cat([r.valid for r in results]).cpu()
    iterations = torch.cat([r.iterations for r in results]).float().cpu()
    mpjpe, pa = errors_mm(model, pose, betas, joints3d)
    return {"loss_mean": round(float(loss[torch.isfinite(loss)].mean()), 3),
            "loss_median": round(float(loss.median()), 3),
            "valid_fraction": round(float(valid.float().mean()), 4),
            "mpjpe_mm": round(mpjpe, 1), "pa_mpjpe_mm": round(pa, 1),
            "iterations_mean": round(float(iterations.mean()), 1), "iterations_max": int(iterations.max())}


def warm_up(name: str, fitter: Smplify, people: dict, batch: int, device) -> float | None:
    """An arm that fits this batch size by a graph records it with one full call (timed and
    returned); any other arm (or size) runs once with 2 steps per stage, as before the timed repeats."""
    kp = people["keypoints"][:batch]
    if not fitter.routes_to_cpu(batch) and fitter.batch_mode(batch) == "graph":
        sync(device)
        start = time.perf_counter()
        fitter(kp)
        sync(device)
        return time.perf_counter() - start
    short = fitter.config.to_dict()
    short["stages"] = [{**stage, "iterations": 2} for stage in short["stages"]]
    Smplify(fitter.model, fitter.prior, SmplifyConfig.from_dict(short), reuse=False)(kp)
    return None


def run_case(model, prior, people, batch: int, init_kind: str, repeats: int, fitters: dict, device,
             first_calls: dict | None = None) -> tuple[list[dict], dict]:
    """Every arm on the same `repeats` disjoint batches (batch 1 still averages over people) ->
    (rows, each arm's results on the first batch)."""
    runs = {name: {"wall": [], "cpu": [], "results": []} for name in fitters}
    slices = [slice(r * batch, (r + 1) * batch) for r in range(repeats)]
    for sl in slices:
        kp, init = people["keypoints"][sl], init_of(people, init_kind, sl)
        for name, fitter in fitters.items():
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            result = fitter(kp, init)
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
        wall, cpu = statistics.median(run["wall"]), statistics.median(run["cpu"])
        measured = quality(model, results, gt)
        rows.append({
            "solver": name, "batch": batch, "init": init_kind, "repeats": repeats, "people": len(gt),
            "mode": "+".join(sorted({r.mode for r in results})),
            "fit_device": "+".join(sorted({r.device for r in results})),
            "seconds_median": round(wall, 4), "fits_per_s": round(batch / wall, 2),
            "cpu_seconds_median": round(cpu, 4), "fits_per_cpu_s": round(batch / cpu, 2),
            **{k: measured[k] for k in ("loss_mean", "loss_median", "valid_fraction", "mpjpe_mm", "pa_mpjpe_mm")},
            "init_mpjpe_mm": round(init_mpjpe, 1), "init_pa_mpjpe_mm": round(init_pa, 1),
            "iterations_mean": measured["iterations_mean"], "iterations_max": measured["iterations_max"],
        })
        if first_calls and first_calls.get(name) is not None:
            rows[-1]["first_call_seconds"] = round(first_calls[name], 3)
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows, {name: run["results"][0] for name, run in runs.items()}


def equal_quality(model_cpu, reference: dict, people: dict, batch: int, init_kind: str, firsts: dict) -> list[dict]:
    """Each arm's fits of the first people of a batch beside the CPU's default fits of the same
    people (`reference`: init kind -> CPU FitResult of the first --quality-people people)."""
    cpu = reference[init_kind]
    count = min(batch, cpu.loss.shape[0])
    gt = people["joints3d"][:count].cpu()
    def part(result: FitResult) -> FitResult:
        return FitResult(**{k: (v[:count].cpu() if torch.is_tensor(v) else v) for k, v in vars(result).items()})

    base = quality(model_cpu, [part(cpu)], gt)
    out = []
    for name, result in firsts.items():
        gpu = part(result)
        measured = quality(model_cpu, [gpu], gt)
        finite = torch.isfinite(cpu.loss[:count]) & torch.isfinite(gpu.loss)
        out.append({
            "batch": batch, "init": init_kind, "arm": name, "mode": gpu.mode, "fit_device": gpu.device,
            "people": count, "cpu": base, "gpu": measured,
            "loss_mean_diff": round(measured["loss_mean"] - base["loss_mean"], 3),
            "valid_fraction_diff": round(measured["valid_fraction"] - base["valid_fraction"], 4),
            "pa_mpjpe_diff_mm": round(measured["pa_mpjpe_mm"] - base["pa_mpjpe_mm"], 1),
            "loss_max_abs_diff": round(float((gpu.loss - cpu.loss[:count])[finite].abs().max()), 4),
            "same_validity_fraction": round(float((gpu.valid == cpu.valid[:count]).float().mean()), 4),
            "same_iterations_fraction": round(float((gpu.iterations == cpu.iterations[:count]).float().mean()), 4),
        })
        print(json.dumps({k: v for k, v in out[-1].items() if k not in ("cpu", "gpu")}), file=sys.stderr)
    return out


def graph_ratios(rows: list[dict]) -> list[dict]:
    """Per batch and initialization: fits/s of the graph arm over each eager LM arm's."""
    out = []
    for graph in (r for r in rows if r["solver"] == "lm_graph"):
        same = {r["solver"]: r for r in rows if r["batch"] == graph["batch"] and r["init"] == graph["init"]}
        out.append({"batch": graph["batch"], "init": graph["init"],
                    **{f"graph_vs_{name}": round(graph["fits_per_s"] / same[name]["fits_per_s"], 2)
                       for name in ("lm_dynamic", "lm_static", "lm") if name in same}})
    return out


def cpu_ratios(rows: list[dict], cpu_rows: list[dict]) -> list[dict]:
    """Per batch and initialization that the CPU also ran: every arm's fits/s over the CPU's LM fit."""
    out = []
    for cpu in cpu_rows:
        same = [r for r in rows if r["batch"] == cpu["batch"] and r["init"] == cpu["init"]]
        out.append({"batch": cpu["batch"], "init": cpu["init"], "cpu_fits_per_s": cpu["fits_per_s"],
                    **{f"{r['solver']}_vs_cpu": round(r["fits_per_s"] / cpu["fits_per_s"], 2) for r in same}})
    return out


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
        adam = next((r for r in rows if r["solver"] == "adam" and r["batch"] == spin["batch"]
                     and r["init"] == spin["init"]), None)
        if adam is None:
            continue
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


LM_ARMS = {"auto": "lm", "dynamic": "lm_dynamic", "static": "lm_static", "graph": "lm_graph"}


def sizes(text: str) -> list[int]:
    return [int(b) for b in text.split(",") if b]


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
    parser.add_argument("--lm-modes", default="auto",
                        help="SmplifyConfig modes of the LM arms: auto (the arm 'lm'), dynamic, static, graph")
    parser.add_argument("--adam-batches", default=None, help="batch sizes at which Adam runs (default: all; '' to skip)")
    parser.add_argument("--spin-batches", default="1,64,512",
                        help="batch sizes at which SPIN's whole-mesh Adam also runs ('' to skip)")
    parser.add_argument("--converged-batch", type=int, default=64,
                        help="people for the check against Adam run 10x longer (0: skip)")
    parser.add_argument("--forward-batches", default="64,512", help="batch sizes of the keypoint forward table ('' to skip)")
    parser.add_argument("--quality-people", type=int, default=0,
                        help="on a GPU: fit this many of the first people on the CPU too, for equal_quality (0: skip)")
    parser.add_argument("--cpu-baseline-batches", default="",
                        help="on a GPU: batch sizes at which the LM fit is also timed on the CPU, for gpu_vs_cpu")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="start no batch size after this many seconds (0: no limit)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    began = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = sizes(args.batches)
    repeats = sizes(args.repeats)
    repeats = (repeats + [repeats[-1]] * len(batches))[:len(batches)]
    modes = [m for m in args.lm_modes.split(",") if m]
    unknown = sorted(set(modes) - set(LM_ARMS))
    if unknown:
        parser.error(f"--lm-modes: unknown mode {unknown[0]!r} (known: {', '.join(LM_ARMS)})")
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = load_body_model(args.model, device=device)
    prior = load_prior(device=device)
    base = SmplifyConfig()
    configs = {"adam": solver_config(base, "adam"),
               **{LM_ARMS[m]: SmplifyConfig.from_dict({**base.to_dict(), "mode": m}) for m in modes}}
    spin = {"spin": solver_config(base, "adam", forward="mesh")}
    fitters = {name: Smplify(model, prior, config) for name, config in {**configs, **spin}.items()}
    adam_batches = set(batches if args.adam_batches is None else sizes(args.adam_batches))
    spin_batches = set(sizes(args.spin_batches))
    count = max(b * r for b, r in zip(batches, repeats))
    people = make_people(model, count, args.seed, args.noise_px, args.drop, device)
    load_start = round(os.getloadavg()[0], 2)
    on_cpu = bool(args.quality_people or args.cpu_baseline_batches)
    model_cpu = load_body_model(args.model, device="cpu") if on_cpu else None
    prior_cpu = load_prior(device="cpu") if on_cpu else None
    cpu_fitter = Smplify(model_cpu, prior_cpu, base) if on_cpu else None
    reference = {}
    if args.quality_people:
        first = slice(0, min(args.quality_people, count))
        cpu_people = {"keypoints": people["keypoints"][first].cpu(),
                      "near": FitInit(*(t[first].cpu() for t in vars(people["near"]).values()))}
        reference = {kind: cpu_fitter(cpu_people["keypoints"], init_of(cpu_people, kind, slice(None)))
                     for kind in ("mean", "near")}

    report = {
        "benchmark": "smplify",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_1m_at_start": load_start,
                    "torch": torch.__version__, "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "model": {"path": model.name if args.model else "built-in", "vertices": model.num_vertices},
        "data": {"seed": args.seed, "noise_px": args.noise_px, "drop": args.drop, "yaw_deg": 45,
                 "near_init": "pose + N(0, 0.1) rad, betas + N(0, 0.3), depth x (1 + N(0, 0.05)), xy + N(0, 0.02) m"},
        "smplify": {name: fitter.config.to_dict() for name, fitter in fitters.items()},
    }
    rows, cpu_rows, quality_rows, errors, skipped = [], [], [], [], []
    for batch, reps in zip(batches, repeats):
        if args.budget_s and time.perf_counter() - began > args.budget_s:
            skipped.append(batch)
            continue
        try:
            arms = {name: fitter for name, fitter in fitters.items()
                    if (name != "adam" or batch in adam_batches) and (name != "spin" or batch in spin_batches)}
            first_calls = {name: warm_up(name, fitter, people, batch, device) for name, fitter in arms.items()}
            for init_kind in ("mean", "near"):
                timed = arms if init_kind == "mean" else {k: v for k, v in arms.items() if k != "spin"}
                case, firsts = run_case(model, prior, people, batch, init_kind, reps, timed, device, first_calls)
                rows.extend(case)
                if reference:
                    quality_rows.extend(equal_quality(model_cpu, reference, people, batch, init_kind,
                                                      {k: v for k, v in firsts.items() if k.startswith("lm")}))
                if cpu_fitter is not None and batch in sizes(args.cpu_baseline_batches):
                    cpu_case, _ = run_case(model_cpu, prior_cpu, cpu_copy(people, batch * reps), batch, init_kind,
                                           reps, {"lm_cpu": cpu_fitter}, torch.device("cpu"))
                    cpu_rows.extend(cpu_case)
        except Exception as exc:  # noqa: BLE001 - one batch size failing must not lose the others
            errors.append({"batch": batch, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:800]}"})
            print(json.dumps(errors[-1]), file=sys.stderr)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report.update(results(rows, cpu_rows, quality_rows, errors, skipped, fitters))
        write(report, args.out)

    report["near_truth_vs_adam_run_longer"] = (converged_adam(model, prior, people, args.converged_batch, 10, device)
                                               if args.converged_batch else None)
    report["keypoint_forward"] = [time_forward(model, b, 10, device) for b in sizes(args.forward_batches)]
    report["machine"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    report["seconds"] = round(time.perf_counter() - began, 1)
    emit(report, args.out)


def cpu_copy(people: dict, count: int) -> dict:
    """The first `count` people's keypoints, truth and near start, on the CPU."""
    near = FitInit(*(t[:count].cpu() for t in vars(people["near"]).values()))
    return {"keypoints": people["keypoints"][:count].cpu(), "joints3d": people["joints3d"][:count].cpu(),
            "near": near}


def results(rows: list[dict], cpu_rows: list[dict], quality_rows: list[dict], errors: list[dict],
            skipped: list[int], fitters: dict) -> dict:
    graphs = {name: fitter.graphs.recorded for name, fitter in fitters.items() if fitter.graphs is not None}
    return {"lm_vs_spin": compare(rows, "spin"), "lm_vs_adam": compare(rows), "adam_vs_spin": compare_same_solver(rows),
            "fits": rows, "cpu_fits": cpu_rows, "graph_vs_eager": graph_ratios(rows),
            "vs_cpu": cpu_ratios(rows, cpu_rows),
            "equal_quality": quality_rows, "graphs_recorded": graphs, "errors": errors, "skipped": skipped}


def emit(report: dict, out: str | None) -> None:
    """Print the report as JSON and, with `out`, write it there too."""
    print(write(report, out))


def write(report: dict, out: str | None) -> str:
    """Write the report as JSON to `out` (if given) and return the text."""
    text = json.dumps(report, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
