"""SPIN's losses: per-sample, per-term values, masks, weights, and the shape guard."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fitting.errors import BadInput
from fitting.geometry import pose_to_rotmat, rotmat_to_sixd
from fitting.keypoints import GT24, OP25
from fitting.priors import GMMPrior
from tests.test_train import make_body, make_samples
from trainer.dataset import SamplesDataset
from trainer.losses import (
    LossWeights, camera_loss, compute_losses, keypoint_3d_loss, keypoint_loss, masked_mean, project_keypoints,
)
from trainer.data.tables import FITS_SCHEMA, make_table, to_numpy
from trainer.model import RegressorOutput

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def body():
    return make_body(num_vertices=800)


def _truth(body, n=3, seed=0):
    rng = np.random.default_rng(seed)
    pose = torch.as_tensor(rng.normal(scale=0.2, size=(n, 72)), dtype=torch.float32)
    pose[:, 0] += np.pi
    betas = torch.as_tensor(rng.normal(size=(n, 10)), dtype=torch.float32)
    cam = torch.tensor([[0.3, 0.05, -0.02]]).repeat(n, 1)
    with torch.no_grad():
        out = body(pose, betas)
    keypoints = torch.cat([project_keypoints(out.keypoints, cam), torch.ones(n, 49, 1)], dim=-1)
    joints3d = torch.cat([out.keypoints[:, list(GT24)] + 0.3, torch.ones(n, 24, 1)], dim=-1)  # any offset
    batch = {"keypoints": keypoints, "pose": pose, "betas": betas, "joints3d": joints3d,
             "fit_valid": torch.ones(n, dtype=torch.bool), "betas_ok": torch.ones(n, dtype=torch.bool),
             "has_joints3d": torch.ones(n, dtype=torch.bool), "usable": torch.ones(n, dtype=torch.bool)}
    rotmat = pose_to_rotmat(pose)
    pred = RegressorOutput(rotmat=rotmat, betas=betas.clone(), cam=cam, sixd=rotmat_to_sixd(rotmat).reshape(n, -1))
    return pred, batch


def test_perfect_prediction_has_zero_loss_but_the_camera_term(body):
    pred, batch = _truth(body)
    result = compute_losses(pred, batch, body, LossWeights(vertices=1.0))
    for name in ("keypoints", "keypoints_3d", "pose", "betas", "vertices"):
        assert result.terms[name].shape == (3,)
        assert float(result.terms[name].abs().max()) < 1e-6, name
    assert torch.allclose(result.terms["cam"], torch.exp(torch.tensor(-3.0)) ** 2)
    assert result.keypoint_per_joint.shape == (3, 49)
    assert float(result.total) == pytest.approx(60 * float(torch.exp(torch.tensor(-3.0)) ** 2), rel=1e-4)


def test_terms_are_per_sample_and_total_follows_the_weights(body):
    pred, batch = _truth(body)
    pred.betas[1] += 0.5
    pred.rotmat[1, 5] = pose_to_rotmat(torch.tensor([[0.0, 0.8, 0.0]]))[0, 0] @ pred.rotmat[1, 5]
    result = compute_losses(pred, batch, body, LossWeights())
    for name in ("keypoints", "pose", "betas"):
        assert float(result.terms[name][0]) < 1e-9 and float(result.terms[name][1]) > 1e-6, name
    assert float(result.terms["betas"][1]) == pytest.approx(0.25, rel=1e-5)
    w = LossWeights()
    expected = w.scale * sum(getattr(w, n) * masked_mean(result.terms[n], result.masks[n]) for n in result.terms)
    assert float(result.total) == pytest.approx(float(expected), rel=1e-5)
    heavier = compute_losses(pred, batch, body, LossWeights(pose=10.0))
    assert float(heavier.total) > float(result.total)


def test_masks_switch_targets_off(body):
    pred, batch = _truth(body)
    batch["pose"] = batch["pose"] + 0.5  # wrong targets ...
    batch["betas"] = batch["betas"] + 1.0
    batch["fit_valid"][:] = False       # ... that no sample uses
    batch["has_joints3d"][:] = False
    batch["joints3d"][:] = 99.0
    result = compute_losses(pred, batch, body, LossWeights())
    assert float(result.total) == pytest.approx(60 * float(camera_loss(pred.cam).mean()), rel=1e-4)
    batch["usable"][0] = False
    pred.betas[0] += 5
    assert float(compute_losses(pred, batch, body, LossWeights()).total) == pytest.approx(float(result.total), rel=1e-4)


def test_keypoint_confidence_and_openpose_block_weight():
    target = torch.zeros(1, 49, 3)
    target[..., 2] = 1.0
    target[0, 3, 2] = 0.0  # unseen
    pred = torch.ones(1, 49, 2)
    per_joint = keypoint_loss(pred, target, openpose_weight=0.0)
    assert float(per_joint[0, list(OP25)].abs().sum()) == 0.0 and torch.all(per_joint[0, list(GT24)] == 1.0)
    per_joint = keypoint_loss(pred, target, openpose_weight=0.5)
    assert float(per_joint[0, 3]) == 0.0 and float(per_joint[0, 0]) == 0.5


def test_3d_keypoints_are_compared_after_centring_on_the_hips():
    gt = torch.cat([torch.randn(2, 24, 3), torch.ones(2, 24, 1)], dim=-1)
    pred = gt[..., :3] + torch.tensor([1.0, -2.0, 3.0])
    assert torch.allclose(keypoint_3d_loss(pred, gt), torch.zeros(2), atol=1e-10)
    gt[0, 7, 3] = 0.0
    pred[0, 7] += 10.0
    assert float(keypoint_3d_loss(pred, gt)[0]) < 1e-10


def test_two_d_mode_adds_priors(body):
    pred, batch = _truth(body)
    with pytest.raises(BadInput, match="needs a pose prior"):
        compute_losses(pred, batch, body, LossWeights(), mode="2d")
    prior = GMMPrior.from_arrays(np.zeros((8, 69)), np.tile(np.eye(69), (8, 1, 1)), np.full(8, 1 / 8))
    result = compute_losses(pred, batch, body, LossWeights(), mode="2d", prior=prior)
    assert {"pose_prior", "angle_prior", "shape_prior"} <= set(result.terms)
    assert torch.allclose(result.terms["shape_prior"], (pred.betas ** 2).sum(-1))
    with pytest.raises(BadInput, match="unknown training mode"):
        compute_losses(pred, batch, body, LossWeights(), mode="3d")


def test_two_d_mode_priors_follow_the_keypoint_weight(body):
    # SMPLify's balance of data and priors: the keypoint weight scales the whole 2D-only loss
    pred, batch = _truth(body)
    pred.betas = pred.betas + 0.3
    batch["keypoints"] = batch["keypoints"].clone()
    batch["keypoints"][..., :2] += 0.05
    prior = GMMPrior.from_arrays(np.zeros((8, 69)), np.tile(np.eye(69), (8, 1, 1)), np.full(8, 1 / 8))
    quiet = dict(keypoints_3d=0.0, pose=0.0, betas=0.0, cam=0.0)
    spin = compute_losses(pred, batch, body, LossWeights(keypoints=5.0, **quiet), mode="2d", prior=prior)
    tenth = compute_losses(pred, batch, body, LossWeights(keypoints=0.5, **quiet), mode="2d", prior=prior)
    assert float(spin.terms["shape_prior"].mean()) > 0 and float(spin.terms["keypoints"].mean()) > 0
    torch.testing.assert_close(tenth.total, spin.total / 10)
    data = 5.0 * spin.terms["keypoints"].mean()
    priors = 5.0 / (98 * 112.0 ** 2) * (4.78 ** 2 * spin.terms["pose_prior"] + 15.2 ** 2 * spin.terms["angle_prior"]
                                        + 5.0 ** 2 * spin.terms["shape_prior"]).mean()
    torch.testing.assert_close(spin.total, 60.0 * (data + priors))


@pytest.mark.parametrize("valid, extreme", [(True, False), (True, True), (False, False), (False, True)])
def test_shape_guard_as_spins_trainer(body, valid, extreme):
    """SPIN's train/trainer.py: extreme betas (any |beta| > 3) make the betas target the mean
    shape while a valid fit's pose and vertices (from its own, extreme betas) still supervise; an
    invalid fit supervises nothing of pose or shape; the keypoint loss applies in every case."""
    samples, fits = make_samples(body, 2, size=32)
    fit_pose, fit_betas = to_numpy(fits, "pose").copy(), to_numpy(fits, "betas").copy()
    if extreme:
        fit_betas[0, 3] = 3.5
    cols = {name: (to_numpy(fits, name) if name in ("pose", "cam_t", "joint_loss") else fits.column(name).to_pylist())
            for name in FITS_SCHEMA.names}
    cols.update(betas=fit_betas, betas_ok=[not extreme, True], valid=[valid, True])
    dataset = SamplesDataset(samples, make_table(cols, FITS_SCHEMA), img_res=32)
    batch = {k: torch.stack([dataset[i][k] for i in range(2)]) for k in dataset[0]}
    assert bool(batch["fit_valid"][0]) == valid and bool(batch["betas_ok"][0]) == (not extreme)
    assert torch.allclose(batch["betas"][0], torch.as_tensor(fit_betas[0]))  # the stored fit keeps its betas

    rng = np.random.default_rng(1)
    pose = torch.as_tensor(fit_pose + rng.normal(scale=0.1, size=fit_pose.shape), dtype=torch.float32)
    rotmat = pose_to_rotmat(pose)
    pred = RegressorOutput(rotmat=rotmat, betas=torch.as_tensor(rng.normal(size=(2, 10)), dtype=torch.float32),
                           cam=torch.tensor([[0.9, 0.0, 0.0]]).repeat(2, 1), sixd=rotmat_to_sixd(rotmat).reshape(2, -1))
    result = compute_losses(pred, batch, body, LossWeights(vertices=1.0))
    for term in ("pose", "betas", "vertices"):
        assert bool(result.masks[term][0]) == valid, term
    assert bool(result.masks["keypoints"][0]) and float(result.terms["keypoints"][0]) > 0
    target = torch.zeros(10) if extreme else torch.as_tensor(fit_betas[0])
    assert float(result.terms["betas"][0]) == pytest.approx(float((pred.betas[0] - target).square().mean()), rel=1e-5)
    with torch.no_grad():
        own = body(torch.as_tensor(fit_pose[:1]), torch.as_tensor(fit_betas[:1])).vertices
        expected = (body(pred.rotmat[:1], pred.betas[:1]).vertices - own).abs().mean()
    assert float(result.terms["vertices"][0]) == pytest.approx(float(expected), rel=1e-4)


def test_fit_targets(body):
    samples, fits = make_samples(body, 4, size=32)
    cols = {name: (to_numpy(fits, name) if name in ("pose", "betas", "cam_t", "joint_loss") else fits.column(name).to_pylist())
            for name in FITS_SCHEMA.names}
    cols["sample_id"] = cols["sample_id"][:3] + ["unknown"]
    dataset = SamplesDataset(samples, make_table(cols, FITS_SCHEMA), img_res=32)
    items = [dataset[i] for i in range(4)]
    assert [bool(i["fit_valid"]) for i in items] == [True, True, True, False]  # no fit: nothing to supervise
    assert items[0]["image"].dtype == torch.uint8 and items[0]["image"].shape == (3, 32, 32)
