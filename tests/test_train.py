"""The training loop on real files: a small samples table (images drawn from projected toy-body
keypoints) and its exact fits; overfitting, resume, warm start, checkpoints, prediction."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch

from fitting.body_model import BodyModel
from fitting.camera import perspective_projection, pixels_to_normalized
from fitting.errors import BadInput
from fitting.keypoints import VERTEX_JOINT_NAMES
from fitting.priors import GMMPrior
from tests.toy_body import make_toy_smpl
from trainer.data.samples import encode_image
from trainer.data.tables import SAMPLES_SCHEMA, fits_table, make_table, write_shards
from trainer.train import load_regressor, predict, train_regressor
from trainer.train_config import TRAIN_PRESETS, TrainConfig

torch.set_num_threads(1)


def make_body(num_vertices: int = 1500, seed: int = 0) -> BodyModel:
    arrays = make_toy_smpl(num_vertices=num_vertices, seed=seed)
    arrays["vertex_joint_ids"] = np.random.default_rng(seed).integers(num_vertices, size=len(VERTEX_JOINT_NAMES))
    return BodyModel(arrays)


def make_samples(body: BodyModel, n: int, seed: int = 0, size: int = 64) -> tuple[pa.Table, pa.Table]:
    """(samples table, fits table): random poses seen by SPIN's camera, images with the
    keypoints drawn in, fits equal to the truth."""
    rng = np.random.default_rng(seed)
    pose = rng.normal(scale=0.2, size=(n, 72))
    pose[:, :3] = np.array([np.pi, 0, 0]) + rng.normal(scale=0.2, size=(n, 3))
    betas = rng.normal(scale=0.5, size=(n, 10))
    cam_t = np.stack([rng.normal(scale=0.05, size=n), rng.normal(scale=0.05, size=n), rng.uniform(40, 60, n)], 1)
    with torch.no_grad():
        out = body(torch.as_tensor(pose, dtype=torch.float32), torch.as_tensor(betas, dtype=torch.float32))
        px = perspective_projection(out.keypoints, torch.as_tensor(cam_t, dtype=torch.float32))
    keypoints = np.concatenate([pixels_to_normalized(px, 224).numpy(), np.ones((n, 49, 1))], axis=2)
    images = []
    for i in range(n):
        image = (rng.uniform(0, 60, size=(size, size, 3))).astype(np.uint8)
        for k, (x, y) in enumerate((keypoints[i, :, :2] + 1) * size / 2):
            colour = tuple(int(c) for c in np.array([k * 5, 255 - k * 5, 128 + (k % 2) * 100]))
            cv2.circle(image, (int(x), int(y)), 2, colour, -1)
        images.append(encode_image(image, ".png"))
    ids = [f"s{seed}-{i}" for i in range(n)]
    samples = make_table({"sample_id": ids, "dataset": ["toy"] * n, "image": images,
                          "center": np.full((n, 2), size / 2), "scale": np.full(n, size / 200),
                          "keypoints": keypoints, "has_smpl": [False] * n}, SAMPLES_SCHEMA)
    fits = fits_table(ids, pose=pose, betas=betas, cam_t=cam_t, loss=1.0, joint_loss=0.0, valid=True, betas_ok=True,
                      found_in_round=0, init="mean", iterations=10)
    return samples, fits


@pytest.fixture(scope="module")
def body() -> BodyModel:
    return make_body()


@pytest.fixture(scope="module")
def data(body, tmp_path_factory) -> tuple[Path, pa.Table]:
    root = tmp_path_factory.mktemp("data")
    samples, fits = make_samples(body, 8)
    write_shards(samples, root / "train", shard_size=5)
    return root, fits


def _config(**overrides) -> TrainConfig:
    return TrainConfig.from_dict({**TRAIN_PRESETS["tiny"], "mean_params": None, **overrides})


def test_config_rejects_unknown_keys_and_round_trips():
    with pytest.raises(BadInput, match=r"^train: unknown key 'bakbone' \(known: backbone, "):
        TrainConfig.from_dict({"bakbone": "small"})
    with pytest.raises(BadInput, match=r"^train\.weights: unknown key 'keypoint' \(known: keypoints, "):
        TrainConfig.from_dict({"weights": {"keypoint": 5}})
    with pytest.raises(BadInput, match="backbone"):
        TrainConfig.from_dict({"backbone": "vgg"})
    config = TrainConfig.from_dict({"steps": "7", "lr": "1e-4", "weights": {"pose": 2}, "use_augmentation": "false"})
    assert config.steps == 7 and config.lr == 1e-4 and config.weights.pose == 2 and not config.use_augmentation
    assert TrainConfig.from_dict(config.to_dict()) == config
    for preset in TRAIN_PRESETS.values():
        TrainConfig.from_dict(preset)


def test_loss_falls_when_overfitting(body, data, tmp_path):
    root, fits = data
    losses = {}
    config = _config(steps=30, batch_size=8, log_every=1, use_augmentation=False)
    summary = train_regressor(config, [root], fits, tmp_path, body_model=body,
                              log_metrics=lambda m, step: losses.setdefault(step, m.get("train/loss")))
    assert summary["steps"] == 30 and summary["fitted_samples"] == 8
    curve = [losses[s] for s in sorted(losses) if losses[s] is not None]
    assert np.mean(curve[-5:]) < 0.5 * np.mean(curve[:5])
    assert (tmp_path / "checkpoint.pt").is_file() and not (tmp_path / "last.pt").exists()


class _Killed(Exception):
    pass


def _kill_at(step_to_die: int):
    def log(metrics, step):
        if step == step_to_die:
            raise _Killed()
    return log


@pytest.mark.fault("training stopped between checkpoints (an exception from the metrics callback)",
                   "the rerun resumes from `last.pt` and ends with the uninterrupted run's weights")
def test_resume_gives_the_uninterrupted_weights(body, data, tmp_path):
    root, fits = data
    config = _config(steps=8, checkpoint_every=3, log_every=1)
    train_regressor(config, [root], fits, tmp_path / "straight", body_model=body)
    with pytest.raises(_Killed):
        train_regressor(config, [root], fits, tmp_path / "killed", body_model=body, log_metrics=_kill_at(5))
    assert (tmp_path / "killed" / "last.pt").is_file() and not (tmp_path / "killed" / "checkpoint.pt").exists()
    summary = train_regressor(config, [root], fits, tmp_path / "killed", body_model=body)
    assert summary["resumed_from"] == 3 and summary["trained_steps"] == 5
    a = load_regressor(tmp_path / "straight" / "checkpoint.pt").state_dict()
    b = load_regressor(tmp_path / "killed" / "checkpoint.pt").state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


@pytest.mark.fault("training resumed with other settings", "one-line error, nothing mixed")
def test_resume_refuses_a_different_configuration(body, data, tmp_path):
    root, fits = data
    with pytest.raises(_Killed):
        train_regressor(_config(steps=6, checkpoint_every=2), [root], fits, tmp_path, body_model=body,
                        log_metrics=_kill_at(4))
    with pytest.raises(BadInput, match="other settings"):
        train_regressor(_config(steps=6, checkpoint_every=2, lr=1e-2), [root], fits, tmp_path, body_model=body)


class _Payload:
    """Something a plain torch.load would happily unpickle."""


@pytest.mark.fault("a checkpoint holding arbitrary objects; a missing checkpoint", "refused with one line")
def test_load_regressor_uses_weights_only(body, data, tmp_path):
    root, fits = data
    train_regressor(_config(steps=2), [root], fits, tmp_path / "model", body_model=body)
    regressor = load_regressor(tmp_path / "model" / "checkpoint.pt")
    assert regressor.config["backbone"] == "small" and not regressor.training
    evil = tmp_path / "evil.pt"
    torch.save({"format": "spin-pipeline-regressor/1", "x": _Payload()}, evil)
    assert isinstance(torch.load(evil, weights_only=False)["x"], _Payload)
    with pytest.raises(BadInput, match="not a readable checkpoint"):
        load_regressor(evil)
    with pytest.raises(BadInput, match="not found"):
        load_regressor(tmp_path / "missing.pt")


def test_warm_start_and_predict(body, data, tmp_path):
    root, fits = data
    train_regressor(_config(steps=2), [root], fits, tmp_path / "r0", body_model=body)
    first = load_regressor(tmp_path / "r0" / "checkpoint.pt")
    summary = train_regressor(_config(steps=2, seed=1), [root], fits, tmp_path / "r1", body_model=body,
                              init_from=tmp_path / "r0" / "checkpoint.pt")
    assert summary["init_from"].endswith("checkpoint.pt")
    with pytest.raises(BadInput, match="cannot warm-start"):
        train_regressor(_config(steps=2, backbone="resnet18"), [root], fits, tmp_path / "r2", body_model=body,
                        init_from=tmp_path / "r0" / "checkpoint.pt")

    samples, _ = make_samples(body, 3, seed=5)
    images = samples.column("image").to_pylist()
    images[1] = images[1][:20]  # a corrupt image
    samples = samples.set_column(samples.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    pred = predict(first, samples, batch_size=2)
    assert pred["pose"].shape == (3, 72) and pred["betas"].shape == (3, 10) and pred["cam_t"].shape == (3, 3)
    assert pred["ok"].tolist() == [True, False, True]
    assert np.all(pred["cam_t"][:, 2] > 0) and np.all(np.isfinite(pred["pose"]))
    again = predict(load_regressor(tmp_path / "r0" / "checkpoint.pt"), samples.slice(0, 1))
    assert np.allclose(again["pose"][0], pred["pose"][0], atol=1e-5)


def test_two_d_mode_needs_no_fits(body, data, tmp_path):
    root, _ = data
    prior = GMMPrior.from_arrays(np.zeros((8, 69)), np.tile(np.eye(69) * 0.1, (8, 1, 1)), np.full(8, 1 / 8))
    logged = []
    summary = train_regressor(_config(steps=3, mode="2d", log_every=1), [root], None, tmp_path, body_model=body,
                              prior=prior, log_metrics=lambda m, s: logged.append(m))
    assert summary["fitted_samples"] == 0
    assert {"train/pose_prior", "train/angle_prior", "train/shape_prior"} <= set(logged[0])
    with pytest.raises(BadInput, match="needs a fits table"):
        train_regressor(_config(steps=3), [root], None, tmp_path / "x", body_model=body)


def test_parallel_loader_serves_the_same_batches(body, data):
    import cv2
    from trainer.augment import AugmentConfig
    from trainer.dataset import SamplesDataset, StepBatchSampler, make_loader, read_samples

    root, fits = data
    cv2.resize(np.zeros((600, 600, 3), np.uint8), (300, 300))  # OpenCV's thread pool runs before the fork
    dataset = SamplesDataset(read_samples([root]), fits, img_res=48, augment=AugmentConfig(), seed=3)
    def batches(workers):
        sampler = StepBatchSampler(len(dataset), 4, seed=3, start=1, stop=4)
        return list(make_loader(dataset, sampler, num_workers=workers, timeout=60))
    for a, b in zip(batches(0), batches(2)):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_norm_is_logged_and_clipped(body, data, tmp_path):
    from trainer.dataset import SamplesDataset, make_loader, read_samples
    from trainer.train import _build_regressor, train_step

    root, fits = data
    logged = {}
    train_regressor(_config(steps=2, log_every=1), [root], fits, tmp_path, body_model=body,
                    log_metrics=lambda m, step: logged.update(m))
    assert logged["train/grad_norm"] > 0
    config = _config(grad_clip=1e-3)
    regressor, _ = _build_regressor(config, None)
    batch = next(iter(make_loader(SamplesDataset(read_samples([root]), fits, config.img_res), batch_size=4)))
    values = train_step(regressor, torch.optim.Adam(regressor.parameters(), lr=1e-4), batch, body, config, None, 0)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in regressor.parameters() if p.grad is not None]))
    assert values["grad_norm"] > 1e-3 and float(norm) == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(BadInput, match="grad_clip"):
        TrainConfig.from_dict({"grad_clip": -1})
