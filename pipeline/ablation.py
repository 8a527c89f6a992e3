"""`spin-pipeline ablation`: the paper's Table 1 on the built-in benchmark.

Three regressors with the same backbone, seeds and total number of training steps, trained on the
train split's 2D keypoints only (no 3D truth in training):
  2d-only   reprojection + pose and shape priors, no fits (the HMR-style baseline);
  static    round-0 fits (SMPLify from the mean pose), all steps on them;
  loop      K rounds of fit -> train, the steps split over the rounds, warm-starting each round.
An oracle arm trains like the static one on the train split's ground-truth pose and shape, the
labels no SMPLify can beat: its score bounds what better pseudo-labels can give at this budget.
All are evaluated on the test split; the fits of every round against the train split's held-out
truth; and SMPLify from the final network against SMPLify from the mean, on the same samples.
A reference row predicts the mean pose and shape for every test image: a regressor that does not
beat it has not learned to read poses from the images, and its arm's ordering says little.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from fitting.camera import normalized_to_pixels
from fitting.smplify import FitInit, fit, mean_init
from fitting.solvers import SOLVERS
from pipeline import rundir
from pipeline.config import (
    RunConfig,
    apply_overrides,
    load_run_body_model,
    load_run_prior,
    run_models,
    run_params,
    save_config,
    yaml_settings,
)
from pipeline.demo import DEMO_PRESETS, ensure_benchmark
from pipeline.lease import Lease
from pipeline.report import headline
from pipeline.rounds import eval_round, run_pipeline
from pipeline.tracking import Tracker, finished_step
from trainer.data.tables import fits_table, read_split, to_numpy, write_table
from trainer.evaluate import evaluate_fits, evaluate_mean_pose
from trainer.mean_params import load_mean_params, mean_pose_axis_angle
from trainer.train import load_regressor, predict, train_regressor
from trainer.train_config import train_config

ARMS = ("2d-only", "static", "loop")
LABELS = {arm: arm for arm in ARMS} | {"oracle": "ground-truth labels"}  # table rows, plot legend
TABLE_KEYS = (("mpjpe", "MPJPE"), ("pa_mpjpe", "PA-MPJPE"), ("pck", "PCK"), ("auc", "AUC"),
              ("pa_pck", "PA-PCK"), ("pa_auc", "PA-AUC"), ("fg_accuracy", "FB acc"), ("fg_f1", "FB F1"),
              ("parts_accuracy", "parts acc"), ("parts_f1", "parts F1"))


def arm_config(base: RunConfig, arm: str, steps: int, rounds: int) -> RunConfig:
    per_round = steps // rounds if arm == "loop" else steps
    overrides: dict[str, Any] = {"train.steps": per_round}
    if arm == "2d-only":
        overrides["train.mode"] = "2d"
    return apply_overrides(base, overrides)


def train_2d_only(run: Path, config: RunConfig, tracker: Tracker) -> dict[str, Any]:
    """The baseline: no fits at all, keypoints and priors only."""
    if rundir.is_done(run, 0, "model"):
        return finished_step(run, 0, "model", tracker, "train-2d-only")
    models = run_models(config)
    data = Path(config.data) / "train"
    out_dir = rundir.step_dir(run, 0, "model")
    with Lease(out_dir, "round 0 model"), \
            tracker.step("train-2d-only", {**config.training.to_dict(), "models": models}) as child:
        summary = train_regressor(config.training, [data], None, out_dir,
                                  load_run_body_model(models), prior=load_run_prior(models),
                                  log_metrics=lambda m, step: tracker.log_metrics(child, m, step))
        rundir.mark_done(run, 0, "model", {**summary, "round": 0, "models": models})
    return summary


def truth_table(truth: pa.Table) -> pa.Table:
    """The train split's ground truth (its sample_id, has_smpl, pose and betas) in the fits schema
    (init 'gt'): labels that train through the same code as the fits."""
    truth = truth.filter(pc.fill_null(truth.column("has_smpl"), False))
    return fits_table(truth.column("sample_id").to_pylist(), pose=to_numpy(truth, "pose"), betas=to_numpy(truth, "betas"),
                      cam_t=0.0, loss=0.0, joint_loss=0.0, valid=True, betas_ok=True, found_in_round=0, init="gt",
                      iterations=0)


def write_truth_table(run: Path, config: RunConfig) -> dict[str, Any]:
    """The oracle arm's round 0: the truth table in place of the fits."""
    if rundir.is_done(run, 0, "fits"):
        return rundir.read_success(run, 0, "fits")
    table = truth_table(read_split(config.data, "truth", ["sample_id", "has_smpl", "pose", "betas"]))
    write_table(table, rundir.step_dir(run, 0, "fits") / "part-00000.parquet")
    summary = {"fits": len(table), "init": "gt", "round": 0}
    rundir.mark_done(run, 0, "fits", summary)
    return summary


