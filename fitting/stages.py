"""SMPLify's stages as data: which energy a stage minimises, over which parameters, with which
solver and for how long. `fitting.solvers` runs a stage; `fitting.smplify` chains them."""
from __future__ import annotations

from dataclasses import dataclass, field

from fitting.errors import BadInput
from fitting.settings import Settings

PARAMETERS = ("global_orient", "body_pose", "betas", "cam_t")
STAGE_DEFAULTS = {"camera": ("global_orient", "cam_t"), "body": ("body_pose", "betas", "global_orient")}


@dataclass
class StageConfig(Settings):
    """One stage: `name` picks the energy ('camera' | 'body'), `optimize` the free parameters
    (default per stage as in SPIN), `solver` the solver by name (checked against the registry
    when a SmplifyConfig is built), `options` solver settings."""
    SECTION = "smplify stage"

    name: str
    iterations: int = 100
    lr: float = 1e-2
    optimize: tuple[str, ...] = ()
    solver: str = "lm"
    options: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in STAGE_DEFAULTS:
            raise BadInput(f"stage name must be one of {', '.join(STAGE_DEFAULTS)}, got '{self.name}'")
        self.optimize = tuple(self.optimize) or STAGE_DEFAULTS[self.name]
        bad = [p for p in self.optimize if p not in PARAMETERS]
        if bad:
            raise BadInput(f"stage '{self.name}': cannot optimize '{bad[0]}' (choose from {', '.join(PARAMETERS)})")
        if self.iterations < 0:
            raise BadInput(f"stage '{self.name}': iterations must be >= 0, got {self.iterations!r}")
        if not self.lr > 0:
            raise BadInput(f"stage '{self.name}': lr must be > 0, got {self.lr!r}")


def default_stages() -> list[StageConfig]:
    """SPIN's two stages (100 steps at lr 1e-2 each under `solver: adam`), solved by
    Levenberg-Marquardt, which stops each sample when it converges. The camera stage only
    places the body for the body stage, which frees the orientation again: it stops at a looser
    tolerance and after 12 steps. The body stage stops after 20 (about 2% of samples would take
    longer, for little gain), so that a few slow samples do not hold up a whole batch."""
    return [StageConfig("camera", 100, 1e-2, options={"ftol": 1e-2, "max_iterations": 12}),
            StageConfig("body", 100, 1e-2, options={"max_iterations": 20})]
