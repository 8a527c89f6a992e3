"""Evaluation protocols: which joints a dataset's 3D numbers are computed on, where its truth comes
from, and how prediction and truth are centred. One table says which protocol a dataset follows;
ingest records it, evaluation reads it.

SPIN's datasets follow SPIN's `eval.py`:
    prediction  the predicted mesh through `J_regressor_h36m` (17 joints), minus that regressor's
                pelvis (row 0), then `H36M_TO_J14` (`H36M_TO_J17` for MPI-INF-3DHP)
    H36M, 3DHP  the truth is the dataset's `S` (24 ground-truth joints, metres, already centred on
                the pelvis by SPIN's preprocessing) through `J24_TO_J14` / `J24_TO_J17`; `S` never
                fills row 13 ("Top of Head (LSP)"), and these lists never read it
    3DPW        the truth is the ground-truth pose and shape through the same regressor, on the
                gendered meshes, centred like the prediction
    LSP         foreground and six-part segmentation on the full original image
Every other dataset, and the built-in benchmark, keeps this project's own protocol: the 14 LSP
joints of the model's keypoints, each set centred on its mid-hip.

The index lists are SPIN's `constants.py`, in `fitting.keypoints`: J24 is the ground-truth block of
the 49 keypoints (rows 25..48); H36M17 is the row order of `J_regressor_h36m`.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch

from fitting.errors import BadInput
from fitting.keypoints import H36M_TO_J14, H36M_TO_J17, J24_TO_J14, J24_TO_J17

H36M_PELVIS = 0
# The 14 LSP joints of the built-in protocol: the first 14 rows of J24; rows 2 and 3 are the hips.
LSP14_IN_J24: tuple[int, ...] = tuple(range(14))
LSP14_HIPS: tuple[int, int] = (2, 3)


@dataclass(frozen=True)
class Protocol:
    """How a dataset is scored.

    joints: 'lsp14' (the model's 14 LSP keypoints, mid-hip centred), 'h36m14' or 'h36m17' (SPIN's
    J_regressor_h36m joints), or '' (no 3D numbers). truth: 'joints3d' (the sample's 24
    ground-truth joints, falling back to its pose and shape through the body model for 'lsp14'),
    'mesh' (the ground-truth pose and shape through the regressor on the gendered meshes), or ''.
    segmentation: 'crop' (masks of the stored crop), 'image' (masks of the full original image,
    the rendered prediction un-cropped), or ''.
    """
    name: str
    joints: str
    truth: str
    pck: bool
    segmentation: str
    description: str


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("lsp14", "lsp14", "joints3d", True, "crop",
             "14 LSP joints of the model's keypoints, mid-hip centred; masks of the crop"),
    *(Protocol(f"h36m-p{k}", "h36m14", "joints3d", False, "",
               f"SPIN's Human3.6M protocol {k}: J_regressor_h36m, H36M_TO_J14 vs S through J24_TO_J14") for k in (1, 2)),
    Protocol("mpi-inf-3dhp", "h36m17", "joints3d", True, "",
             "SPIN's MPI-INF-3DHP: J_regressor_h36m, H36M_TO_J17 vs S through J24_TO_J17; PCK/AUC at 150 mm"),
    Protocol("3dpw", "h36m14", "mesh", False, "",
             "SPIN's 3DPW: J_regressor_h36m, H36M_TO_J14 on the predicted and the gendered true meshes"),
    Protocol("lsp", "", "", False, "image",
             "SPIN's LSP: foreground and six-part segmentation on the full original image"),
)}
DEFAULT_PROTOCOL = "lsp14"

# Dataset name -> protocol: SPIN's dataset keys (eval.py --dataset) and its files' stems.
DATASET_PROTOCOLS: dict[str, str] = {
    "h36m-p1": "h36m-p1", "h36m_valid_protocol1": "h36m-p1",
    "h36m-p2": "h36m-p2", "h36m_valid_protocol2": "h36m-p2",
    "mpi-inf-3dhp": "mpi-inf-3dhp", "mpi_inf_3dhp_valid": "mpi-inf-3dhp", "mpi_inf_3dhp_test": "mpi-inf-3dhp",
    "3dpw": "3dpw", "3dpw_test": "3dpw",
    "lsp": "lsp", "lsp_dataset_test": "lsp",
}


def protocol_for_dataset(dataset: str | None) -> str:
    """The protocol name of a dataset (its name, or a file name or path whose stem is one);
    DEFAULT_PROTOCOL for any other dataset."""
    name = str(dataset or "").replace("\\", "/").rsplit("/", 1)[-1]
    stem = name[:-4] if name.endswith(".npz") else name
    return DATASET_PROTOCOLS.get(stem, DEFAULT_PROTOCOL)


def row_protocols(table: pa.Table) -> list[str]:
    """The protocol of every row of a samples table: its `protocol` column where set (ingest records
    it), else its dataset's. BadInput for a protocol this project does not know."""
    n = len(table)
    recorded = table.column("protocol").to_pylist() if "protocol" in table.column_names else [None] * n
    datasets = table.column("dataset").to_pylist() if "dataset" in table.column_names else [None] * n
    names = [p if p else protocol_for_dataset(d) for p, d in zip(recorded, datasets)]
    unknown = sorted(set(names) - set(PROTOCOLS))
    if unknown:
        raise BadInput(f"unknown evaluation protocol {unknown[0]!r} (known: {', '.join(PROTOCOLS)})")
    return names


