"""`verify`: the entry point that runs the pipeline and returns a `Report`."""

import contextlib
import contextvars
import dataclasses
import difflib
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from . import (
    _autodiff,
    _differences,
    _directions,
    _error_model,
    _options,
    _orders,
    _plan,
    _precision,
    _problem,
    _tree,
)
from ._errors import GradientCheckError
from ._plan import Timer
from ._report import LeafResult, Report, Status

LEAF_INDEX_OFFSET = 2**30  # leaf-local directions use indices disjoint from the global ones
MAX_NOISE_FLOOR = 0.025  # a reference noisier than this cannot resolve a few-percent bug
MAX_STEP = 0.05  # largest relative step; larger ones probe the function, not its derivative
ROUNDING_NOTE = 1e3  # rounding above this many eps of the tested dtype is pointed out
COVERAGE_ERROR = 1e-3  # leaves where a 0.1 % error might go unseen globally are checked alone


def _keywords_checked(verify):
    """`verify`, refusing keywords it does not have with a message that tells fn's
    keyword arguments (which must be bound with functools.partial) from misspelt options."""
    names = tuple(inspect.signature(verify).parameters)[3:]

    @functools.wraps(verify)
    def checked(*args, **kwargs):
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            raise TypeError(_unknown_keywords(unknown, names))
        return verify(*args, **kwargs)

    return checked


def _unknown_keywords(unknown, names) -> str:
    parts, for_fn = [], []
    for k in unknown:
        close = difflib.get_close_matches(k, names, n=1)
        parts.append(f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k))
        if not close:
            for_fn.append(k)
    text = (
        f"jaxcheck.verify got unexpected keyword argument(s) {', '.join(parts)}; its options "
        f"are {', '.join(names)}."
    )
    if for_fn:
        bound = ", ".join(f"{k}=..." for k in for_fn)
        text += (
            " If these are fn's keyword arguments: fn's inputs are positional, "
            "verify(fn, params, *args); bind keywords first, "
            f"verify(functools.partial(fn, {bound}), params, *args)."
        )
    return text


@_keywords_checked
def verify(
    fn: Callable,
    params: Any,
    *args: Any,
    grad_fn: Callable | None = None,
    has_aux: bool = False,
    order: int = 1,
    num_directions: int = 16,
    key: Any = 0,
    mode: Literal["reverse", "forward", "both"] = "reverse",
    precision: Literal["auto", "float64", "native"] = "auto",
    step: float | None = None,
    rtol: float | None = None,
    localize: bool | Literal["auto"] = "auto",
    leaf_directions: int = 8,
    directions: Literal["rademacher", "gaussian"] = "rademacher",
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    direction_sharding: jax.sharding.NamedSharding | None = None,
    raise_on_failure: bool = False,
) -> Report:
    """Check the derivative of `fn` at `params` against finite differences.

    Draws `num_directions` random directions v over the floating-point leaves of `params`
    (each leaf scaled to its own magnitude), evaluates central finite differences of
    fn(params + t v, *args) at t = ±h, ±h/2 for all directions in one jitted, vmapped
    program, and compares their Richardson extrapolation with the projections <g, v> of the
    derivative under test. The result is an estimated relative gradient error with a 95 %
    interval, judged against a tolerance derived from the finite-difference error model
    (step ladder, truncation, roundoff) rather than from a fixed table.

    Args:
        fn: `fn(params, *args)` returning a scalar or a pytree of float or complex arrays
            (then random output cotangents u make it scalar: <u, fn(...)>; a complex output
            counts as its (re, im) pair). With `has_aux`, `(out, aux)`.
        params: any pytree. Floating leaves are differentiated; all other leaves (ints,
            bools, PRNG keys, static fields, functions) are held fixed and listed. Complex
            leaves (holomorphic fn or not, no flag needed) are checked through their real
            view, a trailing (re, im) axis under the same key path, following JAX's
            conventions (`jax.grad` of a real fn is d/d re - i d/d im).
        *args: further inputs, held fixed (complex ones too).
        grad_fn: a hand-written gradient `grad_fn(params, *args)` to check instead of JAX's
            own (scalar `fn` only); returns a pytree shaped like `params` (for complex leaves
            in JAX's convention, as `jax.grad` returns it).
        has_aux: `fn` returns `(out, aux)`; aux is ignored.
        order: highest order of derivatives checked (1: first derivatives). Order k also
            checks the derivative maps of order k - 1 like fn, as `jax.test_util.check_grads`
            does: the vjp map params -> <vjp(fn)(u), v> (for a scalar fn <grad fn, v>, whose
            gradient is the Hessian-vector product) in reverse mode, the jvp map
            params -> <u, jvp(fn, v)> in forward mode, both in both modes with mode="both";
            u and v are fixed, random, drawn from `key`. With `grad_fn`, order 2 checks
            grad_fn's Jacobian. The report's `parts` hold one report per order and map.
        num_directions: number of random directions K for the all-leaf check.
        key: int seed or JAX PRNG key. Same key, same result.
        mode: "reverse" (grad/vjp), "forward" (jvp) or "both" (also checks
            <u, J v> = <J^T u, v>, which needs no finite differences; reverse only, said in
            the report, when fn contains a custom_vjp function).
        precision: "auto" (finite differences in float64 when fn runs in float64, with
            64-bit types enabled only inside the check; else the model's precision),
            "float64" (required), or "native" (the model's precision, at least float32).
        step: relative step h to start from; default eps^(1/3) of the reference
            precision (of a lower precision fn rounds to inside, when it casts to one).
            The error model may move to a smaller step, never to a larger one than
            max(step, 0.05).
        rtol: smallest relative error treated as a bug; default derived from the precision.
        localize: also check each leaf on its own. "auto": when the check fails, and for
            leaves too small for the all-leaf check to see a 0.1 % error in them.
        leaf_directions: directions per leaf when localizing.
        directions: "rademacher" (random signs, cheapest) or "gaussian".
        chunk_size: directions evaluated at once (vmapped); chunks run one after another.
            Default: 1 on CPU (fastest there); on accelerators, as many as keep their
            perturbed parameter copies within `memory_budget`.
        memory_budget: bytes of perturbed parameter copies in flight at once on an
            accelerator. Default: a quarter of its free memory. (On CPU one direction runs
            at a time unless `chunk_size` says otherwise.)
        direction_sharding: a `NamedSharding` with a one-axis `PartitionSpec` (say
            `PartitionSpec("data")`) that spreads the directions over that mesh axis;
            `num_directions` must be a multiple of the axis size. Parameters that are
            themselves sharded keep their sharding in every perturbed copy either way.
        raise_on_failure: raise `GradientCheckError` unless the status is "pass".

    Returns:
        A `Report`; `report.ok` is True only when the derivative was judged correct.

    Raises:
        TypeError, ValueError: bad inputs, with the offending leaf's path.
        GradientCheckError: with `raise_on_failure=True`, when the check did not pass.

    Example:
        >>> import jax.numpy as jnp, jaxcheck
        >>> report = jaxcheck.verify(lambda p: jnp.sum(jnp.sin(p["w"]) ** 2), {"w": jnp.ones(3)})
        >>> report.ok, report.status
        (True, <Status.PASS: 'pass'>)
    """
    options = _options.Options(
        grad_fn=grad_fn,
        has_aux=has_aux,
        order=order,
        num_directions=num_directions,
        key=key,
        mode=mode,
        precision=precision,
        step=step,
        rtol=rtol,
        localize=localize,
        leaf_directions=leaf_directions,
        directions=directions,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
        direction_sharding=direction_sharding,
        raise_on_failure=raise_on_failure,
    )
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}.")
    return run(fn, params, args, options)


