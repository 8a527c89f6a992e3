"""One loader for every body model: the built-in model, a user's SMPL .npz, and (after an explicit,
opt-in conversion) a user's official SMPL .pkl. Every model becomes a `smplx.SMPL` built from a
`data_struct`, wrapped with what SPIN's keypoints need.

The .npz layout is SMPL's own (v_template, shapedirs, posedirs, J_regressor, weights,
kintree_table, f) plus optional keys:
    vertex_joint_ids   (21,) int  vertex of each smplx vertex joint, in VERTEX_JOINT_NAMES order
    J_regressor_extra  (9, V)     SPIN's extra joint regressor, rows in EXTRA_JOINT_NAMES order
    J_regressor_h36m   (17, V)    SPIN's evaluation regressor, rows in H36M_JOINT_NAMES order

A model loaded from a file carries its identity (path and sha256 of the file), so that every step
of a run can record which model it used and refuse another.
"""
from __future__ import annotations

import contextlib
import io
import pickle
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import smplx
import torch
from torch import nn

from fitting import npz
from fitting.errors import BadInput
from fitting.identity import check_identity, file_identity
from fitting.keypoints import (
    EXTRA_JOINT_NAMES,
    H36M_JOINT_NAMES,
    KEYPOINT_SOURCE,
    SMPL_PARENTS,
    VERTEX_JOINT_NAMES,
)

NUM_JOINTS = 24
NUM_BETAS = 10
SMPL_NUM_VERTICES = 6890
# SMPL vertex on the top of the head, used when a model brings no extra regressor.
SMPL_HEAD_TOP_VERTEX = 411


def builtin_body_model_path() -> Path:
    return Path(str(resources.files("fitting") / "assets" / "body_model.npz"))


def _required_shapes(num_vertices: int) -> dict[str, tuple]:
    V = num_vertices
    return {
        "v_template": (V, 3),
        "shapedirs": (V, 3, None),
        "posedirs": (V, 3, 207),
        "J_regressor": (NUM_JOINTS, V),
        "weights": (V, NUM_JOINTS),
        "kintree_table": (2, NUM_JOINTS),
        "f": (None, 3),
    }


# what a body-model .npz may hold; other members are never read
BODY_MODEL_KEYS = (*_required_shapes(1), "vertex_joint_ids", "J_regressor_extra", "J_regressor_h36m",
                   "provenance", "license")


def _shape_ok(shape: tuple, expected: tuple) -> bool:
    return len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))


def validate_arrays(arrays: dict[str, np.ndarray], source: str = "body model") -> None:
    """Raise BadInput naming the first missing key, wrong shape or non-finite array."""
    if "v_template" not in arrays:
        raise BadInput(f"{source}: missing key 'v_template'")
    V = int(np.shape(arrays["v_template"])[0])
    for key, expected in _required_shapes(V).items():
        if key not in arrays:
            raise BadInput(f"{source}: missing key '{key}'")
        shape = tuple(np.shape(arrays[key]))
        if key == "posedirs" and len(shape) == 2 and shape == (V * 3, 207):
            continue
        if not _shape_ok(shape, expected):
            want = "x".join("N" if e is None else str(e) for e in expected)
            raise BadInput(f"{source}: '{key}' has shape {shape}, expected {want}")
    if np.shape(arrays["shapedirs"])[2] < NUM_BETAS:
        raise BadInput(f"{source}: 'shapedirs' has {np.shape(arrays['shapedirs'])[2]} components, need {NUM_BETAS}")
    for key in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights"):
        if not np.all(np.isfinite(np.asarray(arrays[key], dtype=np.float64))):
            raise BadInput(f"{source}: '{key}' contains NaN or Inf")
    faces = np.asarray(arrays["f"])
    if faces.size and (faces.min() < 0 or faces.max() >= V):
        raise BadInput(f"{source}: 'f' indexes vertices outside 0..{V - 1}")
    if "vertex_joint_ids" in arrays:
        ids = np.asarray(arrays["vertex_joint_ids"])
        if ids.shape != (len(VERTEX_JOINT_NAMES),) or ids.min() < 0 or ids.max() >= V:
            raise BadInput(f"{source}: 'vertex_joint_ids' must be {len(VERTEX_JOINT_NAMES)} vertex ids")
    elif V != SMPL_NUM_VERTICES:
        raise BadInput(f"{source}: a model with {V} vertices needs 'vertex_joint_ids'")
    for key, rows in (("J_regressor_extra", len(EXTRA_JOINT_NAMES)), ("J_regressor_h36m", len(H36M_JOINT_NAMES))):
        if key in arrays and np.shape(arrays[key]) != (rows, V):
            raise BadInput(f"{source}: '{key}' has shape {np.shape(arrays[key])}, expected {rows}x{V}")
        if key in arrays and not np.all(np.isfinite(np.asarray(arrays[key], dtype=np.float64))):
            raise BadInput(f"{source}: '{key}' contains NaN or Inf")
    # linear blend skinning walks the tree in joint order: each parent must come before its child
    parents = np.asarray(arrays["kintree_table"])[0, 1:].astype(np.int64)
    wrong = np.flatnonzero((parents < 0) | (parents >= np.arange(1, NUM_JOINTS)))
    if wrong.size:
        joint = int(wrong[0]) + 1
        raise BadInput(f"{source}: 'kintree_table' gives joint {joint} the parent {int(parents[wrong[0]])}; "
                       f"a parent must be one of the joints 0..{joint - 1}")


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read a body-model .npz without ever unpickling (its known keys only), and validate it."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"body model not found: {path}")
    if path.suffix == ".pkl":
        raise BadInput(
            f"{path} is a pickle; convert it once with "
            f"`spin-pipeline body-model convert --allow-pickle {path} OUT.npz`"
        )
    arrays = npz.read_npz(path, BODY_MODEL_KEYS, what="body model")
    validate_arrays(arrays, source=str(path))
    return arrays


