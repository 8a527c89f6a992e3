"""The demo's and the ablation's reports: the mean-pose reference beside every round, the seeds'
mean and sd, the seed-paired ratios and their worst seed (made-up numbers, checked by hand), and
the demo end to end on the tiny keypoint-only benchmark."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from fitting.errors import BadInput
from pipeline.ablation import aggregate_arm, mean_sd, paired_ratios
from pipeline.benchmark import BENCHMARK_SMPLIFY, benchmark_smplify, preset_for
from pipeline.demo import choose_backbone, summarize
from pipeline.report import round_table

# PA-MPJPE by arm and training seed
MADE_UP = {
    "2d-only": {"0": 125.0, "1": 125.0, "2": 100.0},
    "static": {"0": 100.0, "1": 110.0, "2": 90.0},
    "loop": {"0": 85.0, "1": 99.0, "2": 82.8},
    "oracle": {"0": 80.0, "1": 88.0, "2": 72.0},
}


def test_mean_and_sample_sd():
    assert mean_sd([100.0, 110.0, 90.0]) == pytest.approx((100.0, 10.0))
    assert mean_sd([3.0]) == (3.0, None)


def test_seed_paired_ratios_and_their_worst_seed():
    ratios = paired_ratios(MADE_UP)
    loop = ratios["loop_vs_static"]   # 0.85, 0.90, 0.92
    assert loop["by_seed"] == pytest.approx({"0": 0.85, "1": 0.90, "2": 0.92})
    assert loop["mean"] == pytest.approx(0.89) and loop["sd"] == pytest.approx(0.0360555, abs=1e-6)
    assert (loop["worst_seed"], loop["worst"], loop["target"]) == ("2", pytest.approx(0.92), 0.90)
    assert loop["worst_meets_target"] is False   # the mean meets 0.90, its worst seed does not
    static = ratios["static_vs_2d"]   # 0.80, 0.88, 0.90
    assert static["mean"] == pytest.approx(0.86) and static["worst_seed"] == "2" and static["worst_meets_target"] is False
    oracle = ratios["oracle_vs_static"]   # 0.8 on every seed
    assert oracle["sd"] == pytest.approx(0.0) and oracle["target"] is None and oracle["worst_meets_target"] is None
    assert set(paired_ratios({"static": MADE_UP["static"], "loop": MADE_UP["loop"]})) == {"loop_vs_static"}


def test_an_arm_over_seeds():
    by_seed = {s: {"regressor": {"pa_mpjpe": v, "mpjpe": 2 * v, "evaluated_3d": 64, "protocol": "lsp14"},
                   "rounds": [{"round": 0, "reg_pa_mpjpe": v + 10}, {"round": 1, "reg_pa_mpjpe": v}]}
               for s, v in MADE_UP["static"].items()}
    arm = aggregate_arm(by_seed)
    assert arm["regressor"] == pytest.approx({"pa_mpjpe": 100.0, "mpjpe": 200.0, "evaluated_3d": 64})
    assert arm["regressor_sd"]["pa_mpjpe"] == pytest.approx(10.0) and arm["regressor_sd"]["evaluated_3d"] == 0
    assert [r["round"] for r in arm["rounds"]] == [0, 1]
    assert arm["rounds"][0]["reg_pa_mpjpe"] == pytest.approx(110.0) and arm["rounds"][1]["reg_pa_mpjpe_sd"] == pytest.approx(10.0)
    assert arm["by_seed"] == by_seed


def test_the_demo_reports_each_round_beside_the_mean_pose():
    results = [{"round": r, "fit": {"acceptance_rate": 0.99, "found_in_round": {str(r): 10}},
                "train": {"images_per_s": 1000.0}, "seconds": 5.0,
                "eval": {"round": r, "regressor": {"pa_mpjpe": reg, "mpjpe": 2 * reg}, "fits": {"pa_mpjpe": fit}}}
               for r, reg, fit in ((0, 96.0, 100.0), (1, 90.0, 80.0))]
    reference = {"pa_mpjpe": 120.0, "mpjpe": 250.0}
    rows = summarize(results, reference)
    assert [r["regressor_pa_mpjpe_mm"] for r in rows] == [96.0, 90.0]
    assert [r["fit_pa_mpjpe_mm"] for r in rows] == [100.0, 80.0]
    assert [r["mean_pose_pa_mpjpe_mm"] for r in rows] == [120.0, 120.0]
    assert [r["regressor_vs_mean_pose"] for r in rows] == pytest.approx([0.8, 0.75])
    table = round_table(results, reference).splitlines()
    assert "mean-pose PA-MPJPE" in table[0] and "reg/mean" in table[0]
    assert table[2].split()[-3:-1] == ["120.0", "0.75"]
    assert "mean-pose" not in round_table(results)   # `run` keeps its table


def test_the_benchmark_fits_with_its_own_angle_prior_weight_unless_told():
    assert benchmark_smplify() == {"angle_prior_weight": 5.0}
    assert benchmark_smplify({"angle_prior_weight": 15.2, "sigma": 50}) == {"angle_prior_weight": 15.2, "sigma": 50}


@pytest.mark.slow
def test_spins_angle_prior_bends_the_benchmarks_fits_and_the_benchmarks_weight_does_not():
    """Why the benchmark sets angle_prior_weight: SMPLify started from the true pose of its people
    bends elbows and knees further with SPIN's weight (15.2), hardly with the benchmark's."""
    import numpy as np
    import torch

    from fitting.body_model import load_body_model
    from fitting.camera import estimate_translation, normalized_to_pixels
    from fitting.priors import load_prior
    from fitting.smplify import FitInit, SmplifyConfig, fit
    from trainer.data.synth import SynthConfig
    from trainer.data.synth_keypoints import keypoint_chunk
    from trainer.metrics import shared_rotation_error

    records = keypoint_chunk(SynthConfig.from_preset("keypoints", seed=3, num_train=100, num_test=0), "train", 0, 100)
    pose = torch.as_tensor(np.stack([r["pose"] for r in records]), dtype=torch.float32)
    betas = torch.as_tensor(np.stack([r["betas"] for r in records]), dtype=torch.float32)
    keypoints = normalized_to_pixels(torch.as_tensor(np.stack([r["keypoints"] for r in records]), dtype=torch.float32))
    body, prior = load_body_model(), load_prior()
    with torch.no_grad():
        cam = estimate_translation(body(pose, betas).keypoints, keypoints)
    bends = {}
    for weight in (SmplifyConfig().angle_prior_weight, BENCHMARK_SMPLIFY["angle_prior_weight"]):
        fitted = fit(body, prior, keypoints, FitInit(pose, betas, cam), SmplifyConfig(angle_prior_weight=weight)).pose
        bends[weight] = shared_rotation_error(fitted, pose)[[4, 5, 18, 19]].tolist()   # knees, elbows
    assert min(bends[15.2]) > 8.0, bends
    assert max(bends[5.0]) < 5.0, bends


def test_the_backbone_and_preset_choice():
    assert choose_backbone(None, gpu=False)[0] == "keypoints" and "no GPU" in choose_backbone(None, gpu=False)[1]
    assert choose_backbone(None, gpu=True)[0] is None
    assert choose_backbone("small", gpu=False) == ("small", "backbone small (--backbone)")
    assert preset_for("keypoints", None) == "keypoints" and preset_for(None, None) == "small"
    assert preset_for("keypoints", "tiny") == "tiny"   # keypoints read from a rendered split too
    with pytest.raises(BadInput, match="keypoints without images"):
        preset_for("small", "keypoints")


@pytest.mark.slow
def test_demo_closes_the_loop_on_keypoints(tmp_path):
    """`spin-pipeline demo` on the tiny keypoint-only benchmark, as a user runs it: the first line
    names the regressor, the console stays short, and summary.json carries the regressor's and
    the fits' PA-MPJPE per round beside the mean-pose reference."""
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "demo", "--preset", "tiny-keypoints", "--rounds", "2", "--out", str(out)]
        + ([] if not _has_gpu() else ["--backbone", "keypoints"]),
        capture_output=True, text=True, timeout=1200, env={**os.environ})
    assert result.returncode == 0, result.stderr
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    assert "keypoint" in lines[0] and "240 train people, keypoints only" in lines[1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backbone"] == "keypoints" and summary["mean_pose_reference"]["pa_mpjpe"] > 0
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    for row in summary["rounds"]:
        assert row["regressor_pa_mpjpe_mm"] > 0 and row["fit_pa_mpjpe_mm"] > 0
        assert row["mean_pose_pa_mpjpe_mm"] == summary["mean_pose_reference"]["pa_mpjpe"]
        assert row["regressor_vs_mean_pose"] == pytest.approx(row["regressor_pa_mpjpe_mm"] / row["mean_pose_pa_mpjpe_mm"])
    assert any(p.endswith("regressor_overlays.png") for p in summary["pictures"])
    assert any(p.endswith("fit_overlays.png") for p in summary["pictures"])   # keypoint-only rows on a blank crop
    assert "mean-pose PA-MPJPE" in result.stdout
    config = yaml.safe_load((out / "run" / "config.yaml").read_text())
    assert config["fit"]["smplify"] == BENCHMARK_SMPLIFY   # the benchmark's SMPLify settings, recorded


def test_a_bad_smplify_setting_stops_the_demo_before_its_benchmark(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--smplify", "angle_prior_weight=-1",
                             "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: --smplify: 'angle_prior_weight'")
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