def _host_side(run):
    """`run` for concrete inputs only, with jaxcheck's own transfers allowed (the function
    under check keeps the caller's transfer guard): a check reads numbers back and
    decides, so it cannot be traced, and nothing derived from a traced value may reach
    its caches."""

    @functools.wraps(run)
    def checked(fn, params, args, options):
        # float64 NumPy params are checked as float64 (the caller's args keep jax's default)
        wide = _wide_numpy(params) and not _precision.x64_enabled()
        with _precision.x64_scope(True) if wide else contextlib.nullcontext():
            with _contextvar(_NOTES, _NOTES.get() + (_WIDE_NOTE,) if wide else _NOTES.get()):
                return guarded(fn, params, args, options)

    def guarded(fn, params, args, options):
        # jaxcheck's own programs make infinities on purpose (overflow-safe scales, probes
        # far from params): they run with the debug flags off, and the caller's flags are
        # applied to fn alone when the check finds NaN/Inf in it (`_Run._replay_nonfinite`)
        flags = _DEBUG_FLAGS.get()  # already set when one check runs others
        if flags is None:
            flags = (jax.config.jax_debug_nans, jax.config.jax_debug_infs)
        with (
            _plan.own_transfers(),
            jax.debug_nans(False),
            jax.debug_infs(False),
            _contextvar(_DEBUG_FLAGS, flags),
        ):
            _refuse_traced(params, args)
            try:
                return run(fn, params, args, options)
            except (jax.errors.UnexpectedTracerError, TypeError) as err:
                # a closed-over tracer becomes a hidden input of the compiled program, which
                # then refuses its inputs ("compiled for 6 inputs but called with 2")
                if isinstance(err, TypeError) and "Computation compiled for" not in str(err):
                    raise
                _plan.forget(fn)
                _problem.forget(fn)
                raise TypeError(
                    f"{_TRACED} fn closes over a traced value (an array of an enclosing "
                    "jax.jit, jax.grad or jax.vmap); pass it as an argument instead: "
                    "verify(fn, params, x)."
                ) from err

    return checked


_DEBUG_FLAGS = contextvars.ContextVar("jaxcheck_debug_flags", default=None)
_NOTES = contextvars.ContextVar("jaxcheck_notes", default=())  # for the report's problems
_WIDE_NOTE = (
    "params hold float64 NumPy arrays while 64-bit types are off: the check ran with them "
    "on, so that the float64 parameters are checked as float64 (not rounded to float32)"
)


def _wide_numpy(tree) -> bool:
    """Whether any leaf is a float64 NumPy array or scalar (which jax would round to float32
    with 64-bit types off)."""
    return any(
        isinstance(leaf, np.ndarray | np.generic) and leaf.dtype == np.float64
        for leaf in jax.tree_util.tree_leaves(tree)
    )


@contextlib.contextmanager
def _contextvar(var, value):
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


_TRACED = (
    "jaxcheck.verify runs on the host (it reads numbers back and decides), so it cannot be "
    "called inside jax.jit, jax.grad, jax.vmap or any other transformation."
)


def _refuse_traced(params, args) -> None:
    for where, tree in (("params", params), ("args", args)):
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if isinstance(leaf, jax.core.Tracer):
                raise TypeError(
                    f"{_TRACED} The {where} leaf {jax.tree_util.keystr(key_path) or '(root)'} "
                    "is a traced value. Call verify outside the transformation, on concrete "
                    "arrays."
                )
    # inside jax.jit even new constants are traced: jaxcheck's programs would be staged
    # into the caller's instead of run
    if isinstance(jnp.zeros((), jnp.float32), jax.core.Tracer):
        raise TypeError(f"{_TRACED} Call it outside jax.jit, on concrete arrays.")


