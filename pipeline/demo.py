"""`spin-pipeline demo`: the whole loop on the built-in benchmark, on a CPU, in minutes."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from fitting.solvers import SOLVERS
from pipeline.config import resolve_config
from pipeline.report import headline, round_table
from pipeline.rounds import run_pipeline
from trainer.data.synth import SYNTH_PRESETS, SynthConfig
from trainer.data.synth_run import generate
from trainer.train_config import TRAIN_PRESETS

# a demo preset sizes both the benchmark and the trainer
DEMO_PRESETS = [name for name in TRAIN_PRESETS if name in SYNTH_PRESETS]


def ensure_benchmark(data: Path, preset: str, seed: int, workers: int | None = None) -> dict[str, Any]:
    """Synthesize the benchmark once; a finished one (dataset.json present) is reused."""
    marker = data / "dataset.json"
    if marker.exists():
        return json.loads(marker.read_text())
    return generate(SynthConfig.from_preset(preset, seed=seed), data, workers=workers, overwrite=True)


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for row in results:
        metrics = headline(row.get("eval", {}))
        rows.append({
            "round": row["round"],
            "fit_acceptance": row["fit"].get("acceptance_rate"),
            "fit_pa_mpjpe_mm": metrics.get("fit_pa_mpjpe"),
            "fit_mpjpe_mm": metrics.get("fit_mpjpe"),
            "regressor_mpjpe_mm": metrics.get("reg_mpjpe"),
            "regressor_pa_mpjpe_mm": metrics.get("reg_pa_mpjpe"),
            "fits_from_this_round": row["fit"].get("found_in_round", {}).get(str(row["round"])),
            "seconds": row.get("seconds"),
        })
    return rows


@click.command("demo")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="spin-demo", show_default=True,
              help="Where the benchmark (OUT/data), the run (OUT/run) and summary.json go.")
@click.option("--rounds", type=int, default=3, show_default=True, help="Fit/train rounds.")
@click.option("--preset", type=click.Choice(DEMO_PRESETS), default="small", show_default=True,
              help="Benchmark and trainer preset: tiny (a minute) or small (the demo).")
@click.option("--seed", type=int, default=0, show_default=True, help="Benchmark seed.")
@click.option("--ray-address", default=None, help="Ray cluster address; default a local Ray.")
@click.option("--solver", type=click.Choice(sorted(SOLVERS)), help="SMPLify solver (default: the library default).")
def demo(out_dir, rounds, preset, seed, ray_address, solver):
    """The whole loop on the built-in benchmark: synthesize it, then fit/train/evaluate ROUNDS
    rounds with real Ray and real MLflow (SQLite in OUT/run/mlflow.db). Prints a table by round
    and writes OUT/summary.json; overlays and plots are in OUT/run/round=N/eval/. Rerunning resumes.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    click.echo(f"1/2 benchmark ({preset}) in {out / 'data'}")
    dataset = ensure_benchmark(out / "data", preset, seed)
    run = out / "run"
    config = resolve_config(run, None, {"data": str((out / "data").resolve()), "rounds": rounds,
                                        "train_preset": preset, "fit.solver": solver, "seed": seed})
    click.echo(f"2/2 {rounds} rounds of fit -> train -> eval in {run}")
    results = run_pipeline(run, config, rounds, ray_address=ray_address)
    rows = summarize(results)
    summary = {"rounds": rows, "dataset": dataset.get("counts"), "seconds": round(time.perf_counter() - start, 1),
               "pictures": sorted(str(p) for p in run.glob("round=*/eval/*.png")),
               "mlflow": f"mlflow ui --backend-store-uri sqlite:///{(run / 'mlflow.db').resolve()}"}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    click.echo(round_table(results))
    click.echo(f"summary: {out / 'summary.json'} ({summary['seconds']:.0f} s); MLflow: {summary['mlflow']}")
