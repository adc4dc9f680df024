"""What the stages of one check share: the run state (`Run`), set up by `_verify.run` and
passed to the functions of `_probe`, `_evaluate`, `_ladder`, `_verdict` and `_localize`, and
one group's finite differences with the projections onto its directions (`Pass`)."""

import collections
import contextvars
import dataclasses
import math

import numpy as np

from . import _directions, _error_model, _plan, _problem
from ._plan import Timer

MAX_STEP = 0.05  # largest relative step; larger ones probe the function, not its derivative

# Random signs drawn on the host for a program, in all (directions times elements of the
# parameter and output leaves): at most this many (half a megabyte of int8), the most that
# a problem batched whole (`_plan`) takes. Hashing them inside the program instead made a
# 1e4-parameter MLP's first check 0.5 s slower to compile (1.8 s against 1.3 s).
HOST_SIGNS = 1 << 19
# Draws kept for the next check with the same key, directions and shapes (a warm check
# draws nothing: hashing 4 x 1e4 signs on the host costs about a millisecond)
_DRAWN: collections.OrderedDict = collections.OrderedDict()
DRAWN_KEPT = 16

# while an order >= 2 check runs: the scales its first-order check's probe measured
# ("params", "outputs"), from which the derivative maps' fixed vectors are drawn
SCALES = contextvars.ContextVar("jaxcheck_scales", default=None)
# True while the first-order part of an order >= 2 check without grad_fn runs: its
# derivatives are traced under the caller's `jax_enable_checks` by the order-2 part, whose
# derivative maps contain them (`_probe.under_checks`), so not twice
CHECKED_LATER = contextvars.ContextVar("jaxcheck_checked_later", default=False)
# while a custom rule found in fn is checked: it is the rule as fn's trace recorded it, typed
# in fn's precision, so it cannot be widened to float64 (`_evaluate` says so)
TRACED_RULE = contextvars.ContextVar("jaxcheck_traced_rule", default=False)
# True while verify_rule's finite-difference rows run: its primal row compares the rule's
# primal with its function already, and the rows judge the derivative alone
PRIMAL_ROW = contextvars.ContextVar("jaxcheck_primal_row", default=False)
# while an order >= 2 check runs: {"last": whether the latest first-order check found its
# function curving measurably (`_verdict.curves`)}; a derivative map flat where the
# function it derives from curves is not that function's derivative (`_orders`)
CURVES = contextvars.ContextVar("jaxcheck_curves", default=None)
# True while the derivative maps of an order >= 2 check are checked (after its first-order
# part): a map takes fixed random vectors, so its errors are samples over them
MAPS = contextvars.ContextVar("jaxcheck_maps", default=False)
# True while a `Checker` runs other than at its first call: fn may have changed since the
# programs it reuses were traced
CHECKER_AGAIN = contextvars.ContextVar("jaxcheck_checker_again", default=False)
# while a `Checker` runs: {(leaf paths, shapes and dtypes): per leaf, whether it was ever
# found packed (`_directions.packed_leaves`) at a call of that checker}. A leaf stays
# packed once found so: bias entries that drift through zero in training made the packed
# set, part of the compiled programs' key, differ at nearly every periodic check
PACKED_SEEN = contextvars.ContextVar("jaxcheck_packed_seen", default=None)


