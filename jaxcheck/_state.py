"""What the stages of one check share: the run state (`Run`), set up by `_verify.run` and
passed to the functions of `_probe`, `_evaluate`, `_ladder`, `_verdict` and `_localize`, and
one group's finite differences with the projections onto its directions (`Pass`)."""

import contextvars
import dataclasses

import numpy as np

from . import _error_model, _plan, _problem
from ._plan import Timer

MAX_STEP = 0.05  # largest relative step; larger ones probe the function, not its derivative

# while an order >= 2 check runs: the scales its first-order check's probe measured
# ("params", "outputs"), from which the derivative maps' fixed vectors are drawn
SCALES = contextvars.ContextVar("jaxcheck_scales", default=None)


@dataclasses.dataclass
class Run:
    """One check's inputs and what it learns on the way (the reference precision fn runs
    in, the largest step, the problems to report)."""

    problem: _problem.Problem
    inputs: _problem.Inputs
    modes: tuple[str, ...]
    seeds: tuple[np.ndarray, np.ndarray]  # per parameter leaf, per output leaf
    kind: str
    plan: _plan.Plan
    tested: np.dtype
    policy: str
    rtol: float | None
    timer: Timer
    reference: np.dtype | None = None
    cast: bool = True  # the reference casts the floating inputs to its dtype
    rounds_to: np.dtype | None = None  # a less precise dtype fn rounds to inside
    max_step: float = MAX_STEP  # largest relative step the ladder may move to
    batch: int = 0  # directions per program call: the all-leaf check's (first look's) number
    evaluations: int = 0
    # each direction's evaluations so far, so that a later look pays for new ones only
    evaluated: dict = dataclasses.field(default_factory=dict)
    problems: list = dataclasses.field(default_factory=list)
    probe: dict | None = None


@dataclasses.dataclass(frozen=True)
class Pass:
    """Finite differences along one group of directions, and the projections onto them."""

    fd: _error_model.Differences
    rev: np.ndarray | None  # derivative under test, reverse mode
    fwd: np.ndarray | None  # derivative under test, forward mode
    ref_rev: np.ndarray | None  # same rule, reference precision
    ref_fwd: np.ndarray | None
    phis: np.ndarray
    phi0: np.ndarray
    step: float  # relative step actually taken

    @property
    def numeric(self) -> np.ndarray:
        return self.fd.value
