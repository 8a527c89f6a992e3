"""Training settings: `TrainConfig`, the presets, and how a preset and a run's own settings merge.
The loss weights' defaults are SPIN's (`trainer.losses.LossWeights`); a preset changes only what
its budget needs, and says why."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fitting.errors import BadInput
from fitting.settings import Settings
from trainer.augment import AugmentConfig
from trainer.losses import MODES, LossWeights
from trainer.model import BACKBONES


SCHEDULES = ("constant", "cosine")
AUTOCAST = ("none", "bf16")


@dataclass
class TrainConfig(Settings):
    SECTION = "train"

    backbone: str = "small"
    backbone_weights: str = "auto"   # 'auto' (torchvision's cache; never downloads, an error without it), 'none', or a path
    img_res: int = 128
    batch_size: int = 64
    lr: float = 5e-5
    steps: int = 1000
    num_workers: int = 2
    mode: str = "fits"               # 'fits' (SPIN) or '2d' (keypoints and priors only)
    weights: LossWeights = field(default_factory=LossWeights)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    use_augmentation: bool = True
    mean_params: str | None = None   # a smpl_mean_params.npz; None = built-in
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 500
    log_every: int = 10
    threads: int = 0                 # torch intra-op threads; 0 = torch's default
    grad_clip: float = 100.0         # max global gradient norm (0: off): caps the step one bad batch can take
    head_hidden: int = 1024          # width of the HMR head's two layers (SPIN: 1024)
    head_dropout: float = 0.5        # dropout after each (SPIN: 0.5)
    encoder_width: int = 256         # the keypoints backbone's MLP width
    schedule: str = "constant"       # learning rate: 'constant' (SPIN) or 'cosine' (to 0 at the last step)
    autocast: str = "none"           # 'bf16': the network's forward in bfloat16 (body model and losses stay float32)
    # torch.compile the step's forward and losses with their backward: fewer, fused kernels where
    # many small ones cost more than their arithmetic (the keypoints step on a CPU). A one-off
    # compile per batch shape (about a minute on 2 cores, seconds once cached on disk); on a CPU it
    # needs a C++ compiler, checked before training.
    compile: bool = False

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise BadInput(f"unknown backbone '{self.backbone}' (choose from {', '.join(BACKBONES)})")
        if self.mode not in MODES:
            raise BadInput(f"unknown training mode '{self.mode}' (choose from {', '.join(MODES)})")
        for name in ("img_res", "batch_size", "steps", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise BadInput(f"training setting '{name}' must be >= 1, got {getattr(self, name)}")
        if self.img_res < 32:
            raise BadInput(f"img_res must be >= 32, got {self.img_res}")
        if self.num_workers < 0 or self.threads < 0:
            raise BadInput("num_workers and threads must be >= 0")
        if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            raise BadInput(f"grad_clip must be a finite number >= 0, got {self.grad_clip}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise BadInput(f"lr must be a positive number, got {self.lr}")
        if self.head_hidden < 1 or self.encoder_width < 1 or not 0 <= self.head_dropout < 1:
            raise BadInput("head_hidden and encoder_width must be >= 1 and head_dropout in [0, 1)")
        if self.schedule not in SCHEDULES:
            raise BadInput(f"unknown schedule '{self.schedule}' (choose from {', '.join(SCHEDULES)})")
        if not isinstance(self.compile, bool):
            raise BadInput(f"compile must be true or false, got {self.compile!r}")
        if self.autocast not in AUTOCAST:
            raise BadInput(f"unknown autocast '{self.autocast}' (choose from {', '.join(AUTOCAST)})")


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # tests and CI: seconds
    "tiny": {"backbone": "small", "img_res": 64, "batch_size": 8, "lr": 3e-4, "steps": 12,
             "num_workers": 0, "checkpoint_every": 6, "log_every": 2, "backbone_weights": "none"},
    # the demo and the ablation on a 2-core CPU: minutes. A tenth of SPIN's keypoint weight: a
    # network trained from scratch for minutes matches the 2D keypoints with implausible 3D poses
    # before it learns to read them, and at weight 5 scores worse than the mean pose. The loss is
    # then about a tenth as large, and so is the gradient clip (at 100 the camera scale could
    # turn negative and the loss diverge)
    "small": {"backbone": "small", "img_res": 96, "batch_size": 32, "lr": 3e-4, "steps": 500,
              "num_workers": 1, "checkpoint_every": 100, "log_every": 10, "backbone_weights": "none",
              "weights": {"keypoints": 0.5}, "grad_clip": 10.0},
    # 2D keypoints in, no pixels: a small MLP encoder into a narrow head, trained on whole
    # batches of keypoints (trainer.dataset.KeypointBatches). Adam 1e-3 decayed to 0 (cosine)
    # over ~38 epochs of 20k people: enough for the head to learn its labels, where a constant
    # rate of 1e-3 leaves it noisy. Dropout 0: the input is 147 numbers, the network is small.
    # bf16 autocast halves the CPU time of the network and scored no worse (ground-truth labels,
    # 4500 steps: 71.9 mm against 76.1 in float32). Batch 1024 runs 1.2x the samples/s of 512
    # (compiled), but at the same lr and people seen (half the steps) the demo's regressor ended
    # 3.8 mm worse (91.7 against 87.9), so the batch stays 512.
    "keypoints": {"backbone": "keypoints", "backbone_weights": "none", "batch_size": 512, "lr": 1e-3,
                  "schedule": "cosine", "steps": 1500, "num_workers": 0, "checkpoint_every": 500, "log_every": 50,
                  "head_hidden": 256, "head_dropout": 0.0, "encoder_width": 256, "autocast": "bf16",
                  "augment": {"keypoint_dropout": 0.1, "keypoint_jitter": 0.01}},
    # the paper: ResNet-50 from ImageNet weights (torch's cache, or an error), 224 px, batch 64, Adam 5e-5
    "paper": {"backbone": "resnet50", "img_res": 224, "batch_size": 64, "lr": 5e-5, "steps": 200000,
              "num_workers": 8, "checkpoint_every": 1000, "log_every": 50, "backbone_weights": "auto"},
}
GROUPS = ("weights", "augment")  # settings that merge key by key


def train_config(preset: str, overrides: Mapping[str, Any] | None = None, seed: int | None = None,
                 where: str = "train") -> TrainConfig:
    """The preset's settings with `overrides` on top, read as a TrainConfig. A group (weights,
    augment) merges key by key: a run's own loss weight keeps the preset's others. `seed` is the
    seed unless the overrides set one (a run passes its own)."""
    if preset not in TRAIN_PRESETS:
        raise BadInput(f"unknown train preset '{preset}' (known: {', '.join(TRAIN_PRESETS)})")
    overrides = {} if overrides is None else overrides
    if not isinstance(overrides, Mapping):
        raise BadInput(f"{where}: expected a mapping, found {type(overrides).__name__}")
    base = TRAIN_PRESETS[preset]
    merged = {**base, **overrides}
    for group in GROUPS:
        if isinstance(base.get(group), Mapping) and isinstance(overrides.get(group), Mapping):
            merged[group] = {**base[group], **overrides[group]}
    if seed is not None:
        merged.setdefault("seed", seed)
    return TrainConfig.from_dict(merged, where)
