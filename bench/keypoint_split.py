"""The keypoint-only train split against the rendered one: the same people through the renderer's
depth buffer and through the ray cast (`trainer.data.synth_keypoints`), no occluders, and what
each costs per person; then the time to write a keypoint-only split and a rendered one of the
same size with the same workers. Prints JSON.

    python bench/keypoint_split.py [--compare 200] [--num 400] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fitting.camera import pinhole  # noqa: E402
from trainer.data.synth import (  # noqa: E402
    SynthConfig, keypoint_visibility, place_and_crop, posed_people, render_body, synth_context,
)
from trainer.data.synth_keypoints import cast_visibility  # noqa: E402
from trainer.data.synth_run import generate  # noqa: E402


def compare(num: int, seed: int = 0) -> dict:
    """Per-keypoint agreement of the two visibilities, and their cost per person."""
    cfg = SynthConfig.from_preset("keypoints", seed=seed)
    ctx = synth_context(None)
    people = posed_people(ctx, cfg, "train", 0, num)
    agree, hidden_render, hidden_both, seconds = 0, 0, 0, {"render": 0.0, "cast": 0.0}
    rates = np.zeros((2, 49))
    for k in range(num):
        cam_t, _, _, focal, pp = place_and_crop(people.vertices[k], ctx.dominant, people.scenes[k], cfg.img_size)
        verts, kp_cam = people.vertices[k] + cam_t, people.keypoints[k] + cam_t
        kp_px = pinhole(kp_cam, focal, pp)
        start = time.perf_counter()
        body = render_body(ctx, verts, focal, pp, cfg.img_size, zoom=cfg.supersample)
        rendered = keypoint_visibility(kp_cam, kp_px * body.zoom, body.depth, body.joints, ctx.own)
        seconds["render"] += time.perf_counter() - start
        start = time.perf_counter()
        cast = cast_visibility(ctx, verts, kp_cam, kp_px, focal, pp, cfg.img_size)
        seconds["cast"] += time.perf_counter() - start
        agree += int((rendered == cast).sum())
        hidden_render += int((~rendered).sum())
        hidden_both += int((~rendered & ~cast).sum())
        rates += np.stack([rendered, cast])
    return {"people": num, "keypoint_agreement": round(agree / (49 * num), 4),
            "hidden_by_renderer_also_cast_hidden": round(hidden_both / max(hidden_render, 1), 4),
            "visible_per_person": {"render": round(rates[0].sum() / num, 2), "cast": round(rates[1].sum() / num, 2)},
            "max_keypoint_rate_difference": round(float(np.abs(rates[0] - rates[1]).max() / num), 4),
            "ms_per_person_visibility": {k: round(1000 * v / num, 2) for k, v in seconds.items()}}


def split_seconds(num: int, workers: int) -> dict:
    """Wall seconds to write `num` train people keypoint-only and rendered (no test split)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, images in (("keypoints_only", False), ("rendered", True)):
            cfg = SynthConfig.from_preset("keypoints", num_train=num, num_test=0, train_images=images)
            summary = generate(cfg, Path(tmp) / name, workers=workers, progress=False)
            out[name] = {"seconds": summary["seconds"], "people_per_s": summary["samples_per_s"]}
    out["ratio_rendered_vs_keypoints_only"] = round(out["rendered"]["seconds"] / out["keypoints_only"]["seconds"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", type=int, default=200, help="people whose visibility is compared")
    parser.add_argument("--num", type=int, default=400, help="people per split in the timing (0: skip it)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    result = {"command": "python bench/keypoint_split.py " + " ".join(sys.argv[1:]), "machine": platform.machine(),
              "cpus": os.cpu_count(), "visibility": compare(args.compare)}
    if args.num:
        result["split"] = {"people": args.num, "workers": args.workers, **split_seconds(args.num, args.workers)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
