"""The synthetic benchmark's keypoint-only train split: the ray cast agrees with the renderer, the
rows validate without images, and the people are the rendered benchmark's people."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fitting.camera import pinhole
from fitting.render import rasterize, surface_at_points
from trainer.data.samples import validate_samples
from trainer.data.synth import (
    SynthConfig,
    keypoint_visibility,
    place_and_crop,
    render_body,
    sample_rng,
    sample_scene,
    scene_pose,
    synth_context,
)
from trainer.data.synth_keypoints import cast_visibility
from trainer.data.synth_run import generate
from trainer.data.tables import read_split, to_numpy


def posed_scenes(num: int, size: int):
    """(ctx, [(verts, kp_cam, kp_px, focal, pp)]) for the first `num` train scenes of seed 0."""
    cfg = SynthConfig.from_preset("small")
    ctx = synth_context(None)
    out = []
    for i in range(num):
        scene = sample_scene(sample_rng(0, "train", i), cfg)
        with torch.no_grad():
            body = ctx.model(torch.as_tensor(scene_pose(scene)[None], dtype=torch.float32),
                             torch.as_tensor(scene.betas[None], dtype=torch.float32))
        vertices, keypoints = body.vertices[0].double().numpy(), body.keypoints[0].double().numpy()
        cam_t, _, _, focal, pp = place_and_crop(vertices, ctx.dominant, scene, size)
        out.append((vertices + cam_t, keypoints + cam_t, pinhole(keypoints + cam_t, focal, pp), focal, pp))
    return ctx, out


def test_the_cast_surface_is_the_rasterized_one_at_pixel_centres():
    ctx, scenes = posed_scenes(4, 96)
    for verts, _, kp_px, focal, pp in scenes:
        centres = np.floor(kp_px) + 0.5
        face, _, depth_map = rasterize(verts, ctx.faces, focal, pp, 96)
        depth, corner = surface_at_points(centres, verts, ctx.faces, focal, pp)
        inside = ((centres >= 0) & (centres < 96)).all(1)
        cols, rows = centres[inside].astype(int).T
        expected = depth_map[rows, cols].astype(np.float64)
        assert np.isfinite(expected).sum() > 20
        np.testing.assert_allclose(np.nan_to_num(depth[inside], posinf=-1), np.nan_to_num(expected, posinf=-1), atol=1e-5)
        hit = face[rows, cols] >= 0
        assert np.all(np.isin(corner[inside][hit].reshape(-1, 1), ctx.faces[face[rows, cols][hit]]).any(1))
        assert np.all(corner[inside][~hit] == -1)


def test_cast_visibility_agrees_with_the_renderer():
    """The same people (no occluders) through the renderer's depth buffer and through the cast:
    nearly every keypoint gets the same verdict, including most of the hidden ones."""
    size = 128
    ctx, scenes = posed_scenes(12, size)
    agree, hidden_render, hidden_both = 0, 0, 0
    for verts, kp_cam, kp_px, focal, pp in scenes:
        body = render_body(ctx, verts, focal, pp, size)
        rendered = keypoint_visibility(kp_cam, kp_px * body.zoom, body.depth, body.joints, ctx.own)
        cast = cast_visibility(ctx, verts, kp_cam, kp_px, focal, pp, size)
        agree += int((rendered == cast).sum())
        hidden_render += int((~rendered).sum())
        hidden_both += int((~rendered & ~cast).sum())
    assert agree / (49 * len(scenes)) >= 0.97
    assert hidden_render >= 20 and hidden_both / hidden_render >= 0.8


@pytest.fixture(scope="module")
def keypoint_split(tmp_path_factory):
    """A tiny benchmark twice: rendered, and with a keypoint-only train split."""
    root = tmp_path_factory.mktemp("keypoint-split")
    sizes = {"num_train": 24, "num_test": 8, "shard_size": 10}
    generate(SynthConfig.from_preset("tiny", **sizes), root / "rendered", workers=1, progress=False)
    generate(SynthConfig.from_preset("tiny", train_images=False, **sizes), root / "keypoints", workers=2, progress=False)
    return root


def test_keypoint_only_rows_validate_and_have_no_images(keypoint_split):
    data = keypoint_split / "keypoints"
    train = read_split(data, "train")
    assert len(train) == 24 and train.column("image").null_count == 24 and train.column("image_uri").null_count == 24
    good, quarantine = validate_samples(train, check_images=False)
    assert len(good) == 24 and len(quarantine) == 0
    assert set(train.column("dataset").to_pylist()) == {"synth"}
    labelled = (to_numpy(train, "keypoints")[:, :, 2] > 0).sum(1)
    assert labelled.min() >= 4 and labelled.mean() > 25
    test = read_split(data, "test")   # the test split stays rendered: overlays and segmentation
    assert test.column("image").null_count == 0 and test.column("mask").null_count == 0
    summary = json.loads((data / "dataset.json").read_text())
    assert summary["config"]["train_images"] is False and summary["counts"] == {"train": 24, "test": 8, "truth": 24}


def test_keypoint_only_people_are_the_rendered_benchmarks(keypoint_split):
    """Same seed, same people: the truth and crops match the rendered split's, the test split is
    the same file content; only the labels' random draws differ."""
    rendered, keypoints = keypoint_split / "rendered", keypoint_split / "keypoints"
    for column in ("pose", "betas", "joints3d", "keypoints"):
        np.testing.assert_array_equal(to_numpy(read_split(rendered, "truth"), column),
                                      to_numpy(read_split(keypoints, "truth"), column))
    for column in ("center", "scale"):
        a, b = (read_split(d, "train").column(column) for d in (rendered, keypoints))
        np.testing.assert_array_equal(np.asarray(a.to_pylist(), dtype=object), np.asarray(b.to_pylist(), dtype=object))
    assert read_split(rendered, "test").equals(read_split(keypoints, "test"))
    a, b = (to_numpy(read_split(d, "train"), "keypoints")[:, :, 2] > 0 for d in (rendered, keypoints))
    assert (a == b).mean() > 0.8


def test_a_contact_sheet_draws_keypoint_only_rows_on_a_blank_crop(keypoint_split):
    from trainer.data.cli import TILE, contact_sheet

    sheet = contact_sheet(str(keypoint_split / "keypoints"), "train", num=4, columns=4)
    assert sheet.shape[0] == TILE and sheet.shape[1] >= 4 * TILE
