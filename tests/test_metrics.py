"""Metrics on hand-made inputs, and the evaluation of a regressor and of fits on real files."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pyarrow as pa
import pytest
import roma
import torch

from fitting.keypoints import GT24
from fitting.render import part_labels, render
from tests.test_train import make_body, make_samples
from trainer.data.samples import encode_mask
from trainer.data.tables import FITS_SCHEMA, SAMPLES_SCHEMA, make_table, to_numpy, write_shards
from trainer.data.protocols import PROTOCOLS, lsp14_joints
from trainer.evaluate import _eval_joints, evaluate_fits, evaluate_regressor, format_table, write_overlays
from trainer.metrics import (
    AUC_THRESHOLDS_MM, auc, confusion_matrix, joint_errors, mpjpe, pa_mpjpe, pck, pose_metrics, segmentation_scores,
    shared_rotation_error,
)
from trainer.model import Regressor

torch.set_num_threads(1)


def _joints(seed=0, n=4):
    return torch.as_tensor(np.random.default_rng(seed).normal(scale=0.3, size=(n, 14, 3)))


def test_perfect_prediction_scores_perfectly():
    gt = _joints()
    metrics = pose_metrics(gt.clone(), gt)
    assert float(metrics["mpjpe"].abs().max()) == 0.0 and float(metrics["pa_mpjpe"].abs().max()) < 1e-6
    # no error is strictly below the 0 mm threshold, so AUC tops out at 30 of its 31 thresholds
    assert torch.all(metrics["pck"] == 100) and torch.allclose(metrics["auc"], torch.tensor(100 * 30 / 31, dtype=torch.float64))


def test_pa_mpjpe_is_invariant_to_a_similarity_transform():
    gt = _joints(1)
    noisy = gt + 0.02 * _joints(2)
    R = roma.random_rotmat(4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    moved = 1.7 * torch.einsum("bij,bnj->bni", R, noisy) + torch.tensor([0.3, -1.0, 4.0], dtype=torch.float64)
    assert torch.allclose(pa_mpjpe(moved, gt), pa_mpjpe(noisy, gt), atol=1e-6)
    assert float(pa_mpjpe(gt * 0.5 + 2.0, gt).abs().max()) < 1e-6
    assert torch.all(mpjpe(moved, gt) > 10 * pa_mpjpe(moved, gt))


def _lsp14(joints14: torch.Tensor) -> torch.Tensor:
    """The built-in protocol's centring of (B, 14, 3) LSP joints (rows 0-13 of the 24)."""
    return lsp14_joints(torch.cat([joints14, torch.zeros(len(joints14), 10, 3, dtype=joints14.dtype)], dim=1))


def test_the_builtin_protocol_centres_on_the_mid_hip_and_errors_are_in_millimetres():
    gt = _joints(3, n=1)
    pred = gt + torch.tensor([5.0, 0.0, 0.0], dtype=torch.float64)  # a global shift: no error
    assert float(mpjpe(_lsp14(pred), _lsp14(gt))) == pytest.approx(0.0, abs=1e-9)
    pred[0, 0, 1] += 0.014  # one joint (not a hip) 14 mm off
    assert float(mpjpe(_lsp14(pred), _lsp14(gt))) == pytest.approx(1.0, rel=1e-6)
    pred[0, 2, 2] += 0.028  # moving a hip moves the pelvis: every other joint shifts by 14 mm
    errors = joint_errors(_lsp14(pred), _lsp14(gt))[0]
    assert float(errors[5]) == pytest.approx(14.0, rel=1e-6)


