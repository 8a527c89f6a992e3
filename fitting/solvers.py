"""Solvers for one SMPLify stage, chosen by name.

A stage is a `StageProblem`: start values for every parameter, the names it may change, and a
residual function params -> (B, M) whose squared sum is each sample's energy. Samples are
independent, so a solver may stop each one on its own; it returns the best parameters it saw
per sample, that energy and how many iterations each sample took.

Register another solver (say Levenberg-Marquardt, which needs exactly these residuals) with
`register_solver(name, fn)`; stages pick it by name and no caller changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from fitting.errors import BadInput

if TYPE_CHECKING:
    from fitting.smplify import StageConfig

Params = dict[str, torch.Tensor]


@dataclass
class StageProblem:
    """residuals(params, rows=None) -> (R, M) for the samples `rows` (a long index; None: all B),
    with every tensor in `params` holding just those samples; energy = sum of squares. A solver
    that stops samples early can keep evaluating only the ones still running."""
    params: Params                                # every parameter's start value, (B, k) each
    free: tuple[str, ...]                         # the parameters this stage changes
    residuals: Callable[..., torch.Tensor]
    active: torch.Tensor                          # (B,) bool; inactive samples are left as they are

    def energy(self, params: Params, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(R,) per-sample energy."""
        return self.residuals(params, rows).square().sum(dim=-1)


@dataclass
class StageResult:
    params: Params             # best parameters per sample (all of them, frozen ones included)
    energy: torch.Tensor       # (B,) energy at those parameters
    iterations: torch.Tensor   # (B,) long, iterations each sample ran


Solver = Callable[[StageProblem, "StageConfig"], StageResult]


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


def adam(problem: StageProblem, stage: "StageConfig") -> StageResult:
    """SPIN's solver: Adam on the summed energy for `stage.iterations` steps.

    Adam's update is elementwise, so summing the batch leaves every sample's trajectory as if
    it were fitted alone. Options: beta1 (0.9), beta2 (0.999), eps (1e-8)."""
    opts = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, **stage.options}
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
    return StageResult({**fixed, **tracker.params}, tracker.energy, iterations)


SOLVERS: dict[str, Solver] = {"adam": adam}


def register_solver(name: str, solver: Solver) -> None:
    """Make `solver` available to stages as `solver: name`."""
    SOLVERS[name] = solver


def get_solver(name: str) -> Solver:
    if name not in SOLVERS:
        raise BadInput(f"unknown solver '{name}'; known: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[name]
