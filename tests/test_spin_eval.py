"""SPIN's evaluation on files in SPIN's formats: ingested as a user would, scored under each
dataset's protocol. A prediction equal to the truth scores 0.0 mm; the numbers of made-up cases
are the ones worked out by hand."""
from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import roma
import torch

from fitting.errors import BadInput
from fitting.keypoints import H36M_TO_J14, H36M_TO_J17, J24_TO_J14
from fitting.render import PART_NAMES, SMPL_JOINT_PART
from tests import spin_formats as sf
from tests.test_body_model import run_cli
from trainer.data.ingest import ingest_spin_npz
from trainer.data.protocols import PROTOCOLS, h36m_eval_joints, s_eval_joints
from trainer.data.tables import SAMPLES_SCHEMA, read_table
from trainer.evaluate import TruthModels, evaluate_predictions, true_joints
from trainer.metrics import pose_metrics

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def spin(tmp_path_factory):
    """SPIN's data folder, its files and the fixture SMPL converted with both regressors."""
    from fitting.body_model import load_body_model

    root = tmp_path_factory.mktemp("spin-eval")
    data = sf.write_spin_data(root / "data")
    images = root / "images"
    files = {
        "h36m-p2": sf.write_h36m(root / "h36m_valid_protocol2.npz", images, data),
        "mpi-inf-3dhp": sf.write_mpi_inf_3dhp_test(root / "mpi_inf_3dhp_valid.npz", images, data),
        "3dpw": sf.write_3dpw_test(root / "3dpw_test.npz", images, data),
        "lsp": sf.write_lsp_dataset_test(root / "lsp_dataset_test.npz", images, images, data),
    }
    models = {}
    for gender in ("neutral", "male", "female"):
        out = root / f"smpl_{gender}.npz"
        code, _, err = (run_cli(["body-model", "convert", "--allow-pickle", str(data.smpl_dir / f"SMPL_{gender.upper()}.pkl"),
                                 str(out), "--joint-regressor-extra", str(data.extra), "--joint-regressor-h36m",
                                 str(data.h36m)], _NoCapture()))
        assert code == 0, err
        models[gender] = load_body_model(out)
    tables = {}
    for name, written in files.items():
        summary = ingest_spin_npz(written.path, images, root / "samples" / name, min_visible=0, workers=1, progress=False)
        assert summary["quarantined"] == 0 and summary["protocol"] == name
        shards = sorted((root / "samples" / name / summary["split"]).glob("*part-*.parquet"))
        tables[name] = pa.concat_tables([read_table(p, SAMPLES_SCHEMA) for p in shards])
    return {"data": data, "files": files, "models": models, "tables": tables}


class _NoCapture:
    """run_cli's capsys stand-in outside a test function: the CLI's output is not needed."""

    def readouterr(self):
        return type("Captured", (), {"out": "", "err": ""})()


def _truth_predictions(spin, name: str) -> dict[str, np.ndarray]:
    """The fixture's true pose, shape and camera for each ingested row, in the table's order."""
    scenes, table = spin["files"][name].scenes, spin["tables"][name]
    index = [int(sid.rsplit("-", 1)[1]) for sid in table.column("sample_id").to_pylist()]
    return {"pose": scenes.pose[index].astype(np.float32), "betas": scenes.betas[index].astype(np.float32),
            "cam": scenes.cam[index].astype(np.float32)}