def h36m_eval_joints(h36m: torch.Tensor, joints: str) -> torch.Tensor:
    """(B, 17, 3) H36M joints -> (B, 14 or 17, 3) as SPIN's eval.py reads them: the rows of
    H36M_TO_J14 ('h36m14') or H36M_TO_J17 ('h36m17') minus row 0, the pelvis (taken before the
    selection, which for 14 joints does not contain it)."""
    index = _h36m_index(joints)
    return h36m[:, list(index)] - h36m[:, H36M_PELVIS:H36M_PELVIS + 1]


def s_eval_joints(S: torch.Tensor, joints: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 24, 4) SPIN `S` (x, y, z in metres, confidence) -> (B, J, 3) truth joints through
    J24_TO_J14 / J24_TO_J17 and (B, J) which of them count: those of confidence 1. Not centred:
    SPIN's preprocessing already centred S on the pelvis, and its eval.py does not again."""
    index = list(J24_TO_J14 if _h36m_index(joints) == H36M_TO_J14 else J24_TO_J17)
    return S[:, index, :3], S[:, index, 3] == 1


def lsp14_joints(joints24: torch.Tensor) -> torch.Tensor:
    """(B, 24, 3+) ground-truth-block joints -> (B, 14, 3) LSP joints centred on their mid-hip
    (the built-in protocol)."""
    lsp = joints24[:, list(LSP14_IN_J24), :3]
    right, left = LSP14_HIPS
    return lsp - 0.5 * (lsp[:, right:right + 1] + lsp[:, left:left + 1])


def lsp14_truth(joints3d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 24, 4) stored ground-truth joints -> (B, 14, 3) centred LSP joints and (B, 14) which
    count (confidence 1: SPIN's `S` leaves the LSP head top empty). A sample whose hips do not
    both count has no usable centre, so none of its joints count."""
    conf = joints3d[:, list(LSP14_IN_J24), 3] == 1
    hips = conf[:, list(LSP14_HIPS)].all(dim=1, keepdim=True)
    return lsp14_joints(joints3d), conf & hips


def _h36m_index(joints: str) -> tuple[int, ...]:
    if joints == "h36m14":
        return H36M_TO_J14
    if joints == "h36m17":
        return H36M_TO_J17
    raise ValueError(f"not an H36M joint set: {joints!r}")
