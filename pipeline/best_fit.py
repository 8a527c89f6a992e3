"""Fitting one batch of samples and keeping the best fit: SPIN's fits dictionary, on disk.

`BatchFitter.fit_table` takes a batch of sample rows (with their shard path) and returns rows of
the fit stage's output schema: the better of the new fit and the previous round's best fit, scored
under the same keypoints, or a quarantine reason.
"""
from __future__ import annotations

from typing import Any

import json

import numpy as np
import pyarrow as pa
import torch

from fitting.camera import IMG_RES, estimate_translation, normalized_to_pixels
from fitting.smplify import FitInit, Smplify, SmplifyConfig, mean_init, score
from pipeline import rundir
from pipeline.config import load_run_body_model, load_run_prior
from trainer.data import storage
from trainer.data.tables import FITS_SCHEMA, fits_columns, make_table, read_table, to_numpy
from trainer.mean_params import load_mean_params, mean_pose_axis_angle
from trainer.train import load_regressor, predict, resolve_device


def device_report(device: torch.device) -> dict[str, str]:
    """Where a fitter runs: 'cpu', or the CUDA device torch uses with its name."""
    if device.type != "cuda":
        return {"device": "cpu"}
    index = torch.cuda.current_device() if device.index is None else device.index
    return {"device": f"cuda:{index}", "device_name": torch.cuda.get_device_name(index)}


def keep_new(new_loss: np.ndarray, old_loss: np.ndarray) -> np.ndarray:
    """Where the new fit replaces the old one: strictly lower loss; a missing or non-finite old
    loss always loses, a non-finite new loss never wins."""
    new_ok = np.isfinite(new_loss)
    old_ok = np.isfinite(old_loss)
    return new_ok & (~old_ok | (new_loss < old_loss))


