"""Batched Levenberg-Marquardt for many small, independent least-squares problems.

Each sample b minimises its own energy E_b(x_b) = |r_b(x_b)|^2 over x_b in R^n. A step solves

    (J^T J + lambda diag(J^T J)) dx = -J^T r

for every running sample at once (one batched solve), and is kept only where the true energy
drops; lambda shrinks after good steps and grows after rejected ones (Nielsen's rule), per
sample. A sample stops when a step lowers its energy, or the linear model promises to lower it,
by less than ftol * energy + atol, when lambda runs away (no descent left at float precision),
or at the iteration limit. A rejected step needs no new Jacobian: only the damping changes.

Two loops take the same steps. `levenberg_marquardt` drops stopped samples out of every later
evaluation: on a CPU that saves their work. `levenberg_marquardt_static` evaluates every sample
at every step with fixed shapes and freezes stopped ones by masks: it never reads a value back to
the host, so on a GPU its kernels queue without waiting, and a CUDA graph can record it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch

from fitting.errors import BadInput
from fitting.settings import Settings

Linearize = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]
Energy = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
Retract = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    # Two triangular solves rather than cholesky_solve, whose batched GPU path in some PyTorch
    # builds (MAGMA) reads a status back to the host.
    half = torch.linalg.solve_triangular(factor, gradient[..., None], upper=False)
    step = -torch.linalg.solve_triangular(factor.mT, half, upper=True)[..., 0]
    solved = (info == 0) & torch.isfinite(step).all(dim=-1)
    step = torch.where(solved[:, None], step, 0.0)
    # (H + lambda D) step = -g, so -(g.step + step.H.step / 2) = (-g.step + lambda step.D.step) / 2
    predicted = 0.5 * ((scale * step.square()).sum(-1) - (gradient * step).sum(-1))
    return step, predicted, solved


def judge_step(before: torch.Tensor, trial: torch.Tensor, predicted: torch.Tensor, solved: torch.Tensor,
               damping: torch.Tensor, growth: torch.Tensor,
               settings: LMSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's verdict per sample, from (R,) energies before and at the trial point, the
    decrease the linear model predicted, whether the system was solved, lambda and its growth
    factor -> (accept, next lambda, next growth, done)."""
    decrease = before - trial
    accept = solved & torch.isfinite(trial) & (decrease > 0)
    gain = decrease / predicted.clamp_min(torch.finfo(predicted.dtype).tiny)
    shrink = (1.0 - (2.0 * gain - 1.0) ** 3).clamp(min=1.0 / 3.0)
    damping = torch.where(accept, damping * shrink, damping * growth)
    growth = torch.where(accept, 2.0, 2.0 * growth)
    # Converged: the step gained (or the model promised) less than ftol of the energy.
    small = settings.ftol * before + settings.atol
    done = (accept & (decrease <= small)) | (solved & (predicted <= small)) | (damping > settings.max_damping)
    return accept, damping, growth, done


def _start(x0: torch.Tensor, energy: Energy, active: torch.Tensor, settings: LMSettings) -> tuple[torch.Tensor, ...]:
    """Both loops' state before the first step: x, its energy, running, lambda, lambda's growth
    factor, stale (needs a new system), J^T r, J^T J, iterations."""
    batch, device = x0.shape[0], x0.device
    x = x0.detach().clone()
    current = energy(x, None)
    running = active & torch.isfinite(current)
    damping = torch.full((batch,), settings.damping, dtype=x.dtype, device=device)
    return (x, current, running, damping, torch.full_like(damping, 2.0), running.clone(),
            x.new_zeros(batch, x.shape[1]), x.new_zeros(batch, x.shape[1], x.shape[1]),
            torch.zeros(batch, dtype=torch.long, device=device))


def _step(x: torch.Tensor, step: torch.Tensor, retract: Retract | None) -> torch.Tensor:
    return x + step if retract is None else retract(x, step)


@torch.no_grad()
def levenberg_marquardt(x0: torch.Tensor, energy: Energy, linearize: Linearize, active: torch.Tensor,
                        max_iterations: int, settings: LMSettings | None = None,
                        retract: Retract | None = None) -> LMResult:
    """Minimise every active sample's energy from x0 (B, n).

    energy(x_rows, rows) -> (R,) and linearize(x_rows, rows) -> ((R, n) J^T r, (R, n, n) J^T J)
    evaluate the samples `rows` (a sorted long index; None: all B) at x_rows (R, n);
    retract(x, step) -> the point a step leads to (default x + step, for unknowns with a curved
    chart). Inactive samples keep x0 and take no iterations. x0 is not modified."""
    settings, batch = settings or LMSettings(), x0.shape[0]
    x, current, running, damping, growth, stale, gradient, hessian, iterations = _start(x0, energy, active, settings)
    for _ in range(max_iterations):
        rows = torch.nonzero(running).flatten()
        if rows.numel() == 0:
            break
        fresh = torch.nonzero(stale & running).flatten()
        if fresh.numel() == batch:
            gradient, hessian = linearize(x, None)
        elif fresh.numel():
            gradient[fresh], hessian[fresh] = linearize(x[fresh], fresh)
        everyone = rows.numel() == batch
        if everyone:
            g, h, lam, x_rows = gradient, hessian, damping, x
        else:
            g, h, lam, x_rows = gradient[rows], hessian[rows], damping[rows], x[rows]
        step, predicted, solved = damped_step(g, h, lam, settings.min_diagonal)
        trial = _step(x_rows, step, retract)
        trial_energy = energy(trial, None if everyone else rows)
        before = current[rows]
        accept, damping[rows], growth[rows], done = judge_step(before, trial_energy, predicted, solved, lam,
                                                               growth[rows], settings)
        x[rows] = torch.where(accept[:, None], trial, x_rows)
        current[rows] = torch.where(accept, trial_energy, before)
        stale[rows] = accept
        iterations[rows] += 1
        running[rows] = ~done
    return LMResult(x, current, torch.where(active, iterations, 0))


@torch.no_grad()
def levenberg_marquardt_static(x0: torch.Tensor, energy: Energy, linearize: Linearize, active: torch.Tensor,
                               max_iterations: int, settings: LMSettings | None = None,
                               retract: Retract | None = None) -> LMResult:
    """levenberg_marquardt's steps, with every sample evaluated at every one of the
    `max_iterations` steps (energy and linearize always get rows=None). A stopped sample's
    state is kept by masks; a sample whose last step was rejected keeps its old system. No
    value is read back to the host and no shape depends on the data."""
    settings = settings or LMSettings()
    x, current, running, damping, growth, stale, gradient, hessian, iterations = _start(x0, energy, active, settings)
    for _ in range(max_iterations):
        fresh = stale & running
        new_gradient, new_hessian = linearize(x, None)
        gradient = torch.where(fresh[:, None], new_gradient, gradient)
        hessian = torch.where(fresh[:, None, None], new_hessian, hessian)
        step, predicted, solved = damped_step(gradient, hessian, damping, settings.min_diagonal)
        trial = _step(x, step, retract)
        trial_energy = energy(trial, None)
        accept, next_damping, next_growth, done = judge_step(current, trial_energy, predicted, solved, damping,
                                                             growth, settings)
        moved = running & accept
        x = torch.where(moved[:, None], trial, x)
        current = torch.where(moved, trial_energy, current)
        damping = torch.where(running, next_damping, damping)
        growth = torch.where(running, next_growth, growth)
        stale = torch.where(running, accept, stale)
        iterations = iterations + running.long()
        running = running & ~done
    return LMResult(x, current, torch.where(active, iterations, 0))