@_host_side
def run(fn, params, args: tuple, options: _options.Options) -> Report:
    """Check `fn` at `params` with validated `options`."""
    if not _orders.INSIDE.get():  # complex leaves and orders > 1 become first-order checks
        return _orders.run(fn, params, args, options, run)
    o = options
    p_split, diff, p_arrays = _tree.split(params, "params")
    a_split, a_floats, a_arrays = _tree.split(args, "args")
    if not diff:
        raise ValueError(
            "params has no floating-point leaf to differentiate (held fixed: "
            f"{', '.join(p + ' ' + d for p, d in _tree.held_fixed(p_split, p_arrays)) or 'none'}"
            "). Pass the parameters to check as float arrays."
        )
    if not any(x.size for x in diff):
        shapes = ", ".join(
            f"{p or '(root)'} {tuple(x.shape)}" for p, x in zip(p_split.paths_of(_tree.DIFF), diff)
        )
        raise ValueError(
            f"every floating-point leaf of params is empty ({shapes}): there is nothing to "
            "check. Pass parameters with at least one element."
        )
    inputs = _problem.Inputs(diff, p_arrays, a_floats, a_arrays)
    problem = _problem.Problem(fn, o.grad_fn, o.has_aux, p_split, a_split)
    problem = _problem.with_output_structure(problem, inputs)
    tested = _precision.lowest(x.dtype for x in diff)
    reference = _precision.reference_dtype(o.precision, tested)
    pipeline = _Run(
        problem=problem,
        inputs=inputs,
        modes=("reverse", "forward") if o.mode == "both" else (o.mode,),
        seeds=(
            _directions.seeds(o.key, "params", p_split.paths_of(_tree.DIFF)),
            _directions.seeds(o.key, "outputs", problem.out_paths),
        ),
        kind=o.directions,
        plan=_plan.make_plan(
            diff,
            o.num_directions,
            len(_differences.OUTER),
            jnp.dtype(reference).itemsize,
            chunk_size=o.chunk_size,
            budget=o.memory_budget,
            direction_sharding=o.direction_sharding,
            other_elements=sum(np.size(x) for x in jax.tree_util.tree_leaves(inputs.traced())),
        ),
        tested=tested,
        policy=o.precision,
        rtol=o.rtol,
        timer=Timer(),
    )
    report = pipeline.check(
        o.num_directions,
        o.step,
        o.localize,
        o.leaf_directions,
        _tree.held_fixed(p_split, p_arrays),
    )
    if o.raise_on_failure and not report.ok:
        raise GradientCheckError(report)
    return report


@dataclasses.dataclass(frozen=True)
class _Pass:
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


