"""The GMM, angle and shape priors against hand-computed values; loading gmm_08-format files."""
from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fitting.errors import BadInput
from fitting.objective import gmof, gmof_residual
from fitting.priors import GMMPrior, angle_prior, load_prior, read_prior_arrays, shape_prior


@pytest.fixture(scope="module")
def builtin():
    return load_prior()


def test_gmof_by_hand():
    x = torch.tensor([0.0, 1.0, -3.0, 100.0])
    expected = torch.tensor([0.0, 4 * 1 / (4 + 1), 4 * 9 / (4 + 9), 4 * 1e4 / (4 + 1e4)])
    torch.testing.assert_close(gmof(x, 2.0), expected)
    torch.testing.assert_close(gmof_residual(x, 2.0).square(), expected)
    assert gmof_residual(torch.tensor([-3.0]), 2.0).item() < 0  # signed, so it has a useful Jacobian


def test_angle_prior_by_hand():
    pose = torch.zeros(2, 69)
    assert angle_prior(pose).tolist() == [4.0, 4.0]
    pose[1, 52] = 0.5    # left elbow y: bending the wrong way (+) costs
    pose[1, 55] = 0.5    # right elbow y: bending the right way (+) is cheap
    pose[1, 9] = -1.0    # left knee x: hyperextension costs
    pose[1, 12] = 2.0    # right knee x: flexion is cheap
    expected = math.exp(1.0) + math.exp(-1.0) + math.exp(2.0) + math.exp(-4.0)
    assert angle_prior(pose)[1].item() == pytest.approx(expected, rel=1e-6)
    pose[1, 0] = 3.0     # other joints do not enter
    assert angle_prior(pose)[1].item() == pytest.approx(expected, rel=1e-6)


def test_shape_prior_by_hand():
    betas = torch.arange(10.0)[None].repeat(2, 1)
    betas[1] = 0.0
    assert shape_prior(betas).tolist() == [285.0, 0.0]


def test_gmm_prior_by_hand_2d():
    means = np.array([[0.0, 0.0], [1.0, 1.0]])
    covars = np.array([np.eye(2), np.diag([4.0, 1.0])])    # sqrt(det) = 1 and 2
    weights = np.array([0.25, 0.75])
    prior = GMMPrior.from_arrays(means, covars, weights, dim=None)
    # c_k = -log(w_k / (2 pi * sqrt(det C_k) / 1))
    c0 = -math.log(0.25 / (2 * math.pi * 1.0))
    c1 = -math.log(0.75 / (2 * math.pi * 2.0))
    x = torch.tensor([[1.0, 0.0], [1.0, 3.0]])
    # x0: comp 0 -> 0.5 * 1 + c0 ; comp 1 -> d = (0, -1): 0.5 * (0/4 + 1) + c1
    e00, e01 = 0.5 + c0, 0.5 + c1
    # x1: comp 0 -> 0.5 * (1 + 9) + c0 ; comp 1 -> d = (0, 2): 0.5 * 4 + c1
    e10, e11 = 5.0 + c0, 2.0 + c1
    torch.testing.assert_close(prior.component_energies(x), torch.tensor([[e00, e01], [e10, e11]]))
    torch.testing.assert_close(prior(x), torch.tensor([min(e00, e01), min(e10, e11)]))
    torch.testing.assert_close(prior.residuals(x).square().sum(-1), prior(x))
    torch.testing.assert_close(prior.mean(), torch.tensor([0.75, 0.75]))


def test_builtin_prior_matches_smplify_formula(builtin):
    arrays = builtin.to_arrays()
    assert arrays["means"].shape == (8, 69) and arrays["covars"].shape == (8, 69, 69)
    assert arrays["weights"].shape == (8,) and arrays["weights"].sum() == pytest.approx(1.0, abs=1e-5)
    rng = np.random.default_rng(0)
    x = arrays["means"][rng.integers(8, size=5)] + 0.2 * rng.standard_normal((5, 69))
    # SMPLify's merged log-likelihood written out in float64
    sqrdets = np.sqrt(np.linalg.det(arrays["covars"]))
    nll_weights = arrays["weights"] / ((2 * np.pi) ** (69 / 2) * sqrdets / sqrdets.min())
    diff = x[:, None, :] - arrays["means"][None]
    quad = np.einsum("bki,kij,bkj->bk", diff, np.linalg.inv(arrays["covars"]), diff)
    expected = (0.5 * quad - np.log(nll_weights)).min(axis=1)
    got = builtin(torch.as_tensor(x, dtype=torch.float32))
    np.testing.assert_allclose(got.numpy(), expected, rtol=2e-4)
    torch.testing.assert_close(builtin.residuals(torch.as_tensor(x, dtype=torch.float32)).square().sum(-1), got)


