"""The training set: samples shards joined with a best-fit table on sample_id, augmented as SPIN
does, served by a torch DataLoader.

Targets per sample:
    pose/betas  the ground truth where the sample has SMPL (`has_smpl`), else its fit, as stored
    fit_valid   whether they supervise at all: ground truth, or a valid fit (SPIN's `valid_fit`)
    betas_ok    the fit's betas are all within the guard (ground truth always is); the loss applies
                SPIN's shape guard (`trainer.losses`)
Images travel as uint8 (3, H, W); `trainer.model.normalize_images` runs on the device.

Augmentation is a pure function of (seed, key): the sampler hands out keys = epoch * N + row,
so a run is reproducible whatever the number of workers and resumes exactly mid-epoch.

The keypoints backbone never reads an image: `KeypointBatches` serves the same targets from
memory, a whole batch at a time, augmented in torch (a pure function of (seed, step)).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fitting.errors import BadInput
from fitting.geometry import pose_to_rotmat
from trainer.augment import (
    AugmentConfig,
    AugParams,
    BatchAugParams,
    augment_image,
    augment_joints3d,
    augment_joints3d_batch,
    augment_keypoints,
    augment_keypoints_batch,
    augment_pose,
    augment_rotmat_batch,
    corrupt_keypoints,
    sample_batch_params,
    sample_params,
)
from trainer.data.samples import decode_image, read_image_file, validate_samples
from trainer.data.tables import QUARANTINE_SCHEMA, SAMPLES_SCHEMA, concat, make_table, read_split, to_numpy


def read_samples(samples_dirs: Sequence[str | Path], split: str | None = "train") -> pa.Table:
    """All shards of the given directories (DIR/<split>/ when it exists, else DIR/) as one table."""
    if not samples_dirs:
        raise BadInput("no samples directories given")
    return concat([read_split(d, split) for d in samples_dirs], SAMPLES_SCHEMA)


def load_image(data: bytes | None, uri: str | None) -> np.ndarray:
    """(H, W, 3) uint8 RGB from encoded bytes or, when there are none, from a path or URI."""
    if data is not None:
        return decode_image(data)
    if not uri:
        raise BadInput("no image")
    if "://" not in uri:
        return read_image_file(uri)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        with fs.open_input_stream(path) as stream:
            return decode_image(stream.read())
    except (OSError, pa.ArrowInvalid) as exc:
        raise BadInput(f"cannot read image {uri}: {' '.join(str(exc).split())[:160]}") from exc


def _finite_rows(values: np.ndarray) -> np.ndarray:
    return np.isfinite(values.reshape(len(values), -1)).all(axis=1)


def _fit_targets(samples: pa.Table, fits: pa.Table | None) -> dict[str, np.ndarray]:
    """Pose/betas targets and their masks, per samples row."""
    n = len(samples)
    pose = np.zeros((n, 72), np.float32)
    betas = np.zeros((n, 10), np.float32)
    fit_valid = np.zeros(n, bool)
    betas_ok = np.ones(n, bool)
    has_fit = np.zeros(n, bool)
    if fits is not None and len(fits):
        fit_ids = fits.column("sample_id").to_pylist()
        if len(set(fit_ids)) != len(fit_ids):
            raise BadInput("fits table has duplicate sample_ids")
        where = {sid: i for i, sid in enumerate(fit_ids)}
        rows = np.array([where.get(sid, -1) for sid in samples.column("sample_id").to_pylist()])
        hit = rows >= 0
        f_pose, f_betas = to_numpy(fits, "pose"), to_numpy(fits, "betas")
        valid = to_numpy(fits, "valid").astype(bool)
        fit_betas_ok = to_numpy(fits, "betas_ok").astype(bool)
        sel = rows[hit]
        ok = _finite_rows(f_pose[sel]) & _finite_rows(f_betas[sel])
        idx = np.flatnonzero(hit)[ok]
        sel = sel[ok]
        has_fit[idx] = True
        pose[idx] = f_pose[sel]
        betas[idx] = f_betas[sel]
        fit_valid[idx] = valid[sel]
        betas_ok[idx] = fit_betas_ok[sel]
    has_smpl = samples.column("has_smpl").to_numpy(zero_copy_only=False)
    has_smpl = np.asarray([bool(v) if v is not None else False for v in has_smpl], bool)
    if has_smpl.any():
        gt_pose, gt_betas = to_numpy(samples, "pose"), to_numpy(samples, "betas")
        gt = has_smpl & _finite_rows(gt_pose) & _finite_rows(gt_betas)
        pose[gt], betas[gt] = gt_pose[gt], gt_betas[gt]
        fit_valid[gt] = betas_ok[gt] = has_fit[gt] = True
    return {"pose": pose, "betas": betas, "fit_valid": fit_valid, "betas_ok": betas_ok, "has_fit": has_fit}


class SamplesDataset(Dataset):
    """Items for training (augment given) or prediction/evaluation (augment None).

    __getitem__(key) serves row key % len(self); see the module docstring for the keys.
    """

    def __init__(
        self,
        samples: pa.Table,
        fits: pa.Table | None = None,
        img_res: int = 224,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        drop_invalid: bool = True,
    ):
        self.quarantine = None
        if drop_invalid:
            samples, self.quarantine = validate_samples(samples, check_images=False)
        if len(samples) == 0:
            raise BadInput("no usable samples")
        self.sample_ids = samples.column("sample_id").to_pylist()
        self.datasets = np.asarray(samples.column("dataset").to_pylist())
        self.images = samples.column("image").combine_chunks()
        self.uris = samples.column("image_uri").to_pylist()
        self.keypoints = to_numpy(samples, "keypoints")
        joints3d = to_numpy(samples, "joints3d")
        self.has_joints3d = _finite_rows(joints3d) & (np.nan_to_num(joints3d[:, :, 3]) > 0).any(axis=1)
        self.joints3d = np.where(self.has_joints3d[:, None, None], np.nan_to_num(joints3d), 0.0).astype(np.float32)
        self.targets = _fit_targets(samples, fits)
        self.img_res = int(img_res)
        self.augment = augment
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def unreadable(self, rows: Iterable[int], source: str) -> pa.Table:
        """Quarantine rows for those of `rows` whose image cannot be read, with the reason. The
        images are read again here: a loader worker reports only that a row was unusable."""
        ids, reasons = [], []
        for row in sorted(set(rows)):
            try:
                load_image(self.images[row].as_py(), self.uris[row])
            except BadInput as exc:
                ids.append(self.sample_ids[row])
                reasons.append(f"unreadable image: {exc}")
        return make_table({"sample_id": ids, "source": [source] * len(ids), "reason": reasons}, QUARANTINE_SCHEMA)

    def params_for(self, key: int) -> AugParams:
        if self.augment is None:
            return AugParams()
        rng = np.random.default_rng([self.seed, int(key)])
        return sample_params(rng, self.augment)

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        row = int(key) % len(self)
        params = self.params_for(key)
        usable = True
        try:
            image = load_image(self.images[row].as_py(), self.uris[row])
        except BadInput:
            # a sample that cannot be read trains nothing: it rides along with zero weight
            image, usable = np.zeros((self.img_res, self.img_res, 3), np.uint8), False
        image = augment_image(image, params, self.img_res)
        keypoints = augment_keypoints(self.keypoints[row], params)
        pose = self.targets["pose"][row]
        if self.targets["has_fit"][row]:
            pose = augment_pose(pose, params)
        joints3d = augment_joints3d(self.joints3d[row], params) if self.has_joints3d[row] else self.joints3d[row]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "keypoints": torch.from_numpy(keypoints.astype(np.float32)),
            "pose": torch.from_numpy(pose.astype(np.float32)),
            "betas": torch.from_numpy(self.targets["betas"][row]),
            "fit_valid": torch.tensor(bool(self.targets["fit_valid"][row])),
            "betas_ok": torch.tensor(bool(self.targets["betas_ok"][row])),
            "joints3d": torch.from_numpy(joints3d.astype(np.float32)),
            "has_joints3d": torch.tensor(bool(self.has_joints3d[row])),
            "usable": torch.tensor(usable),
            "row": torch.tensor(row),
        }


def lacks_images(samples: pa.Table) -> np.ndarray:
    """(N,) bool: rows with neither image bytes nor an image URI (keypoint-only samples)."""
    images = samples.column("image").is_null().to_numpy(zero_copy_only=False)
    uris = samples.column("image_uri").to_pylist()
    return images & np.array([not uri for uri in uris], bool)


def augmented_batch(batch: dict[str, torch.Tensor], params: BatchAugParams) -> dict[str, torch.Tensor]:
    """A gathered keypoint batch augmented by `params` (a new dict; the input is untouched): the
    keypoints, pose targets and 3D joints turned, scaled and flipped, and the network's input
    ("input_keypoints") after dropout and jitter."""
    keypoints = augment_keypoints_batch(batch["keypoints"], params)
    return {**batch, "keypoints": keypoints, "pose_rotmat": augment_rotmat_batch(batch["pose_rotmat"], params),
            "joints3d": augment_joints3d_batch(batch["joints3d"], params),
            "input_keypoints": corrupt_keypoints(keypoints, params)}


class KeypointBatches:
    """Training batches for the keypoints backbone: a SamplesDataset's keypoints and targets as
    tensors, gathered and augmented a batch at a time (`trainer.augment`'s *_batch functions).

    batch(keys, step) -> the items of `SamplesDataset` for rows key % N, stacked (without
    "image"), with the pose target as rotation matrices ("pose_rotmat") and the network's input
    ("input_keypoints": the augmented keypoints after dropout and jitter; "keypoints" stays the
    clean target). Augmentation depends only on (seed, step). `compile`: the augmentation runs
    as one torch.compile'd graph per batch size (a few dozen small tensor ops, fused)."""

    def __init__(self, dataset: SamplesDataset, augment: AugmentConfig | None, seed: int, compile: bool = False):
        self.n, self.augment, self.seed = len(dataset), augment, int(seed)
        self.apply = torch.compile(augmented_batch, dynamic=False) if compile else augmented_batch
        targets = dataset.targets
        self.columns = {
            "keypoints": torch.from_numpy(np.nan_to_num(dataset.keypoints).astype(np.float32)),
            "pose_rotmat": pose_to_rotmat(torch.from_numpy(targets["pose"])),
            "betas": torch.from_numpy(targets["betas"]),
            "fit_valid": torch.from_numpy(targets["fit_valid"]),
            "betas_ok": torch.from_numpy(targets["betas_ok"]),
            "joints3d": torch.from_numpy(dataset.joints3d),
            "has_joints3d": torch.from_numpy(dataset.has_joints3d),
        }

    def batch(self, keys: Sequence[int], step: int) -> dict[str, torch.Tensor]:
        rows = torch.from_numpy(np.asarray(keys, np.int64) % self.n)
        out = {name: column[rows] for name, column in self.columns.items()}
        out["usable"] = torch.ones(len(rows), dtype=torch.bool)
        out["row"] = rows
        if self.augment is None:
            out["input_keypoints"] = out["keypoints"]
            return out
        params = sample_batch_params(np.random.default_rng([self.seed, 104729, int(step)]), self.augment, len(rows))
        return self.apply(out, params)


class StepBatchSampler(Sampler[list[int]]):
    """Batches for steps start..stop-1 of an endless stream of epochs, each a fresh permutation
    of the rows (seeded by epoch). Batch `s` is the same whenever it is drawn, which is what
    makes a resumed run identical to an uninterrupted one."""

    def __init__(self, num_rows: int, batch_size: int, seed: int, start: int, stop: int):
        self.n, self.batch_size, self.seed = int(num_rows), int(batch_size), int(seed)
        self.start, self.stop = int(start), int(stop)

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 7919, epoch]).permutation(self.n)

    def epoch_of(self, step: int) -> int:
        return (step * self.batch_size) // self.n

    def __iter__(self) -> Iterator[list[int]]:
        cache: dict[int, np.ndarray] = {}
        for step in range(self.start, self.stop):
            batch = []
            for position in range(step * self.batch_size, (step + 1) * self.batch_size):
                epoch, index = divmod(position, self.n)
                if epoch not in cache:
                    cache.clear()
                    cache[epoch] = self._permutation(epoch)
                batch.append(epoch * self.n + int(cache[epoch][index]))
            yield batch


