"""Where this project's SMPLify and fits dictionary differ from SPIN's code on purpose, and what
each difference changes, measured on the same people in one run. Prints JSON.

People as in bench/smplify.py: poses from the pose sampler, shapes N(0, 1), facing the camera
within +-45 degrees, the built-in model's 49 keypoints projected into SPIN's 224-px crop with
2 px noise and 10% of them dropped (confidence 0). Four comparisons, each "ours" against
"SPIN's" with everything else equal:

1. solver: Levenberg-Marquardt (ours) against SPIN's Adam (100 + 100 steps, its last iterate),
   from the mean pose.
2. best_iterate: Adam keeping each sample's lowest-energy iterate (ours, for `solver: adam`)
   against its last iterate (SPIN's); LM accepts only steps that lower the energy, so for LM the
   two are the same.
3. camera_torso: the camera stage on people whose ground-truth torso misses one joint and whose
   OpenPose torso is incomplete (so the ground-truth torso is used): ours leaves the missing
   joint out; SPIN's camera loss has no confidence and pulls it to its stored placeholder, the
   crop centre where this pipeline stores an absent keypoint (SPIN's own placeholder is the
   crop image of the source pixel (0, 0)).
4. old_fit_camera: deciding whether a new fit replaces the previous best fit. Ours re-scores the
   old fit with the camera it was fitted with; SPIN re-estimates that camera from the
   ground-truth 2D keypoints (`estimate_translation`, its 24 ground-truth rows) each time. The
   old fits are LM fits from the mean pose (round 0); the new fits are LM fits started near the
   truth (a stand-in for a trained regressor's prediction).

Errors are MPJPE / PA-MPJPE (mm) over the 14 LSP joints of the model's keypoints (the built-in
benchmark's protocol); loss is SPIN's fitting loss (mean over the 49 keypoints, crop pixels),
valid means loss < 100.

    python bench/spin_deviations.py --threads 1 [--people 512] [--out bench/results/spin_deviations_cpu.json]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.smplify import emit, errors_mm, make_people  # noqa: E402
from fitting.body_model import load_body_model  # noqa: E402
from fitting.camera import estimate_translation  # noqa: E402
from fitting.keypoints import GT24, GT_TORSO, OP_TORSO  # noqa: E402
from fitting.priors import load_prior  # noqa: E402
from fitting.smplify import FitInit, SmplifyConfig, fit, score  # noqa: E402

CROP_CENTRE = 112.0
CONF_SEEN_BY_SPIN = 1e-12  # above 0, so the camera stage uses the joint; no weight anywhere else


def summary(model, result, joints3d, seconds: float | None = None) -> dict:
    mpjpe, pa = errors_mm(model, result.pose, result.betas, joints3d)
    out = {"loss_mean": round(float(result.loss[torch.isfinite(result.loss)].mean()), 3),
           "valid_fraction": round(float(result.valid.float().mean()), 4),
           "mpjpe_mm": round(mpjpe, 1), "pa_mpjpe_mm": round(pa, 1)}
    if seconds is not None:
        out["fits_per_s"] = round(len(result.loss) / seconds, 2)
    return out


def timed_fit(model, prior, keypoints, init, config):
    start = time.perf_counter()
    result = fit(model, prior, keypoints, init, config)
    return result, time.perf_counter() - start


def effect(ours: dict, spin: dict) -> dict:
    """ours - SPIN's, for the numbers both have (negative loss / error differences favour ours)."""
    return {f"{k}_diff": round(ours[k] - spin[k], 4) for k in ours if k in spin and k != "fits_per_s"}


def solver_and_best_iterate(model, prior, people) -> dict:
    adam = SmplifyConfig().with_solver("adam")
    adam_last = SmplifyConfig.from_dict({"stages": [{**s, "options": {**s["options"], "last_iterate": 1}}
                                                    for s in adam.to_dict()["stages"]]})
    kp, gt = people["keypoints"], people["joints3d"]
    runs = {name: timed_fit(model, prior, kp, None, config)
            for name, config in (("lm", SmplifyConfig()), ("adam_best", adam), ("adam_last_spin", adam_last))}
    rows = {name: summary(model, result, gt, seconds) for name, (result, seconds) in runs.items()}
    return {
        "solver": {"ours_lm": rows["lm"], "spin_adam_last": rows["adam_last_spin"],
                   "effect": effect(rows["lm"], rows["adam_last_spin"]),
                   "speedup": round(rows["lm"]["fits_per_s"] / rows["adam_last_spin"]["fits_per_s"], 2)},
        "best_iterate": {"ours_adam_best": rows["adam_best"], "spin_adam_last": rows["adam_last_spin"],
                         "effect": effect(rows["adam_best"], rows["adam_last_spin"])},
    }


