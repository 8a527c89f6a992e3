"""The regressor: HMR as SPIN uses it.

A torchvision backbone gives one pooled feature vector per image; two fully connected layers
(1024, dropout) read it together with the current estimate (24 joint rotations in 6D, 10 betas,
a weak-perspective camera) and predict a correction, three times (iterative error feedback),
starting from the mean parameters. 6D -> rotation matrices through `fitting.geometry`.

The camera is weak perspective [s, tx, ty] in normalized crop coordinates. It becomes a camera
translation with SPIN's focal length 5000 and 224-px crop, whatever the input resolution, so the
pose, shape and camera mean the same thing for every backbone and image size.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from fitting.camera import FOCAL_LENGTH, IMG_RES, weak_perspective_to_translation
from fitting.errors import BadInput
from fitting.geometry import rotmat_to_pose, sixd_to_rotmat
from trainer.mean_params import load_mean_params

BACKBONES = ("resnet50", "resnet18", "small")
NUM_JOINTS = 24
POSE_DIM = NUM_JOINTS * 6
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# file names of torchvision's ImageNet weights in its hub cache (IMAGENET1K_V1, as SPIN used)
_TORCHVISION_FILES = {"resnet50": "resnet50-0676ba61.pth", "resnet18": "resnet18-f37072fd.pth"}


@dataclass
class RegressorOutput:
    rotmat: torch.Tensor  # (B, 24, 3, 3)
    betas: torch.Tensor   # (B, 10)
    cam: torch.Tensor     # (B, 3) weak perspective [s, tx, ty]
    sixd: torch.Tensor    # (B, 144) the raw 6D pose


def _small_backbone() -> nn.Sequential:
    """A CPU-sized residual network: a strided stem and four one-block stages (32..256 wide),
    built from torchvision's BasicBlock. About 1.2M parameters; 256 features."""
    def stage(inp: int, out: int) -> BasicBlock:
        down = nn.Sequential(nn.Conv2d(inp, out, 1, stride=2, bias=False), nn.BatchNorm2d(out))
        return BasicBlock(inp, out, stride=2, downsample=down)

    return nn.Sequential(
        nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        stage(32, 32), stage(32, 64), stage(64, 128), stage(128, 256),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )


def build_backbone(name: str) -> tuple[nn.Module, int]:
    """(backbone mapping (B, 3, H, W) -> (B, F), F) with random weights."""
    if name == "small":
        return _small_backbone(), 256
    if name not in ("resnet50", "resnet18"):
        raise BadInput(f"unknown backbone '{name}' (choose from {', '.join(BACKBONES)})")
    net = getattr(torchvision.models, name)(weights=None)
    features = net.fc.in_features
    net.fc = nn.Identity()
    return net, features


def torchvision_weights_path(name: str) -> Path:
    """Where torchvision keeps a backbone's ImageNet weights (IMAGENET1K_V1, as SPIN used) in
    torch's hub cache: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _TORCHVISION_FILES[name]


def resolve_backbone_weights(name: str, spec: str | None) -> Path | None:
    """Where the backbone's initial weights come from: 'none' (random), 'auto' (torchvision's
    ImageNet file in the local hub cache; never downloads) or a file path. With 'auto', a
    torchvision backbone whose file is not in the cache is an error that says how to provide it:
    never a silent start from random weights. The small backbone has no ImageNet weights: 'auto'
    starts it from random ones (recorded as such)."""
    if spec in (None, "", "none"):
        return None
    if spec == "auto":
        if name not in _TORCHVISION_FILES:
            return None
        cached = torchvision_weights_path(name)
        if not cached.is_file():
            raise BadInput(
                f"backbone_weights: auto needs torchvision's ImageNet {name} weights at {cached} and this project "
                f"never downloads them: copy {cached.name} there (docker/Dockerfile shows how to bake it into the "
                "image), or set train.backbone_weights to the file's path, or to 'none' for random weights")
        return cached
    path = Path(spec)
    if not path.is_file():
        raise BadInput(f"backbone weights not found: {path}")
    return path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_record(path: Path | None, kind: str) -> dict[str, str]:
    """What a network's weights started from, for summaries and MLflow: the kind ('imagenet',
    'spin', 'random'), the file and its SHA-256."""
    if path is None:
        return {"kind": "random", "path": "", "sha256": ""}
    return {"kind": kind, "path": str(Path(path).resolve()), "sha256": file_sha256(path)}


def load_backbone_weights(backbone: nn.Module, path: Path) -> None:
    """Load a state dict (torch.load with weights_only=True) into the backbone; a classifier
    head ('fc.*') in the file is ignored, any other mismatch is an error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise BadInput(f"{path}: not a loadable weights file ({' '.join(str(exc).split())[:160]})") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BadInput(f"{path}: expected a state dict")
    load_exactly(backbone, {k: v for k, v in state.items() if not k.startswith("fc.")}, f"{path}", "the backbone")


