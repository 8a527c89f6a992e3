"""What a person looks at: the table by round, the per-round plot, and fit overlays of a fixed set
of samples, round over round."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import rundir

COLUMNS = (
    ("round", "round", "{:d}"),
    ("fit acc.", ("eval", "fits", "acceptance_rate"), "{:.3f}"),
    ("fit PA-MPJPE", ("eval", "fits", "pa_mpjpe"), "{:.1f}"),
    ("reg MPJPE", ("eval", "regressor", "mpjpe"), "{:.1f}"),
    ("reg PA-MPJPE", ("eval", "regressor", "pa_mpjpe"), "{:.1f}"),
    ("s", "seconds", "{:.0f}"),
)


def _get(row: dict[str, Any], path) -> Any:
    if isinstance(path, str):
        return row.get(path)
    node: Any = row
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def round_table(results: list[dict[str, Any]]) -> str:
    """Plain-text table, one line per round (3D errors in mm)."""
    lines = [[name for name, _, _ in COLUMNS]]
    for row in results:
        cells = []
        for _, path, fmt in COLUMNS:
            value = _get(row, path)
            cells.append("-" if value is None else fmt.format(value))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The per-round numbers that `compare` and the demo table show."""
    reg, fits = metrics.get("regressor", {}), metrics.get("fits", {})
    out = {
        "fit_acceptance": fits.get("acceptance_rate"), "fit_pa_mpjpe": fits.get("pa_mpjpe"),
        "fit_mpjpe": fits.get("mpjpe"), "reg_mpjpe": reg.get("mpjpe"), "reg_pa_mpjpe": reg.get("pa_mpjpe"),
        "rounds_done": metrics.get("round", 0) + 1,
    }
    return {k: v for k, v in out.items() if v is not None}


def step_line(step: str, round_index: int, summary: dict[str, Any]) -> str:
    """One line for a finished step (fit, train or eval), from its summary."""
    head = f"{step} round {round_index}"
    if summary.get("skipped"):
        return f"{head}: already done"
    if step == "fit":
        return (f"{head}: {summary.get('rows', 0)} fits, acceptance {summary.get('acceptance_rate', 0.0):.3f}, "
                f"{summary.get('quarantined', 0)} quarantined ({summary.get('seconds', 0):.0f} s)")
    if step == "train":
        loss = summary.get("final_losses", {}).get("loss", float("nan"))
        return (f"{head}: {summary.get('trained_steps', 0)} steps, loss {loss:.4g}, "
                f"{summary.get('images_per_s', 0.0):.1f} samples/s ({summary.get('seconds', 0):.0f} s)")
    parts = [f"{name} {value:.1f} mm" for name, value in (
        ("regressor PA-MPJPE", _get(summary, ("regressor", "pa_mpjpe"))),
        ("regressor MPJPE", _get(summary, ("regressor", "mpjpe"))),
        ("fits PA-MPJPE", _get(summary, ("fits", "pa_mpjpe")))) if value is not None]
    return f"{head}: " + (", ".join(parts) or "done")


def format_metrics(metrics: dict[str, Any]) -> str:
    return json.dumps(metrics, indent=2, sort_keys=True, default=float)


def metrics_by_round(run: Path) -> list[dict[str, Any]]:
    return [{"round": r, **rundir.read_success(run, r, "eval")} for r in rundir.finished_rounds(run, "eval")]


def plot_metrics_by_round(rows: list[dict[str, Any]], out_png: Path) -> Path:
    """PA-MPJPE of fits and regressor, and fit acceptance, by round."""
    import matplotlib  # here: seconds to import, and the backend is chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for label, path in (("fits PA-MPJPE", ("fits", "pa_mpjpe")), ("regressor PA-MPJPE", ("regressor", "pa_mpjpe")),
                        ("regressor MPJPE", ("regressor", "mpjpe"))):
        values = [_get(r, path) for r in rows]
        if any(v is not None for v in values):
            ax1.plot(rounds, [np.nan if v is None else v for v in values], marker="o", label=label)
    ax1.set_xlabel("round"), ax1.set_ylabel("mm"), ax1.legend(), ax1.grid(alpha=0.3)
    ax2.plot(rounds, [_get(r, ("fits", "acceptance_rate")) or np.nan for r in rows], marker="o", color="C3")
    ax2.set_xlabel("round"), ax2.set_ylabel("fit acceptance"), ax2.set_ylim(0, 1.02), ax2.grid(alpha=0.3)
    for ax in (ax1, ax2):
        ax.set_xticks(rounds)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