def test_only_joints_that_count_are_scored_by_hand():
    """Three joints, the third not counted (a confidence-0 row of S): it may be anywhere."""
    gt = torch.tensor([[[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    pred = torch.tensor([[[0.0, 0.03, 0.0], [0.1, 0.0, 0.04], [9.0, 9.0, 9.0]]], dtype=torch.float64)
    counts = torch.tensor([[True, True, False]])
    assert float(mpjpe(pred, gt, counts)) == pytest.approx((30.0 + 40.0) / 2)
    assert math.isnan(float(joint_errors(pred, gt, counts)[0, 2]))
    metrics = pose_metrics(pred, gt, counts)
    assert float(metrics["pck"]) == 100.0                                  # 30 and 40 mm < 150 mm
    assert float(metrics["auc"]) == pytest.approx(100 * (np.mean([30 < t for t in AUC_THRESHOLDS_MM])
                                                         + np.mean([40 < t for t in AUC_THRESHOLDS_MM])) / 2)
    # two points: a similarity transform matches them exactly, whatever the third does
    assert float(pa_mpjpe(pred, gt, counts)) == pytest.approx(0.0, abs=1e-9)
    assert float(pa_mpjpe(pred, gt)) > 10  # counted, the far joint pulls the alignment off


def test_pck_and_auc():
    errors = torch.tensor([[0.0, 100.0, 150.0]])
    assert float(pck(errors)) == pytest.approx(200 / 3)  # 150 mm is not below 150 mm
    expected = np.mean([100 * np.mean(np.array([0.0, 100.0, 150.0]) < t) for t in AUC_THRESHOLDS_MM])
    assert float(auc(errors)) == pytest.approx(expected)
    assert len(AUC_THRESHOLDS_MM) == 31 and AUC_THRESHOLDS_MM[-1] == 150.0


def test_shared_rotation_error_sees_a_common_turn_and_not_scatter():
    truth = torch.as_tensor(np.random.default_rng(0).normal(scale=0.5, size=(200, 72)))
    turned = roma.rotvec_to_rotmat(truth.reshape(200, 24, 3))
    turned[:, 18] = turned[:, 18] @ roma.rotvec_to_rotmat(torch.tensor([0.0, -math.radians(20), 0.0], dtype=truth.dtype))
    fitted = roma.rotmat_to_rotvec(turned).reshape(200, 72)
    error = shared_rotation_error(fitted, truth)
    assert error.shape == (24,) and error[18] == pytest.approx(20.0, abs=1e-4) and float(error[:18].max()) < 1e-4
    # each fit off by its own +-20 degrees about the same axis: no shared direction
    sign = torch.where(torch.arange(200) % 2 == 0, 1.0, -1.0).to(truth.dtype)
    scattered = roma.rotvec_to_rotmat(truth.reshape(200, 24, 3))
    scattered[:, 4] = scattered[:, 4] @ roma.rotvec_to_rotmat(sign[:, None] * torch.tensor([math.radians(20), 0.0, 0.0], dtype=truth.dtype))
    assert float(shared_rotation_error(roma.rotmat_to_rotvec(scattered).reshape(200, 72), truth)[4]) < 1e-4


def test_segmentation_scores_on_hand_made_masks():
    gt = np.zeros((4, 4), bool)
    gt[1:3, 1:3] = True                      # 4 foreground pixels
    pred = np.zeros((4, 4), bool)
    pred[1:3, 2:4] = True                    # 2 right, 2 false positives, 2 missed
    confusion = confusion_matrix(pred, gt, 2)
    assert confusion.tolist() == [[10, 2], [2, 2]]
    scores = segmentation_scores(confusion)
    assert scores["accuracy"] == pytest.approx(12 / 16)
    assert scores["f1"] == pytest.approx(np.mean([2 * 10 / (20 + 4), 2 * 2 / (4 + 4)]))

    gt_parts = np.array([[0, 1, 1], [2, 2, 255], [0, 0, 0]])
    pred_parts = np.array([[0, 1, 2], [2, 2, 6], [0, 0, 1]])
    confusion = confusion_matrix(pred_parts, gt_parts, 7)
    assert confusion.sum() == 8                               # the 255 pixel is ignored
    scores = segmentation_scores(confusion)
    assert scores["accuracy"] == pytest.approx(6 / 8)
    f1 = [2 * 3 / (6 + 1), 2 * 1 / (2 + 2), 2 * 2 / (4 + 1)]  # background, part 1, part 2; absent parts skipped
    assert scores["f1"] == pytest.approx(np.mean(f1))
    # SPIN (after UP-3D) reads an unlabelled pixel as background for the accuracy: predicted 6 there
    assert segmentation_scores(confusion, ignored=1, ignored_background=0)["accuracy"] == pytest.approx(6 / 9)
    with pytest.raises(ValueError):
        confusion_matrix(np.full((2, 2), 9), np.zeros((2, 2)), 7)


# ------------------------------------------------------------------- evaluation on files

@pytest.fixture(scope="module")
def body():
    return make_body(num_vertices=1500)


def _constant_regressor(pose: np.ndarray, betas: np.ndarray, cam: np.ndarray) -> Regressor:
    """A regressor whose output is the given parameters for every image."""
    from fitting.geometry import pose_to_rotmat, rotmat_to_sixd
    sixd = rotmat_to_sixd(pose_to_rotmat(torch.as_tensor(pose, dtype=torch.float32)[None]))[0].reshape(144)
    regressor = Regressor("small", img_res=64, mean_params={"pose": sixd.numpy(), "shape": betas, "cam": cam})
    for layer in (regressor.decpose, regressor.decshape, regressor.deccam):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    return regressor.eval()


def _test_split(body, tmp_path, pose, betas, cam, size=64, n=3):
    """A test split whose every sample shows the body of (pose, betas) seen through SPIN's camera
    (cam, weak perspective) at crop size `size`: masks rendered with a 5000 * size / 224 focal."""
    samples, _ = make_samples(body, n, size=size)
    with torch.no_grad():
        out = body(torch.as_tensor(pose, dtype=torch.float32)[None], torch.as_tensor(betas, dtype=torch.float32)[None])
    cam_t = np.array([cam[1], cam[2], 2 * 5000 / (224 * cam[0])])
    rendered = render(out.vertices[0].numpy() + cam_t, body.faces, 5000 * size / 224, (size / 2, size / 2), size,
                      part_labels=part_labels(body))
    joints3d = np.concatenate([out.keypoints[0, list(GT24)].numpy() + cam_t, np.ones((24, 1))], axis=1)
    table = samples.drop(["joints3d", "mask", "part_mask"])
    table = table.append_column("joints3d", pa.array([joints3d.reshape(-1).tolist()] * n, pa.list_(pa.float32())))
    table = table.append_column("mask", pa.array([encode_mask(rendered.mask)] * n, pa.binary()))
    table = table.append_column("part_mask", pa.array([encode_mask(rendered.parts)] * n, pa.binary()))
    write_shards(table, tmp_path / "test", shard_size=2)
    return tmp_path, rendered


def test_evaluate_regressor_against_known_truth(body, tmp_path):
    pose = np.zeros(72)
    pose[0] = math.pi
    pose[50] = 0.6
    betas = np.zeros(10, np.float32)
    cam = np.array([0.9, 0.05, -0.03], np.float32)
    root, rendered = _test_split(body, tmp_path, pose, betas, cam)
    assert rendered.mask.sum() > 50  # the body is in view
    exact = evaluate_regressor(_constant_regressor(pose, betas, cam), [root], body, batch_size=2)
    assert exact["samples"] == 3 and exact["evaluated_3d"] == 3 and exact["segmented"] == 3
    assert exact["mpjpe"] < 0.01 and exact["pa_mpjpe"] < 0.01 and exact["pck"] == 100  # mm; float32 storage
    assert exact["fg_accuracy"] == 1.0 and exact["fg_f1"] == 1.0 and exact["parts_f1"] == 1.0

    bent = pose.copy()
    bent[3:] = np.random.default_rng(0).normal(scale=0.4, size=69)
    shifted = np.array([0.8, 0.15, -0.03], np.float32)
    wrong = evaluate_regressor(_constant_regressor(bent, betas, shifted), [root], body, batch_size=2)
    assert wrong["mpjpe"] > 20 and wrong["pa_mpjpe"] > 5 and wrong["pa_mpjpe"] < wrong["mpjpe"]
    assert wrong["fg_f1"] < 0.95 and wrong["parts_accuracy"] < 1.0

    png = write_overlays(_constant_regressor(pose, betas, cam), [root], body, tmp_path / "grid.png", num=3, columns=2)
    assert cv2.imread(str(png)).shape == (2 * 160, 2 * 320, 3)
    table = format_table({"exact": exact, "wrong": wrong})
    assert "pa_mpjpe" in table.splitlines()[0] and table.splitlines()[2].startswith("wrong")


def test_the_builtin_protocol_scores_keypoints_without_posing_meshes_and_gets_the_same_joints(body):
    """Fits are scored through the keypoints alone (the built-in protocol's joints); meshes are
    posed only where someone looks at them (the regressor's segmentation): the same joints."""
    rng = np.random.default_rng(3)
    pose, betas = rng.normal(scale=0.4, size=(70, 72)), rng.normal(size=(70, 10))
    seen = []
    keypoints_only = _eval_joints(PROTOCOLS["lsp14"], body, body, pose, betas, batch_size=32)
    with_meshes = _eval_joints(PROTOCOLS["lsp14"], body, body, pose, betas, batch_size=32,
                               on_batch=lambda rows, meshes: seen.append(len(rows)))
    assert seen == [32, 32, 6] and keypoints_only.shape == (70, 14, 3)
    np.testing.assert_allclose(keypoints_only, with_meshes, atol=1e-5)


def test_evaluate_fits(body):
    samples, fits = make_samples(body, 6, seed=2, size=32)
    truth = make_table({"sample_id": samples.column("sample_id").to_pylist(), "dataset": ["toy"] * 6,
                        "keypoints": to_numpy(samples, "keypoints"), "pose": to_numpy(fits, "pose"),
                        "betas": to_numpy(fits, "betas")}, SAMPLES_SCHEMA)
    exact = evaluate_fits(fits, truth, body)   # truth without joints3d: pose and betas give it
    assert exact["matched"] == 6 and exact["acceptance_rate"] == 1.0 and exact["mpjpe"] < 1e-3

    pose = to_numpy(fits, "pose").copy()
    pose[:3, 3:] += 0.5
    columns = {n: (to_numpy(fits, n) if n in ("betas", "cam_t", "joint_loss") else fits.column(n).to_pylist())
               for n in FITS_SCHEMA.names}
    columns.update(pose=pose, valid=[False] * 3 + [True] * 3)
    columns["sample_id"] = columns["sample_id"][:5] + ["elsewhere"]
    result = evaluate_fits(make_table(columns, FITS_SCHEMA), truth, body)
    assert result["fits"] == 6 and result["matched"] == 5 and result["acceptance_rate"] == 0.5
    assert result["mpjpe"] > 10 and result["valid_mpjpe"] < 1e-3
