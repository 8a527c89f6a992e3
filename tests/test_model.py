"""The regressor, its mean parameters and its backbones."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from fitting.errors import BadInput
from fitting.geometry import pose_to_rotmat, rotmat_to_sixd
from trainer.mean_params import (
    builtin_mean_params_path, load_mean_params, mean_params_from_poses, mean_pose_axis_angle, save_mean_params,
)
from trainer.model import (
    BACKBONES, Regressor, axis_angle_pose, build_backbone, cam_translation, model_input, normalize_images,
)

torch.set_num_threads(1)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_output_shapes_and_valid_rotations(backbone):
    torch.manual_seed(0)
    regressor = Regressor(backbone, img_res=64).eval()
    batch = {"image": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), "keypoints": torch.rand(2, 49, 3)}
    with torch.no_grad():
        out = regressor(model_input(regressor, batch))
    assert out.rotmat.shape == (2, 24, 3, 3) and out.betas.shape == (2, 10) and out.cam.shape == (2, 3)
    eye = torch.eye(3).expand(2, 24, 3, 3)
    assert torch.allclose(out.rotmat.transpose(-1, -2) @ out.rotmat, eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(out.rotmat), torch.ones(2, 24), atol=1e-5)
    assert axis_angle_pose(out.rotmat).shape == (2, 72)


def test_sixd_of_arbitrary_vectors_gives_rotations():
    regressor = Regressor("small", img_res=32)
    regressor.init_pose.copy_(torch.randn(1, 144) * 3)
    with torch.no_grad():
        rot = regressor.eval()(torch.randn(3, 3, 32, 32)).rotmat
    assert torch.allclose(rot @ rot.transpose(-1, -2), torch.eye(3).expand_as(rot), atol=1e-5)
    assert (torch.linalg.det(rot) > 0.999).all()


def test_starts_from_the_mean_parameters():
    mean = load_mean_params()
    regressor = Regressor("small", img_res=32, mean_params=mean).eval()
    for layer in (regressor.decpose, regressor.decshape, regressor.deccam):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    with torch.no_grad():
        out = regressor(torch.randn(1, 3, 32, 32))
    assert np.allclose(axis_angle_pose(out.rotmat)[0].numpy(), mean_pose_axis_angle(mean), atol=1e-5)
    assert np.allclose(out.cam[0].numpy(), mean["cam"]) and np.allclose(out.betas[0].numpy(), 0)


def test_builtin_mean_params_stand_upright_facing_the_camera():
    mean = load_mean_params(builtin_mean_params_path())
    assert np.allclose(mean["cam"], [0.9, 0, 0]) and np.allclose(mean["shape"], 0)
    orient = pose_to_rotmat(torch.as_tensor(mean_pose_axis_angle(mean))[None])[0, 0].numpy()
    assert np.allclose(orient, np.diag([1.0, -1.0, -1.0]), atol=1e-6)  # model +y -> image up, front -> camera


def test_rotation_average_of_identical_poses_is_that_pose():
    body = np.random.default_rng(0).normal(scale=0.3, size=69)
    mean = mean_params_from_poses(np.tile(body, (5, 1)))
    rotmats = pose_to_rotmat(torch.as_tensor(np.concatenate([[np.pi, 0, 0], body]))[None])
    assert np.allclose(mean["pose"], rotmat_to_sixd(rotmats)[0].reshape(144).numpy(), atol=1e-6)


def test_user_mean_params_file(tmp_path):
    params = {"pose": np.random.rand(144), "shape": np.ones(10), "cam": np.array([1.0, 0.1, 0.2])}
    save_mean_params(params, tmp_path / "smpl_mean_params.npz")
    loaded = load_mean_params(tmp_path / "smpl_mean_params.npz")
    assert np.allclose(loaded["pose"], params["pose"]) and loaded["cam"].dtype == np.float32
    np.savez(tmp_path / "bad.npz", pose=np.zeros(72), shape=np.zeros(10), cam=np.zeros(3))
    with pytest.raises(BadInput, match="'pose' has shape"):
        load_mean_params(tmp_path / "bad.npz")
    np.savez(tmp_path / "obj.npz", pose=np.array([object()] * 144), shape=np.zeros(10), cam=np.zeros(3))
    with pytest.raises(BadInput, match="holds Python objects"):
        load_mean_params(tmp_path / "obj.npz")


def test_camera_uses_spin_convention_whatever_the_resolution():
    cam = torch.tensor([[0.9, 0.1, -0.2]])
    t = cam_translation(cam)
    assert torch.allclose(t, torch.tensor([[0.1, -0.2, 2 * 5000 / (224 * 0.9)]]))


def test_normalize_images():
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize_images(images)
    assert torch.allclose(out[0, :, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))


@pytest.mark.fault("backbone weights that do not match, or are missing", "one-line error")
def test_backbone_weights_from_a_path_and_from_the_hub_cache(tmp_path):
    source, _ = build_backbone("resnet18")
    state = {**source.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    torch.save(state, tmp_path / "weights.pth")
    regressor = Regressor("resnet18", backbone_weights=str(tmp_path / "weights.pth"))
    assert torch.equal(regressor.backbone.conv1.weight, source.conv1.weight)

    previous = torch.hub.get_dir()
    try:
        torch.hub.set_dir(str(tmp_path / "hub"))
        # never a silent start from random weights: the error says where the file goes
        with pytest.raises(BadInput, match=r"resnet18-f37072fd.pth.*never downloads.*Dockerfile"):
            Regressor("resnet18", backbone_weights="auto")
        assert Regressor("small", backbone_weights="auto").backbone_weights["kind"] == "random"  # none exist
        (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
        torch.save(state, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
        cached = Regressor("resnet18", backbone_weights="auto")
        assert torch.equal(cached.backbone.conv1.weight, source.conv1.weight)
        record = cached.backbone_weights
        assert record["kind"] == "imagenet" and record["path"].endswith("resnet18-f37072fd.pth")
        assert record["sha256"] == hashlib.sha256((tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth").read_bytes()).hexdigest()
    finally:
        torch.hub.set_dir(previous)

    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(BadInput, match="does not match"):
        Regressor("resnet18", backbone_weights=str(tmp_path / "other.pth"))
    with pytest.raises(BadInput, match="not found"):
        Regressor("resnet18", backbone_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(BadInput, match="unknown backbone"):
        Regressor("vgg16")
