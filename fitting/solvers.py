"""Solvers for one SMPLify stage, chosen by name.

A stage is a `StageProblem`: start values for every parameter, the names it may change, and a
residual function params -> (B, M) whose squared sum is each sample's energy. Samples are
independent, so a solver may stop each one on its own; it returns the best parameters it saw
per sample, that energy and how many iterations each sample took.

Two solvers ship: `adam` (SPIN's) and `lm` (batched Levenberg-Marquardt on the same residuals,
with the problem's closed-form normal equations where it has them, forward-mode autodiff
otherwise). Register another with `register_solver(name, fn)`; stages pick it by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import roma
import torch

from fitting.errors import BadInput
from fitting.lm import LMSettings, levenberg_marquardt
from fitting.stages import StageConfig

Params = dict[str, torch.Tensor]


@dataclass
class StageProblem:
    """residuals(params, rows=None) -> (R, M) for the samples `rows` (a long index; None: all B),
    with every tensor in `params` holding just those samples; energy = sum of squares. A solver
    that stops samples early can keep evaluating only the ones still running.

    linearize(params, rows=None) -> (J^T r (R, n), J^T J (R, n, n)), optional: the Gauss-Newton
    system of the same residuals over the free parameters, concatenated in `free` order; for
    the axis-angle parameters named in `local_rotations` (each (B, 3k)) its columns are rotation
    increments d on the left, so a step updates them as exp([d]) exp([theta])."""
    params: Params                                # every parameter's start value, (B, k) each
    free: tuple[str, ...]                         # the parameters this stage changes
    residuals: Callable[..., torch.Tensor]
    active: torch.Tensor                          # (B,) bool; inactive samples are left as they are
    linearize: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    local_rotations: tuple[str, ...] = ()

    def energy(self, params: Params, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(R,) per-sample energy."""
        return self.residuals(params, rows).square().sum(dim=-1)


@dataclass
class StageResult:
    params: Params             # best parameters per sample (all of them, frozen ones included)
    energy: torch.Tensor       # (B,) energy at those parameters
    iterations: torch.Tensor   # (B,) long, iterations each sample ran


Solver = Callable[[StageProblem, StageConfig], StageResult]


class BestTracker:
    """Keeps, per sample, the lowest-energy parameters seen so far."""

    def __init__(self, params: Params):
        self.params = {k: v.detach().clone() for k, v in params.items()}
        batch = next(iter(params.values())).shape[0]
        device = next(iter(params.values())).device
        self.energy = torch.full((batch,), float("inf"), device=device)

    @torch.no_grad()
    def update(self, params: Params, energy: torch.Tensor) -> None:
        energy = energy.detach().to(self.energy.dtype)
        better = energy < self.energy  # NaN never wins
        self.energy = torch.where(better, energy, self.energy)
        for k, v in params.items():
            self.params[k] = torch.where(better[:, None], v.detach(), self.params[k])


def adam(problem: StageProblem, stage: StageConfig) -> StageResult:
    """SPIN's solver: Adam on the summed energy for `stage.iterations` steps.

    Adam's update is elementwise, so summing the batch leaves every sample's trajectory as if
    it were fitted alone. Options: beta1 (0.9), beta2 (0.999), eps (1e-8), last_iterate (0: keep
    each sample's best iterate; 1: its last, as SPIN does); other solvers' options are ignored,
    so that a stage can switch solvers by name alone."""
    opts = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "last_iterate": 0.0, **stage.options}
    fixed = {k: v.detach() for k, v in problem.params.items() if k not in problem.free}
    free = {k: problem.params[k].detach().clone().requires_grad_(True) for k in problem.free}
    tracker = BestTracker(free)
    weight = problem.active.to(next(iter(problem.params.values())).dtype)
    optimizer = None
    if free and stage.iterations > 0:
        optimizer = torch.optim.Adam(list(free.values()), lr=stage.lr,
                                     betas=(opts["beta1"], opts["beta2"]), eps=opts["eps"])
    for step in range(stage.iterations + 1):
        last = optimizer is None or step == stage.iterations
        with torch.set_grad_enabled(not last):
            energy = problem.energy({**fixed, **free})
        tracker.update(free, energy)
        if last:
            break
        optimizer.zero_grad(set_to_none=True)
        (energy * weight).sum().backward()
        optimizer.step()
    ran = stage.iterations if optimizer is not None else 0
    iterations = torch.where(problem.active, ran, 0).to(torch.long)
    if opts["last_iterate"]:
        return StageResult({**fixed, **{k: v.detach() for k, v in free.items()}}, energy.detach(), iterations)
    return StageResult({**fixed, **tracker.params}, tracker.energy, iterations)


