"""Renderer benchmark: milliseconds per frame of `fitting.render.render` (z-buffer, shading, parts)
on the built-in body model, against OpenCV filling the same projected triangles (a silhouette
only, no depth, no shading) measured in the same run. Prints JSON.

    python bench/render.py [--sizes 128,224,512] [--repeats 15] [--out bench/results/render_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fitting.body_model import load_body_model  # noqa: E402
from fitting.pose_sampler import sample_body_poses  # noqa: E402
from fitting.render import part_labels, render  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def fill_triangles(vertices: np.ndarray, faces: np.ndarray, focal: float, size: int) -> np.ndarray:
    px = focal * vertices[:, :2] / vertices[:, 2:] + size / 2
    mask = np.zeros((size, size), dtype=np.uint8)
    cv2.fillPoly(mask, list(np.round(px[faces] * 16).astype(np.int32)), 1, shift=4)
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128,224,512")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_body_model()
    pose = torch.zeros(1, 72)
    pose[0, 0] = np.pi
    pose[0, 3:] = torch.as_tensor(sample_body_poses(1, np.random.default_rng(0))[0])
    with torch.no_grad():
        vertices = model(pose, torch.zeros(1, 10)).vertices[0].numpy().astype(np.float64)
    vertices[:, 2] += 2 * 5000 / (224 * 0.9)  # SPIN's framing: the body spans ~90% of the crop
    faces, labels = model.faces, part_labels(model)
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        focal = 5000.0 * size / 224
        ours = timed(lambda: render(vertices, faces, focal, (size / 2, size / 2), size, part_labels=labels), args.repeats)
        base = timed(lambda: fill_triangles(vertices, faces, focal, size), args.repeats)
        rows.append({"size": size, "render_ms": round(ours, 2), "opencv_fill_ms": round(base, 2),
                     "ratio_vs_opencv_fill": round(ours / base, 2)})
    result = {
        "benchmark": "render", "vertices": model.num_vertices, "faces": int(len(faces)),
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} cpus, torch threads 1",
        "results": rows,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
