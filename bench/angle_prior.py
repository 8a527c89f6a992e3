"""What SMPLify's angle prior does to the fits on the built-in benchmark. For each angle prior
weight: SMPLify from the mean pose (as round 0 fits) and from the true pose (where the objective
itself pulls), on the same train people of the keypoints benchmark. Prints JSON per weight and
start: PA-MPJPE against the truth (mm), the systematic bend per joint (the angle of the mean
rotation from the true to the fitted one, degrees: 0 when the fits err in no common direction),
and the share of fits with an elbow or knee bent the wrong way by more than 10 degrees (the truth
has none; the angle prior exists to prevent them).

    python bench/angle_prior.py [--people 2000] [--weights 0,2,5,10,15.2] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fitting.body_model import load_body_model  # noqa: E402
from fitting.camera import estimate_translation, normalized_to_pixels  # noqa: E402
from fitting.priors import angle_prior_residuals, load_prior  # noqa: E402
from fitting.smplify import FitInit, SmplifyConfig, fit  # noqa: E402
from trainer.data.synth import SynthConfig  # noqa: E402
from trainer.data.synth_run import generate  # noqa: E402
from trainer.data.tables import fits_table, read_split, to_numpy  # noqa: E402
from trainer.evaluate import evaluate_fits  # noqa: E402
from trainer.metrics import shared_rotation_error  # noqa: E402

JOINTS = {"hip": 1, "knee": 4, "shoulder": 16, "elbow": 18}   # SMPL's left ones (the right match them)


def systematic_bend(pose: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """(N, 72) fitted and true poses -> per joint, degrees of the mean relative rotation."""
    degrees = shared_rotation_error(pose, truth)
    return {name: round(float(degrees[j]), 2) for name, j in JOINTS.items()}


def wrong_way_share(pose: torch.Tensor, degrees: float = 10.0) -> float:
    """(N, 72) -> share of fits with an elbow or knee bent the wrong way by more than `degrees`."""
    wrong = angle_prior_residuals(pose[:, 3:]).log() > np.radians(degrees)
    return round(float(wrong.any(dim=-1).float().mean()), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", type=int, default=2000)
    parser.add_argument("--weights", default="0,2,5,10,15.2", help="angle prior weights (SPIN's: 15.2)")
    parser.add_argument("--seed", type=int, default=7, help="benchmark seed of the people (the presets use 0)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    body, prior = load_body_model(), load_prior()
    with tempfile.TemporaryDirectory() as tmp:
        generate(SynthConfig.from_preset("keypoints", seed=args.seed, num_train=args.people, num_test=0), tmp,
                 progress=False)
        samples, truth = read_split(Path(tmp), "train"), read_split(Path(tmp), "truth")
    ids = samples.column("sample_id").to_pylist()
    true_pose = torch.as_tensor(to_numpy(truth, "pose"), dtype=torch.float32)
    true_betas = torch.as_tensor(to_numpy(truth, "betas"), dtype=torch.float32)
    keypoints = normalized_to_pixels(torch.from_numpy(to_numpy(samples, "keypoints").copy()))
    with torch.no_grad():
        cam = estimate_translation(body(true_pose, true_betas).keypoints, keypoints)
    rows = []
    for weight in (float(w) for w in args.weights.split(",")):
        config = replace(SmplifyConfig(), angle_prior_weight=weight)
        for start, init in (("mean", None), ("truth", FitInit(true_pose, true_betas, cam))):
            began = time.perf_counter()
            result = fit(body, prior, keypoints, init, config)
            seconds = time.perf_counter() - began
            table = fits_table(ids, pose=result.pose.numpy(), betas=result.betas.numpy(), cam_t=result.cam_t.numpy(),
                               loss=result.loss.numpy(), joint_loss=result.joint_loss.numpy(),
                               valid=result.valid.numpy(), betas_ok=result.betas_ok.numpy(), found_in_round=0,
                               init=start, iterations=result.iterations.numpy())
            scores = evaluate_fits(table, truth, body)
            rows.append({"angle_prior_weight": weight, "start": start, "pa_mpjpe": round(scores["pa_mpjpe"], 2),
                         "mpjpe": round(scores["mpjpe"], 2), "acceptance": round(scores["acceptance_rate"], 4),
                         "systematic_bend_deg": systematic_bend(result.pose, true_pose),
                         "wrong_way_share": wrong_way_share(result.pose), "seconds": round(seconds, 2)})
            print(json.dumps(rows[-1]), file=sys.stderr)
    out = {"command": "python bench/angle_prior.py " + " ".join(sys.argv[1:]), "people": args.people,
           "benchmark_seed": args.seed, "truth_wrong_way_share": wrong_way_share(true_pose),
           "truth_mean_bend_deg": {name: round(float(torch.rad2deg(true_pose.reshape(-1, 24, 3)[:, j].norm(dim=-1)).mean()), 2)
                                   for name, j in JOINTS.items()},
           "machine": {"processor": platform.processor() or platform.machine(), "threads": args.threads,
                       "torch": torch.__version__},
           "rows": rows}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