def init_comparison(loop_run: Path, config: RunConfig, last_round: int, num: int = 256) -> dict[str, Any]:
    """SMPLify from the mean vs from the final loop regressor, on the same train samples."""
    models = run_models(config)
    body, prior = load_run_body_model(models), load_run_prior(models)
    smplify = config.smplify
    samples = read_split(config.data, "train").slice(0, num)
    keypoints = normalized_to_pixels(torch.from_numpy(to_numpy(samples, "keypoints").copy()))
    mean = load_mean_params()
    inits = {"mean": mean_init(body, torch.nan_to_num(keypoints), torch.as_tensor(mean_pose_axis_angle(mean)),
                               torch.as_tensor(mean["shape"]))}
    regressor = load_regressor(rundir.step_dir(loop_run, last_round, "model") / "checkpoint.pt")
    pred = predict(regressor, samples)
    inits["network"] = FitInit(*(torch.as_tensor(pred[k]) for k in ("pose", "betas", "cam_t")))
    truth = read_split(config.data, "truth")
    out = {}
    for name, init in inits.items():
        start = time.perf_counter()
        result = fit(body, prior, keypoints, init, smplify)
        seconds = time.perf_counter() - start
        table = fits_table(samples.column("sample_id").to_pylist(), pose=result.pose.numpy(), betas=result.betas.numpy(),
                           cam_t=result.cam_t.numpy(), loss=result.loss.numpy(), joint_loss=result.joint_loss.numpy(),
                           valid=result.valid.numpy(), betas_ok=result.betas_ok.numpy(), found_in_round=0, init=name,
                           iterations=result.iterations.numpy())
        out[name] = {**evaluate_fits(table, truth, body), "seconds": round(seconds, 2)}
    return out


def mean_pose_reference(config: RunConfig) -> dict[str, Any]:
    """Test-split metrics of predicting the regressors' mean parameters for every image."""
    mean = load_mean_params()
    return evaluate_mean_pose([Path(config.data) / "test"], load_run_body_model(run_models(config)),
                              mean_pose_axis_angle(mean), np.asarray(mean["shape"], np.float32))