def camera_torso(model, prior, people, seed: int) -> dict:
    """The people whose eight torso keypoints were all detected, each with one ground-truth and
    one OpenPose torso joint then taken away."""
    rng = np.random.default_rng(seed)
    whole = (people["keypoints"][:, list(GT_TORSO) + list(OP_TORSO), 2] > 0).all(dim=1)
    kp, joints3d = people["keypoints"][whole].clone(), people["joints3d"][whole]
    n = len(kp)
    rows = torch.arange(n)
    missing_gt = torch.as_tensor(np.asarray(GT_TORSO)[rng.integers(0, 4, n)])
    missing_op = torch.as_tensor(np.asarray(OP_TORSO)[rng.integers(0, 4, n)])
    for joint in (missing_gt, missing_op):
        kp[rows, joint, :2] = CROP_CENTRE
        kp[rows, joint, 2] = 0.0
    spin_kp = kp.clone()
    spin_kp[rows, missing_gt, 2] = CONF_SEEN_BY_SPIN
    ours = summary(model, fit(model, prior, kp, None, SmplifyConfig()), joints3d)
    spin = summary(model, fit(model, prior, spin_kp, None, SmplifyConfig()), joints3d)
    return {"people": n, "ours_left_out": ours, "spin_pulled_to_placeholder": spin, "effect": effect(ours, spin)}


def old_fit_camera(model, prior, people) -> dict:
    kp, gt, near = people["keypoints"], people["joints3d"], people["near"]
    config = SmplifyConfig()
    old = fit(model, prior, kp, None, config)
    new = fit(model, prior, kp, FitInit(near.pose, near.betas, near.cam_t), config)
    with torch.no_grad():
        gt_rows = list(GT24)
        joints = model(old.pose, old.betas).keypoints
        spin_cam = estimate_translation(joints[:, gt_rows], kp[:, gt_rows])
    kept_loss, _ = score(model, prior, old.pose, old.betas, old.cam_t, kp, config)
    spin_loss, _ = score(model, prior, old.pose, old.betas, spin_cam, kp, config)
    out = {"people": len(kp), "new_fit": summary(model, new, gt), "old_fit": summary(model, old, gt)}
    for name, loss in (("ours_camera_kept", kept_loss), ("spin_camera_reestimated", spin_loss)):
        replace = new.loss < loss
        pose = torch.where(replace[:, None], new.pose, old.pose)
        betas = torch.where(replace[:, None], new.betas, old.betas)
        merged_loss = torch.where(replace, new.loss, loss)
        mpjpe, pa = errors_mm(model, pose, betas, gt)
        out[name] = {"old_loss_mean": round(float(loss.mean()), 3),
                     "old_valid_fraction": round(float((loss < config.loss_threshold).float().mean()), 4),
                     "replaced_fraction": round(float(replace.float().mean()), 4),
                     "merged_valid_fraction": round(float((merged_loss < config.loss_threshold).float().mean()), 4),
                     "merged_mpjpe_mm": round(mpjpe, 1), "merged_pa_mpjpe_mm": round(pa, 1)}
    out["effect"] = {k + "_diff": round(out["ours_camera_kept"][k] - out["spin_camera_reestimated"][k], 4)
                     for k in out["ours_camera_kept"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=512)
    parser.add_argument("--seed", type=int, default=1000, help="pose seed (the built-in prior uses 0)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = round(os.getloadavg()[0], 2)
    model, prior = load_body_model(), load_prior()
    people = make_people(model, args.people, args.seed, noise_px=2.0, drop=0.1, device="cpu")
    started = time.perf_counter()
    report = {
        "benchmark": "spin_deviations",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_1m_at_start": load_start, "torch": torch.__version__},
        "data": {"people": args.people, "seed": args.seed, "noise_px": 2.0, "drop": 0.1, "model": "built-in"},
        **solver_and_best_iterate(model, prior, people),
        "camera_torso": camera_torso(model, prior, people, args.seed),
        "old_fit_camera": old_fit_camera(model, prior, people),
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["machine"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    emit(report, args.out)


if __name__ == "__main__":
    main()