def test_ingest_records_protocol_gender_and_full_image_masks(spin):
    for name, table in spin["tables"].items():
        assert set(table.column("protocol").to_pylist()) == {name}
    assert set(spin["tables"]["3dpw"].column("gender").to_pylist()) == {"m", "f"}
    lsp, scenes = spin["tables"]["lsp"], spin["files"]["lsp"].scenes
    mask = cv2.imdecode(np.frombuffer(lsp.column("mask")[0].as_py(), np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask.shape == tuple(scenes.image_hw[0])  # the original image's, not the crop's


@pytest.mark.parametrize("name, joints", [("h36m-p2", 14), ("mpi-inf-3dhp", 17), ("3dpw", 14)])
def test_a_prediction_equal_to_the_truth_scores_zero(spin, name, joints):
    # 3DPW without the gendered models: the truth comes from the neutral one, and says so
    result = evaluate_predictions(spin["tables"][name], _truth_predictions(spin, name), spin["models"]["neutral"])[name]
    assert result["protocol"] == name and result["evaluated_3d"] == len(spin["tables"][name])
    assert result["mpjpe"] < 1e-3 and result["pa_mpjpe"] < 1e-3  # mm, so 0.0 (S is stored as float32)
    if name == "mpi-inf-3dhp":
        assert result["pck"] == 100.0 and result["pa_pck"] == 100.0
        assert result["auc"] == pytest.approx(100 * 30 / 31)     # nothing is below 0 mm
    else:
        assert "pck" not in result                                 # SPIN reports none there
    if name == "3dpw":
        assert result["truth_model"] == "neutral"
    gt, counts, _ = true_joints(PROTOCOLS[name], spin["tables"][name], spin["models"]["neutral"], TruthModels())
    assert gt.shape[1] == joints and counts.all()


@pytest.mark.parametrize("name", ["h36m-p2", "mpi-inf-3dhp", "3dpw"])
def test_a_similarity_transform_of_the_truth_scores_zero_pa_mpjpe(spin, name):
    table, body = spin["tables"][name], spin["models"]["neutral"]
    gt, counts, _ = true_joints(PROTOCOLS[name], table, body, TruthModels())
    R = roma.random_rotmat(len(gt), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    moved = 1.3 * torch.einsum("bij,bnj->bni", R, torch.as_tensor(gt)) + torch.tensor([0.2, -0.1, 3.0], dtype=torch.float64)
    metrics = pose_metrics(moved, torch.as_tensor(gt), torch.as_tensor(counts))
    assert float(metrics["pa_mpjpe"].max()) < 1e-6 and float(metrics["mpjpe"].min()) > 50
    # through the whole path: the true pose turned about the camera's axes (a rotation of the mesh)
    pred = _truth_predictions(spin, name)
    turned = roma.rotvec_composition([torch.tensor([[0.0, 0.6, 0.2]]).expand(len(gt), 3), torch.as_tensor(pred["pose"][:, :3])])
    pred["pose"][:, :3] = turned.numpy()
    result = evaluate_predictions(table, pred, body)[name]
    assert result["pa_mpjpe"] < 0.05 and result["mpjpe"] > 20


def test_3dpw_truth_comes_from_the_gendered_meshes(spin):
    table, models, data = spin["tables"]["3dpw"], spin["models"], spin["data"]
    gendered = TruthModels(models["male"], models["female"])
    result = evaluate_predictions(table, _truth_predictions(spin, "3dpw"), models["neutral"], gendered)["3dpw"]
    assert result["truth_model"] == "gendered"
    # by hand, in numpy: each person's true gendered mesh and the neutral mesh of the same pose and
    # shape, through SPIN's regressor, centred on its pelvis, rows H36M_TO_J14
    scenes = spin["files"]["3dpw"].scenes
    index = [int(sid.rsplit("-", 1)[1]) for sid in table.column("sample_id").to_pylist()]
    with torch.no_grad():
        neutral = models["neutral"](torch.as_tensor(scenes.pose[index], dtype=torch.float32),
                                    torch.as_tensor(scenes.betas[index], dtype=torch.float32)).vertices.double().numpy()
    def centred(vertices):
        h36m = np.einsum("jv,bvc->bjc", data.h36m_array, vertices)
        return h36m[:, list(H36M_TO_J14)] - h36m[:, :1]
    expected = 1000 * np.linalg.norm(centred(neutral) - centred(scenes.vertices[index]), axis=-1).mean()
    assert expected > 5 and result["mpjpe"] == pytest.approx(expected, rel=1e-3)


def test_a_made_up_case_by_hand():
    """S holds the 14 joints of J24_TO_J14 (row 13, the LSP head top, stays empty, conf 0); the
    H36M prediction equals them after its pelvis is taken away, but for one wrist 30 mm off in x
    and 40 mm in z: MPJPE = 50 / 14 mm."""
    rng = np.random.default_rng(0)
    h36m = rng.normal(scale=0.3, size=(1, 17, 3))
    centred = h36m - h36m[:, :1]
    S = np.zeros((1, 24, 4))
    for h, j in zip(H36M_TO_J17, (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 18, 14, 16, 17)):
        S[0, j, :3], S[0, j, 3] = centred[0, h], 1.0
    pred = h36m.copy()
    pred[0, H36M_TO_J14[6]] += [0.03, 0.0, 0.04]   # J14 row 6 is the right wrist
    gt, counts = s_eval_joints(torch.as_tensor(S), "h36m14")
    assert counts.all() and J24_TO_J14[13] == 18
    metrics = pose_metrics(h36m_eval_joints(torch.as_tensor(pred), "h36m14"), gt, counts, with_pck=False)
    assert float(metrics["mpjpe"]) == pytest.approx(50.0 / 14)
    S[0, 18, 3] = 0.0   # a truth row that does not count drops out of the mean
    gt, counts = s_eval_joints(torch.as_tensor(S), "h36m14")
    metrics = pose_metrics(h36m_eval_joints(torch.as_tensor(pred), "h36m14"), gt, counts, with_pck=False)
    assert float(metrics["mpjpe"]) == pytest.approx(50.0 / 13)


def test_lsp_segmentation_is_scored_on_the_full_image(spin):
    table, files, body = spin["tables"]["lsp"], spin["files"]["lsp"], spin["models"]["neutral"]
    pred = _truth_predictions(spin, "lsp")
    result = evaluate_predictions(table, pred, body)["lsp"]
    assert result["protocol"] == "lsp" and "mpjpe" not in result and result["segmented"] == len(table)
    assert result["fg_accuracy"] == 1.0 and result["fg_f1"] == 1.0 and result["parts_f1"] == 1.0
    # by hand: an unlabelled (255) pixel counts as background for accuracy, as in SPIN and UP-3D,
    # so each one on the body is a miss, and nothing else is
    misses = pixels = 0
    index = [int(sid.rsplit("-", 1)[1]) for sid in table.column("sample_id").to_pylist()]
    for row, k in enumerate(index):
        gt = cv2.imdecode(np.frombuffer(table.column("part_mask")[row].as_py(), np.uint8), cv2.IMREAD_UNCHANGED)
        _, parts = sf.crop_render(files.scenes, k, body)
        on_body = sf.spin_uncrop(parts, files.arrays["center"][k], files.arrays["scale"][k], gt.shape) > 0
        misses += int(((gt == 255) & on_body).sum())
        pixels += gt.size
    assert misses > 0 and result["parts_accuracy"] == pytest.approx(1 - misses / pixels)
    shifted = {**pred, "cam": pred["cam"] + np.array([0.0, 0.1, 0.0], np.float32)}
    wrong = evaluate_predictions(table, shifted, body)["lsp"]
    assert wrong["fg_f1"] < 0.9 and wrong["parts_accuracy"] < result["parts_accuracy"]


def test_part_labels_follow_up3d():
    assert PART_NAMES == ("background", "head", "torso", "right arm", "left arm", "right leg", "left leg")
    assert SMPL_JOINT_PART[12] == SMPL_JOINT_PART[13] == SMPL_JOINT_PART[0] == 2   # neck, collar: torso
    assert SMPL_JOINT_PART[17] == 3 and SMPL_JOINT_PART[16] == 4                     # right, left shoulder
    assert SMPL_JOINT_PART[2] == 5 and SMPL_JOINT_PART[1] == 6                       # right, left hip


def test_a_model_without_the_h36m_regressor_is_a_one_line_error(spin, tmp_path, capsys):
    from fitting.body_model import load_body_model

    plain = tmp_path / "plain.npz"
    code, _, err = run_cli(["body-model", "convert", "--allow-pickle", str(spin["data"].smpl_dir / "SMPL_NEUTRAL.pkl"),
                            str(plain)], capsys)
    assert code == 0, err
    with pytest.raises(BadInput, match="no J_regressor_h36m.*--joint-regressor-h36m"):
        evaluate_predictions(spin["tables"]["h36m-p2"], _truth_predictions(spin, "h36m-p2"), load_body_model(plain))
    # the built-in benchmark's own protocol needs none
    assert PROTOCOLS["lsp14"].joints == "lsp14"
    # a run stops on it before any work, with one line
    data, run = tmp_path / "data", tmp_path / "run"
    (data / "test").mkdir(parents=True)
    pq.write_table(spin["tables"]["h36m-p2"], data / "test" / "part-00000.parquet")
    (tmp_path / "run.yaml").write_text(f"body_model: {plain}\ntrain_preset: tiny\n")
    code, _, err = run_cli(["run", "--data", str(data), "--run", str(run), "--config", str(tmp_path / "run.yaml"),
                            "--rounds", "1"], capsys)
    assert code == 2 and err.startswith("error:") and "J_regressor_h36m" in err and len(err.strip().splitlines()) == 1
    assert not (run / "round=0").exists()
