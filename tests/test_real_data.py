"""Real data in and out, piece by piece, on files in SPIN's own formats (tests/spin_data_formats.py):
the data root, OpenPose and COCO rows, dataset mixing, SPIN's checkpoint and gmm_08.pkl. The whole
path, with predict and export, runs end to end in tests/test_bring_your_own.py."""
from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from fitting.errors import BadInput
from fitting.keypoints import COCO17_TO_KEYPOINTS, KEYPOINT_NAMES
from pipeline.cli import main
from pipeline.config import RunConfig, load_config
from tests import spin_data_formats as spin
from trainer.data.datasets import describe_root
from trainer.data.tables import SAMPLES_SCHEMA, read_table, shard_paths, to_numpy
from trainer.data.wild import coco_rows, keypoint_box, openpose_rows, whole_image_rows
from trainer.dataset import MixedBatchSampler, SPIN_MIX, mixing_probabilities
from trainer.model import Regressor, load_spin_weights, normalize_images, spin_state_dict


def run_cli(args, capsys) -> tuple[int, str, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(args, capsys) -> str:
    code, _, err = run_cli(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------- the data root

def test_ingest_keeps_the_truth_of_an_evaluation_set_and_never_overwrites(tmp_path, capsys):
    pw3d = spin.write_3dpw_test(tmp_path / "in", n=4)
    data = tmp_path / "data"
    code, out, err = run_cli(["data", "ingest", pw3d.file, "--images", pw3d.images, "--out", data, "--img-size", 48], capsys)
    assert code == 0, err
    record = json.loads(out.strip().splitlines()[-1])
    assert (record["dataset"], record["split"], record["protocol"]) == ("3dpw", "test", "3dpw")
    assert record["source_sha256"] == hashlib.sha256(pw3d.file.read_bytes()).hexdigest()
    # no 2D keypoints at all, and not one row lost to the visibility rule: 3D truth is the label
    table = read_table(shard_paths(data, "test")[0], SAMPLES_SCHEMA)
    assert len(table) == 4 and (to_numpy(table, "keypoints")[:, :, 2] == 0).all()
    assert table.column("gender").to_pylist() == ["m", "f", "m", "f"]
    np.testing.assert_allclose(to_numpy(table, "pose"), np.stack([p.pose for p in pw3d.people]), atol=1e-6)
    assert table.column("imgname").to_pylist()[0] == "imageFiles/courtyard_basketball_00/image_00000.jpg"

    shard = shard_paths(data, "test")[0]
    stamp = shard.stat().st_mtime_ns
    assert "already in" in one_line_error(["data", "ingest", pw3d.file, "--images", pw3d.images, "--out", data], capsys)
    assert shard.stat().st_mtime_ns == stamp
    # the same file under another name is a second dataset beside the first
    code, _, err = run_cli(["data", "ingest", pw3d.file, "--images", pw3d.images, "--out", data, "--dataset",
                            "3dpw-copy", "--img-size", 48], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (data / "test").iterdir()) == ["3dpw-copy-part-00000.parquet", "3dpw-part-00000.parquet"]


def test_an_h36m_protocol_file_ingests_on_its_3d_joints_alone(tmp_path, capsys):
    h36m = spin.write_h36m_train(tmp_path / "in", n=3)
    arrays = np.load(h36m.file)
    protocol_file = tmp_path / "in" / "h36m_valid_protocol2.npz"
    np.savez(protocol_file, **{k: arrays[k] for k in ("imgname", "center", "scale", "S")})  # SPIN's h36m.py keys
    code, out, err = run_cli(["data", "ingest", protocol_file, "--images", h36m.images, "--out", tmp_path / "data",
                              "--img-size", 48], capsys)
    assert code == 0, err
    record = json.loads(out.strip().splitlines()[-1])
    assert (record["dataset"], record["split"], record["protocol"], record["written"]) == ("h36m-p2", "test", "h36m-p2", 3)
    table = read_table(shard_paths(tmp_path / "data", "test")[0], SAMPLES_SCHEMA)
    np.testing.assert_allclose(to_numpy(table, "joints3d"), arrays["S"], atol=1e-6)


def test_training_rows_need_2d_labels_and_bad_images_are_quarantined(tmp_path, capsys):
    lsp = spin.write_lsp_original_train(tmp_path / "in", n=6, missing=(1,), truncated=(2,))
    arrays = dict(np.load(lsp.file))
    arrays["part"][3, :, 2] = 0.0
    arrays["openpose"][3, :, 2] = 0.0      # a row with no labels left
    np.savez(lsp.file, **arrays)
    data = tmp_path / "data"
    code, _, err = run_cli(["data", "ingest", lsp.file, "--images", lsp.images, "--out", data, "--img-size", 48], capsys)
    assert code == 0, err
    rows = {r["dataset"]: r for r in describe_root(data)}
    assert (rows["lsp-orig"]["samples"], rows["lsp-orig"]["quarantined"]) == (3, 3)
    lost = read_table(data / "_quarantine" / "train" / "lsp-orig.parquet").to_pylist()
    reasons = {r["sample_id"]: (r["source"], r["reason"]) for r in lost}
    assert reasons["lsp-orig-000001"][0] == "images/im0002.jpg" and "not found" in reasons["lsp-orig-000001"][1]
    assert "truncated" in reasons["lsp-orig-000002"][1]
    assert "visible keypoints" in reasons["lsp-orig-000003"][1]
    assert not (data / "_staging").exists()


def test_readers_take_only_shards(tmp_path, capsys):
    lsp = spin.write_lsp_original_train(tmp_path / "in", n=3)
    data = tmp_path / "data"
    assert run_cli(["data", "ingest", lsp.file, "--images", lsp.images, "--out", data, "--img-size", 48], capsys)[0] == 0
    # what an earlier version left beside its shards, and a temporary file, are not samples
    pa.parquet.write_table(pa.table({"sample_id": ["x"], "reason": ["y"]}), data / "train" / "quarantine.parquet")
    (data / "train" / ".lsp-orig-part-00001.parquet.tmp").write_bytes(b"partial")
    assert [p.name for p in shard_paths(data, "train")] == ["lsp-orig-part-00000.parquet"]


def test_masks_come_from_their_own_root(tmp_path, capsys):
    written, masks = spin.write_lsp_test_with_masks(tmp_path / "in", n=2)
    data = tmp_path / "data"
    assert "mask folder not found" in one_line_error(
        ["data", "ingest", written.file, "--images", written.images, "--masks", tmp_path / "nowhere", "--out", data], capsys)
    code, _, err = run_cli(["data", "ingest", written.file, "--images", written.images, "--masks", masks, "--out", data,
                            "--img-size", 48], capsys)
    assert code == 0, err
    table = read_table(shard_paths(data, "test")[0], SAMPLES_SCHEMA)
    assert table.column("protocol").to_pylist() == ["lsp", "lsp"]
    import cv2
    parts = cv2.imdecode(np.frombuffer(table.column("part_mask")[0].as_py(), np.uint8), cv2.IMREAD_UNCHANGED)
    # SPIN scores LSP's segmentation on the full original image: the PNG is kept whole
    np.testing.assert_array_equal(parts, written.people[0].parts)


# ----------------------------------------------------------------------------- in-the-wild rows

def test_openpose_rows_are_every_confident_person_with_spins_demo_box(tmp_path):
    folder = spin.write_openpose_folder(tmp_path)
    rows = openpose_rows(folder.images, folder.keypoints)
    names = rows.arrays["imgname"].tolist()
    assert names == ["nobody.jpg", "one_person.jpg", "one_person.jpg", "two_people.jpg", "two_people.jpg"]
    assert rows.reasons[0] == "OpenPose found no person" and "too few detected keypoints" in rows.reasons[2]
    assert rows.reasons[1] is None and rows.reasons[3] is None and rows.reasons[4] is None
    for row, detection in ((3, folder.detections["two_people.jpg"][0]), (4, folder.detections["two_people.jpg"][1])):
        confident = detection[detection[:, 2] > 0.2]
        # SPIN's bbox_from_openpose: centre at the mean of the confident keypoints, 1.2 x the larger extent
        np.testing.assert_allclose(rows.arrays["center"][row], confident[:, :2].mean(axis=0))
        assert rows.arrays["scale"][row] == pytest.approx(1.2 * np.ptp(confident[:, :2], axis=0).max() / 200)
    assert keypoint_box(np.zeros((3, 2))) is None


def test_openpose_files_that_are_not_body_25_are_quarantined_not_fatal(tmp_path):
    folder = spin.write_openpose_folder(tmp_path)
    (folder.keypoints / "two_people_keypoints.json").write_text(json.dumps(
        {"people": [{"pose_keypoints_2d": [0.0] * 54}]}))   # COCO-18 output
    (folder.keypoints / "nobody_keypoints.json").write_text("{not json")
    (folder.keypoints / "one_person_keypoints.json").unlink()
    rows = openpose_rows(folder.images, folder.keypoints)
    assert [r.split(" (")[0] for r in rows.reasons] == [
        "unreadable OpenPose file", "no OpenPose file", "unreadable OpenPose file"]
    assert "BODY_25" in rows.reasons[2]
    with pytest.raises(BadInput, match="not found"):
        openpose_rows(tmp_path / "nowhere", folder.keypoints)


def test_coco_rows_follow_spins_preprocessing(tmp_path):
    coco = spin.write_coco_keypoints(tmp_path)
    rows = coco_rows(coco.file)
    assert len(rows.reasons) == 4 and rows.reasons[:2] == [None, None] and rows.reasons[3] is None
    assert "left_ankle" in rows.reasons[2]                       # SPIN keeps only all 12 limb joints
    # the one table agrees with SPIN's coco.py joints_idx
    assert [k - 25 for k in COCO17_TO_KEYPOINTS] == list(spin.COCO_TO_J24)
    first = coco.annotations[0]
    kp = np.asarray(first["keypoints"], float).reshape(17, 3)
    part = rows.arrays["part"][0]
    for k, j24 in enumerate(spin.COCO_TO_J24):
        assert part[j24, 2] == (kp[k, 2] > 0)
        np.testing.assert_array_equal(part[j24, :2], kp[k, :2] if kp[k, 2] > 0 else 0)
    x, y, w, h = first["bbox"]
    np.testing.assert_allclose(rows.arrays["center"][0], [x + w / 2, y + h / 2])
    assert rows.arrays["scale"][0] == pytest.approx(1.2 * max(w, h) / 200)
    assert rows.arrays["part"][1, KEYPOINT_NAMES.index("Right Elbow") - 25, 2] == 1  # labelled, not visible: v=1
    assert rows.arrays["imgname"][0] == "COCO_train2014_000000000009.jpg"


def test_whole_image_rows_are_spins_demo_without_a_box(tmp_path):
    image = tmp_path / "a.jpg"
    spin.write_image(image, np.zeros((90, 160, 3), np.uint8))
    (tmp_path / "b.jpg").write_bytes(b"not an image")
    rows = whole_image_rows([image, tmp_path / "b.jpg"])
    np.testing.assert_array_equal(rows.arrays["center"][0], [80, 45])
    assert rows.arrays["scale"][0] == pytest.approx(160 / 200) and rows.reasons == [None, "undecodable image"]


# ----------------------------------------------------------------------------- mixing

def test_mixing_probabilities_are_spins():
    counts = {"h36m": 300, "lsp-orig": 100, "mpii": 300, "lspet": 100, "coco": 500, "mpi-inf-3dhp": 50}
    p = mixing_probabilities(counts, SPIN_MIX)
    assert p["h36m"] == pytest.approx(0.3) and p["mpi-inf-3dhp"] == pytest.approx(0.1)
    assert p["coco"] == pytest.approx(0.6 * 500 / 1000) and p["lsp-orig"] == pytest.approx(0.6 * 100 / 1000)
    assert mixing_probabilities({"a": 1, "b": 3}, {}) == {"a": 0.25, "b": 0.75}
    assert mixing_probabilities({"a": 1, "b": 3}, {"a": 1, "b": 0}) == {"a": 1.0, "b": 0.0}
    with pytest.raises(BadInput, match="no weight for b"):
        mixing_probabilities({"a": 1, "b": 3}, {"a": 1})
    with pytest.raises(BadInput, match="names no dataset"):
        mixing_probabilities({"a": 1}, {"a": 1, "lsp_orig": 1})
    with pytest.raises(BadInput, match="two weights"):
        mixing_probabilities({"a": 1}, {"a": 1, "a,b": 1})


def test_mixed_sampler_draws_by_weight_and_repeats_itself():
    rows = {"big": np.arange(0, 900), "small": np.arange(900, 1000)}
    sampler = MixedBatchSampler(rows, {"big": 0.2, "small": 0.8}, batch_size=50, seed=3, start=0, stop=40)
    keys = np.concatenate([np.asarray(b) for b in sampler])
    drawn = keys % 1000
    assert abs((drawn >= 900).mean() - 0.8) < 0.03
    assert len(np.unique(keys)) == len(keys)                  # every draw has its own augmentation
    resumed = MixedBatchSampler(rows, {"big": 0.2, "small": 0.8}, batch_size=50, seed=3, start=20, stop=40)
    np.testing.assert_array_equal(np.concatenate([np.asarray(b) for b in resumed]), keys[20 * 50:])


def test_config_mix_and_pickles(tmp_path):
    config = RunConfig.from_dict({"mix": {"h36m": 0.3, "lsp-orig,coco": "0.6"}})
    assert config.mix == {"h36m": 0.3, "lsp-orig,coco": 0.6}
    with pytest.raises(BadInput, match=r"mix.h36m: .* >= 0"):
        RunConfig.from_dict({"mix": {"h36m": -1}})
    for key, command in (("prior", "prior"), ("body_model", "body-model")):
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump({key: "/models/x.pkl"}))
        with pytest.raises(BadInput, match=rf"spin-pipeline {command} convert --allow-pickle /models/x.pkl /models/x.npz"):
            load_config(path)


# ----------------------------------------------------------------------------- SPIN's files

def test_gmm_08_pkl_converts_only_with_the_opt_in(tmp_path, capsys):
    written = spin.write_gmm_08_pkl(tmp_path / "gmm_08.pkl")
    assert set(pickle.load(open(tmp_path / "gmm_08.pkl", "rb"), encoding="latin1")) == {"means", "covars", "weights"}
    assert "--allow-pickle" in one_line_error(["prior", "convert", tmp_path / "gmm_08.pkl", tmp_path / "g.npz"], capsys)
    assert not (tmp_path / "g.npz").exists()
    code, _, err = run_cli(["prior", "convert", "--allow-pickle", tmp_path / "gmm_08.pkl", tmp_path / "g.npz"], capsys)
    assert code == 0, err
    with np.load(tmp_path / "g.npz", allow_pickle=False) as converted:
        for key, value in written.items():
            np.testing.assert_array_equal(converted[key], value)
    assert "exists" in one_line_error(["prior", "convert", "--allow-pickle", tmp_path / "gmm_08.pkl", tmp_path / "g.npz"], capsys)
    # a pickle that holds anything but arrays is refused
    with open(tmp_path / "evil.pkl", "wb") as fh:
        pickle.dump({"means": print}, fh)
    assert "refusing to unpickle" in one_line_error(
        ["prior", "convert", "--allow-pickle", tmp_path / "evil.pkl", tmp_path / "e.npz"], capsys)


def test_spin_checkpoint_starts_our_regressor_exactly(tmp_path):
    state = spin.write_spin_checkpoint(tmp_path / "model_checkpoint.pt", seed=1)
    mapped = spin_state_dict(tmp_path / "model_checkpoint.pt")   # torch 1.x legacy format, weights_only
    assert len(state) == 331 and sum(k.startswith("backbone.") for k in mapped) == 318
    regressor = Regressor("resnet50", 224, backbone_weights="none").eval()
    load_spin_weights(regressor, tmp_path / "model_checkpoint.pt")
    # any size reads the key mapping; SPIN feeds 224 px, where its AvgPool2d(7) is torchvision's adaptive pool
    images = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = regressor(normalize_images(images))
    rotmat, betas, cam = spin.spin_hmr_forward(state, normalize_images(images))
    torch.testing.assert_close(ours.rotmat, rotmat, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.betas, betas, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.cam, cam, atol=1e-5, rtol=1e-4)
    with pytest.raises(BadInput, match="resnet50"):
        load_spin_weights(Regressor("small", 64), tmp_path / "model_checkpoint.pt")
    torch.save({"model": {"conv1.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(BadInput, match="not SPIN's checkpoint"):
        spin_state_dict(tmp_path / "other.pt")


@pytest.mark.parametrize("case", ["openpose-one-arg", "npz-two-args", "no-images", "coco-missing", "coco-not-coco",
                                  "bad-dataset-name", "show-empty"])
def test_bad_ingest_arguments_are_one_line_errors(tmp_path, capsys, case):
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.json").write_text(json.dumps({"people": []}))
    args = {
        "openpose-one-arg": ["data", "ingest", "--format", "openpose", tmp_path / "empty", "--out", tmp_path / "d"],
        "npz-two-args": ["data", "ingest", tmp_path / "a.npz", tmp_path / "b", "--images", tmp_path, "--out", tmp_path / "d"],
        "no-images": ["data", "ingest", "--format", "openpose", tmp_path / "empty", tmp_path / "empty", "--out", tmp_path / "d"],
        "coco-missing": ["data", "ingest", "--format", "coco", tmp_path / "none.json", "--images", tmp_path, "--out", tmp_path / "d"],
        "coco-not-coco": ["data", "ingest", "--format", "coco", tmp_path / "x.json", "--images", tmp_path, "--out", tmp_path / "d"],
        "bad-dataset-name": ["data", "ingest", "--format", "coco", tmp_path / "x.json", "--images", tmp_path, "--out",
                           tmp_path / "d", "--dataset", "_hidden"],
        "show-empty": ["data", "show", tmp_path / "empty"],
    }[case]
    one_line_error(args, capsys)
    assert not (tmp_path / "d").exists()