# SPIN's mixing (datasets/mixed_dataset.py): H36M 0.3, the four 2D in-the-wild sets 0.6 split by
# their sizes, MPI-INF-3DHP 0.1. A key naming several datasets shares its weight by size.
SPIN_MIX: dict[str, float] = {"h36m": 0.3, "lsp-orig,mpii,lspet,coco": 0.6, "mpi-inf-3dhp": 0.1}


def mixing_probabilities(counts: Mapping[str, int], mix: Mapping[str, float]) -> dict[str, float]:
    """Per-dataset sampling probabilities from the datasets' sizes and a run's `mix`.

    `mix` maps a dataset, or several joined by commas, to a weight; a group's weight is split in
    proportion to its datasets' sizes (SPIN_MIX's in-the-wild group), and the weights are
    normalized. An empty `mix` draws every row alike. BadInput when `mix` names no dataset of the
    data, leaves a dataset of the data without a weight (0 leaves it out of training) or names one twice."""
    counts = {name: int(n) for name, n in counts.items() if n > 0}
    if not mix:
        total = sum(counts.values())
        return {name: n / total for name, n in counts.items()}
    owner: dict[str, str] = {}
    for key, weight in mix.items():
        if not (np.isfinite(weight) and weight >= 0):
            raise BadInput(f"mix: weight of '{key}' must be a number >= 0, got {weight}")
        names = [n.strip() for n in str(key).split(",") if n.strip()]
        twice = [n for n in names if n in owner]
        if twice:
            raise BadInput(f"mix: dataset '{twice[0]}' has two weights")
        if not any(n in counts for n in names):
            raise BadInput(f"mix: '{key}' names no dataset of the training data (it has: {', '.join(sorted(counts))})")
        owner.update({n: key for n in names})
    unweighted = sorted(set(counts) - set(owner))
    if unweighted:
        raise BadInput(f"mix: no weight for {', '.join(unweighted)} of the training data (weight 0 leaves a "
                       "dataset out of training)")
    group_size = {key: sum(counts.get(n, 0) for n in owner if owner[n] == key) for key in mix}
    raw = {name: mix[owner[name]] * n / group_size[owner[name]] for name, n in counts.items()}
    total = sum(raw.values())
    if total <= 0:
        raise BadInput("mix: every dataset of the training data has weight 0")
    return {name: w / total for name, w in raw.items()}


