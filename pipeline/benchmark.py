"""The built-in benchmark as the demo and the ablation use it: which benchmark and trainer presets
go together, the regressor each picks, the benchmark made once, and the mean-pose reference
that a regressor has to beat to have learned anything."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fitting.errors import BadInput
from pipeline.config import RunConfig, load_run_body_model, run_models
from trainer.data.synth import SynthConfig
from trainer.data.synth_run import generate
from trainer.evaluate import evaluate_mean_pose
from trainer.mean_params import load_mean_params, mean_pose_axis_angle
from trainer.train_config import train_config

IMAGE_BACKBONE = "small"   # the demo's image network (a GPU's default)
KEYPOINT_BACKBONE = "keypoints"

# SMPLify on the built-in benchmark: SPIN's settings, but the angle prior at 5 instead of 15.2.
# SPIN's exp(+-angle)^2 term pushes every elbow and knee to bend further, also where the keypoints
# hold it: started from the true pose, SPIN's weight bent the fits' elbows 18 degrees and knees 13
# further on average, and a regressor learns that bend from its labels. At 5 the bend is 2-4
# degrees; the price is more fits with a joint bent the wrong way (6 % from the mean pose, against
# 0.4 % at 15.2). bench/angle_prior.py measures it; docs/spin.md has the figures.
BENCHMARK_SMPLIFY: dict[str, Any] = {"angle_prior_weight": 5.0}


@dataclass(frozen=True)
class BenchmarkPreset:
    """A benchmark preset (trainer.data.synth) with the trainer preset that fits it. The demo may
    take fewer train people and steps than the ablation, to stay within its time budget."""
    synth: str
    train: str
    demo_people: int | None = None   # the demo's train split (None: the benchmark preset's)
    demo_steps: int | None = None    # the demo's steps per round (None: the trainer preset's)
    ablation_compile: bool = False   # the ablation's train.compile (its --train may say otherwise)


PRESETS: dict[str, BenchmarkPreset] = {
    "tiny": BenchmarkPreset("tiny", "tiny"),
    "small": BenchmarkPreset("small", "small"),
    # five minutes on a 2-core CPU, generation included: 10,000 people at the preset's 1500 steps
    # took 355 s on a quiet one (a round: fit 16-25 s, train 56-71 s), so the demo takes 8,000
    # people and 1000 steps a round; the ablation keeps the preset's 20,000 and 1500
    # The ablation compiles its training step: a minute once (then seconds, from torch's cache) for
    # 1.4-1.5x the samples/s over a dozen trainings; the demo's three would not win the minute back.
    "keypoints": BenchmarkPreset("keypoints", "keypoints", demo_people=8000, demo_steps=1000, ablation_compile=True),
    # tests and CI: the keypoint path end to end in a minute or two
    "tiny-keypoints": BenchmarkPreset("tiny-keypoints", "keypoints", demo_steps=20),
}


def preset_backbone(preset: str) -> str:
    return train_config(PRESETS[preset].train).backbone


def preset_for(backbone: str | None, preset: str | None, image_default: str = "small") -> str:
    """The preset a command runs: the one asked for, else the keypoint benchmark for the keypoint
    regressor and `image_default` for an image backbone. BadInput for an image backbone on a
    benchmark whose train split has no images, before any work."""
    name = preset or ("keypoints" if backbone == KEYPOINT_BACKBONE else image_default)
    if name not in PRESETS:
        raise BadInput(f"unknown preset '{name}' (known: {', '.join(PRESETS)})")
    synth = SynthConfig.from_preset(PRESETS[name].synth)
    if backbone not in (None, KEYPOINT_BACKBONE) and not synth.train_images:
        raise BadInput(f"the {name} benchmark's train split is keypoints without images; a {backbone} backbone "
                       f"reads pixels: use --preset small (or tiny) with it")
    return name


def backbone_override(backbone: str | None, preset: str) -> dict[str, Any]:
    """The run's train.backbone when it differs from the preset's (else nothing: the preset says it)."""
    return {} if backbone in (None, preset_backbone(preset)) else {"train.backbone": backbone}


def benchmark_smplify(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The SMPLify settings of a run on the built-in benchmark (`fit.smplify`): the benchmark's
    own (BENCHMARK_SMPLIFY) with the command's `--smplify` overrides on top."""
    return {**BENCHMARK_SMPLIFY, **(overrides or {})}


def benchmark_config(preset: str, seed: int, demo: bool = False) -> SynthConfig:
    people = PRESETS[preset].demo_people if demo else None
    return SynthConfig.from_preset(PRESETS[preset].synth, seed=seed, num_train=people)


def ensure_benchmark(data: Path, cfg: SynthConfig, workers: int | None = None) -> dict[str, Any]:
    """Synthesize the benchmark once; a finished one (dataset.json present) is reused when it was
    made with the same settings, and refused (BadInput) when not."""
    marker = data / "dataset.json"
    if marker.exists():
        summary = json.loads(marker.read_text())
        made = SynthConfig.from_dict(summary.get("config", {}), str(marker))
        if made != cfg:
            raise BadInput(f"{data} holds a benchmark made with other settings (preset {made.preset}, "
                           f"{made.num_train} train people); choose another --out")
        return summary
    return generate(cfg, data, workers=workers, overwrite=True)


def mean_pose_reference(config: RunConfig) -> dict[str, Any]:
    """Test-split metrics of predicting the regressors' mean parameters for every image."""
    mean = load_mean_params()
    return evaluate_mean_pose([Path(config.data) / "test"], load_run_body_model(run_models(config)),
                              mean_pose_axis_angle(mean), np.asarray(mean["shape"], np.float32))