def _split(problem: StageProblem, x: torch.Tensor, rows: torch.Tensor | None) -> Params:
    """Flat (R, n) free values -> every parameter of the samples `rows`."""
    out = {k: v if rows is None else v[rows] for k, v in problem.params.items() if k not in problem.free}
    sizes = [problem.params[k].shape[1] for k in problem.free]
    return {**out, **dict(zip(problem.free, x.split(sizes, dim=1)))}


def autodiff_linearize(problem: StageProblem) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """J^T r and J^T J of `problem.residuals` with J from forward-mode autodiff: one tangent per
    unknown, all samples at once (samples are independent, so column k of every sample's
    Jacobian comes from the same tangent)."""
    def linearize(params: Params, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([params[k] for k in problem.free], dim=1)
        fixed = {k: v for k, v in params.items() if k not in problem.free}
        sizes = [params[k].shape[1] for k in problem.free]

        def residuals(flat: torch.Tensor) -> torch.Tensor:
            return problem.residuals({**fixed, **dict(zip(problem.free, flat.split(sizes, dim=1)))}, rows)

        r = residuals(x)
        basis = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)[:, None, :].expand(-1, x.shape[0], -1)
        jac = torch.func.vmap(lambda t: torch.func.jvp(residuals, (x,), (t,))[1])(basis).permute(1, 2, 0)
        return (jac.mT @ r[..., None])[..., 0], jac.mT @ jac
    return linearize


def lm(problem: StageProblem, stage: StageConfig) -> StageResult:
    """Levenberg-Marquardt on the stage's residuals, at most `stage.iterations` (and the option
    max_iterations) steps per sample, each sample stopping on its own (see fitting.lm). Options:
    the fields of LMSettings; `lr` is not used."""
    settings = LMSettings.from_options(stage.options)
    if not problem.free:
        with torch.no_grad():
            energy = problem.energy(problem.params)
        return StageResult(dict(problem.params), energy, torch.zeros_like(energy, dtype=torch.long))
    linearize = problem.linearize or autodiff_linearize(problem)
    start = torch.cat([problem.params[k].detach() for k in problem.free], dim=1)
    batch = start.shape[0]

    def rows_or_all(rows: torch.Tensor) -> torch.Tensor | None:
        return None if rows.numel() == batch else rows   # rows are sorted: all of them is arange

    def energy(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        rows = rows_or_all(rows)
        return problem.energy(_split(problem, x, rows), rows)

    def gauss_newton(x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = rows_or_all(rows)
        return linearize(_split(problem, x, rows), rows)

    local = [] if problem.linearize is None else [k for k in problem.free if k in problem.local_rotations]
    spans, at = [], 0
    for name in problem.free:
        width = problem.params[name].shape[1]
        if name in local:
            spans.append(slice(at, at + width))
        at += width

    def retract(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        out = x + step
        for span in spans:
            turn, rotvec = step[:, span].unflatten(1, (-1, 3)), x[:, span].unflatten(1, (-1, 3))
            out[:, span] = roma.rotvec_composition([turn, rotvec]).flatten(1)   # R(turn) R(rotvec)
        return out

    steps = int(min(stage.iterations, settings.max_iterations))
    result = levenberg_marquardt(start, energy, gauss_newton, problem.active, steps, settings,
                                 retract if spans else None)
    return StageResult({k: v.detach() for k, v in _split(problem, result.x, None).items()},
                       result.energy, result.iterations)


SOLVERS: dict[str, Solver] = {"adam": adam, "lm": lm}


def register_solver(name: str, solver: Solver) -> None:
    """Make `solver` available to stages as `solver: name`."""
    SOLVERS[name] = solver


def get_solver(name: str) -> Solver:
    if name not in SOLVERS:
        raise BadInput(f"unknown solver '{name}'; known: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[name]
