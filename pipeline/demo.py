"""`spin-pipeline demo`: the whole loop on the built-in benchmark, on a CPU, in minutes.

Without a GPU the regressor is the keypoint regressor (2D keypoints in, no pixels): a small image
network trained from scratch for minutes on a CPU does not learn to read poses from pixels, so
its half of the loop would show nothing. With a GPU the image network is the default."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import torch

from fitting.smplify import SmplifyConfig
from fitting.solvers import SOLVERS
from pipeline.benchmark import (
    IMAGE_BACKBONE,
    KEYPOINT_BACKBONE,
    PRESETS,
    backbone_override,
    benchmark_config,
    benchmark_smplify,
    ensure_benchmark,
    mean_pose_reference,
    preset_for,
)
from pipeline.config import resolve_config, yaml_settings
from pipeline.report import headline, round_table
from pipeline.rounds import run_pipeline
from trainer.model import BACKBONES


def choose_backbone(requested: str | None, gpu: bool) -> tuple[str | None, str]:
    """The demo's backbone (None: the preset's) and the line that says which and why."""
    if requested:
        return requested, f"backbone {requested} (--backbone)"
    if gpu:
        return None, (f"GPU found: the preset's regressor (an image network, {IMAGE_BACKBONE}, with the small preset); "
                      f"--backbone {KEYPOINT_BACKBONE} for the keypoint regressor")
    return KEYPOINT_BACKBONE, (f"no GPU: the keypoint regressor (backbone {KEYPOINT_BACKBONE}, 2D keypoints in, no pixels); "
                               f"--backbone {IMAGE_BACKBONE} trains an image network instead")


def summarize(results: list[dict[str, Any]], reference: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per round: the fits' and the regressor's errors (mm) and, with the mean-pose
    `reference`, the regressor's PA-MPJPE as a fraction of the reference's."""
    rows = []
    for row in results:
        metrics = headline(row.get("eval", {}))
        reg = metrics.get("reg_pa_mpjpe")
        rows.append({
            "round": row["round"],
            "fit_acceptance": row["fit"].get("acceptance_rate"),
            "fit_pa_mpjpe_mm": metrics.get("fit_pa_mpjpe"),
            "fit_mpjpe_mm": metrics.get("fit_mpjpe"),
            "regressor_mpjpe_mm": metrics.get("reg_mpjpe"),
            "regressor_pa_mpjpe_mm": reg,
            "mean_pose_pa_mpjpe_mm": reference.get("pa_mpjpe") if reference else None,
            "regressor_vs_mean_pose": (reg / reference["pa_mpjpe"]
                                       if reference and reg is not None and reference.get("pa_mpjpe") else None),
            "fits_from_this_round": row["fit"].get("found_in_round", {}).get(str(row["round"])),
            "train_samples_per_s": row.get("train", {}).get("images_per_s"),
            "seconds": row.get("seconds"),
        })
    return rows


@click.command("demo")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="spin-demo", show_default=True,
              help="Where the benchmark (OUT/data), the run (OUT/run) and summary.json go.")
@click.option("--rounds", type=int, default=3, show_default=True, help="Fit/train rounds.")
@click.option("--backbone", type=click.Choice(BACKBONES),
              help=f"The regressor: default {KEYPOINT_BACKBONE} without a GPU, the preset's image network with one.")
@click.option("--preset", type=click.Choice(list(PRESETS)),
              help=f"Benchmark and trainer preset: tiny (a minute), small (images), {KEYPOINT_BACKBONE} "
                   f"(keypoint-only train split); default: {KEYPOINT_BACKBONE} for the keypoint regressor, else small.")
@click.option("--seed", type=int, default=0, show_default=True, help="Benchmark seed.")
@click.option("--ray-address", default=None, help="Ray cluster address; default a local Ray.")
@click.option("--solver", type=click.Choice(sorted(SOLVERS)), help="SMPLify solver (default: the library default).")
@click.option("--smplify", "smplify_settings", multiple=True, metavar="KEY=VALUE",
              help="One SMPLify setting (a fit.smplify field), repeatable. The benchmark fits with "
                   "angle_prior_weight=5 (SPIN: 15.2, which bends elbows and knees; see docs/spin.md).")
def demo(out_dir, rounds, backbone, preset, seed, ray_address, solver, smplify_settings):
    """The whole loop on the built-in benchmark: synthesize it, then fit/train/evaluate ROUNDS
    rounds with real Ray and real MLflow (SQLite in OUT/run/mlflow.db). Prints a table by round
    beside the mean-pose reference and writes OUT/summary.json; overlays and plots are in
    OUT/run/round=N/eval/. Rerunning resumes.
    """
    start = time.perf_counter()
    smplify = benchmark_smplify(yaml_settings(smplify_settings, "--smplify"))
    SmplifyConfig.from_dict(smplify, "--smplify")   # checked before the benchmark is made
    backbone, why = choose_backbone(backbone, torch.cuda.is_available())
    preset = preset_for(backbone, preset)   # an image backbone on a keypoint-only benchmark stops here
    click.echo(why)
    out = Path(out_dir)
    cfg = benchmark_config(preset, seed, demo=True)
    click.echo(f"1/2 benchmark ({preset}: {cfg.num_train} train people{'' if cfg.train_images else ', keypoints only'}) "
               f"in {out / 'data'}")
    dataset = ensure_benchmark(out / "data", cfg)
    run = out / "run"
    config = resolve_config(run, None, {"data": str((out / "data").resolve()), "rounds": rounds,
                                        "train_preset": PRESETS[preset].train, "train.steps": PRESETS[preset].demo_steps,
                                        **backbone_override(backbone, preset), "fit.solver": solver, "fit.smplify": smplify,
                                        "seed": seed})
    click.echo(f"2/2 {rounds} rounds of fit -> train ({config.training.backbone}) -> eval in {run}")
    results = run_pipeline(run, config, rounds, ray_address=ray_address)
    reference = mean_pose_reference(config)
    rows = summarize(results, reference)
    summary = {"backbone": config.training.backbone, "preset": preset, "rounds": rows,
               "mean_pose_reference": reference, "dataset": dataset.get("counts"),
               "seconds": round(time.perf_counter() - start, 1),
               "pictures": sorted(str(p) for p in run.glob("round=*/eval/*.png")),
               "mlflow": f"mlflow ui --backend-store-uri sqlite:///{(run / 'mlflow.db').resolve()}"}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    click.echo(round_table(results, reference))
    click.echo(f"summary: {out / 'summary.json'} ({summary['seconds']:.0f} s); MLflow: {summary['mlflow']}")
