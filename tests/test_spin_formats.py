"""The SPIN-format fixtures hold what SPIN's scripts write, and SPIN's index lists read them right."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from tests import spin_formats as sf
from fitting.keypoints import H36M_TO_J14, H36M_TO_J17, J24_TO_J14, J24_TO_J17
from trainer.data.protocols import (
    h36m_eval_joints,
    lsp14_truth,
    protocol_for_dataset,
    s_eval_joints,
)


@pytest.fixture(scope="module")
def spin(tmp_path_factory):
    root = tmp_path_factory.mktemp("spin")
    data = sf.write_spin_data(root / "data")
    files = {
        "h36m_valid_protocol2.npz": sf.write_h36m(root / "h36m_valid_protocol2.npz", root / "h36m", data),
        "mpi_inf_3dhp_test.npz": sf.write_mpi_inf_3dhp_test(root / "mpi_inf_3dhp_test.npz", root / "3dhp", data),
        "3dpw_test.npz": sf.write_3dpw_test(root / "3dpw_test.npz", root / "3dpw", data),
        "lsp_dataset_test.npz": sf.write_lsp_dataset_test(root / "lsp_dataset_test.npz", root / "lsp", root / "upi", data),
    }
    return root, data, files


def test_index_lists_are_spins():
    assert H36M_TO_J17 == (6, 5, 4, 1, 2, 3, 16, 15, 14, 11, 12, 13, 8, 10, 0, 7, 9)
    assert J24_TO_J17 == (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 18, 14, 16, 17)
    assert H36M_TO_J14 == H36M_TO_J17[:14] and J24_TO_J14 == J24_TO_J17[:14]
    assert 13 not in J24_TO_J17  # the LSP head top, which S never fills
    # the lists pair every H36M regressor row with the S row that h36m.py writes its joint into
    assert all(sf.S_ROWS[h] == j for h, j in zip(H36M_TO_J17, J24_TO_J17))


def test_files_have_spins_keys_shapes_and_dtypes(spin):
    _, _, files = spin
    for name, expected in sf.EXPECTED_FORMATS.items():
        arrays = files[name].arrays
        assert set(arrays) == set(expected), name
        n = len(arrays["imgname"])
        for key, (row_shape, kind) in expected.items():
            assert arrays[key].shape == (n, *row_shape), (name, key)
            assert arrays[key].dtype.kind == kind[0] and (kind == "U" or arrays[key].dtype == np.dtype(kind)), (name, key)
    assert set(files["3dpw_test.npz"].arrays["gender"]) == {"m", "f"}
    assert files["3dpw_test.npz"].arrays["gender"].dtype == np.dtype("<U1")


@pytest.mark.parametrize("name", ["h36m_valid_protocol2.npz", "mpi_inf_3dhp_test.npz"])
def test_s_rows_are_filled_as_spins_scripts_fill_them(spin, name):
    S = spin[2][name].arrays["S"]
    filled = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 17, 18]
    assert (S[:, filled, 3] == 1).all()
    empty = [r for r in range(24) if r not in filled]
    assert (S[:, empty] == 0).all()
    assert (S[:, 14, :3] == 0).all()  # centred on the pelvis, which lands in row 14
    assert np.abs(S[:, filled, :3]).max() > 0.3  # metres, a whole body


@pytest.mark.parametrize("name, joints", [("h36m_valid_protocol2.npz", "h36m14"), ("mpi_inf_3dhp_test.npz", "h36m17")])
def test_truth_is_the_known_mesh_through_the_regressor(spin, name, joints):
    _, data, files = spin
    written = files[name]
    pred = h36m_eval_joints(data.model().h36m_joints(torch.as_tensor(written.scenes.vertices)), joints)
    gt, counts = s_eval_joints(torch.as_tensor(written.arrays["S"]), joints)
    assert counts.all() and gt.shape == pred.shape == (len(gt), 14 if joints == "h36m14" else 17, 3)
    torch.testing.assert_close(pred, gt, atol=1e-6, rtol=0)  # a micron: float32 regressor rows


def test_3dpw_truth_depends_on_the_gendered_mesh(spin):
    _, data, files = spin
    written = files["3dpw_test.npz"]
    pose = torch.as_tensor(written.arrays["pose"], dtype=torch.float32)
    betas = torch.as_tensor(written.arrays["shape"], dtype=torch.float32)
    model = data.model()
    truth = h36m_eval_joints(model.h36m_joints(torch.as_tensor(written.scenes.vertices)), "h36m14")
    male, female = (data.model(g)(pose, betas).vertices.double() for g in ("male", "female"))
    is_female = torch.as_tensor(written.arrays["gender"] == "f")
    gendered = torch.where(is_female[:, None, None], female, male)
    torch.testing.assert_close(h36m_eval_joints(model.h36m_joints(gendered), "h36m14"), truth, atol=1e-5, rtol=0)
    neutral = h36m_eval_joints(model.h36m_joints(model(pose, betas).vertices.double()), "h36m14")
    assert (neutral - truth).norm(dim=-1).mean() > 0.005  # the neutral mesh is another body


def test_2d_joints_and_boxes_match_the_crop_camera(spin):
    """Each file's 2D joints, pushed through SPIN's crop of its box, land where SPIN's crop camera
    sees the true body: the box, the joints and the camera agree."""
    _, _, files = spin
    for name, rows, source in (("lsp_dataset_test.npz", list(range(14)), sf.LSP14),
                               ("mpi_inf_3dhp_test.npz", list(sf.S_ROWS), None)):
        written = files[name]
        scenes, arrays = written.scenes, written.arrays
        points = scenes.keypoints[:, list(source)] if source else scenes.h36m
        crop = sf.FOCAL * points[..., :2] / points[..., 2:3] + sf.CROP / 2.0
        side = 200.0 * arrays["scale"][:, None, None]
        from_file = (arrays["part"][:, rows, :2] - arrays["center"][:, None]) * sf.CROP / side + sf.CROP / 2.0
        np.testing.assert_allclose(from_file, crop, atol=1e-6)
        lo, hi = arrays["part"][:, rows, :2].min(1), arrays["part"][:, rows, :2].max(1)
        np.testing.assert_allclose(arrays["scale"], 1.2 * (hi - lo).max(1) / 200.0)


def test_lsp_masks_are_full_image_label_maps(spin):
    root, _, files = spin
    arrays, scenes = files["lsp_dataset_test.npz"].arrays, files["lsp_dataset_test.npz"].scenes
    for k in range(len(arrays["imgname"])):
        image = cv2.imread(str(root / "lsp" / arrays["imgname"][k]))
        mask = cv2.imread(str(root / "upi" / arrays["maskname"][k]), 0)
        parts = cv2.imread(str(root / "upi" / arrays["partname"][k]), 0)
        assert image.shape[:2] == mask.shape == parts.shape == tuple(scenes.image_hw[k])
        assert set(np.unique(mask)) <= {0, 255} and (mask > 0).mean() > 0.02
        assert set(np.unique(parts)) <= {0, 1, 2, 3, 4, 5, 6, 255}
        assert ((parts > 0) & (parts < 255) & (mask == 0)).sum() == 0


def test_spin_uncrop_by_hand():
    """A 4-px label map of the box centred at (5, 5) with side 8 (scale 0.04): SPIN's transform puts
    the box at ul = 1, br = 9, so each label becomes a 2x2 block from pixel 1, clipped to 8x8."""
    labels = np.arange(16, dtype=np.uint8).reshape(4, 4)
    out = sf.spin_uncrop(labels, (5.0, 5.0), 0.04, (8, 8))
    expected = np.zeros((8, 8), np.uint8)
    expected[1:8, 1:8] = np.kron(labels, np.ones((2, 2), np.uint8))[:7, :7]
    np.testing.assert_array_equal(out, expected)


def test_fixture_model_converts_and_keeps_the_builtin_keypoints(spin, tmp_path, capsys):
    from fitting.body_model import load_body_model
    from tests.test_body_model import run_cli

    _, data, _ = spin
    out = tmp_path / "smpl.npz"
    code, _, err = run_cli(["body-model", "convert", "--allow-pickle", str(data.smpl_dir / "SMPL_NEUTRAL.pkl"), str(out),
                            "--joint-regressor-extra", str(data.extra)], capsys)
    assert code == 0, err
    converted, builtin = load_body_model(out), load_body_model()
    pose = torch.zeros(2, 72)
    pose[1, 3:] = 0.3
    betas = torch.zeros(2, 10)
    betas[1, 0] = 1.0
    with torch.no_grad():
        torch.testing.assert_close(converted(pose, betas).keypoints, builtin(pose, betas).keypoints, atol=1e-5, rtol=0)


def test_lsp14_truth_leaves_out_unfilled_rows(spin):
    S = torch.as_tensor(spin[2]["h36m_valid_protocol2.npz"].arrays["S"])
    _, counts = lsp14_truth(S)
    assert counts[:, :13].all() and not counts[:, 13].any()  # the head top: confidence 0


def test_protocol_follows_the_dataset():
    assert protocol_for_dataset("h36m_valid_protocol2") == "h36m-p2"
    assert protocol_for_dataset("/data/dataset_extras/h36m_valid_protocol1.npz") == "h36m-p1"
    assert protocol_for_dataset("mpi_inf_3dhp_valid") == protocol_for_dataset("mpi_inf_3dhp_test") == "mpi-inf-3dhp"
    assert protocol_for_dataset("3dpw_test") == "3dpw"
    assert protocol_for_dataset("lsp_dataset_test") == "lsp"
    assert protocol_for_dataset("synthetic") == protocol_for_dataset("mpii_train") == "lsp14"
