"""`verify`: the entry point that runs the pipeline and returns a `Report`."""

import contextlib
import dataclasses
import functools
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
        fn: `fn(params, *args)` returning a scalar or a pytree of float arrays (then random
            output cotangents u make it scalar: <u, fn(...)>). With `has_aux`, `(out, aux)`.
        params: any pytree. Floating leaves are differentiated; all other leaves (ints,
            bools, PRNG keys, static fields, functions) are held fixed and listed.
        *args: further inputs, held fixed.
        grad_fn: a hand-written gradient `grad_fn(params, *args)` to check instead of JAX's
            own (scalar `fn` only); returns a pytree shaped like `params`.
        has_aux: `fn` returns `(out, aux)`; aux is ignored.
        order: highest order of derivatives checked (1: first derivatives).
        num_directions: number of random directions K for the all-leaf check.
        key: int seed or JAX PRNG key. Same key, same result.
        mode: "reverse" (grad/vjp), "forward" (jvp) or "both" (also checks
            <u, J v> = <J^T u, v>, which needs no finite differences; reverse only, said in
            the report, when fn contains a custom_vjp function).
        precision: "auto" (finite differences in float64 when fn runs in float64, with
            64-bit types enabled only inside the check; else the model's precision),
            "float64" (required), or "native" (the model's precision, at least float32).
        step: relative step h; default eps^(1/3) of the reference precision.
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


def run(fn, params, args: tuple, options: _options.Options) -> Report:
    """Check `fn` at `params` with validated `options`."""
    o = options
    p_split, diff, p_arrays = _tree.split(params, "params")
    a_split, a_floats, a_arrays = _tree.split(args, "args")
    if not diff:
        raise ValueError(
            "params has no floating-point leaf to differentiate (held fixed: "
            f"{', '.join(p + ' ' + d for p, d in _tree.held_fixed(p_split, p_arrays)) or 'none'}"
            "). Pass the parameters to check as float arrays."
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
    batch: int = 0  # directions per program call: the all-leaf check's number
    evaluations: int = 0
    problems: list = dataclasses.field(default_factory=list)
    probe: dict | None = None

    # -- pipeline -------------------------------------------------------------------------

    def check(self, k, step, localize, leaf_k, held_fixed) -> Report:
        reverse = "reverse" in self.modes
        probe = self.timer.run(
            functools.partial(_autodiff.probe, self.problem, reverse),
            self.seeds[1],
            self.inputs.diff,
            self.inputs.traced(),
        )
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
            return self._report(Status.NONFINITE, k, None, (), (), held_fixed, ())
        scales = self.probe["leaf_scales"]
        h0 = step if step is not None else _precision.default_step(ref)
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
        eps_t = _precision.eps(self.tested)
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
        eps = _precision.eps(self.reference)
        best = [self._group(out, g, h, 1.0) for g in groups]
        tried = [[h] for _ in groups]
        suspect = [p.fd.relative_noise > 100 * eps for p in best]
        for i, p in enumerate(best):
            if suspect[i]:
                factors[i] = 1 / 16
            elif p.fd.noise_floor > 0.1 * self._floors(p.fd)["nonsmooth"] or p.fd.num_nonsmooth:
                f = min(max(p.fd.better_step(), 1e-3), 1e3, MAX_STEP / h)
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
                again[i] = min(1e3, (best[i].fd.relative_noise / eps) ** (1 / 3), MAX_STEP / h)
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
                        rows.astype(np.float32),
                        index,
                        self.probe["output_scales"].astype(np.float32),
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
            eps = _precision.eps(self.reference)
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
            _precision.eps(self.reference),
            self._floors(None)["nonsmooth"],
            noise_from_data=from_data,
        )

    def _reference(self, index, rows, h, offsets) -> dict:
        """The finite-difference program, in float64 when the policy allows it."""
        if self.reference is None:
            wanted = _precision.reference_dtype(self.policy, self.tested)
            try:
                return self._reference_in(wanted, index, rows, h, offsets)
            except Exception as err:  # noqa: BLE001 - any failure of fn in float64
                fallback = _precision.reference_dtype("native", self.tested)
                if self.policy != "auto" or wanted == fallback:
                    raise
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                self.problems.append(
                    f"fn could not run in float64 ({type(err).__name__}: {first[:120]}); "
                    "finite differences use the model's precision, so the resolution is coarser"
                )
                wanted = fallback
            return self._reference_in(wanted, index, rows, h, offsets)
        return self._reference_in(self.reference, index, rows, h, offsets)

    def _reference_in(self, dtype, index, rows, h, offsets) -> dict:
        with _precision.x64_scope(True) if dtype == jnp.float64 else contextlib.nullcontext():
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
                        jnp.dtype(dtype),
                    ),
                    self.seeds,
                    self.inputs.diff,
                    self.inputs.traced(),
                    rows.astype(dtype),
                    index,
                    self.probe["output_scales"].astype(dtype),
                    g,
                    np.asarray(h, dtype),
                )
            )
        self.reference = jnp.dtype(dtype)
        return out

    # -- judging --------------------------------------------------------------------------

    def _floors(self, fd) -> dict:
        """Smallest relative errors that count as bugs, per comparison."""
        eps_t, eps_r = _precision.eps(self.tested), _precision.eps(self.reference)
        with_rule = eps_r < eps_t
        eps_eff = max(eps_r, fd.relative_noise if fd is not None else 0.0)
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
        for mode, a, a_ref in (("reverse", p.rev, p.ref_rev), ("forward", p.fwd, p.ref_fwd)):
            if mode not in self.modes:
                continue
            rounding_scale = 0.0
            if with_rule:  # absolute size of the tested derivative's rounding
                use = p.fd.smooth & np.isfinite(a) & np.isfinite(a_ref)
                rounding_scale = _error_model.rms(a[use] - a_ref[use]) if use.any() else 0.0
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
        noisy = max(math.sqrt(_precision.eps(self.tested)), 100 * _precision.eps(self.reference))
        if head.absolute and p.fd.relative_noise > noisy:
            problems.append(
                f"fn's values scatter by {p.fd.relative_noise:.1e} (relative) between nearby "
                "evaluations, far beyond rounding, so its derivative cannot be told from zero: "
                "is fn random, or not a function of params and args alone (say, constants "
                "drawn anew each time it is traced)?"
            )
            return Status.INCONCLUSIVE
        if head.absolute:  # the derivative is zero to within noise or rounding
            problems.append(
                "the derivative is zero to within finite-difference noise or rounding along "
                "these directions (at a stationary point?); it was judged in absolute terms"
            )
        elif head.noise_floor > MAX_NOISE_FLOOR:
            problems.append(
                f"finite-difference noise floor {head.noise_floor:.1e} is too coarse to judge "
                "the gradient"
            )
            return Status.INCONCLUSIVE
        return Status.PASS if all(c.passed for c in checks) else Status.FAIL

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
            problems=tuple(self.problems),
            compile_seconds=self.timer.compile_s,
            run_seconds=self.timer.run_s,
            num_compiled=self.timer.compiled,
            stencil_points=p.fd.points if p else 0,
            peak_memory_bytes=self.timer.peak_bytes,
            numeric=None if p is None else np.asarray(p.numeric),
            analytic=None if analytic is None else np.asarray(analytic, np.float64),
        )


def _floor_values(eps_tested: float, eps_reference: float, eps_effective: float):
    """Default smallest relative errors that count as bugs: (same rule in the reference
    precision, derivative under test). The rule is held to 1e-6, or to 10 eps^(2/3) of the
    precision fn really computes in; the derivative under test to 10 eps of its dtype when a
    higher-precision rule measures its rounding, else to sqrt(eps)."""
    rule = max(1e-6, 10 * eps_effective ** (2 / 3))
    if eps_reference < eps_tested:
        return rule, 10 * eps_tested
    return rule, max(1e-6, math.sqrt(eps_tested))


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