def test_prior_is_differentiable_and_prefers_its_means(builtin):
    x = builtin.means[:1].clone().requires_grad_(True)
    builtin(x).sum().backward()
    assert x.grad.abs().max() < 1e-3  # a component mean is a stationary point
    assert builtin(builtin.means[:1] + 0.5).item() > builtin(builtin.means[:1]).item()


def _save_pickle(path, arrays, protocol=2):
    with open(path, "wb") as fh:
        pickle.dump(arrays, fh, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.fault("a prior `.pkl` without the opt-in", "refused")
def test_load_npz_and_opt_in_pickle(tmp_path, builtin, protocol):
    arrays = builtin.to_arrays()
    np.savez(tmp_path / "gmm_08.npz", **arrays)
    _save_pickle(tmp_path / "gmm_08.pkl", arrays, protocol)
    x = builtin.means + 0.1
    from_npz = load_prior(tmp_path / "gmm_08.npz")
    torch.testing.assert_close(from_npz(x), builtin(x))
    with pytest.raises(BadInput, match="opt-in"):
        load_prior(tmp_path / "gmm_08.pkl")
    torch.testing.assert_close(load_prior(tmp_path / "gmm_08.pkl", allow_pickle=True)(x), builtin(x))


class _Sneaky:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.fault("a pickle that references code, even with the opt-in", "refused")
def test_pickle_with_foreign_objects_is_refused(tmp_path):
    _save_pickle(tmp_path / "evil.pkl", {"means": _Sneaky(), "covars": 0, "weights": 0})
    with pytest.raises(BadInput, match="refusing to unpickle"):
        load_prior(tmp_path / "evil.pkl", allow_pickle=True)
    _save_pickle(tmp_path / "list.pkl", [1, 2])
    with pytest.raises(BadInput, match="expected a dict"):
        load_prior(tmp_path / "list.pkl", allow_pickle=True)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("weights"), "missing key 'weights'"),
    (lambda a: a.update(means=a["means"][:, :60]), "60 dimensions"),
    (lambda a: a.update(covars=a["covars"][:7]), "covars"),
    (lambda a: a.update(covars=-a["covars"]), "positive definite"),
    (lambda a: a.update(weights=np.where(np.arange(8) == 2, np.nan, a["weights"])), "NaN"),
])
@pytest.mark.fault("a prior with a missing key, wrong dimensions, a covariance that is not positive definite, NaN",
                   "one-line error")
def test_bad_prior_files(tmp_path, builtin, change, message):
    arrays = builtin.to_arrays()
    change(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(BadInput, match=message):
        load_prior(tmp_path / "bad.npz")


@pytest.mark.fault("a missing or corrupt prior file", "one-line error")
def test_unreadable_or_missing_files(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(BadInput, match="not a readable"):
        read_prior_arrays(tmp_path / "junk.npz")
    with pytest.raises(BadInput, match="not found"):
        load_prior(tmp_path / "none.npz")


def test_prior_build_command(tmp_path):
    from fitting.prior_cli import prior

    out = tmp_path / "gmm.npz"
    result = CliRunner().invoke(prior, ["build", "--out", str(out), "--num-poses", "1500",
                                        "--seed", "3", "--components", "2"])
    assert result.exit_code == 0, result.output
    built = load_prior(out)
    assert built.num_components == 2
    assert built.weights.sum().item() == pytest.approx(1.0, abs=1e-5)
    # poses of the family it was fitted on are far more likely than random joint angles
    from fitting.pose_sampler import sample_body_poses

    family = torch.as_tensor(sample_body_poses(200, np.random.default_rng(99)))
    noise = torch.as_tensor(np.random.default_rng(1).uniform(-1, 1, (200, 69)), dtype=torch.float32)
    assert built(family).median() < built(noise).median() - 100


def test_prior_build_bad_input_exits_2(tmp_path, capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["prior", "build", "--out", str(tmp_path / "x.npz"), "--num-poses", "0"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")