@dataclasses.dataclass
class _Run:
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
    batch: int = 0  # directions per program call: the all-leaf check's number
    evaluations: int = 0
    problems: list = dataclasses.field(default_factory=list)
    probe: dict | None = None

    # -- pipeline -------------------------------------------------------------------------

    def check(self, k, step, localize, leaf_k, held_fixed) -> Report:
        reverse = "reverse" in self.modes
        try:
            probe = self.timer.run(
                functools.partial(_autodiff.probe, self.problem, reverse),
                self.seeds[1],
                self.inputs.diff,
                self.inputs.traced(),
            )
        except jax.errors.TracerArrayConversionError as err:
            if not (reverse and self.problem.grad_fn is None):
                raise
            raise TypeError(
                "fn converts its inputs to NumPy arrays (it calls NumPy on them), so jax "
                "cannot differentiate it: jax.grad needs fn written with jax.numpy. To check "
                "a NumPy function, pass its hand-written gradient: "
                "verify(fn, params, *args, grad_fn=grad_fn)."
            ) from err
        # the gradient stays on its devices (and sharding); only the small values come over
        self.probe = _probe_on_host(probe, self.inputs.diff, self.problem)
        if self.timer.eager_reason is not None:
            self.problems.append(
                f"jax.jit cannot trace fn or grad_fn ({self.timer.eager_reason}); they were "
                "evaluated eagerly, one direction at a time, which is slower"
            )
        paths = self.problem.params.paths_of(_tree.DIFF)
        nonfinite = self._probe_nonfinite(paths)
        ref = _precision.reference_dtype(self.policy, self.tested)
        if nonfinite:
            self._replay_nonfinite(reverse)
            return self._report(Status.NONFINITE, k, None, (), (), held_fixed, ())
        scales = self.probe["leaf_scales"]
        h0 = step if step is not None else _precision.default_step(ref)
        rounds_to = self.problem.rounds_to
        if rounds_to is not None and _precision.eps(rounds_to) > _precision.eps(ref):
            self.rounds_to = jnp.dtype(rounds_to)
            if step is None:
                h0 = _precision.default_step(self.rounds_to)
            self.problems.append(
                f"fn rounds values computed from params to {rounds_to} (an explicit cast), "
                f"so it is a staircase of {rounds_to} quanta even in {jnp.dtype(ref).name}: "
                f"finite differences take a relative step of {h0:.1e} and judge at "
                f"{rounds_to} resolution"
            )
        self.max_step = max(MAX_STEP, h0)
        beta, share = scales, None
        if reverse:
            beta, share = _directions.balance(
                scales,
                self.probe["grad_norms"],
                _precision.eps(ref) ** 0.25,
                self._needed_derivative(ref, h0),
            )
        index = np.arange(k, dtype=np.int32)
        self.batch = k
        [(p, steps)] = self._ladder(index, np.tile(beta, (k, 1)), h0, [slice(0, k)])
        if step is None and self.reference != ref:
            # fn could not run in float64: take the step of the precision it ran in
            h0 = min(_precision.default_step(self.reference), self.max_step)
            [(p, steps)] = self._ladder(index, np.tile(beta, (k, 1)), h0, [slice(0, k)])
        flat = _flat_directions(p)
        if step is None and flat is not None and not flat[1] and p.step < self.max_step:
            # flat at this step while the derivative is not: a staircase of quanta larger
            # than the step (fn rounds to a low precision), or truly flat: the largest
            # step tells them apart
            h0 = self.max_step
            [(p, more)] = self._ladder(index, np.tile(beta, (k, 1)), h0, [slice(0, k)])
            steps = tuple(steps) + tuple(more)
        checks = self._compare(p)
        if self._incomparable(checks[0]):
            self.reference = _precision.reference_dtype("native", self.tested)
            h0 = step if step is not None else _precision.default_step(self.reference)
            [(p, steps)] = self._ladder(index, np.tile(beta, (k, 1)), h0, [slice(0, k)])
            checks = self._compare(p)
        status = self._status(p, checks, k, self.problems)
        self._note_large_rounding(checks[0])
        leaves = ()
        chosen = []
        if localize is True or (localize == "auto" and status is Status.FAIL):
            chosen = list(range(len(paths)))
        elif localize == "auto" and status is Status.PASS and share is not None:
            # leaves whose 0.1 % error the all-leaf check could not see: check them alone
            chosen = [
                i
                for i, s in enumerate(share)
                if COVERAGE_ERROR * math.sqrt(s) <= checks[0].tolerance
            ]
        if chosen:
            leaves = self._localize(scales, leaf_k, h0, paths, chosen)
            status = self._merge_leaves(status, leaves)
        return self._report(status, k, p, checks, leaves, held_fixed, steps)

    def _incomparable(self, head) -> bool:
        """Whether fn in float64 is a different function from fn in the model's precision
        (say, random numbers drawn in the default dtype), judged by the gradients of the two
        disagreeing by far more than rounding; then finite differences fall back to the
        model's precision."""
        limit = max(0.1, 30 * math.sqrt(_precision.eps(self.tested)))
        if self.policy != "auto" or not head.resolved or not head.rounding > limit:
            return False
        self.problems.append(
            f"the derivative of fn in {self.reference.name} differs from that in "
            f"{self.tested.name} by {head.rounding:.1e}, far beyond rounding: fn computes "
            f"something else in {self.reference.name} (e.g. random numbers drawn in the "
            "default dtype); finite differences use the model's precision instead"
        )
        return True

    def _note_large_rounding(self, head) -> None:
        """Say so when the derivative in the model's dtype is far from the same rule in the
        reference dtype: it is excused as rounding, which is right for an ill-conditioned
        loss, but would also excuse a bug in a code path taken only in the model's dtype."""
        eps_t = max(_precision.eps(self.tested), self._eps_fd())
        if head.rounding_measured and head.rounding > ROUNDING_NOTE * eps_t:
            self.problems.append(
                f"the {self.tested.name} derivative differs from the same rule in "
                f"{self.reference.name} by {head.rounding:.1e} (relative), far above "
                f"{self.tested.name} rounding of a well-conditioned computation; it was "
                "accepted as rounding (an ill-conditioned loss?). If fn or its rules take a "
                f"different path in {self.tested.name}, check that path"
            )

    def _needed_derivative(self, ref, h) -> float:
        """Smallest RMS directional derivative whose roundoff error bar (~15 sigma / h, with
        sigma ~ 10 eps |phi|) stays at a tenth of the smallest tolerance."""
        if self.problem.scalar_output:
            magnitude = abs(float(self.probe["value"]))
        else:
            magnitude = math.sqrt(sum(math.prod(s) for s in self.problem.out_shapes))
        eps_r, eps_t = _precision.eps(ref), _precision.eps(self.tested)
        rule, tested = _floor_values(eps_t, eps_r, eps_r)
        floor = rule if eps_r < eps_t else tested
        return 15 * 10 * eps_r * magnitude / (h * 0.1 * floor)

    def _probe_nonfinite(self, paths) -> bool:
        pr = self.probe
        found = [
            f"parameter leaf {p or '(root)'} contains NaN/Inf"
            for p, ok in zip(paths, pr["params_finite"])
            if not ok
        ]
        found += [
            f"fn's output {p or '(root)'} is NaN/Inf at params"
            for p, ok in zip(self.problem.out_paths, pr["outputs_finite"])
            if not ok
        ]
        if "grad_finite" in pr:
            source = "grad_fn" if self.problem.grad_fn is not None else "autodiff"
            found += [
                f"the gradient ({source}) of leaf {p or '(root)'} is NaN/Inf"
                for p, ok in zip(paths, pr["grad_finite"])
                if not ok
            ]
        self.problems += found
        return bool(found)

    def _replay_nonfinite(self, reverse: bool) -> None:
        """With the caller's jax_debug_nans/jax_debug_infs on, evaluate fn (and its
        gradient) at params again, op by op under those flags, so that JAX's own
        FloatingPointError names the primitive that made the NaN/Inf, as it would outside
        the check. (With the flags off, or when no primitive of fn trips them, the check
        reports "nonfinite".)"""
        nans, infs = _DEBUG_FLAGS.get() or (False, False)
        if not (nans or infs) or not np.all(self.probe["params_finite"]):
            return  # NaN/Inf already in params: the report says which leaf
        problem, inputs = self.problem, self.inputs
        f = lambda d: problem.outputs(d, inputs.traced())  # noqa: E731
        with jax.disable_jit(), jax.debug_nans(nans), jax.debug_infs(infs):
            outs = f(inputs.diff)
            if not reverse:
                return
            if problem.grad_fn is not None:
                problem.gradient(inputs.diff, inputs.traced())
            else:
                _, vjp_fn = jax.vjp(f, inputs.diff)
                vjp_fn([jnp.ones_like(y) for y in outs])

    def _ladder(self, index, rows, h, groups):
        """Finite differences for each group of directions (a slice of the rows), each with
        its own step: the step h times a factor applied to the group's rows.

        First, central differences D(h) from two points per direction. A group whose checks
        all pass with a margin (the derivative agrees with D(h) to within half the
        tolerance, or to its own measured rounding) is settled: D(h)'s truncation and noise
        can only be smaller than that agreement, unless they cancel a bug along every
        direction. Otherwise the stencil is completed with -h/2, h/2 and the error model
        takes over (`_full_ladder`). Returns one (_Pass, steps) per group.
        """
        out = self._evaluate(index, rows, h, _differences.OUTER)
        results, pending = [None] * len(groups), []
        for i, g in enumerate(groups):
            p = self._group(out, g, h, 1.0)
            if self._settled(p):
                results[i] = (p, (h,))
            else:
                pending.append(i)
        if not pending:
            return results
        rows_of = [np.arange(len(index))[groups[i]] for i in pending]
        picked = np.concatenate(rows_of)
        ends = np.cumsum([len(r) for r in rows_of])
        sub_groups = [slice(end - len(r), end) for r, end in zip(rows_of, ends)]
        sub_index, sub_rows = index[picked], rows[picked]
        inner = self._evaluate(sub_index, sub_rows, h, _differences.INNER)
        first = {name: None if v is None else v[picked] for name, v in out.items()}
        first = _complete(first, inner)
        for i, r in zip(pending, self._full_ladder(sub_index, sub_rows, h, sub_groups, first)):
            results[i] = r
        return results

    def _settled(self, p: _Pass) -> bool:
        """Whether central differences alone settle the verdict as a pass."""
        if not (p.fd.finite.all() and p.fd.smooth.all()):
            return False
        if p.fd.noise_floor > 0.1 * self._floors(p.fd)["nonsmooth"]:
            return False  # rounding alone is too coarse here: a larger step is needed
        for c in self._compare(p):
            margin = 1.0 if c.rounding_measured else 0.5
            if not (c.num_used and c.relative_error <= margin * c.tolerance):
                return False
            if c.noise_floor and (not c.resolved or c.absolute):
                return False
        return True

    def _full_ladder(self, index, rows, h, groups, out):
        """The error model's step ladder, starting from the full stencil `out` at step h.

        A group whose fourth differences are far above the reference precision's rounding
        is evaluated again at a 16 times smaller step: if d4 / step agrees direction by
        direction, the directions cross kinks (judged against rounding alone from then on);
        if not, fn computes in lower precision than the reference, and a third evaluation
        takes a correspondingly larger step. A group whose noise floor is above target
        moves to the step that balances roundoff (~1/h) against truncation (~h^2). Keeps for
        each group the evaluation with most smooth directions, then lowest noise.
        """
        factors = np.ones(len(groups))
        eps = self._eps_fd()
        best = [self._group(out, g, h, 1.0) for g in groups]
        tried = [[h] for _ in groups]
        suspect = [p.fd.relative_noise > 100 * eps for p in best]
        for i, p in enumerate(best):
            if suspect[i]:
                factors[i] = 1 / 16
            elif p.fd.noise_floor > 0.1 * self._floors(p.fd)["nonsmooth"] or p.fd.num_nonsmooth:
                f = min(max(p.fd.better_step(), 1e-3), 1e3, self.max_step / h)
                factors[i] = min(f, 1 / 8) if p.fd.num_nonsmooth else f
        factors[(factors >= 0.5) & (factors <= 2)] = 1.0
        if np.all(factors == 1.0):
            return list(zip(best, map(tuple, tried)))
        out2 = self._evaluate_full(index, _scale_rows(rows, groups, factors), h)
        again = np.ones(len(groups))
        for i, g in enumerate(groups):
            if factors[i] == 1.0:
                continue
            p2 = self._group(out2, g, h, factors[i])
            tried[i].append(h * factors[i])
            if suspect[i] and _same_kinks(best[i].fd, p2.fd, factors[i]):
                kinked = self._assess(p2.phis, p2.phi0, h, from_data=False)
                best[i] = dataclasses.replace(p2, fd=kinked)
            elif suspect[i]:  # d4 is noise: the function is noisier than the reference
                again[i] = min(1e3, (best[i].fd.relative_noise / eps) ** (1 / 3), self.max_step / h)
            else:
                best[i] = _better(best[i], p2)
        if np.any(again != 1.0):
            out3 = self._evaluate_full(index, _scale_rows(rows, groups, again), h)
            for i, g in enumerate(groups):
                if again[i] != 1.0:
                    tried[i].append(h * again[i])
                    best[i] = _better(best[i], self._group(out3, g, h, again[i]))
        return list(zip(best, map(tuple, tried)))

    def _evaluate_full(self, index, rows, h) -> dict:
        outer = self._evaluate(index, rows, h, _differences.OUTER)
        return _complete(outer, self._evaluate(index, rows, h, _differences.INNER))

    def _evaluate(self, index, rows, h, offsets) -> dict:
        """Run the programs along directions `index` with per-leaf step sizes `rows`, in
        batches of the all-leaf check's size, so that its compiled programs are reused (the
        last batch is padded with repeats of its last direction)."""
        n, size = len(index), self.batch
        if n == size:
            return self._evaluate_batch(index, rows, h, offsets)
        parts = []
        for start in range(0, n, size):
            idx, r = index[start : start + size], rows[start : start + size]
            pad = size - len(idx)
            if pad:
                idx = np.concatenate([idx, np.repeat(idx[-1:], pad)])
                r = np.concatenate([r, np.repeat(r[-1:], pad, axis=0)])
            parts.append(self._evaluate_batch(idx, r, h, offsets))
        return {
            name: None if parts[0][name] is None else np.concatenate([p[name] for p in parts])[:n]
            for name in parts[0]
        }

    def _evaluate_batch(self, index, rows, h, offsets) -> dict:
        native = {}
        projections = offsets == _differences.OUTER
        if projections and ("forward" in self.modes or not self.problem.scalar_output):
            modes = tuple(m for m in self.modes if m == "forward" or not self.problem.scalar_output)
            try:
                native = _numpy(
                    self.timer.run(
                        functools.partial(
                            _autodiff.projections, self.problem, modes, self.kind, self.plan
                        ),
                        self.seeds,
                        self.inputs.diff,
                        self.inputs.traced(),
                        # float64 step sizes for float64 params: directions identical to
                        # the reference's, not rounded to float32
                        rows.astype(_precision.accumulator([self.tested])),
                        index,
                        self.probe["output_scales"].astype(_precision.accumulator([self.tested])),
                    )
                )
            except TypeError as err:
                if "forward" not in modes or "custom_vjp" not in str(err):
                    raise
                if self.modes == ("forward",):
                    raise TypeError(
                        "mode='forward' needs forward-mode autodiff (jvp), but fn contains a "
                        "jax.custom_vjp function, which has no jvp. Use mode='reverse' to "
                        "check its custom rule."
                    ) from err
                self.modes = ("reverse",)
                self.problems.append(
                    "fn contains a jax.custom_vjp function, which has no jvp: only the "
                    "reverse mode was checked"
                )
                return self._evaluate_batch(index, rows, h, offsets)
        out = self._reference(index, rows, h, offsets)
        self.evaluations += len(offsets) * len(index) + 1
        if projections:
            out["rev"] = out.pop("test_rev", native.get("rev"))
            out["fwd"] = native.get("fwd")
        return out

    def _group(self, out, sl, h, factor) -> _Pass:
        def cut(name):
            return None if out.get(name) is None else out[name][sl]

        if out["phis"].shape[1] == 2:
            eps = self._eps_fd()
            fd = _error_model.assess_central(cut("phis"), cut("phi0"), h, eps)
        else:
            fd = self._assess(cut("phis"), cut("phi0"), h, from_data=True)
        return _Pass(
            fd,
            cut("rev"),
            cut("fwd"),
            cut("ref_rev"),
            cut("ref_fwd"),
            cut("phis"),
            cut("phi0"),
            h * factor,
        )

    def _assess(self, phis, phi0, h, from_data: bool) -> _error_model.Differences:
        return _error_model.assess(
            phis,
            phi0,
            h,
            self._eps_fd(),
            self._floors(None)["nonsmooth"],
            noise_from_data=from_data,
        )

    def _reference(self, index, rows, h, offsets) -> dict:
        """The finite-difference program, in float64 when the policy allows it; when fn
        cannot run so, in the model's precision (at least float32), and last with every
        input in its own dtype (fn mixes a low-precision array it closes over with its
        inputs, say)."""
        if self.reference is not None:
            return self._reference_in(self.reference, self.cast, index, rows, h, offsets)
        wanted = _precision.reference_dtype(self.policy, self.tested)
        native = _precision.reference_dtype("native", self.tested)
        attempts = [(wanted, True)]
        if self.policy == "auto" and wanted != native:
            attempts.append((native, True))
        if self.policy != "float64":
            attempts.append((self.tested, False))
        for i, (dtype, cast) in enumerate(attempts):
            try:
                return self._reference_in(dtype, cast, index, rows, h, offsets)
            except Exception as err:  # noqa: BLE001 - any failure of fn in that precision
                if i + 1 == len(attempts):
                    raise
                text = str(err).strip()
                first = text.splitlines()[0] if text else type(err).__name__
                after = (
                    f"finite differences use {attempts[i + 1][0].name}"
                    if attempts[i + 1][1]
                    else "finite differences leave every input in its own dtype"
                )
                where = f"in {dtype.name}" if cast else "with its inputs in their own dtypes"
                self.problems.append(
                    f"fn could not run {where} ({type(err).__name__}: {first[:120]}); {after}, "
                    "so the resolution is coarser"
                )
        raise AssertionError("unreachable")

    def _reference_in(self, dtype, cast, index, rows, h, offsets) -> dict:
        wide = dtype == jnp.float64
        work = jnp.dtype(dtype) if cast else _precision.accumulator([dtype])
        with _precision.x64_scope(True) if wide else contextlib.nullcontext():
            g = self.probe.get("grad")
            with_rule = _precision.eps(dtype) < _precision.eps(self.tested)
            out = _numpy(
                self.timer.run(
                    functools.partial(
                        _differences.reference,
                        self.problem,
                        self.modes,
                        self.kind,
                        self.plan,
                        offsets,
                        offsets == _differences.OUTER,
                        with_rule,
                        jnp.dtype(dtype) if cast else None,
                        work,
                    ),
                    self.seeds,
                    self.inputs.diff,
                    self.inputs.traced(),
                    rows.astype(work),
                    index,
                    self.probe["output_scales"].astype(work),
                    g,
                    np.asarray(h, work),
                )
            )
        self.reference, self.cast = jnp.dtype(dtype), cast
        return out

    # -- judging --------------------------------------------------------------------------

    def _eps_fd(self) -> float:
        """The resolution of fn's values in the reference: its precision, or that of a
        lower-precision dtype fn rounds its values to inside."""
        eps = _precision.eps(self.reference)
        return eps if self.rounds_to is None else max(eps, _precision.eps(self.rounds_to))

    def _floors(self, fd) -> dict:
        """Smallest relative errors that count as bugs, per comparison."""
        eps_t, eps_r = _precision.eps(self.tested), _precision.eps(self.reference)
        with_rule = eps_r < eps_t
        eps_eff = max(self._eps_fd(), fd.relative_noise if fd is not None else 0.0)
        rule, tested = _floor_values(eps_t, eps_r, eps_eff)
        if self.rtol is not None:
            rule, tested = self.rtol, self.rtol
        return {"rule": rule, "tested": tested, "nonsmooth": rule if with_rule else tested}

    def _compare(self, p: _Pass) -> tuple:
        floors = self._floors(p.fd)
        t, r = self.tested.name, self.reference.name
        with_rule = _precision.eps(self.reference) < _precision.eps(self.tested)
        source = "grad_fn" if self.problem.grad_fn is not None else "autodiff"
        checks = []
        use = p.fd.smooth
        # the absolute size below which a derivative is zero here: by the finite
        # differences' error bars, or by the rounding of the derivatives under test
        zero_scale = max(_error_model.rms(p.fd.value[use]), _error_model.rms(p.fd.bar[use]))
        for mode, a, a_ref in (("reverse", p.rev, p.ref_rev), ("forward", p.fwd, p.ref_fwd)):
            if mode not in self.modes:
                continue
            rounding_scale = 0.0
            if with_rule:  # absolute size of the tested derivative's rounding
                use = p.fd.smooth & np.isfinite(a) & np.isfinite(a_ref)
                rounding_scale = _error_model.rms(a[use] - a_ref[use]) if use.any() else 0.0
                zero_scale = max(zero_scale, rounding_scale)
            checks.append(
                _error_model.compare(
                    f"{mode} {source} ({t}) vs finite differences ({r})",
                    p.fd,
                    a,
                    floors["tested"],
                    a_ref if with_rule else None,
                    rounding_scale,
                )
            )
            if with_rule:
                checks.append(
                    _error_model.compare(
                        f"{mode} {source}, same rule in {r}, vs finite differences",
                        p.fd,
                        a_ref,
                        floors["rule"],
                        rounding_scale=rounding_scale,
                    )
                )
        if len(self.modes) == 2:
            rounding = math.hypot(checks[0].rounding, checks[-2 if with_rule else -1].rounding)
            checks.append(
                _error_model.consistency(
                    f"forward vs reverse ({t}), <u, J v> = <J^T u, v>",
                    p.fwd,
                    p.rev,
                    floors["tested"],
                    rounding,
                    zero_scale,
                )
            )
        return tuple(checks)

    def _status(self, p: _Pass, checks, k, problems) -> Status:
        bad = int(np.sum(~p.fd.finite))
        if bad:
            problems.append(
                f"finite differences are NaN/Inf along {bad} of {k} directions: fn is not finite "
                f"within a relative step {p.step:.1e} of params"
            )
            return Status.NONFINITE
        used = int(p.fd.smooth.sum())
        if used < max(3, k // 2):
            problems.append(
                f"only {used} of {k} directions are smooth at this point; non-smooth directions "
                "(kinks within the step) are excluded from the verdict"
            )
            return Status.INCONCLUSIVE
        head = checks[0]
        flat = self._flat(p, k, problems)
        if flat is not None:
            return flat
        noisy = max(math.sqrt(_precision.eps(self.tested)), 100 * self._eps_fd())
        if head.absolute and p.fd.relative_noise > noisy:
            problems.append(
                f"fn's values scatter by {p.fd.relative_noise:.1e} (relative) between nearby "
                "evaluations, far beyond rounding, so its derivative cannot be told from zero: "
                "is fn random, or not a function of params and args alone (say, constants "
                "drawn anew each time it is traced)?"
            )
            return Status.INCONCLUSIVE
        coarse = head.noise_floor > MAX_NOISE_FLOOR
        if coarse and head.relative_error > 2 * head.tolerance:
            return Status.FAIL  # wrong beyond twice a tolerance that includes the noise
        if head.absolute and coarse and _vacuous(p, self.rounds_to is not None):
            problems.append(
                "finite-difference noise (noise floor "
                f"{head.noise_floor:.1e}) is as large as the derivative judged: a pass would "
                "carry no information about it (does fn round to a low precision inside?). "
                "Try a larger `step`, or a point where the derivative is not zero"
            )
            return Status.INCONCLUSIVE
        if head.absolute:  # the derivative is zero to within noise or rounding
            problems.append(
                "the derivative is zero to within finite-difference noise or rounding along "
                "these directions (at a stationary point?); it was judged in absolute terms"
            )
        elif coarse:
            problems.append(
                f"finite-difference noise floor {head.noise_floor:.1e} is too coarse to judge "
                "the gradient"
            )
            return Status.INCONCLUSIVE
        return Status.PASS if all(c.passed for c in checks) else Status.FAIL

    def _flat(self, p: _Pass, k, problems) -> Status | None:
        """The verdict where fn's values do not change at all within the step along most
        directions (finite differences exactly zero): a pass when the derivative under test
        is exactly zero there too (fn is piecewise constant here); inconclusive when it is
        not, unless fn stays flat at the largest step (a staircase of a low precision that
        fn rounds to inside looks flat at a step below its quanta: never a failure)."""
        flat = _flat_directions(p)
        if flat is None:
            return None
        n, zero = flat
        if zero:
            problems.append(
                f"fn is flat here: its values do not change within a relative step {p.step:.1e} "
                "along any direction, so its derivative is zero everywhere nearby "
                "(piecewise constant, as round or argmax are), as the derivative under test says"
            )
            return Status.PASS
        if p.step >= 0.99 * self.max_step:
            return None  # flat even at the largest step: judged as usual
        problems.append(
            f"fn's values do not change within a relative step {p.step:.1e} along {n} of {k} "
            "directions (finite differences exactly zero) while the derivative under test is "
            "not zero there: fn is piecewise constant at this scale (it rounds to a low "
            "precision inside, say a cast to bfloat16?), so finite differences cannot judge "
            f"its derivative. Try a larger `step` (up to {self.max_step})"
        )
        return Status.INCONCLUSIVE

    # -- localization ---------------------------------------------------------------------

    def _localize(self, scales, leaf_k, h, paths, chosen) -> tuple:
        index = np.tile(LEAF_INDEX_OFFSET + np.arange(leaf_k, dtype=np.int32), len(chosen))
        rows = np.repeat(np.diag(scales)[chosen], leaf_k, axis=0)
        groups = [slice(j * leaf_k, (j + 1) * leaf_k) for j in range(len(chosen))]
        results = []
        for leaf, (p, _) in zip(chosen, self._ladder(index, rows, h, groups)):
            checks = self._compare(p)
            status = self._status(p, checks, leaf_k, [])
            head, x = checks[0], self.inputs.diff[leaf]
            results.append(
                LeafResult(
                    paths[leaf],
                    tuple(x.shape),
                    str(x.dtype),
                    head.relative_error,
                    head.interval,
                    head.tolerance,
                    p.fd.num_nonsmooth,
                    status,
                )
            )
        return tuple(results)

    def _merge_leaves(self, status, leaves) -> Status:
        failing = [leaf.path or "(root)" for leaf in leaves if leaf.status is Status.FAIL]
        if failing:
            self.problems.append(f"wrong: {', '.join(failing)}")
            return Status.FAIL if status is not Status.NONFINITE else status
        if status is Status.FAIL:
            self.problems.append(
                "no single leaf fails on its own: the error is spread thinly over several "
                "leaves, or comes from their interaction"
            )
        return status

    # -- report ---------------------------------------------------------------------------

    def _report(self, status, k, p, checks, leaves, held_fixed, steps) -> Report:
        head = checks[0] if checks else None
        nan = math.nan
        ref = self.reference or _precision.reference_dtype(self.policy, self.tested)
        analytic = None
        if p is not None:
            analytic = p.rev if p.rev is not None else p.fwd
        return Report(
            status=status,
            relative_error=head.relative_error if head else nan,
            interval=head.interval if head else (nan, nan),
            tolerance=head.tolerance if head else nan,
            noise_floor=head.noise_floor if head else nan,
            checks=tuple(checks),
            leaves=tuple(leaves),
            held_fixed=tuple(held_fixed),
            mode="+".join(self.modes),
            tested_dtype=self.tested.name,
            reference_dtype=jnp.dtype(ref).name,
            step=p.step if p else math.nan,
            steps_tried=tuple(float(s) for s in steps),
            num_directions=k,
            num_nonsmooth=p.fd.num_nonsmooth if p else 0,
            num_nonfinite=int(np.sum(~p.fd.finite)) if p else 0,
            num_subgradient_consistent=(
                _error_model.subgradient_consistent(p.fd, analytic) if p else 0
            ),
            num_evaluations=self.evaluations,
            problems=(*self.problems, *_NOTES.get(), *self.problem.notes),
            compile_seconds=self.timer.compile_s,
            run_seconds=self.timer.run_s,
            num_compiled=self.timer.compiled,
            stencil_points=p.fd.points if p else 0,
            peak_memory_bytes=self.timer.peak_bytes,
            numeric=None if p is None else np.asarray(p.numeric),
            analytic=None if analytic is None else np.asarray(analytic, np.float64),
        )


def _vacuous(p: _Pass, rounds: bool) -> bool:
    """Whether an absolute comparison (the derivative zero to within the error bars) says
    nothing: fn's values are coarse (it rounds to a low precision: seen in its jaxpr, or
    constant along some direction), or the derivative under test (its rule in higher
    precision, where measured) is not small against the error bars, which then hide it.
    At a true zero (a stationary point, an identically zero fn) it is far below them."""
    use = p.fd.smooth
    a = p.rev if p.rev is not None else p.fwd
    a_ref = p.ref_rev if p.rev is not None else p.ref_fwd
    claimed = _error_model.rms((a if a_ref is None else a_ref)[use])
    coarse_values = rounds or bool(np.any(_constant_along(p)))
    return coarse_values or claimed > 0.1 * _error_model.rms(p.fd.bar[use])


def _constant_along(p: _Pass) -> np.ndarray:
    """Whether fn's values are exactly equal at every stencil point, per direction."""
    return np.all(p.phis == p.phi0[:, None], axis=1)


def _flat_directions(p: _Pass):
    """None, unless fn's values are exactly constant within the step along at least half of
    the smooth directions; then (how many, whether the derivative under test is zero
    there: exactly, or to within its rounding against the same rule in higher precision)."""
    a = p.rev if p.rev is not None else p.fwd
    use = p.fd.smooth & np.isfinite(a)
    flat = use & _constant_along(p)
    n = int(flat.sum())
    if n == 0 or 2 * n < int(use.sum()):
        return None
    zero = not np.any(a[use])
    a_ref = p.ref_rev if p.rev is not None else p.ref_fwd
    if (
        not zero
        and a_ref is not None
        and _error_model.rms(a_ref[use]) <= _error_model.rms(a[use] - a_ref[use])
    ):
        return None  # the same rule in higher precision is zero: a is rounding alone
    return n, zero and n == int(use.sum())


def _floor_values(eps_tested: float, eps_reference: float, eps_effective: float):
    """Default smallest relative errors that count as bugs: (same rule in the reference
    precision, derivative under test). The rule is held to 1e-6, or to 10 eps^(2/3) of the
    precision fn really computes in; the derivative under test to 10 eps of its dtype when a
    higher-precision rule measures its rounding, else to sqrt(eps) (1.5e-8 in float64: a
    float64 gradient 5e-7 off is wrong), or to what fn's real precision allows."""
    rule = max(1e-6, 10 * eps_effective ** (2 / 3))
    if eps_reference < eps_tested:
        return rule, 10 * eps_tested
    return rule, max(math.sqrt(eps_tested), 10 * eps_effective ** (2 / 3))


def _same_kinks(fd1, fd2, factor: float) -> bool:
    """Whether d4 / step agrees between two steps direction by direction, as it does for a
    kink at the point (a fixed jump in slope), and not for rounding noise, whose d4 is
    random even where its size scales with the step."""
    j1, j2 = fd1.d4, fd2.d4 / factor
    use = fd1.finite & fd2.finite & (j1 != 0)
    if not use.any():
        return False
    return bool(np.median(np.abs(j2[use] - j1[use]) / np.abs(j1[use])) < 0.3)


def _better(p1: _Pass, p2: _Pass) -> _Pass:
    key = lambda p: (int(p.fd.smooth.sum()), -p.fd.noise_floor)  # noqa: E731
    return p2 if key(p2) > key(p1) else p1


def _scale_rows(rows, groups, factors):
    rows = rows.copy()
    for g, f in zip(groups, factors):
        rows[g] *= f
    return rows


def _probe_on_host(probe: dict, diff: list, problem) -> dict:
    """The probe's scales and finiteness flags as NumPy values; the gradient stays a list
    of device arrays, passed on only for a scalar fn (whose projections are formed from it)."""
    out = {k: _numpy(v) for k, v in probe.items() if k != "grad"}
    rms_params, out["params_finite"] = _directions.host_rms(out["param_squares"], diff)
    out["leaf_scales"] = _directions.with_floor(rms_params, [max(x.size, 1) for x in diff])
    if "grad" in probe:
        rms_grad, out["grad_finite"] = _directions.host_rms(out["grad_squares"], probe["grad"])
        out["grad_norms"] = rms_grad * np.sqrt([max(x.size, 1) for x in diff])
        if problem.scalar_output:
            out["grad"] = probe["grad"]
    return out


def _complete(outer: dict, inner: dict) -> dict:
    """The full stencil (columns in `_differences.OFFSETS` order) from the evaluations at
    +-h (with the projections) and at +-h/2."""
    out = dict(outer)
    o, i = outer["phis"], inner["phis"]
    out["phis"] = np.stack([o[:, 0], i[:, 0], i[:, 1], o[:, 1]], axis=1)
    return out


def _numpy(tree):
    return jax.tree_util.tree_map(np.asarray, tree)
