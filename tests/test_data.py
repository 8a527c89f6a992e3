"""The data side: samples table round trip, image crops, quarantine, SPIN .npz ingest, the
synthetic benchmark (visibility, ground truth, determinism, layout) and the contact sheet."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch

from fitting.errors import BadInput
from fitting.keypoints import GT24, KEYPOINT_NAMES, NUM_KEYPOINTS
from pipeline.cli import main
from trainer.data.samples import (
    crop_square,
    decode_image,
    encode_image,
    from_normalized,
    to_normalized,
    transform_points,
    validate_samples,
)
from trainer.data.tables import (
    FITS_SCHEMA,
    QUARANTINE_SCHEMA,
    SAMPLES_SCHEMA,
    fits_table,
    make_table,
    read_table,
    shard_paths,
    to_numpy,
    write_table,
)

RNG = np.random.default_rng(7)


def test_fits_rows_have_one_builder():
    table = fits_table(["a", "b"], pose=np.ones((2, 72)), betas=0.0, cam_t=[0.0, 0.0, 50.0], loss=[1.0, np.inf],
                       joint_loss=0.5, valid=[True, False], betas_ok=True, found_in_round=3, init="network",
                       iterations=[4, 0])
    assert table.schema == FITS_SCHEMA and table.column("sample_id").to_pylist() == ["a", "b"]
    assert to_numpy(table, "cam_t").tolist() == [[0.0, 0.0, 50.0]] * 2 and to_numpy(table, "joint_loss").shape == (2, 49)
    assert table.column("found_in_round").to_pylist() == [3, 3] and table.column("init").to_pylist() == ["network"] * 2
    assert table.column("valid").to_pylist() == [True, False] and np.isinf(to_numpy(table, "loss")[1])
    with pytest.raises(BadInput, match=r"missing \['iterations'\], unknown \['iteration'\]"):
        fits_table(["a"], pose=0.0, betas=0.0, cam_t=0.0, loss=0.0, joint_loss=0.0, valid=True, betas_ok=True,
                   found_in_round=0, init="gt", iteration=0)
    with pytest.raises(ValueError):
        fits_table(["a", "b"], pose=np.ones((3, 72)), betas=0.0, cam_t=0.0, loss=0.0, joint_loss=0.0, valid=True,
                   betas_ok=True, found_in_round=0, init="gt", iterations=0)


def _image(h=64, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _keypoints(n, visible=NUM_KEYPOINTS):
    kp = np.zeros((n, NUM_KEYPOINTS, 3))
    kp[:, :, :2] = RNG.uniform(-0.8, 0.8, (n, NUM_KEYPOINTS, 2))
    kp[:, :visible, 2] = 1.0
    return kp


def _samples(n, **columns):
    base = {
        "sample_id": [f"s-{i}" for i in range(n)], "dataset": ["t"] * n,
        "image": [encode_image(_image(seed=i)) for i in range(n)], "keypoints": _keypoints(n),
        "center": np.zeros((n, 2)), "scale": np.ones(n), "has_smpl": [False] * n,
    }
    base.update(columns)
    return make_table(base, SAMPLES_SCHEMA)


def _run_cli(args, capsys):
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------- samples

def test_samples_schema_round_trip(tmp_path):
    n = 3
    table = _samples(
        n, pose=RNG.normal(size=(n, 72)), betas=[RNG.normal(size=10), None, RNG.normal(size=10)],
        joints3d=RNG.normal(size=(n, 24, 4)), mask=[b"m", None, b"k"], has_smpl=[True, False, True],
    )
    write_table(table, tmp_path / "part-00000.parquet")
    back = read_table(shard_paths(tmp_path)[0], SAMPLES_SCHEMA)
    assert back.schema.equals(SAMPLES_SCHEMA)
    for name in ("keypoints", "pose", "joints3d", "center"):
        np.testing.assert_allclose(to_numpy(back, name), to_numpy(table, name), rtol=1e-6)
    betas = to_numpy(back, "betas")
    assert np.isnan(betas[1]).all() and np.isfinite(betas[[0, 2]]).all()
    assert back.column("image").to_pylist() == table.column("image").to_pylist()
    assert decode_image(back.column("image")[0].as_py()).shape == (64, 64, 3)


def test_decode_rejects_garbage_and_truncated_jpeg():
    data = encode_image(_image())
    assert decode_image(data).shape == (64, 64, 3)
    for bad in (b"", b"not an image", data[: len(data) // 2]):
        with pytest.raises(ValueError):
            decode_image(bad)


def test_crop_moves_pixels_and_keypoints_together():
    image = np.zeros((300, 400), np.float32)
    image[123, 271] = 1.0  # a smooth bump peaking at pixel centre (271.5, 123.5)
    image = cv2.GaussianBlur(image, (0, 0), 5.0)
    center, scale, size = np.array([250.0, 140.0]), 0.9, 64
    crop, transform = crop_square(image, center, scale, size)
    x, y = transform_points(np.array([[271.5, 123.5]]), transform)[0]
    row, col = np.unravel_index(np.argmax(crop), crop.shape)
    assert (col, row) == (int(x), int(y))
    kp = to_normalized(np.array([[x, y, 1.0]]), size)
    np.testing.assert_allclose(from_normalized(kp, size)[0, :2], [x, y])


@pytest.mark.fault("undecodable or missing image, NaN/Inf keypoints, too few visible keypoints, wrong shape, duplicate id",
                   "each quarantined with its own reason")
def test_validate_samples_quarantines_each_problem():
    n = 8
    images = [encode_image(_image(seed=i)) for i in range(n)]
    images[1] = b"\x00garbage"
    images[2] = None
    kp = _keypoints(n)
    kp[3, 5, 0] = np.nan
    kp[4, :, 2] = 0.0
    kp[4, :3, 2] = 0.9
    kp[7, 0, 1] = np.inf
    ids = [f"s-{i}" for i in range(n)]
    ids[6] = "s-0"
    table = _samples(n, sample_id=ids, image=images, keypoints=kp)
    # a wrongly shaped row, as a foreign parquet file may hold: make_table itself refuses one
    rows = [row.reshape(-1).tolist() for row in kp]
    rows[5] = rows[5][:144]
    column = SAMPLES_SCHEMA.field("keypoints")
    table = table.set_column(table.schema.get_field_index("keypoints"), column, pa.array(rows, column.type))
    good, quarantine = validate_samples(table, min_visible=6, source="shard-x")
    assert good.column("sample_id").to_pylist() == ["s-0"]
    assert quarantine.schema.equals(QUARANTINE_SCHEMA)
    reasons = dict(zip(quarantine.column("sample_id").to_pylist(), quarantine.column("reason").to_pylist()))
    assert "undecodable image" in reasons["s-1"]
    assert reasons["s-2"] == "no image"
    assert "NaN or Inf" in reasons["s-3"] and "NaN or Inf" in reasons["s-7"]
    assert "only 3 visible keypoints" in reasons["s-4"]
    assert "144 values" in reasons["s-5"]
    assert "duplicate sample_id 's-0'" in quarantine.column("reason").to_pylist()
    assert set(quarantine.column("source").to_pylist()) == {"shard-x"}


# ----------------------------------------------------------------------------- ingest

def _spin_dataset(root: Path):
    """A SPIN-format .npz over four images: two good, one missing, one corrupt; plus a row with
    a NaN keypoint and one with too few visible keypoints. Each image has a bright marker where
    its right-ankle keypoint is."""
    (root / "images").mkdir(parents=True)
    n = 6
    names = [f"images/im{i}.png" for i in range(n)]
    part = np.zeros((n, 24, 3))
    part[:, :14, :2] = RNG.uniform(60, 140, (n, 14, 2))
    part[:, :14, 2] = 1.0
    part[:, 0, :2] = [120, 60]      # Right Ankle on the marker pixel (SPIN: 0-based pixel indices)
    openpose = np.zeros((n, 25, 3))
    openpose[:, :8] = part[:, :8] * [1, 1, 0.7]
    for i in range(n):
        if i in (2,):
            continue  # missing image
        path = root / names[i]
        if i == 3:
            path.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
            continue
        image = np.full((160, 200, 3), 40, np.uint8)
        image[60, 120] = 255
        cv2.imwrite(str(path), image)
    cv2.imwrite(str(root / "images/mask0.png"), np.pad(np.full((40, 40), 255, np.uint8), ((60, 60), (80, 80))))
    part[4, 3, 0] = np.nan
    part[5, 2:, 2] = 0.0
    openpose[5, :, 2] = 0.0
    arrays = {
        "imgname": np.array(names), "center": np.tile([100.0, 80.0], (n, 1)), "scale": np.full(n, 0.8),
        "part": part, "openpose": openpose, "S": RNG.normal(size=(n, 24, 4)),
        "pose": RNG.normal(size=(n, 72)) * 0.1, "shape": RNG.normal(size=(n, 10)),
        "has_smpl": np.array([1, 0, 1, 1, 1, 0]), "maskname": np.array(["images/mask0.png"] + [""] * (n - 1)),
    }
    np.savez(root / "toy_spin.npz", **arrays)
    return root / "toy_spin.npz", arrays


@pytest.mark.fault("ingest: missing or corrupt images, NaN keypoints",
                   "rows quarantined with reasons, the rest written")
def test_ingest_spin_npz(tmp_path, capsys):
    npz, arrays = _spin_dataset(tmp_path / "src")
    out = tmp_path / "out"
    code, stdout, err = _run_cli(["data", "ingest", "--format", "spin-npz", str(npz), "--images",
                                  str(tmp_path / "src"), "--out", str(out), "--img-size", "64",
                                  "--min-visible", "4"], capsys)
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["rows"] == 6 and summary["written"] == 2 and summary["quarantined"] == 4
    table = read_table(shard_paths(out, "train")[0], SAMPLES_SCHEMA)
    assert table.column("sample_id").to_pylist() == ["toy_spin-000000", "toy_spin-000001"]
    assert table.column("imgname").to_pylist() == ["images/im0.png", "images/im1.png"]
    assert table.column("source_row").to_pylist() == [0, 1] and table.column("protocol").to_pylist() == ["lsp14"] * 2
    assert table.column("has_smpl").to_pylist() == [True, False]
    assert np.isnan(to_numpy(table, "pose")[1]).all() and np.isfinite(to_numpy(table, "pose")[0]).all()
    np.testing.assert_allclose(to_numpy(table, "joints3d"), arrays["S"][:2], rtol=1e-6)
    kp = to_numpy(table, "keypoints")
    ankle = KEYPOINT_NAMES.index("Right Ankle")
    px = from_normalized(kp[0], 64)[ankle]
    crop = decode_image(table.column("image")[0].as_py())
    row, col = np.unravel_index(np.argmax(crop.sum(-1)), crop.shape[:2])
    assert abs(px[0] - (col + 0.5)) <= 1.0 and abs(px[1] - (row + 0.5)) <= 1.0
    assert kp[0, 0, 2] == pytest.approx(0.7) and kp[0, 20, 2] == 0.0
    mask = cv2.imdecode(np.frombuffer(table.column("mask")[0].as_py(), np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}
    quarantine = read_table(out / "_quarantine" / "train" / "toy_spin.parquet", QUARANTINE_SCHEMA)
    reasons = dict(zip(quarantine.column("sample_id").to_pylist(), quarantine.column("reason").to_pylist()))
    assert reasons["toy_spin-000002"].startswith("image not found")
    assert "undecodable" in reasons["toy_spin-000003"]
    assert "NaN" in reasons["toy_spin-000004"]
    assert "visible keypoints" in reasons["toy_spin-000005"]


@pytest.mark.parametrize("kind", ["missing", "garbage", "object", "no_imgname", "bad_shape"])
@pytest.mark.fault("ingest: a broken zip, object arrays, no `imgname`, wrong shapes",
                   "one-line error, exit 2, no traceback")
def test_ingest_bad_npz_is_one_line_error(tmp_path, capsys, kind):
    path = tmp_path / "d.npz"
    good = {"imgname": np.array(["a.png"]), "center": np.zeros((1, 2)), "scale": np.ones(1)}
    if kind == "garbage":
        path.write_bytes(b"PK\x03\x04 broken zip")
    elif kind == "object":
        np.savez(path, **good, pose=np.array([{"evil": 1}], dtype=object))
    elif kind == "no_imgname":
        np.savez(path, center=np.zeros((1, 2)), scale=np.ones(1))
    elif kind == "bad_shape":
        np.savez(path, **good, part=np.zeros((1, 14, 3)))
    code, _, err = _run_cli(["data", "ingest", str(path), "--images", str(tmp_path), "--out",
                             str(tmp_path / "o")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err


# ----------------------------------------------------------------------------- synthetic benchmark

SMALL = {"num_train": 12, "num_test": 6, "img_size": 64, "shard_size": 5}


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    from trainer.data.synth import SynthConfig
    from trainer.data.synth_run import generate

    out = tmp_path_factory.mktemp("synth")
    generate(SynthConfig.from_preset("tiny", **SMALL), out, workers=1, progress=False)
    return out


def _posed(scene):
    from trainer.data.synth import scene_pose, synth_context

    ctx = synth_context(None)
    with torch.no_grad():
        out = ctx.model(torch.as_tensor(scene_pose(scene)[None], dtype=torch.float32),
                        torch.as_tensor(scene.betas[None], dtype=torch.float32))
    return ctx, out.vertices[0].double().numpy(), out.keypoints[0].double().numpy()


def test_upright_person_facing_the_camera_is_pi_about_x():
    from fitting.pose_sampler import archetype_pose
    from trainer.data.synth import Scene, scene_pose

    scene = Scene(body_pose=archetype_pose("stand").astype(np.float64), betas=np.zeros(10))
    np.testing.assert_allclose(np.abs(scene_pose(scene)[:3]), [np.pi, 0, 0], atol=1e-6)
    _, vertices, keypoints = _posed(scene)
    head, ankle = KEYPOINT_NAMES.index("Top of Head (LSP)"), KEYPOINT_NAMES.index("Right Ankle")
    nose = KEYPOINT_NAMES.index("Nose")
    assert keypoints[head, 1] < keypoints[ankle, 1] - 1.2          # head up: smaller image y
    assert keypoints[nose, 2] < vertices[:, 2].mean()              # face towards the camera (-z)


def test_wrist_behind_torso_or_occluder_gets_confidence_zero():
    from fitting.pose_sampler import archetype_pose
    from fitting.camera import pinhole
    from trainer.data.synth import Scene, keypoint_visibility, place_and_crop, render_body
    from trainer.data.synth_scene import annotate_keypoints

    size = 128
    wrists = [KEYPOINT_NAMES.index("Right Wrist"), KEYPOINT_NAMES.index("Left Wrist")]
    scene = Scene(body_pose=archetype_pose("stand").astype(np.float64), betas=np.zeros(10),
                  yaw=np.pi / 2, focal_ratio=5.0)
    ctx, vertices, keypoints = _posed(scene)
    cam_t, _, _, focal, pp = place_and_crop(vertices, ctx.dominant, scene, size)
    kp_cam = keypoints + cam_t
    body = render_body(ctx, vertices + cam_t, focal, pp, size, zoom=1)
    kp_px = pinhole(kp_cam, focal, pp)
    visible = keypoint_visibility(kp_cam, kp_px, body.depth, body.joints, ctx.own)
    near, far = sorted(wrists, key=lambda k: kp_cam[k, 2])
    assert visible[near] and not visible[far]       # side view: the far wrist is behind the body
    labels = annotate_keypoints(np.random.default_rng(0), kp_px, visible, size)
    assert labels[near, 2] == 1.0 and labels[far, 2] == 0.0

    occluder = np.zeros((size, size), bool)
    cv2.circle(occluder.view(np.uint8), tuple(int(v) for v in kp_px[near]), 6, 1, -1)
    covered = keypoint_visibility(kp_cam, kp_px, body.depth, body.joints, ctx.own, occluder)
    assert not covered[near] and covered.sum() < visible.sum()
    assert annotate_keypoints(np.random.default_rng(0), kp_px, covered, size)[near, 2] == 0.0


def test_synth_truth_reproduces_joints3d_and_labels():
    from trainer.data.synth import SynthConfig, render_chunk, synth_context

    cfg = SynthConfig.from_preset("tiny", seed=3, img_size=64)
    records = render_chunk(cfg, "test", 0, 4)
    model = synth_context(None).model
    with torch.no_grad():
        out = model(torch.as_tensor(np.stack([r["pose"] for r in records])),
                    torch.as_tensor(np.stack([r["betas"] for r in records])))
    for k, r in enumerate(records):
        expected = out.keypoints[k, list(GT24)].numpy() + r["cam_t"]
        np.testing.assert_allclose(r["joints3d"][:, :3], expected, atol=1e-4)
        labelled = r["keypoints"][:, 2] == 1.0   # annotations: close to the clean projections
        assert labelled.sum() >= 4
        assert np.abs(r["keypoints"][labelled, :2] - r["clean"][labelled, :2]).max() < 0.1
    again = render_chunk(cfg, "test", 2, 4)
    assert again[0]["image"] == records[2]["image"]   # a sample depends only on its index
    other = render_chunk(SynthConfig.from_preset("tiny", seed=4, img_size=64), "test", 2, 3)
    assert other[0]["image"] != records[2]["image"]


def test_synth_split_layout(synth_dir):
    summary = json.loads((synth_dir / "dataset.json").read_text())
    assert summary["counts"] == {"train": 12, "test": 6, "truth": 12} and summary["samples_per_s"] > 0
    train = pa.concat_tables([read_table(p, SAMPLES_SCHEMA) for p in shard_paths(synth_dir, "train")])
    test = pa.concat_tables([read_table(p, SAMPLES_SCHEMA) for p in shard_paths(synth_dir, "test")])
    truth = pa.concat_tables([read_table(p, SAMPLES_SCHEMA) for p in shard_paths(synth_dir, "truth")])
    assert len(shard_paths(synth_dir, "train")) == 3
    assert train.column("sample_id").to_pylist() == [f"synth-train-{i:06d}" for i in range(12)]
    assert truth.column("sample_id").to_pylist() == train.column("sample_id").to_pylist()
    assert not any(train.column("has_smpl").to_pylist()) and not any(test.column("has_smpl").to_pylist())
    for name in ("pose", "betas", "joints3d", "mask", "part_mask"):
        assert train.column(name).null_count == 12
        assert test.column(name).null_count == 0
    assert truth.column("pose").null_count == 0 and truth.column("image").null_count == 12
    good, quarantine = validate_samples(train, min_visible=1)
    assert len(good) == 12 and len(quarantine) == 0
    image = decode_image(test.column("image")[0].as_py())
    part_mask = cv2.imdecode(np.frombuffer(test.column("part_mask")[0].as_py(), np.uint8), cv2.IMREAD_UNCHANGED)
    assert image.shape == (64, 64, 3) and part_mask.shape == (64, 64) and set(np.unique(part_mask)) <= set(range(7))
    assert len(np.unique(part_mask)) >= 4


@pytest.mark.fault("`data synth` into an existing folder", "refused unless `--overwrite`")
def test_synth_refuses_to_overwrite(synth_dir, capsys):
    code, _, err = _run_cli(["data", "synth", "--out", str(synth_dir), "--preset", "tiny"], capsys)
    assert code == 2 and "--overwrite" in err


@pytest.mark.slow
def test_synth_is_deterministic_across_worker_counts(synth_dir, tmp_path):
    from trainer.data.synth import SynthConfig
    from trainer.data.synth_run import generate

    generate(SynthConfig.from_preset("tiny", **SMALL), tmp_path, workers=2, progress=False)
    for split in ("train", "test", "truth"):
        ours, theirs = shard_paths(tmp_path, split), shard_paths(synth_dir, split)
        assert [p.name for p in ours] == [p.name for p in theirs]
        for a, b in zip(ours, theirs):
            assert read_table(a).equals(read_table(b))


def test_show_writes_a_contact_sheet(synth_dir, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    code, _, err = _run_cli(["data", "show", str(synth_dir), "--out", str(sheet), "--num", "4", "--split", "test"], capsys)
    assert code == 0, err
    image = cv2.imread(str(sheet))
    assert image is not None and image.shape[0] >= 192 and image.shape[1] >= 3 * 192
    code, _, err = _run_cli(["data", "show", str(synth_dir / "nope"), "--out", str(sheet)], capsys)
    assert code == 2 and err.startswith("error: ")