def default_extra_regressor(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Stand-in for SPIN's J_regressor_extra when a model ships none: rows of the joint
    regressor for hips, neck, pelvis, thorax, spine and head, and the head-top vertex."""
    J = np.asarray(arrays["J_regressor"], dtype=np.float64)
    V = J.shape[1]
    head_top = np.zeros(V)
    if V == SMPL_NUM_VERTICES:
        head_top[SMPL_HEAD_TOP_VERTEX] = 1.0
    else:
        head_top[int(np.argmax(np.asarray(arrays["v_template"])[:, 1]))] = 1.0
    rows = {
        "Right Hip": J[2], "Left Hip": J[1], "Neck (LSP)": J[12], "Top of Head (LSP)": head_top,
        "Pelvis (MPII)": J[0], "Thorax (MPII)": J[12], "Spine (H36M)": 0.5 * (J[3] + J[6]),
        "Jaw (H36M)": 0.5 * (J[12] + J[15]), "Head (H36M)": J[15],
    }
    return np.stack([rows[name] for name in EXTRA_JOINT_NAMES]).astype(np.float32)


def vertex_joint_ids(arrays: dict[str, np.ndarray]) -> dict[str, int]:
    if "vertex_joint_ids" in arrays:
        return {n: int(i) for n, i in zip(VERTEX_JOINT_NAMES, arrays["vertex_joint_ids"])}
    return {n: int(smplx.vertex_ids.vertex_ids["smplh"][n]) for n in VERTEX_JOINT_NAMES}


@dataclass
class BodyOutput:
    vertices: torch.Tensor   # (B, V, 3)
    joints: torch.Tensor     # (B, 24, 3) SMPL joints
    keypoints: torch.Tensor  # (B, 49, 3) SPIN's keypoints


class BodyModel(nn.Module):
    """A smplx.SMPL plus SPIN's 49 keypoints.

    forward(pose, betas): pose (B, 72) axis-angle or (B, 24, 3, 3) rotation matrices,
    betas (B, 10). No translation: the camera carries it.
    """

    def __init__(self, arrays: dict[str, np.ndarray], name: str = "body model",
                 identity: dict[str, str] | None = None):
        super().__init__()
        self.name = name
        self.identity = identity or {"path": name, "sha256": ""}
        struct = smplx.utils.Struct(**{k: arrays[k] for k in _required_shapes(1)})
        with contextlib.redirect_stdout(io.StringIO()):  # smplx prints a note about 10 betas
            self.smpl = smplx.SMPL(
                model_path=None, data_struct=struct, vertex_ids=vertex_joint_ids(arrays),
                num_betas=NUM_BETAS, create_betas=False, create_global_orient=False,
                create_body_pose=False, create_transl=False,
            )
        extra = arrays.get("J_regressor_extra")
        self.has_extra_regressor = extra is not None
        extra = default_extra_regressor(arrays) if extra is None else extra
        self.register_buffer("J_regressor_extra", torch.as_tensor(np.asarray(extra), dtype=torch.float32))
        h36m = arrays.get("J_regressor_h36m")
        self.has_h36m_regressor = h36m is not None
        self.register_buffer("J_regressor_h36m", torch.as_tensor(
            np.zeros((len(H36M_JOINT_NAMES), 0)) if h36m is None else np.asarray(h36m), dtype=torch.float32))
        self.register_buffer("keypoint_source", torch.as_tensor(KEYPOINT_SOURCE, dtype=torch.long))
        self.num_vertices = int(arrays["v_template"].shape[0])
        self.vertex_joint_ids = vertex_joint_ids(arrays)

    @property
    def faces(self) -> np.ndarray:
        return np.asarray(self.smpl.faces, dtype=np.int64)

    @property
    def parents(self) -> torch.Tensor:
        return self.smpl.parents

    def h36m_joints(self, vertices: torch.Tensor, needed_by: str = "this evaluation") -> torch.Tensor:
        """(B, V, 3) meshes of this model -> (B, 17, 3) joints through J_regressor_h36m (SPIN's
        evaluation regressor, rows in H36M_JOINT_NAMES order)."""
        if not self.has_h36m_regressor:
            raise BadInput(
                f"{self.name} has no J_regressor_h36m, which {needed_by} needs: store SPIN's with "
                f"`spin-pipeline body-model convert --joint-regressor-h36m J_regressor_h36m.npy SRC DST`")
        return torch.einsum("jv,bvc->bjc", self.J_regressor_h36m.to(vertices.dtype), vertices)

    def forward(self, pose: torch.Tensor, betas: torch.Tensor) -> BodyOutput:
        batch = pose.shape[0]
        pose2rot = pose.ndim == 2
        if pose2rot:
            orient, body = pose[:, :3], pose[:, 3:]
        else:  # smplx's lbs reads rotation matrices as (B, J, 9)
            rot = pose.reshape(batch, NUM_JOINTS, 9)
            orient, body = rot[:, :1], rot[:, 1:]
        out = self.smpl(betas=betas, global_orient=orient, body_pose=body, pose2rot=pose2rot)
        extra = torch.einsum("kv,bvc->bkc", self.J_regressor_extra, out.vertices)
        source = torch.cat([out.joints, extra], dim=1)
        return BodyOutput(out.vertices, out.joints[:, :NUM_JOINTS], source[:, self.keypoint_source])


def load_body_model(path: str | Path | None = None, device: str | torch.device = "cpu",
                    sha256: str | None = None) -> BodyModel:
    """The built-in model (path None) or a user's SMPL-layout .npz, as a BodyModel on `device`;
    with `sha256`, only that file content (BadInput otherwise)."""
    path = builtin_body_model_path() if path is None else Path(path)
    arrays = read_npz(path)
    identity = file_identity(path, "body model")
    check_identity(identity, sha256, "body model")
    return BodyModel(arrays, name=str(path), identity=identity).to(device)


# ---------------------------------------------------------------- official .pkl conversion

class _ChumpyStub:
    """Stands in for any chumpy class while unpickling; keeps the pickled state."""

    def __init__(self, *args, **kwargs):
        self.state = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"x": state}

    def array(self) -> np.ndarray:
        if "x" not in self.state:
            raise BadInput("a chumpy object in the pickle carries no array value ('x')")
        return np.asarray(self.state["x"])


class _RestrictedUnpickler(pickle.Unpickler):
    """Allows numpy arrays, scipy sparse matrices and chumpy objects (as stubs), nothing else."""

    _ALLOWED_PREFIXES = ("numpy", "scipy.sparse")

    def find_class(self, module: str, name: str):
        if module.startswith("chumpy"):
            return _ChumpyStub
        if module in ("copy_reg", "copyreg") and name == "_reconstructor":
            import copyreg
            return copyreg._reconstructor
        if module == "_codecs" and name == "encode":  # how protocol-2 pickles store numpy bytes
            import codecs
            return codecs.encode
        if module in ("__builtin__", "builtins") and name in ("object", "set", "frozenset", "slice"):
            import builtins
            return getattr(builtins, name)
        if module.startswith(self._ALLOWED_PREFIXES):
            return super().find_class(module, name)
        raise BadInput(f"refusing to unpickle {module}.{name}: not part of an SMPL model file")


def _to_array(value) -> np.ndarray:
    if isinstance(value, _ChumpyStub):
        return value.array()
    if hasattr(value, "toarray"):  # scipy sparse
        return value.toarray()
    return np.asarray(value)


def read_official_pickle(path: str | Path, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Arrays of an official SMPL .pkl, with chumpy objects handled without importing chumpy."""
    if not allow_pickle:
        raise BadInput(f"{path}: reading a pickle needs an explicit opt-in (--allow-pickle)")
    path = Path(path)
    if not path.exists():
        raise BadInput(f"body model not found: {path}")
    try:
        with open(path, "rb") as fh:
            raw = _RestrictedUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as exc:
        if isinstance(exc, BadInput):
            raise
        raise BadInput(f"{path}: not a readable SMPL pickle ({' '.join(str(exc).split())})") from exc
    if not isinstance(raw, dict):
        raise BadInput(f"{path}: expected a dict of arrays, found {type(raw).__name__}")
    keys = list(_required_shapes(1))
    arrays = {k: _to_array(raw[k]) for k in keys if k in raw}
    arrays["kintree_table"] = arrays.get("kintree_table", np.zeros((2, 0))).astype(np.int64)
    arrays["f"] = arrays.get("f", np.zeros((0, 3))).astype(np.int64)
    return arrays


def convert_to_npz(
    src: str | Path,
    dst: str | Path,
    allow_pickle: bool = False,
    joint_regressor_extra: str | Path | None = None,
    joint_regressor_h36m: str | Path | None = None,
) -> dict[str, np.ndarray]:
    """Convert a user's SMPL model (.pkl with opt-in, or .npz) into a validated .npz, with SPIN's
    J_regressor_extra.npy and J_regressor_h36m.npy when given."""
    src = Path(src)
    arrays = read_official_pickle(src, allow_pickle) if src.suffix == ".pkl" else read_npz(src)
    for key in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights"):
        arrays[key] = np.asarray(arrays[key], dtype=np.float32)
    if "shapedirs" in arrays and arrays["shapedirs"].ndim == 3:
        arrays["shapedirs"] = arrays["shapedirs"][:, :, :NUM_BETAS]
    for key, given in (("J_regressor_extra", joint_regressor_extra), ("J_regressor_h36m", joint_regressor_h36m)):
        if given is not None:
            arrays[key] = _read_regressor(Path(given), key)
    validate_arrays(arrays, source=str(src))
    np.savez_compressed(dst, **arrays)
    return arrays


def _read_regressor(path: Path, key: str) -> np.ndarray:
    return np.asarray(npz.read_npy(path, what=key), dtype=np.float32)


def describe(model: BodyModel) -> dict[str, object]:
    """What `body-model info` prints."""
    return {
        "name": model.name,
        "vertices": model.num_vertices,
        "faces": int(model.faces.shape[0]),
        "joints": NUM_JOINTS,
        "shape_components": int(model.smpl.shapedirs.shape[-1]),
        "kinematic_tree_matches_smpl": [int(p) for p in model.parents.tolist()] == [
            max(p, -1) for p in SMPL_PARENTS
        ] or model.parents.tolist()[1:] == list(SMPL_PARENTS[1:]),
        "keypoints": "SPIN 49 (25 OpenPose + 24 ground truth)",
        "extra_regressor": "shipped" if model.has_extra_regressor else "approximated from joints",
        "h36m_regressor": "shipped" if model.has_h36m_regressor else "none (SPIN's H36M, 3DHP and 3DPW evaluation needs one)",
        "vertex_joint_ids": model.vertex_joint_ids,
    }
