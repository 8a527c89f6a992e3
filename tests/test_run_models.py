"""Every step of a run uses the configured body model and prior, and says so: a converted model
with another vertex count than the built-in one and a prior of its own, through a real one-round
run (local Ray, SQLite MLflow)."""
from __future__ import annotations

import shutil

import mlflow
import numpy as np
import pytest

from fitting.errors import BadInput
from fitting.identity import file_identity
from fitting.keypoints import VERTEX_JOINT_NAMES
from fitting.priors import builtin_prior_path
from pipeline import rundir
from pipeline.config import RunConfig, load_run_body_model
from pipeline.rounds import run_pipeline
from tests.test_body_model import run_cli
from tests.test_pipeline import FAST_SMPLIFY
from tests.toy_body import make_toy_smpl


@pytest.fixture
def own_models(tmp_path, capsys):
    """A 2,000-vertex SMPL-layout model, converted as a user converts theirs, and a GMM prior that
    is not the built-in one."""
    arrays = make_toy_smpl(num_vertices=2000, seed=4)
    arrays["vertex_joint_ids"] = np.random.default_rng(4).integers(2000, size=len(VERTEX_JOINT_NAMES))
    np.savez(tmp_path / "raw.npz", **arrays)
    code, _, err = run_cli(["body-model", "convert", str(tmp_path / "raw.npz"), str(tmp_path / "smpl.npz")], capsys)
    assert code == 0, err
    with np.load(builtin_prior_path()) as prior:
        np.savez(tmp_path / "gmm.npz", means=prior["means"], covars=prior["covars"], weights=prior["weights"][::-1])
    return tmp_path / "smpl.npz", tmp_path / "gmm.npz"


@pytest.mark.slow
def test_every_step_uses_and_records_the_configured_model_and_prior(tiny_benchmark, tmp_path, own_models):
    body_path, prior_path = own_models
    body, prior = file_identity(body_path), file_identity(prior_path)
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(tiny_benchmark, data)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # explicit: an earlier test may have set MLFLOW_TRACKING_URI
    config = RunConfig.from_dict({"data": str(data), "rounds": 1, "train_preset": "tiny", "body_model": str(body_path),
                                  "prior": str(prior_path), "fit": {"batch_size": 32, "smplify": FAST_SMPLIFY},
                                  "tracking": {"tracking_uri": uri}})
    run_pipeline(run, config, rounds=1, progress=False)

    for step in ("fits", "model", "eval"):
        success = rundir.read_success(run, 0, step)
        assert success["models"] == {"body_model": body, "prior": prior}, step
    # what each step actually loaded: every fit actor, the trainer, the evaluation
    assert rundir.read_success(run, 0, "fits")["loaded"] == [{"body_model": body, "prior": prior}]
    assert rundir.read_success(run, 0, "model")["loaded"] == {"body_model": body}  # fits mode: no prior
    assert rundir.read_success(run, 0, "eval")["loaded"] == {"body_model": body}
    assert "regressor" in rundir.read_success(run, 0, "eval")

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["spin-pipeline"])
    for name in ("fit-round0", "train-round0", "eval-round0"):
        row = runs[runs["tags.mlflow.runName"] == name].iloc[0]
        assert row["params.models.body_model.sha256"] == body["sha256"], name
        assert row["params.models.prior.sha256"] == prior["sha256"], name
    parent = runs[runs["tags.mlflow.parentRunId"].isna()].iloc[0]
    assert parent["params.models.body_model.path"] == body["path"]


def test_a_model_that_changed_under_a_run_is_refused(own_models):
    body_path, _ = own_models
    pinned = {"body_model": {"path": str(body_path), "sha256": file_identity(body_path)["sha256"]}}
    assert load_run_body_model(pinned).num_vertices == 2000
    pinned["body_model"]["sha256"] = "0" * 64
    with pytest.raises(BadInput, match="changed since the run started"):
        load_run_body_model(pinned)
