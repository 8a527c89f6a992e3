"""Batched Levenberg-Marquardt for many small, independent least-squares problems.

Each sample b minimises its own energy E_b(x_b) = |r_b(x_b)|^2 over x_b in R^n. A step solves

    (J^T J + lambda diag(J^T J)) dx = -J^T r

for every running sample at once (one batched solve), and is kept only where the true energy
drops; lambda shrinks after good steps and grows after rejected ones (Nielsen's rule), per
sample. A sample stops when a step lowers its energy, or the linear model promises to lower it,
by less than ftol * energy + atol, when lambda runs away (no descent left at float precision),
or at the iteration limit; stopped samples drop out of every later evaluation. A rejected step
needs no new Jacobian: only the damping changes.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch

from fitting.errors import BadInput
from fitting.settings import Settings

Linearize = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Energy = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LMSettings(Settings):
    """damping: the first lambda (relative to diag(J^T J)); a sample has converged when a step
    lowers its energy by less than ftol * energy + atol (atol ends zero-residual problems, whose
    relative decrease never gets small); max_iterations: a cap on the steps per sample below
    the stage's own `iterations` (which stays the budget of gradient solvers); max_damping:
    the lambda at which a sample gives up on descent; min_diagonal: the floor of diag(J^T J)
    in the damping, for unknowns that no residual sees."""
    SECTION = "lm"

    damping: float = 1e-2
    ftol: float = 1e-3
    atol: float = 1e-2
    max_iterations: float = float("inf")
    max_damping: float = 1e7
    min_diagonal: float = 1e-6

    def __post_init__(self) -> None:
        ok = (self.damping > 0 and self.ftol >= 0 and self.atol >= 0 and self.max_iterations >= 0
              and self.max_damping > self.damping and self.min_diagonal > 0)
        if not ok:
            raise BadInput(f"options must satisfy damping > 0, ftol >= 0, atol >= 0, max_iterations >= 0, "
                           f"max_damping > damping, min_diagonal > 0; got {self}")

    @classmethod
    def from_options(cls, options: dict) -> "LMSettings":
        """The settings named in a stage's options; other solvers' options are left alone."""
        names = {f.name for f in fields(cls)}
        return cls.from_dict({k: v for k, v in options.items() if k in names})


@dataclass
class LMResult:
    x: torch.Tensor           # (B, n) final unknowns (the start where a sample never improved)
    energy: torch.Tensor      # (B,) energy at x
    iterations: torch.Tensor  # (B,) long: steps tried per sample (accepted or not)


def damped_step(gradient: torch.Tensor, hessian: torch.Tensor, damping: torch.Tensor,
                min_diagonal: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R, n) J^T r, (R, n, n) J^T J, (R,) lambda -> ((R, n) step, (R,) decrease that the linear
    model predicts, (R,) bool solved). A sample whose damped system is not positive definite
    (non-finite values) gets a zero step."""
    scale = damping[:, None] * hessian.diagonal(dim1=-2, dim2=-1).clamp_min(min_diagonal)
    system = hessian.clone()
    system.diagonal(dim1=-2, dim2=-1).add_(scale)
    factor, info = torch.linalg.cholesky_ex(system)
    step = -torch.cholesky_solve(gradient[..., None], factor)[..., 0]
    solved = (info == 0) & torch.isfinite(step).all(dim=-1)
    step = torch.where(solved[:, None], step, 0.0)
    # (H + lambda D) step = -g, so -(g.step + step.H.step / 2) = (-g.step + lambda step.D.step) / 2
    predicted = 0.5 * ((scale * step.square()).sum(-1) - (gradient * step).sum(-1))
    return step, predicted, solved


@torch.no_grad()
def levenberg_marquardt(x0: torch.Tensor, energy: Energy, linearize: Linearize, active: torch.Tensor,
                        max_iterations: int, settings: LMSettings | None = None,
                        retract: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> LMResult:
    """Minimise every active sample's energy from x0 (B, n).

    energy(x_rows, rows) -> (R,) and linearize(x_rows, rows) -> ((R, n) J^T r, (R, n, n) J^T J)
    evaluate the samples `rows` (a long index) at x_rows (R, n); retract(x, step) -> the point
    a step leads to (default x + step, for unknowns with a curved chart). Inactive samples keep
    x0 and take no iterations. x0 is not modified."""
    settings = settings or LMSettings()
    batch, device = x0.shape[0], x0.device
    everyone = torch.arange(batch, device=device)
    x = x0.detach().clone()
    current = energy(x, everyone)
    running = active & torch.isfinite(current)
    damping = torch.full((batch,), settings.damping, dtype=x.dtype, device=device)
    growth = torch.full_like(damping, 2.0)
    stale = running.clone()
    gradient = x.new_zeros(batch, x.shape[1])
    hessian = x.new_zeros(batch, x.shape[1], x.shape[1])
    iterations = torch.zeros(batch, dtype=torch.long, device=device)
    for _ in range(max_iterations):
        rows = torch.nonzero(running).flatten()
        if rows.numel() == 0:
            break
        fresh = torch.nonzero(stale & running).flatten()
        if fresh.numel() == batch:
            gradient, hessian = linearize(x, fresh)
        elif fresh.numel():
            gradient[fresh], hessian[fresh] = linearize(x[fresh], fresh)
        if rows.numel() == batch:
            g, h, lam, x_rows = gradient, hessian, damping, x
        else:
            g, h, lam, x_rows = gradient[rows], hessian[rows], damping[rows], x[rows]
        step, predicted, solved = damped_step(g, h, lam, settings.min_diagonal)
        trial = x_rows + step if retract is None else retract(x_rows, step)
        trial_energy = energy(trial, rows)
        before = current[rows]
        decrease = before - trial_energy
        accept = solved & torch.isfinite(trial_energy) & (decrease > 0)
        gain = decrease / predicted.clamp_min(torch.finfo(x.dtype).tiny)
        shrink = (1.0 - (2.0 * gain - 1.0) ** 3).clamp(min=1.0 / 3.0)
        damping[rows] = torch.where(accept, lam * shrink, lam * growth[rows])
        growth[rows] = torch.where(accept, 2.0, 2.0 * growth[rows])
        x[rows] = torch.where(accept[:, None], trial, x_rows)
        current[rows] = torch.where(accept, trial_energy, before)
        stale[rows] = accept
        iterations[rows] += 1
        # Converged: the step gained (or the model promised) less than ftol of the energy.
        small = settings.ftol * before + settings.atol
        done = ((accept & (decrease <= small)) | (solved & (predicted <= small))
                | (damping[rows] > settings.max_damping))
        running[rows] = ~done
    return LMResult(x, current, torch.where(active, iterations, 0))