def note_curves(value: bool) -> None:
    """Record whether the first-order check that just ran found its function curving."""
    seen = CURVES.get()
    if seen is not None:
        seen["last"] = value


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
    # why the derivative under test could not run in the reference precision, where fn
    # itself could (a custom rule's fwd or bwd, or a grad_fn, that refuses float64): the
    # reference then has finite differences but no rule in its precision; "" otherwise
    rule_refused: str = ""
    # fn's float32 closed-over arrays are cast for its float64 reference
    # (`_evaluate._closures_widened`)
    widened: bool = False
    # fn's int32 array inputs are cast to int64 for its float64 reference
    # (`_evaluate._ints_widened`)
    wide_ints: bool = False
    rounds_to: np.dtype | None = None  # a less precise dtype fn rounds to inside
    # fn's derivative in float64 is far from the model's, and finite differences in the
    # model's precision cannot resolve it: the gap stays in the float64 check as rounding
    native_blind: bool = False
    # fn in float64 computes another function than in the model's precision (its value
    # differs too: random numbers drawn in the default dtype): the same rule in float64
    # against float64 differences is the verdict, the model's derivative is not judged
    other_function: bool = False
    # ... and the model's own finite differences were too noisy to judge its derivative
    # (`_pipeline.NATIVE_SANITY`): a pass of the float64 rule is then not a verdict on it
    noisy_native: bool = False
    # where the gap between the derivative under test and the same rule in float64 is no
    # rounding (`_jitter.systematic`): the derivative's own move when params move a few
    # ulps, as a share of that gap; the rounding its checks allow is scaled by it
    rounding_share: float | None = None
    max_step: float = MAX_STEP  # largest relative step the ladder may move to
    # the noise of one evaluation of fn's values near params, the least the all-leaf
    # directions measured at any step, and whether the leaves are being checked alone: the
    # noise is fn's, whatever the direction, and along a leaf of one entry every direction
    # runs along the same line, so its own measure is one draw (`_ladder._assess`)
    fn_noise: float | None = None
    # the relative step at which fn, computed in float64 with no cast to a lower precision
    # inside, was exactly constant along every direction while the derivative under test
    # was not (piecewise constant: round, floor, a straight-through estimator); None else
    flat_below: float | None = None
    leaf_checks: bool = False
    batch: int = 0  # directions per program call: the all-leaf check's (first look's) number
    evaluations: int = 0
    # each direction's evaluations so far, so that a later look pays for new ones only
    evaluated: dict = dataclasses.field(default_factory=dict)
    compared: dict = dataclasses.field(default_factory=dict)  # `_verdict.compare`'s results
    problems: list = dataclasses.field(default_factory=list)
    probe: dict | None = None

    def _drawable_on_host(self) -> bool:
        """Whether directions may be drawn on the host at all: not Gaussian, and neither
        the directions nor any parameter leaf sharded."""
        plan = self.plan
        return (
            self.kind != "gaussian"
            and plan.direction_sharding is None
            and not any(plan.leaf_shardings)
        )

    def _param_size(self) -> int:
        return sum(math.prod(x.shape) for x in self.inputs.diff)

    @property
    def native_differences(self) -> bool:
        """Whether the finite differences run below float64 (fn refused it, or the caller
        asked for the model's precision)."""
        return self.reference is not None and np.dtype(self.reference).itemsize < 8

    def spanned(self) -> bool:
        """Whether the parameters' directions are random signs that span them
        (`_directions.spanning_signs`): at most `_directions.SPANNED` elements in all,
        drawn on the host."""
        return self._drawable_on_host() and self._param_size() <= _directions.SPANNED

    def exact_at(self, n: int) -> bool:
        """Whether n directions of the check over all leaves measure its relative errors
        with no sampling error: a scalar fn (one projection per direction, no random
        cotangent, no derivative map of an order >= 2 check, whose fixed random vectors
        make its errors samples) whose directions span the parameters in whole blocks
        (`_directions.spanning_signs`: sum_i (v_i . x)^2 = M |x|^2 over each block of M, so
        the ratio of two such sums is the ratio of the norms themselves), up to the finite
        differences' noise."""
        return (
            not self.leaf_checks
            and not MAPS.get()
            and self.problem.scalar_output
            and n > 0
            and self.spanned()
            and n % _directions.spanning_block(self._param_size()) == 0
        )

    @property
    def looks_kind(self) -> str:
        """The kind of directions the sequential looks are set for: "rademacher" where
        they span the parameters (a look must take a whole block of `spanning_signs`'
        rows: 4 of a block of 8 miss an error of two entries 1 time in 70)."""
        return "rademacher" if self.spanned() else self.kind

    def signs(self, index) -> tuple | None:
        """The random signs (or "uniform" levels) of directions `index` drawn on the host
        (per parameter leaf; per output leaf, none for a scalar fn, or None where they are
        hashed in the program), for a program to take as an input instead of hashing them
        (`_directions.host_signs`); None where they are all hashed inside. They are drawn
        here, for directions that are not Gaussian, for a problem planned all-vmapped on
        one device whose directions total at most `HOST_SIGNS` elements; and for any
        unsharded problem whose parameters have at most `_directions.SPANNED` elements in
        all, whose signs are then drawn so that the directions span the parameter space
        (`_directions.spanning_signs`)."""
        plan, problem = self.plan, self.problem
        if not self._drawable_on_host():
            return None
        shapes = [x.shape for x in self.inputs.diff]
        out_shapes = [] if problem.scalar_output else list(problem.out_shapes)
        param_size = self._param_size()
        out_size = sum(math.prod(s) for s in out_shapes)
        spanned = param_size <= _directions.SPANNED  # self.spanned(), past the guard above
        batched_whole = plan.chunk is None and plan.vmap_points
        if not spanned and (not batched_whole or (param_size + out_size) * len(index) > HOST_SIGNS):
            return None
        key = tuple(np.asarray(a).tobytes() for a in (*self.seeds, index))
        key += (tuple(shapes), tuple(out_shapes), self.kind)
        drawn = _DRAWN.get(key)
        if drawn is None:
            if spanned:  # signs whatever the kind: rows of a Hadamard matrix
                params = _directions.spanning_signs(self.seeds[0], index, shapes)
            else:
                params = _directions.host_signs(self.seeds[0], index, shapes, self.kind)
            # a spanned problem's outputs too large to draw here are hashed in the program
            outputs = out_size * len(index) <= HOST_SIGNS
            drawn = (
                params,
                _directions.host_signs(self.seeds[1], index, out_shapes, self.kind)
                if outputs
                else None,
            )
            for a in (*drawn[0], *(drawn[1] or ())):
                a.setflags(write=False)
            _DRAWN[key] = drawn
            if len(_DRAWN) > DRAWN_KEPT:
                _DRAWN.popitem(last=False)
        _DRAWN.move_to_end(key)
        return drawn


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

    @property
    def analytic(self) -> np.ndarray:
        """The derivative under test along the directions: reverse mode's where it was
        checked, else forward mode's."""
        return self.rev if self.rev is not None else self.fwd

    @property
    def analytic_ref(self) -> np.ndarray | None:
        """The same rule in the reference precision, in `analytic`'s mode (None where it
        was not evaluated)."""
        return self.ref_rev if self.rev is not None else self.ref_fwd