def table_markdown(results: dict[str, Any]) -> str:
    arms = results["arms"]
    lines = ["| | " + " | ".join(label for _, label in TABLE_KEYS) + " |",
             "|---|" + "---|" * len(TABLE_KEYS)]
    for arm in (arm for arm in LABELS if arm in arms):
        reg = arms[arm]["regressor"]
        cells = [("-" if reg.get(k) is None else f"{reg[k]:.1f}" if "mpjpe" in k or k in ("pck", "auc", "pa_pck", "pa_auc")
                  else f"{reg[k]:.3f}") for k, _ in TABLE_KEYS]
        lines.append(f"| {LABELS[arm]} | " + " | ".join(cells) + " |")
    reference = results.get("mean_pose_reference")
    if reference:
        cells = [f"{reference[k]:.1f}" if k in reference else "-" for k, _ in TABLE_KEYS]
        lines.append("| mean pose, no image | " + " | ".join(cells) + " |")
    ratios = results["ratios"]
    lines += ["", f"PA-MPJPE ratios: static / 2d-only = {ratios['static_vs_2d']:.3f} (target <= 0.85), "
                  f"loop / static = {ratios['loop_vs_static']:.3f} (target <= 0.90)."
              + (f" {LABELS['oracle']} / static = {ratios['oracle_vs_static']:.3f}: the most better labels give at this budget."
                 if "oracle_vs_static" in ratios else ""), "",
              "| round | fits acceptance | fits PA-MPJPE | regressor PA-MPJPE |", "|---|---|---|---|"]
    for row in arms["loop"]["rounds"]:
        lines.append(f"| {row['round']} | {row['fit_acceptance']:.3f} | {row['fit_pa_mpjpe']:.1f} | {row['reg_pa_mpjpe']:.1f} |")
    init = results["init_comparison"]
    lines += ["", "| SMPLify init | PA-MPJPE | MPJPE | acceptance | mean loss |", "|---|---|---|---|---|"]
    for name in ("mean", "network"):
        r = init[name]
        lines.append(f"| {name} | {r['pa_mpjpe']:.1f} | {r['mpjpe']:.1f} | {r['acceptance_rate']:.3f} | {r['mean_loss']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out_png: Path) -> Path:
    import matplotlib  # here: seconds to import, and the backend is chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["arms"]["loop"]["rounds"]
    rounds = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(rounds, [r["reg_pa_mpjpe"] for r in rows], marker="o", label="in the loop: regressor")
    ax.plot(rounds, [r["fit_pa_mpjpe"] for r in rows], marker="s", label="in the loop: fits")
    for arm, style, color in (("static", "--", "gray"), ("2d-only", ":", "gray"), ("oracle", ":", "tab:green")):
        if arm in results["arms"]:
            ax.axhline(results["arms"][arm]["regressor"]["pa_mpjpe"], linestyle=style, color=color,
                       label=f"{LABELS[arm]}: regressor")
    if results.get("mean_pose_reference"):
        ax.axhline(results["mean_pose_reference"]["pa_mpjpe"], linestyle="-.", color="black", label="mean pose, no image")
    ax.set_xlabel("round"), ax.set_ylabel("PA-MPJPE (mm)"), ax.set_xticks(rounds), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


@click.command("ablation")
@click.option("--preset", type=click.Choice(DEMO_PRESETS), default="small", show_default=True,
              help="Benchmark and trainer preset.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="spin-ablation", show_default=True,
              help="Output folder: data/, one run per arm, ablation.json/.md, mlflow.db.")
@click.option("--rounds", type=int, default=3, show_default=True, help="Rounds of the in-the-loop arm.")
@click.option("--steps", type=int, help="Total training steps per arm (default: rounds x the preset's steps).")
@click.option("--seed", type=int, default=0, show_default=True, help="Benchmark and training seed.")
@click.option("--solver", type=click.Choice(sorted(SOLVERS)), help="SMPLify solver.")
@click.option("--ray-address", default=None, help="Ray cluster address; default a local Ray.")
@click.option("--train", "train_settings", multiple=True, metavar="KEY=VALUE",
              help="One training setting for every arm (a TrainConfig field), repeatable; on a GPU machine "
                   "e.g. --train batch_size=64 --train num_workers=12.")
@click.option("--oracle/--no-oracle", default=True, show_default=True,
              help="Also train the static arm's schedule on the train split's ground-truth pose and shape: "
                   "the most any pseudo-labels can give at this budget.")
def ablation(preset, out_dir, rounds, steps, seed, solver, ray_address, train_settings, oracle):
    """2D-only vs static fits vs fitting in the loop, as in SPIN's Table 1, on the built-in
    benchmark, with an oracle arm trained on ground-truth labels as their ceiling. Writes
    OUT/ablation.json, OUT/ablation.md and a plot; all arms are comparable runs in OUT/mlflow.db
    (experiment 'ablation'). Rerunning resumes finished steps."""
    start = time.perf_counter()
    out = Path(out_dir)
    steps = steps or rounds * train_config(preset).steps
    uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    train = yaml_settings(train_settings, "--train")
    base = RunConfig.from_dict({"data": str((out / "data").resolve()), "rounds": rounds, "seed": seed,
                                "train_preset": preset, "train": train,
                                "fit": {"solver": solver or ""},
                                "tracking": {"experiment": "ablation", "tracking_uri": uri}})  # read whole, before any work
    dataset = ensure_benchmark(out / "data", preset, seed)
    results: dict[str, Any] = {"preset": preset, "rounds": rounds, "total_steps": steps, "seed": seed,
                               "dataset": dataset.get("counts"), "arms": {}}
    for arm in ("static", "loop", "2d-only") + (("oracle",) if oracle else ()):
        run = out / arm
        config = arm_config(base, arm, steps, rounds)
        save_config(config, run / "config.yaml")
        tracker = Tracker(run, "ablation", uri, run_name=arm, params={"arm": arm, **run_params(config)})
        click.echo(f"== {arm}")
        if arm == "2d-only":
            with tracker.active():
                train_2d_only(run, config, tracker)
                metrics = eval_round(run, 0, config, tracker)
            results["arms"][arm] = {"regressor": metrics["regressor"]}
            continue
        if arm == "loop" and not rundir.is_done(run, 0, "fits"):
            # round 0 is the static arm's fit round, the same computation: share it
            shutil.copytree(rundir.step_dir(out / "static", 0, "fits"), rundir.step_dir(run, 0, "fits"), dirs_exist_ok=True)
        if arm == "oracle":
            write_truth_table(run, config)
        arm_rounds = rounds if arm == "loop" else 1
        rows = run_pipeline(run, config, arm_rounds, ray_address=ray_address, tracker=tracker)
        per_round = [{"round": r["round"], **headline(r["eval"])} for r in rows]
        results["arms"][arm] = {"regressor": rows[-1]["eval"]["regressor"], "fits": rows[-1]["eval"].get("fits"),
                                "rounds": per_round}
    reg = {arm: results["arms"][arm]["regressor"]["pa_mpjpe"] for arm in ARMS}
    results["ratios"] = {"static_vs_2d": reg["static"] / reg["2d-only"], "loop_vs_static": reg["loop"] / reg["static"]}
    if oracle:
        results["ratios"]["oracle_vs_static"] = results["arms"]["oracle"]["regressor"]["pa_mpjpe"] / reg["static"]
    fits_rounds = [r["fit_pa_mpjpe"] for r in results["arms"]["loop"]["rounds"]]
    results["fits_pa_mpjpe_falls"] = bool(fits_rounds[-1] < fits_rounds[0])
    results["mean_pose_reference"] = mean_pose_reference(base)
    results["init_comparison"] = init_comparison(out / "loop", arm_config(base, "loop", steps, rounds), rounds - 1)
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["command"] = f"spin-pipeline ablation --preset {preset} --rounds {rounds} --steps {steps} --seed {seed}" + (
        f" --solver {solver}" if solver else "") + ("" if oracle else " --no-oracle") + "".join(
        f" --train {pair}" for pair in train_settings)
    (out / "ablation.json").write_text(json.dumps(results, indent=2, default=float))
    (out / "ablation.md").write_text(table_markdown(results))
    png = plot(results, out / "ablation_pa_mpjpe.png")
    loop_tracker = Tracker(out / "loop", "ablation", uri)
    loop_tracker.log_artifact(loop_tracker.parent_id, png)
    loop_tracker.log_artifact(loop_tracker.parent_id, out / "ablation.md")
    click.echo(table_markdown(results))
    click.echo(f"wrote {out / 'ablation.json'} ({results['seconds']:.0f} s)")