def load_exactly(module: nn.Module, state: dict[str, torch.Tensor], source: str, what: str) -> None:
    """Load every weight of `module` from `state`: a key missing or left over, or a shape that
    differs, is a one-line BadInput naming `source` and `what` it should have been."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches
        raise BadInput(f"{source}: does not match {what} ({' '.join(str(exc).split())[:160]})") from exc
    if missing or unexpected:
        raise BadInput(f"{source}: does not match {what} (missing {len(missing)} keys, e.g. {sorted(missing)[:2]}; "
                       f"unexpected {len(unexpected)}, e.g. {sorted(unexpected)[:2]})")


class Regressor(nn.Module):
    """HMR with SPIN's 6D rotations. forward((B, 3, H, W) ImageNet-normalized) -> RegressorOutput.

    `config` holds what rebuilds the network (stored in checkpoints); `img_res` is the input
    size it was trained at, used by `predict` and evaluation.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        img_res: int = IMG_RES,
        mean_params: dict[str, np.ndarray] | None = None,
        backbone_weights: str | None = "none",
        n_iter: int = 3,
        hidden: int = 1024,
        dropout: float = 0.5,
    ):
        super().__init__()
        self.config = {"backbone": backbone, "img_res": int(img_res), "n_iter": int(n_iter),
                       "hidden": int(hidden), "dropout": float(dropout)}
        self.img_res = int(img_res)
        self.n_iter = int(n_iter)
        self.backbone, features = build_backbone(backbone)
        weights_path = resolve_backbone_weights(backbone, backbone_weights)
        if weights_path is not None:
            load_backbone_weights(self.backbone, weights_path)
        self.backbone_weights = weights_record(weights_path, "imagenet")
        state = POSE_DIM + 10 + 3
        self.fc1 = nn.Linear(features + state, hidden)
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)
        self.drop2 = nn.Dropout(dropout)
        self.decpose = nn.Linear(hidden, POSE_DIM)
        self.decshape = nn.Linear(hidden, 10)
        self.deccam = nn.Linear(hidden, 3)
        for layer in (self.decpose, self.decshape, self.deccam):
            # small corrections at first, so training starts from the mean parameters
            nn.init.xavier_uniform_(layer.weight, gain=0.01)
        params = load_mean_params() if mean_params is None else mean_params
        self.register_buffer("init_pose", torch.as_tensor(np.asarray(params["pose"]), dtype=torch.float32)[None])
        self.register_buffer("init_shape", torch.as_tensor(np.asarray(params["shape"]), dtype=torch.float32)[None])
        self.register_buffer("init_cam", torch.as_tensor(np.asarray(params["cam"]), dtype=torch.float32)[None])

    def forward(self, images: torch.Tensor) -> RegressorOutput:
        batch = images.shape[0]
        features = self.backbone(images)
        pose = self.init_pose.expand(batch, -1)
        shape = self.init_shape.expand(batch, -1)
        cam = self.init_cam.expand(batch, -1)
        for _ in range(self.n_iter):
            x = torch.cat([features, pose, shape, cam], dim=1)
            x = self.drop1(self.fc1(x))
            x = self.drop2(self.fc2(x))
            pose = self.decpose(x) + pose
            shape = self.decshape(x) + shape
            cam = self.deccam(x) + cam
        rotmat = sixd_to_rotmat(pose.reshape(batch, NUM_JOINTS, 6))
        return RegressorOutput(rotmat=rotmat, betas=shape, cam=cam, sixd=pose)


# SPIN's HMR keeps the ResNet's layers at the top level of its state dict; this regressor keeps
# them under `backbone.`. The head (fc1, fc2, decpose, decshape, deccam) and the mean-parameter
# buffers (init_pose, init_shape, init_cam) have the same names, shapes and meaning: both read 6D
# rotations as SPIN's (3, 2) layout, and fc1 reads [features, pose, shape, cam] in that order.
SPIN_BACKBONE_PREFIXES = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")


def spin_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """SPIN's checkpoint (`model_checkpoint.pt`, or any file its CheckpointSaver wrote) as this
    regressor's state dict. torch.load(weights_only=True); BadInput for an unreadable file or keys
    that are not SPIN's HMR."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"SPIN checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise BadInput(f"{path}: not a loadable checkpoint ({' '.join(str(exc).split())[:160]})") from exc
    state = payload.get("model", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or "decpose.weight" not in state:
        raise BadInput(f"{path}: not SPIN's checkpoint (no 'model' state dict with decpose, decshape, deccam)")
    mapped = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key  # saved from DataParallel
        if key.startswith("fc."):
            continue  # an ImageNet classifier left in by hmr(pretrained=True)
        mapped[f"backbone.{key}" if key.startswith(SPIN_BACKBONE_PREFIXES) else key] = value
    return mapped


def load_spin_weights(regressor: Regressor, path: str | Path) -> None:
    """Every weight of `regressor` (a ResNet-50 one) from SPIN's checkpoint; any key missing or
    left over, or a shape that differs, is an error."""
    if regressor.config["backbone"] != "resnet50":
        raise BadInput(f"SPIN's checkpoint is a resnet50 regressor; this run trains a {regressor.config['backbone']} "
                       "one (set train.backbone: resnet50)")
    load_exactly(regressor, spin_state_dict(path), f"{path}", "SPIN's HMR")


def cam_translation(cam: torch.Tensor) -> torch.Tensor:
    """(B, 3) weak-perspective camera -> (B, 3) camera translation, always in SPIN's 5000 px /
    224 px convention (the regressor's camera is defined in it, whatever the input size)."""
    return weak_perspective_to_translation(cam, FOCAL_LENGTH, IMG_RES)


def axis_angle_pose(rotmat: torch.Tensor) -> torch.Tensor:
    """(B, 24, 3, 3) -> (B, 72) axis-angle, SMPL's layout."""
    return rotmat_to_pose(rotmat)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 RGB -> float, ImageNet-normalized (what the backbones expect)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).reshape(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
