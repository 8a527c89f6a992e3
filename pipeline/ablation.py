"""`spin-pipeline ablation`: the paper's Table 1 on the built-in benchmark, over training seeds.

Three regressors with the same backbone, seeds and total number of training steps, trained on the
train split's 2D keypoints only (no 3D truth in training):
  2d-only   reprojection + pose and shape priors, no fits (the HMR-style baseline);
  static    round-0 fits (SMPLify from the mean pose), all steps on them;
  loop      K rounds of fit -> train, the steps split over the rounds, warm-starting each round.
An oracle arm trains like the static one on the train split's ground-truth pose and shape, the
labels no SMPLify can beat: its score bounds what better pseudo-labels can give at this budget.
Each arm trains once per training seed (the network's initialization and its batches and
augmentation); the benchmark and the round-0 fits are made once and shared by every arm and seed.
Each arm is reported as mean +- sd over seeds, and the ratios between arms per seed (the seeds
pair the arms: same initialization), with each ratio's worst seed.
All are evaluated on the test split; the fits of every round against the train split's held-out
truth; and SMPLify from the final network against SMPLify from the mean, on the same samples.
A reference row predicts the mean pose and shape for every test image: a regressor that does not
beat it has not learned to read poses from its input, and its arm's ordering says little.
"""
from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import click
import pyarrow as pa
import pyarrow.compute as pc
import torch

from fitting.camera import normalized_to_pixels
from fitting.smplify import FitInit, fit, mean_init
from fitting.solvers import SOLVERS
from pipeline import benchmark, rundir
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
from pipeline.lease import Lease
from pipeline.report import headline, step_line
from pipeline.rounds import eval_round, run_pipeline
from pipeline.tracking import Tracker, finished_step
from trainer.data.tables import fits_table, read_split, to_numpy, write_table
from trainer.evaluate import evaluate_fits
from trainer.mean_params import load_mean_params, mean_pose_axis_angle
from trainer.model import BACKBONES
from trainer.train import load_regressor, predict, train_regressor
from trainer.train_config import train_config

ARMS = ("2d-only", "static", "loop")
LABELS = {arm: arm for arm in ARMS} | {"oracle": "ground-truth labels"}  # table rows, plot legend
TABLE_KEYS = (("mpjpe", "MPJPE"), ("pa_mpjpe", "PA-MPJPE"), ("pck", "PCK"), ("auc", "AUC"),
              ("pa_pck", "PA-PCK"), ("pa_auc", "PA-AUC"), ("fg_accuracy", "FB acc"), ("fg_f1", "FB F1"),
              ("parts_accuracy", "parts acc"), ("parts_f1", "parts F1"))
# name, numerator arm, denominator arm, target (the paper's ordering: PA-MPJPE ratio at most this)
RATIOS = (("loop_vs_static", "loop", "static", 0.90), ("static_vs_2d", "static", "2d-only", 0.85),
          ("oracle_vs_static", "oracle", "static", None))


def arm_config(base: RunConfig, arm: str, steps: int, rounds: int, train_seed: int) -> RunConfig:
    per_round = steps // rounds if arm == "loop" else steps
    overrides: dict[str, Any] = {"train.steps": per_round, "train.seed": train_seed}
    if arm == "2d-only":
        overrides["train.mode"] = "2d"
    return apply_overrides(base, overrides)


def arm_run(out: Path, arm: str, train_seed: int) -> Path:
    return out / arm / f"seed={train_seed}"


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


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for a single value)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate_arm(by_seed: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One arm over its seeds: the regressor's metrics as mean and sd (the numeric ones present in
    every seed), and, per round, the mean of each round's headline numbers."""
    runs = list(by_seed.values())
    keys = [k for k, v in runs[0]["regressor"].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and all(k in r["regressor"] for r in runs)]
    stats = {k: mean_sd([r["regressor"][k] for r in runs]) for k in keys}
    out: dict[str, Any] = {"regressor": {k: m for k, (m, _) in stats.items()},
                           "regressor_sd": {k: sd for k, (_, sd) in stats.items()}, "by_seed": dict(by_seed)}
    if all(r.get("rounds") for r in runs):
        rounds = []
        for index, first in enumerate(runs[0]["rounds"]):
            row = {"round": first["round"]}
            for key in first:
                if key != "round" and all(key in r["rounds"][index] for r in runs):
                    row[key], sd = mean_sd([r["rounds"][index][key] for r in runs])
                    row[f"{key}_sd"] = sd
            rounds.append(row)
        out["rounds"] = rounds
    return out


