"""The keypoints backbone: its body, its batched augmentation, its training path and its place in
the pipeline (fit initialization, evaluation, checkpoints)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from fitting.body_model import BodyModel, load_body_model
from fitting.errors import BadInput
from fitting.geometry import pose_to_rotmat
from fitting.keypoint_body import FastKeypointBody, KeypointBody, small_matmul
from fitting.keypoints import FLIP_PERM
from tests.test_train import make_body, make_samples
from trainer.augment import (
    AugParams,
    AugmentConfig,
    BatchAugParams,
    augment_keypoints_batch,
    augment_pose,
    augment_rotmat_batch,
    corrupt_keypoints,
    flip_rotmat,
    sample_batch_params,
)
from trainer.data.tables import write_shards
from trainer.dataset import KeypointBatches, SamplesDataset, read_samples
from trainer.model import Regressor, model_input
from trainer.train import load_regressor, predict, train_regressor
from trainer.train_config import train_config

torch.set_num_threads(1)


def keypoint_only(samples: pa.Table) -> pa.Table:
    """The same rows without their images (the keypoint-only train split's layout)."""
    at = samples.schema.get_field_index("image")
    return samples.set_column(at, samples.schema.field("image"), pa.nulls(len(samples), pa.binary()))


@pytest.fixture(scope="module")
def body() -> BodyModel:
    return make_body()


@pytest.fixture(scope="module")
def kp_data(body, tmp_path_factory) -> tuple[Path, pa.Table]:
    root = tmp_path_factory.mktemp("kp-data")
    samples, fits = make_samples(body, 12, seed=1)
    write_shards(keypoint_only(samples), root / "train", shard_size=6)
    return root, fits


def _config(**overrides):
    """The keypoints preset, eager unless asked (a compile costs a minute per batch shape)."""
    return train_config("keypoints", {"steps": 6, "batch_size": 8, "checkpoint_every": 3, "log_every": 1,
                                      "threads": 1, "compile": False, **overrides})


def _flip_only(n: int) -> BatchAugParams:
    return BatchAugParams(flip=torch.ones(n, dtype=torch.bool), rot=torch.zeros(n), scale=torch.ones(n))


# ---------------------------------------------------------------- the body


def test_fast_body_is_keypoint_body_with_pose_blend_and_soft_weights(posable):
    original = posable.smpl.lbs_weights.clone()
    noise = torch.softmax(torch.randn(original.shape, generator=torch.Generator().manual_seed(0)), dim=1)
    posable.smpl.lbs_weights.copy_(0.7 * original + 0.3 * noise)  # every vertex on every joint
    try:
        fast, reference = FastKeypointBody(posable), KeypointBody(posable)
        assert fast.pose_blend and fast.num_pairs == fast.num_virtual * 24
        g = torch.Generator().manual_seed(1)
        pose, betas = torch.randn(16, 72, generator=g) * 0.5, torch.randn(16, 10, generator=g)
        with torch.no_grad():
            assert torch.allclose(fast(pose, betas), reference(pose, betas), atol=1e-5)
            assert torch.allclose(fast(pose_to_rotmat(pose), betas), posable(pose, betas).keypoints, atol=1e-5)
    finally:
        posable.smpl.lbs_weights.copy_(original)


def test_fast_body_of_the_builtin_model_uses_few_pairs_and_matches_the_mesh():
    model = load_body_model()
    fast = FastKeypointBody(model)
    assert not fast.pose_blend and fast.num_pairs < 200
    g = torch.Generator().manual_seed(2)
    pose, betas = torch.randn(8, 72, generator=g) * 0.5, torch.randn(8, 10, generator=g)
    with torch.no_grad():
        assert torch.allclose(fast(pose, betas), model(pose, betas).keypoints, atol=1e-5)


# ---------------------------------------------------------------- flips and augmentation


def test_flip_twice_is_the_identity():
    g = torch.Generator().manual_seed(3)
    keypoints = torch.rand(5, 49, 3, generator=g) * 2 - 1
    rotmat = pose_to_rotmat(torch.randn(5, 72, generator=g))
    params = _flip_only(5)
    assert torch.equal(augment_keypoints_batch(augment_keypoints_batch(keypoints, params), params), keypoints)
    assert torch.allclose(flip_rotmat(flip_rotmat(rotmat)), rotmat)
    assert not torch.allclose(flip_rotmat(rotmat), rotmat)


def test_batched_pose_augmentation_is_the_per_sample_one():
    g = torch.Generator().manual_seed(4)
    pose = torch.randn(6, 72, generator=g, dtype=torch.float64) * 0.5
    params = [AugParams(flip=k % 2 == 0, rot=float(k * 17 - 40), scale=1.0 + 0.05 * k) for k in range(6)]
    batch = BatchAugParams(flip=torch.tensor([p.flip for p in params]), rot=torch.tensor([p.rot for p in params]),
                           scale=torch.tensor([p.scale for p in params]))
    batched = augment_rotmat_batch(pose_to_rotmat(pose), batch)
    one_by_one = torch.stack([pose_to_rotmat(torch.from_numpy(augment_pose(pose[k].numpy(), p))[None])[0]
                              for k, p in enumerate(params)])
    assert torch.allclose(batched, one_by_one, atol=1e-10)


def test_flipping_the_pose_flips_the_body_keypoints():
    """The mirrored pose (SMPL permutation, conjugated rotations) puts the body's keypoints where
    the keypoint flip (49-keypoint permutation, x negated) puts the original ones: the two
    permutations agree. The built-in model is left-right symmetric to a few millimetres."""
    model = load_body_model()
    fast = FastKeypointBody(model)
    g = torch.Generator().manual_seed(5)
    rotmat = pose_to_rotmat(torch.randn(8, 72, generator=g) * 0.4)
    betas = torch.zeros(8, 10)
    with torch.no_grad():
        mirrored = fast(flip_rotmat(rotmat), betas)
        flipped = fast(rotmat, betas)[:, list(FLIP_PERM)] * torch.tensor([-1.0, 1.0, 1.0])
        unrelated = (fast(rotmat, betas) - flipped).norm(dim=-1)
    assert float((mirrored - flipped).norm(dim=-1).max()) < 0.01
    assert float(unrelated.mean()) > 0.05  # the check can fail: an unflipped pose is far off


def test_keypoint_batches_are_augmented_consistently_and_reproducibly(body, kp_data):
    from trainer.data.tables import to_numpy
    from trainer.dataset import read_samples

    root, fits = kp_data
    config = _config()
    dataset = SamplesDataset(read_samples([root]), fits, augment=config.augment)
    batches = KeypointBatches(dataset, config.augment, seed=0)
    first, again = batches.batch(list(range(12)), 7), batches.batch(list(range(12)), 7)
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = batches.batch(list(range(12)), 8)
    assert not torch.equal(first["keypoints"], other["keypoints"])
    # input = target, jittered, with some keypoints dropped (confidence 0) and none invented
    dropped = (first["input_keypoints"][..., 2] == 0) & (first["keypoints"][..., 2] > 0)
    assert dropped.any() and not ((first["input_keypoints"][..., 2] > 0) & (first["keypoints"][..., 2] == 0)).any()
    assert 0 < float((first["input_keypoints"][..., :2] - first["keypoints"][..., :2]).abs().mean()) < 0.05
    plain = KeypointBatches(dataset, None, seed=0).batch(list(range(12)), 7)
    assert torch.allclose(plain["keypoints"], torch.tensor(to_numpy(read_samples([root]), "keypoints")).float())


def test_sampled_batch_params_follow_the_settings():
    config = AugmentConfig(keypoint_dropout=0.2, keypoint_jitter=0.03)
    params = sample_batch_params(np.random.default_rng(0), config, 4000)
    assert 0.45 < float(params.flip.float().mean()) < 0.55
    assert 0.35 < float((params.rot != 0).float().mean()) < 0.45 and float(params.rot.abs().max()) <= 60
    assert float(params.scale.min()) >= 0.75 and float(params.scale.max()) <= 1.25
    assert 0.19 < float(params.drop.float().mean()) < 0.21 and abs(float(params.jitter.std()) - 0.03) < 0.002
    none = sample_batch_params(np.random.default_rng(0), AugmentConfig(), 10)
    keypoints = torch.rand(10, 49, 3)
    assert none.drop is None and torch.equal(corrupt_keypoints(keypoints, none), keypoints)


# ---------------------------------------------------------------- the regressor


def test_missing_keypoints_do_not_reach_the_network():
    regressor = Regressor("keypoints", hidden=64, dropout=0.0, encoder_width=32).eval()
    keypoints = torch.rand(2, 49, 3)
    keypoints[:, 10:, 2] = 0.0
    moved = keypoints.clone()
    moved[:, 10:, :2] = torch.nan  # a missing keypoint's coordinates are anything
    with torch.no_grad():
        a, b = regressor(keypoints), regressor(moved)
    assert torch.equal(a.rotmat, b.rotmat) and torch.equal(a.cam, b.cam)
    assert regressor.eats == "keypoints" and Regressor("small", img_res=32).eats == "images"


def test_keypoint_regressor_overfits_a_few_samples(body, kp_data, tmp_path):
    root, fits = kp_data
    # a constant rate: the preset's cosine decay stops short of memorizing in so few steps
    config = _config(steps=300, batch_size=12, use_augmentation=False, schedule="constant", log_every=10,
                     checkpoint_every=1000)
    losses: list[float] = []
    summary = train_regressor(config, [root], fits, tmp_path / "model", body,
                              log_metrics=lambda m, s: losses.append(m["train/loss"]) if "train/loss" in m else None)
    assert summary["input"] == "keypoints" and summary["loss_body"] == "FastKeypointBody"
    assert losses[-1] < losses[0] / 20, losses  # measured: 4.9 -> 0.07-0.09


def test_checkpoint_round_trip_with_weights_only(body, kp_data, tmp_path):
    root, fits = kp_data
    train_regressor(_config(), [root], fits, tmp_path / "model", body)
    payload = torch.load(tmp_path / "model" / "checkpoint.pt", weights_only=True)
    assert payload["regressor"]["backbone"] == "keypoints" and payload["regressor"]["encoder_width"] == 256
    loaded = load_regressor(tmp_path / "model" / "checkpoint.pt")
    from trainer.dataset import read_samples

    table = read_samples([root])
    pred = predict(loaded, table, batch_size=5)
    assert pred["pose"].shape == (12, 72) and pred["ok"].all()
    fresh = Regressor(**payload["regressor"])
    fresh.load_state_dict(payload["model"])
    with torch.no_grad():
        keypoints = torch.from_numpy(np.stack(table.column("keypoints").to_numpy(zero_copy_only=False).tolist())).float()
        direct = fresh.eval()(model_input(fresh, {"keypoints": keypoints.reshape(12, 49, 3)}))
    assert np.allclose(pred["cam"], direct.cam.numpy(), atol=1e-6)


def test_keypoint_training_resumes_to_the_same_weights(body, kp_data, tmp_path):
    root, fits = kp_data
    train_regressor(_config(), [root], fits, tmp_path / "straight", body)

    def die(metrics, step):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_regressor(_config(), [root], fits, tmp_path / "resumed", body, log_metrics=die)
    assert (tmp_path / "resumed" / "last.pt").is_file()
    train_regressor(_config(), [root], fits, tmp_path / "resumed", body)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_image_backbone_on_keypoint_only_rows_is_bad_input_before_training(body, kp_data, tmp_path):
    root, fits = kp_data
    with pytest.raises(BadInput, match="12 of 12 training samples have no image.*backbone: keypoints"):
        train_regressor(train_config("tiny"), [root], fits, tmp_path / "model", body)
    assert not (tmp_path / "model").exists()


def test_a_compiled_step_trains_as_the_eager_one(body, kp_data, tmp_path):
    root, fits = kp_data
    runs = {}
    for compiled in (False, True):
        config = _config(compile=compiled, steps=4, batch_size=12, use_augmentation=False, checkpoint_every=1000)
        losses: list[dict[str, float]] = []
        summary = train_regressor(config, [root], fits, tmp_path / f"model-{compiled}", body,
                                  log_metrics=lambda m, s: losses.append(m) if "train/loss" in m else None)
        runs[compiled] = summary, losses
    (eager, eager_losses), (compiled, compiled_losses) = runs[False], runs[True]
    assert (eager["compile"], compiled["compile"]) == (False, True)
    assert len(eager_losses) == len(compiled_losses) == 4
    for mine, theirs in zip(compiled_losses, eager_losses):
        for name in ("train/loss", "train/keypoints", "train/pose", "train/betas"):
            assert mine[name] == pytest.approx(theirs[name], rel=2e-2), (name, mine[name], theirs[name])


def test_a_killed_eager_training_resumes_compiled(body, kp_data, tmp_path):
    """train.compile changes how the step runs, not what it computes: a resumed run may switch it."""
    root, fits = kp_data
    settings = dict(steps=4, batch_size=12, use_augmentation=False, checkpoint_every=2, log_every=1)

    def die(metrics, step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_regressor(_config(compile=False, **settings), [root], fits, tmp_path / "model", body, log_metrics=die)
    summary = train_regressor(_config(compile=True, **settings), [root], fits, tmp_path / "model", body)
    assert (summary["resumed_from"], summary["trained_steps"], summary["compile"]) == (2, 2, True)
    train_regressor(_config(compile=False, **settings), [root], fits, tmp_path / "straight", body)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "model" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)


def test_compiled_augmentation_makes_the_eager_batches(body, kp_data):
    root, fits = kp_data
    config = _config()
    dataset = SamplesDataset(read_samples([root]), fits, augment=config.augment)
    eager = KeypointBatches(dataset, config.augment, seed=0).batch(list(range(12)), 7)
    compiled = KeypointBatches(dataset, config.augment, seed=0, compile=True).batch(list(range(12)), 7)
    assert set(eager) == set(compiled)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], atol=1e-5, rtol=1e-5)


def test_small_matmul_is_matmul_eager_and_compiled():
    a, b = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 1)
    torch.testing.assert_close(small_matmul(a, b), a @ b)
    torch.testing.assert_close(torch.compile(small_matmul)(a, b), a @ b)


def test_compile_without_a_cpp_compiler_is_a_clear_error():
    code = ("from trainer.train import check_compile; from trainer.train_config import train_config; import torch\n"
            "check_compile(train_config('keypoints', {'compile': True}), torch.device('cpu'))")
    env = {**os.environ, "CXX": "/nonexistent/c++"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode != 0 and "train.compile needs a C++ compiler" in done.stderr
    check = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           cwd=Path(__file__).resolve().parents[1])
    assert check.returncode == 0, check.stderr