def gather_previous(sample_ids: list[str], shards: list[str], lookup) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Previous best fits of a batch whose rows may come from several shards.

    `lookup(shard)` gives (sample id -> row, column arrays) of that shard's previous fits.
    Returns (n,) bool of rows that have one, and the columns of those rows, in batch order."""
    has_old = np.zeros(len(sample_ids), dtype=bool)
    positions, parts = [], []
    for shard in dict.fromkeys(shards):
        index, arrays = lookup(shard)
        rows = [(i, index[sid]) for i, (s, sid) in enumerate(zip(shards, sample_ids)) if s == shard and sid in index]
        if rows:
            positions.append(np.array([i for i, _ in rows]))
            parts.append({k: v[[r for _, r in rows]] for k, v in arrays.items()})
    if not parts:
        return has_old, {}
    order = np.argsort(np.concatenate(positions), kind="stable")
    has_old[np.concatenate(positions)] = True
    return has_old, {k: np.concatenate([p[k] for p in parts])[order] for k in parts[0]}


class BatchFitter:
    """Fits batches with one `Smplify`, kept for all of them (on a GPU its recorded CUDA graphs are
    replayed batch after batch). `worker` says who fits (a Ray actor adds its id); it and the
    models loaded travel with every row, so that the round records where each fit was made."""

    def __init__(self, spec, worker: dict[str, Any] | None = None):
        self.spec = spec
        self.device = resolve_device(spec.device)   # 'cuda' without one is an error, never the CPU
        self.model = load_run_body_model(spec.models, self.device)
        self.prior = load_run_prior(spec.models, self.device)
        # what this fitter loaded, reported with every row so that the round records it
        self.loaded = json.dumps({"body_model": self.model.identity, "prior": self.prior.identity}, sort_keys=True)
        self.worker = json.dumps({**(worker or {}), **device_report(self.device)}, sort_keys=True)
        self.config = SmplifyConfig.from_dict(spec.smplify)
        self.smplify = Smplify(self.model, self.prior, self.config)
        self.regressor = None
        if spec.checkpoint:
            # a checkpoint on an object store is read from a local copy, once per machine
            self.regressor = load_regressor(storage.local_copy(spec.checkpoint), device=self.device)
        mean = load_mean_params()
        self.mean_pose = torch.as_tensor(mean_pose_axis_angle(mean), dtype=torch.float32)
        self.mean_betas = torch.as_tensor(mean["shape"], dtype=torch.float32)
        self._previous: dict[str, tuple[dict[str, int], dict[str, np.ndarray], pa.Table]] = {}

    # -------------------------------------------------------------- public
    def fit_table(self, batch: pa.Table) -> pa.Table:
        """Fit a batch; on an unexpected failure, split it to isolate and quarantine the culprits."""
        try:
            return self._fit(batch)
        except Exception as exc:  # noqa: BLE001 - one bad sample must not sink the round
            if len(batch) == 1:
                return self._quarantined(batch, f"fit failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            half = len(batch) // 2
            return pa.concat_tables([self.fit_table(batch.slice(0, half)), self.fit_table(batch.slice(half))])

    # -------------------------------------------------------------- internals
    def _fit(self, batch: pa.Table) -> pa.Table:
        n = len(batch)
        keypoints = normalized_to_pixels(torch.from_numpy(to_numpy(batch, "keypoints").copy()), IMG_RES)
        keypoints = keypoints.to(self.device)
        has_smpl = self._has_smpl(batch)
        init_kind = np.full(n, "mean", dtype=object)
        if self.regressor is not None:
            pred = predict(self.regressor, batch, device=self.device)
            init = FitInit(*(torch.as_tensor(pred[k], dtype=torch.float32, device=self.device)
                             for k in ("pose", "betas", "cam_t")))
            init_kind[:] = "network"
            if not pred["ok"].all():  # an unreadable image: start that sample from the mean instead
                fallback = self._mean_init(keypoints)
                ok = torch.as_tensor(pred["ok"], device=self.device)[:, None]
                init = FitInit(*(torch.where(ok, a, b) for a, b in zip(
                    (init.pose, init.betas, init.cam_t), (fallback.pose, fallback.betas, fallback.cam_t))))
                init_kind[~pred["ok"]] = "mean"
        else:
            init = self._mean_init(keypoints)
        result = self.smplify(keypoints, init)
        pose, betas, cam_t = result.pose.cpu().numpy(), result.betas.cpu().numpy(), result.cam_t.cpu().numpy()
        loss, joint_loss = result.loss.cpu().numpy(), result.joint_loss.cpu().numpy()
        iterations = result.iterations.cpu().numpy()
        reasons = list(result.reasons)
        if has_smpl.any():
            pose, betas, cam_t, loss, joint_loss = self._ground_truth(batch, keypoints, has_smpl, pose, betas, cam_t, loss, joint_loss)
            init_kind[has_smpl] = "gt"
            iterations = np.where(has_smpl, 0, iterations)
            reasons = [None if h else r for h, r in zip(has_smpl, reasons)]
        valid = np.where(has_smpl, loss < self.config.loss_threshold, result.valid.cpu().numpy()) & np.isfinite(loss)
        columns = fits_columns(
            batch.column("sample_id").to_pylist(), pose=pose, betas=betas, cam_t=cam_t, loss=loss,
            joint_loss=joint_loss, valid=valid, betas_ok=np.all(np.abs(betas) <= self.config.betas_threshold, axis=1),
            found_in_round=self.spec.round_index, init=init_kind, iterations=iterations)
        shards = [storage.basename(p) for p in batch.column("path").to_pylist()]
        merged = self._merge_previous(columns, keypoints, shards)
        table = make_table({k: merged[k] for k in FITS_SCHEMA.names}, FITS_SCHEMA)
        reasons = [r if r else None for r in reasons]
        # a sample with no usable new fit keeps its old best fit when it has one
        reasons = [None if (r is not None and merged["kept_old"][i]) else r for i, r in enumerate(reasons)]
        return self._with_row_notes(table, shards, reasons, f"{result.mode} on {result.device}")

    def _with_row_notes(self, table: pa.Table, shards: list[str], reasons: list[str | None], how: str) -> pa.Table:
        """The fits rows plus what the driver needs beside them: shard, quarantine reason, models
        used, the fitter and how SMPLify ran ('' where nothing was fitted)."""
        n = len(table)
        return (table.append_column("shard", pa.array(shards, pa.string()))
                .append_column("reason", pa.array(reasons, pa.string()))
                .append_column("models", pa.array([self.loaded] * n, pa.string()))
                .append_column("worker", pa.array([self.worker] * n, pa.string()))
                .append_column("fit_mode", pa.array([how] * n, pa.string())))

    def _mean_init(self, keypoints: torch.Tensor) -> FitInit:
        finite = torch.nan_to_num(keypoints, nan=0.0, posinf=0.0, neginf=0.0)  # screened by fit()
        return mean_init(self.model, finite, self.mean_pose.to(self.device), self.mean_betas.to(self.device))

    @staticmethod
    def _has_smpl(batch: pa.Table) -> np.ndarray:
        if "has_smpl" not in batch.column_names:
            return np.zeros(len(batch), dtype=bool)
        values = batch.column("has_smpl").to_pylist()
        gt = np.array([bool(v) for v in values])
        if gt.any() and "pose" in batch.column_names:
            gt &= np.isfinite(to_numpy(batch, "pose")).all(axis=1) & np.isfinite(to_numpy(batch, "betas")).all(axis=1)
        return gt

    def _ground_truth(self, batch, keypoints, has_smpl, pose, betas, cam_t, loss, joint_loss):
        """SPIN: a sample with ground-truth SMPL takes it as its fit; the camera comes from the keypoints."""
        idx = np.flatnonzero(has_smpl)
        gt_pose = torch.as_tensor(to_numpy(batch, "pose")[idx], device=self.device)
        gt_betas = torch.as_tensor(to_numpy(batch, "betas")[idx], device=self.device)
        with torch.no_grad():
            kp3d = self.model(gt_pose, gt_betas).keypoints
            gt_cam = estimate_translation(kp3d, keypoints[idx])
            gt_loss, gt_joint = score(self.model, self.prior, gt_pose, gt_betas, gt_cam, keypoints[idx], self.config)
        pose, betas, cam_t, loss, joint_loss = (a.copy() for a in (pose, betas, cam_t, loss, joint_loss))
        pose[idx], betas[idx], cam_t[idx] = gt_pose.cpu().numpy(), gt_betas.cpu().numpy(), gt_cam.cpu().numpy()
        loss[idx], joint_loss[idx] = gt_loss.cpu().numpy(), gt_joint.cpu().numpy()
        return pose, betas, cam_t, loss, joint_loss

    def _previous_fits(self, shard: str):
        """The previous round's best fits of one shard, indexed by sample id (cached per actor)."""
        if shard not in self._previous:
            path = None if self.spec.round_index == 0 else \
                storage.join(rundir.step_dir(self.spec.run, self.spec.round_index - 1, "fits"), shard)
            if path is None or not storage.exists(path):
                self._previous[shard] = ({}, {}, None)
            else:
                table = read_table(path, FITS_SCHEMA)
                index = {sid: i for i, sid in enumerate(table.column("sample_id").to_pylist())}
                arrays = {k: to_numpy(table, k) for k in FITS_SCHEMA.names}
                self._previous[shard] = (index, arrays, table)
        return self._previous[shard]

    def _merge_previous(self, new: dict[str, Any], keypoints: torch.Tensor, shards: list[str]) -> dict[str, Any]:
        n = len(shards)
        has_old, old_arrays = gather_previous(new["sample_id"], shards, lambda s: self._previous_fits(s)[:2])
        merged = {k: np.array(v) for k, v in new.items()}
        merged["kept_old"] = np.zeros(n, dtype=bool)
        if not has_old.any():
            return merged
        # re-score the stored fits under the current keypoints, so the comparison is fair
        to_t = lambda k: torch.as_tensor(old_arrays[k], device=self.device)  # noqa: E731
        with torch.no_grad():
            old_loss, old_joint = score(self.model, self.prior, to_t("pose"), to_t("betas"), to_t("cam_t"),
                                        keypoints[torch.as_tensor(np.flatnonzero(has_old), device=self.device)], self.config)
        old_loss, old_joint = old_loss.cpu().numpy(), old_joint.cpu().numpy()
        take_old = ~keep_new(merged["loss"][has_old].astype(np.float64), old_loss.astype(np.float64))
        target = np.flatnonzero(has_old)[take_old]
        for key in ("pose", "betas", "cam_t", "found_in_round", "init", "iterations", "betas_ok"):
            merged[key][target] = old_arrays[key][take_old]
        merged["loss"][target] = old_loss[take_old]
        merged["joint_loss"][target] = old_joint[take_old]
        merged["valid"][target] = old_loss[take_old] < self.config.loss_threshold
        merged["kept_old"][target] = True
        return merged

    def _quarantined(self, batch: pa.Table, reason: str) -> pa.Table:
        """Rows for samples that could not be fitted: the previous best fit where there is one
        (a best fit never gets lost), else a quarantine reason."""
        n = len(batch)
        columns = fits_columns(batch.column("sample_id").to_pylist(), pose=0.0, betas=0.0, cam_t=0.0, loss=np.inf,
                               joint_loss=0.0, valid=False, betas_ok=False, found_in_round=self.spec.round_index,
                               init="mean", iterations=0)
        try:
            keypoints = normalized_to_pixels(torch.as_tensor(to_numpy(batch, "keypoints")), IMG_RES)
        except Exception:  # noqa: BLE001 - unreadable keypoints still let us carry the old fit
            keypoints = torch.full((n, 49, 3), float("nan"))
        shards = [storage.basename(p) for p in batch.column("path").to_pylist()]
        merged = self._merge_previous(columns, keypoints.to(self.device), shards)
        table = make_table({k: merged[k] for k in FITS_SCHEMA.names}, FITS_SCHEMA)
        reasons = [None if kept else reason for kept in merged["kept_old"]]
        return self._with_row_notes(table, shards, reasons, "")