def paired_ratios(pa_mpjpe: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """The RATIOS between arms, seed by seed: pa_mpjpe[arm][seed]. Each: the ratio per seed, its
    mean and sd, the worst (largest) seed, the target and whether the worst seed meets it."""
    out = {}
    for name, top, bottom, target in RATIOS:
        if top not in pa_mpjpe or bottom not in pa_mpjpe:
            continue
        per_seed = {seed: pa_mpjpe[top][seed] / pa_mpjpe[bottom][seed] for seed in pa_mpjpe[top]}
        mean, sd = mean_sd(list(per_seed.values()))
        worst = max(per_seed, key=per_seed.get)
        out[name] = {"mean": mean, "sd": sd, "by_seed": per_seed, "worst": per_seed[worst], "worst_seed": worst,
                     "target": target, "worst_meets_target": None if target is None else per_seed[worst] <= target}
    return out


def _cell(mean: float | None, sd: float | None, digits: int) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + ("" if sd is None else f" ± {sd:.{digits}f}")


def table_markdown(results: dict[str, Any]) -> str:
    arms = results["arms"]
    lines = [f"Mean ± sd over {len(results['train_seeds'])} training seeds ({', '.join(map(str, results['train_seeds']))}).",
             "", "| | " + " | ".join(label for _, label in TABLE_KEYS) + " |", "|---|" + "---|" * len(TABLE_KEYS)]
    for arm in (arm for arm in LABELS if arm in arms):
        reg, sd = arms[arm]["regressor"], arms[arm]["regressor_sd"]
        cells = [_cell(reg.get(k), sd.get(k), 1 if "mpjpe" in k or k in ("pck", "auc", "pa_pck", "pa_auc") else 3)
                 for k, _ in TABLE_KEYS]
        lines.append(f"| {LABELS[arm]} | " + " | ".join(cells) + " |")
    reference = results.get("mean_pose_reference")
    if reference:
        cells = [f"{reference[k]:.1f}" if k in reference else "-" for k, _ in TABLE_KEYS]
        lines.append("| mean pose, no input | " + " | ".join(cells) + " |")
    lines += ["", "| PA-MPJPE ratio (seed-paired) | mean ± sd | worst seed | target | by seed |", "|---|---|---|---|---|"]
    for name, top, bottom, target in RATIOS:
        if name in results["ratios"]:
            r = results["ratios"][name]
            verdict = "-" if target is None else f"<= {target:.2f}: {'met' if r['worst_meets_target'] else 'not met'}"
            lines.append(f"| {LABELS[top]} / {LABELS[bottom]} | {_cell(r['mean'], r['sd'], 3)} | "
                         f"{r['worst']:.3f} (seed {r['worst_seed']}) | {verdict} | "
                         + ", ".join(f"{v:.3f}" for v in r["by_seed"].values()) + " |")
    lines += ["", "| round (loop, mean over seeds) | fits acceptance | fits PA-MPJPE | regressor PA-MPJPE |", "|---|---|---|---|"]
    for row in arms["loop"]["rounds"]:
        lines.append(f"| {row['round']} | {row['fit_acceptance']:.3f} | {row['fit_pa_mpjpe']:.1f} | "
                     f"{_cell(row['reg_pa_mpjpe'], row.get('reg_pa_mpjpe_sd'), 1)} |")
    init = results["init_comparison"]
    lines += ["", f"| SMPLify init (seed {results['train_seeds'][0]}) | PA-MPJPE | MPJPE | acceptance | mean loss |",
              "|---|---|---|---|---|"]
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
    ax.errorbar(rounds, [r["reg_pa_mpjpe"] for r in rows], yerr=[r.get("reg_pa_mpjpe_sd") or 0 for r in rows],
                marker="o", capsize=3, label="in the loop: regressor")
    ax.plot(rounds, [r["fit_pa_mpjpe"] for r in rows], marker="s", label="in the loop: fits")
    for arm, style, color in (("static", "--", "gray"), ("2d-only", ":", "gray"), ("oracle", ":", "tab:green")):
        if arm in results["arms"]:
            mean, sd = results["arms"][arm]["regressor"]["pa_mpjpe"], results["arms"][arm]["regressor_sd"]["pa_mpjpe"]
            ax.axhline(mean, linestyle=style, color=color, label=f"{LABELS[arm]}: regressor")
            if sd:
                ax.axhspan(mean - sd, mean + sd, color=color, alpha=0.12)
    if results.get("mean_pose_reference"):
        ax.axhline(results["mean_pose_reference"]["pa_mpjpe"], linestyle="-.", color="black", label="mean pose, no input")
    ax.set_xlabel("round"), ax.set_ylabel("PA-MPJPE (mm)"), ax.set_xticks(rounds), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    ax.set_title(f"mean ± sd over {len(results['train_seeds'])} training seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def run_arm(out: Path, arm: str, config: RunConfig, rounds: int, train_seed: int, shared_fits: Path | None,
            uri: str, ray_address: str | None) -> dict[str, Any]:
    """One arm with one training seed: its run folder, MLflow run and result (regressor metrics,
    and the fits and rounds where it has them)."""
    run = arm_run(out, arm, train_seed)
    save_config(config, run / "config.yaml")
    tracker = Tracker(run, "ablation", uri, run_name=f"{arm} seed {train_seed}",
                      params={"arm": arm, "train_seed": train_seed, **run_params(config)})
    if arm == "2d-only":
        with tracker.active():
            click.echo(step_line("train", 0, train_2d_only(run, config, tracker)))
            metrics = eval_round(run, 0, config, tracker)
            click.echo(step_line("eval", 0, metrics))
            return {"regressor": metrics["regressor"]}
    if shared_fits is not None and not rundir.is_done(run, 0, "fits"):
        # the round-0 fits do not depend on the training seed or the arm: fitted once, shared
        shutil.copytree(rundir.step_dir(shared_fits, 0, "fits"), rundir.step_dir(run, 0, "fits"), dirs_exist_ok=True)
    if arm == "oracle":
        write_truth_table(run, config)
    rows = run_pipeline(run, config, rounds if arm == "loop" else 1, ray_address=ray_address, tracker=tracker)
    return {"regressor": rows[-1]["eval"]["regressor"], "fits": rows[-1]["eval"].get("fits"),
            "rounds": [{"round": r["round"], **headline(r["eval"])} for r in rows]}


@click.command("ablation")
@click.option("--backbone", type=click.Choice(BACKBONES),
              help="The regressor (default: the preset's); keypoints picks the keypoints preset unless --preset says.")
@click.option("--preset", type=click.Choice(list(benchmark.PRESETS)),
              help="Benchmark and trainer preset (default: keypoints for --backbone keypoints, else small).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="spin-ablation", show_default=True,
              help="Output folder: data/, ARM/seed=S/ per arm and seed, ablation.json/.md, mlflow.db.")
@click.option("--rounds", type=int, default=3, show_default=True, help="Rounds of the in-the-loop arm.")
@click.option("--steps", type=int, help="Total training steps per arm (default: rounds x the preset's steps).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Benchmark seed, and the first training seed (the others follow it).")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Training seeds per arm: the network's initialization, batches and augmentation.")
@click.option("--solver", type=click.Choice(sorted(SOLVERS)), help="SMPLify solver.")
@click.option("--ray-address", default=None, help="Ray cluster address; default a local Ray.")
@click.option("--train", "train_settings", multiple=True, metavar="KEY=VALUE",
              help="One training setting for every arm (a TrainConfig field), repeatable; on a GPU machine "
                   "e.g. --train batch_size=64 --train num_workers=12. The keypoints preset compiles its step "
                   "(--train compile=false: eager).")
@click.option("--smplify", "smplify_settings", multiple=True, metavar="KEY=VALUE",
              help="One SMPLify setting for every arm (a fit.smplify field), repeatable. The benchmark fits "
                   "with angle_prior_weight=5 (SPIN: 15.2, which bends elbows and knees; see docs/spin.md).")
@click.option("--oracle/--no-oracle", default=True, show_default=True,
              help="Also train the static arm's schedule on the train split's ground-truth pose and shape: "
                   "the most any pseudo-labels can give at this budget.")
def ablation(backbone, preset, out_dir, rounds, steps, seed, seeds, solver, ray_address, train_settings,
             smplify_settings, oracle):
    """2D-only vs static fits vs fitting in the loop, as in SPIN's Table 1, on the built-in
    benchmark, with an oracle arm trained on ground-truth labels as their ceiling, each trained
    with SEEDS training seeds. Writes OUT/ablation.json, OUT/ablation.md and a plot; all runs are
    comparable in OUT/mlflow.db (experiment 'ablation'). Rerunning resumes finished steps."""
    start = time.perf_counter()
    out = Path(out_dir)
    preset = benchmark.preset_for(backbone, preset)
    train = {"compile": benchmark.PRESETS[preset].ablation_compile, **yaml_settings(train_settings, "--train")}
    smplify = benchmark.benchmark_smplify(yaml_settings(smplify_settings, "--smplify"))
    overrides = benchmark.backbone_override(backbone, preset)
    steps = steps or rounds * train_config(benchmark.PRESETS[preset].train).steps
    uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    base = apply_overrides(RunConfig.from_dict({
        "data": str((out / "data").resolve()), "rounds": rounds, "seed": seed, "train_preset": benchmark.PRESETS[preset].train,
        "train": train, "fit": {"solver": solver or "", "smplify": smplify},
        "tracking": {"experiment": "ablation", "tracking_uri": uri},
    }), overrides)  # read whole, before any work
    dataset = benchmark.ensure_benchmark(out / "data", benchmark.benchmark_config(preset, seed))
    train_seeds = [seed + k for k in range(seeds)]
    arms = ("static", "loop", "2d-only") + (("oracle",) if oracle else ())
    by_arm: dict[str, dict[str, Any]] = {arm: {} for arm in arms}
    for train_seed in train_seeds:
        for arm in arms:
            click.echo(f"== {arm}, training seed {train_seed}")
            # the first static run fits round 0; every other static and loop run reuses those fits
            first = arm == "static" and train_seed == train_seeds[0]
            shared = None if first or arm not in ("static", "loop") else arm_run(out, "static", train_seeds[0])
            by_arm[arm][str(train_seed)] = run_arm(out, arm, arm_config(base, arm, steps, rounds, train_seed), rounds,
                                                   train_seed, shared, uri, ray_address)
    results: dict[str, Any] = {"preset": preset, "backbone": base.training.backbone, "rounds": rounds, "total_steps": steps,
                               "seed": seed, "train_seeds": train_seeds, "dataset": dataset.get("counts"),
                               "arms": {arm: aggregate_arm(by_seed) for arm, by_seed in by_arm.items()}}
    results["ratios"] = paired_ratios({arm: {s: r["regressor"]["pa_mpjpe"] for s, r in by_seed.items()}
                                       for arm, by_seed in by_arm.items()})
    fits_rounds = [r["fit_pa_mpjpe"] for r in results["arms"]["loop"]["rounds"]]
    results["fits_pa_mpjpe_falls"] = bool(fits_rounds[-1] < fits_rounds[0])
    results["mean_pose_reference"] = benchmark.mean_pose_reference(base)
    loop_config = arm_config(base, "loop", steps, rounds, train_seeds[0])
    results["init_comparison"] = init_comparison(arm_run(out, "loop", train_seeds[0]), loop_config, rounds - 1)
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["command"] = (f"spin-pipeline ablation --preset {preset}" + (f" --backbone {backbone}" if backbone else "")
                          + f" --rounds {rounds} --steps {steps} --seed {seed} --seeds {seeds}"
                          + (f" --solver {solver}" if solver else "") + ("" if oracle else " --no-oracle")
                          + "".join(f" --train {pair}" for pair in train_settings)
                          + "".join(f" --smplify {pair}" for pair in smplify_settings))
    (out / "ablation.json").write_text(json.dumps(results, indent=2, default=float))
    (out / "ablation.md").write_text(table_markdown(results))
    png = plot(results, out / "ablation_pa_mpjpe.png")
    loop_tracker = Tracker(arm_run(out, "loop", train_seeds[0]), "ablation", uri)
    loop_tracker.log_artifact(loop_tracker.parent_id, png)
    loop_tracker.log_artifact(loop_tracker.parent_id, out / "ablation.md")
    click.echo(table_markdown(results))
    click.echo(f"wrote {out / 'ablation.json'} ({results['seconds']:.0f} s)")