class MixedBatchSampler(Sampler[list[int]]):
    """Batches for steps start..stop-1 that draw each sample's dataset by its probability and then
    a row of that dataset uniformly (SPIN's MixedDataset). Draws depend only on (seed, step), so a
    resumed run sees the same batches. Keys are (step * batch + position) * N + row: the row is
    key % N, and every draw has its own augmentation."""

    def __init__(self, dataset_rows: Mapping[str, np.ndarray], probabilities: Mapping[str, float],
                 batch_size: int, seed: int, start: int, stop: int):
        names = [n for n in dataset_rows if probabilities.get(n, 0) > 0]
        self.rows = [np.asarray(dataset_rows[n]) for n in names]
        self.p = np.array([probabilities[n] for n in names]) / sum(probabilities[n] for n in names)
        self.n = int(sum(len(r) for r in dataset_rows.values()))
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.start, self.stop = int(start), int(stop)

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def epoch_of(self, step: int) -> int:
        return (step * self.batch_size) // self.n

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            rng = np.random.default_rng([self.seed, 7919, step])
            which = rng.choice(len(self.rows), size=self.batch_size, p=self.p)
            first = step * self.batch_size
            yield [(first + position) * self.n + int(self.rows[d][rng.integers(len(self.rows[d]))])
                   for position, d in enumerate(which)]


def _worker_init(_: int) -> None:
    # workers are the parallelism: OpenCV runs sequentially in each. 0, not 1: setting 1 in a
    # forked child of a process whose OpenCV pool has run blocks forever on the copied pool
    cv2.setNumThreads(0)
    torch.set_num_threads(1)


def make_loader(dataset: SamplesDataset, batch_sampler: Sampler | None = None, batch_size: int = 64,
                num_workers: int = 0, pin_memory: bool = False, timeout: float = 0) -> DataLoader:
    """A DataLoader over `dataset`: with a batch sampler for training, in order otherwise.
    `timeout` (seconds, 0 = none) bounds the wait for a worker's batch."""
    # a private generator: the loader must not draw from the global RNG that dropout uses
    # (a resumed run restores that RNG and must see the same stream)
    common = {"num_workers": int(num_workers), "pin_memory": pin_memory, "generator": torch.Generator().manual_seed(0),
              "worker_init_fn": _worker_init if num_workers > 0 else None,
              "prefetch_factor": 4 if num_workers > 0 else None,
              "persistent_workers": False, "timeout": float(timeout) if num_workers > 0 else 0}
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **common)
    return DataLoader(dataset, batch_size=int(batch_size), shuffle=False, **common)
