"""The keypoint-only train split against the rendered one: the same people through the renderer's
depth buffer and through the ray cast (`trainer.data.synth_keypoints`), no occluders, and what
each costs per person; then the CPU time per person of making keypoint-only and rendered train
samples (the `keypoints` preset's crop size). Prints JSON.

    python bench/keypoint_split.py [--compare 200] [--num 160]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fitting.camera import pinhole  # noqa: E402
from trainer.data.synth import (  # noqa: E402
    SynthConfig, keypoint_visibility, place_and_crop, posed_people, render_body, render_chunk, synth_context,
)
from trainer.data.synth_keypoints import cast_visibility, keypoint_chunk  # noqa: E402
from trainer.data.synth_run import CHUNK  # noqa: E402


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


def chunk_cost(num: int) -> dict:
    """CPU milliseconds per person (this process, 1 torch thread: the least load-sensitive figure)
    of making `num` train people keypoint-only and rendered, in chunks as the writer makes them."""
    torch.set_num_threads(1)
    cfg = SynthConfig.from_preset("keypoints")
    keypoint_chunk(cfg, "train", 0, CHUNK)   # the body model and tables, built once per process
    out = {}
    for name, make in (("keypoints_only", keypoint_chunk), ("rendered", render_chunk)):
        cpu, wall = time.process_time(), time.perf_counter()
        for start in range(0, num, CHUNK):
            make(cfg, "train", start, min(start + CHUNK, num))
        out[name] = {"cpu_ms_per_person": round(1000 * (time.process_time() - cpu) / num, 1),
                     "wall_ms_per_person": round(1000 * (time.perf_counter() - wall) / num, 1)}
    out["cpu_ratio_rendered_vs_keypoints_only"] = round(out["rendered"]["cpu_ms_per_person"]
                                                        / out["keypoints_only"]["cpu_ms_per_person"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", type=int, default=200, help="people whose visibility is compared")
    parser.add_argument("--num", type=int, default=160, help="people of each kind in the cost (0: skip it)")
    args = parser.parse_args()
    result = {"command": "python bench/keypoint_split.py " + " ".join(sys.argv[1:]), "machine": platform.machine(),
              "cpus": os.cpu_count(), "visibility": compare(args.compare)}
    if args.num:
        result["cost"] = {"people": args.num, "img_size": SynthConfig.from_preset("keypoints").img_size, **chunk_cost(args.num)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
