"""Running the compiled programs along a set of directions: the projections of the
derivative under test and the finite-difference stencil, in batches of the all-leaf
check's size (so its programs are reused), in the reference precision, falling back to
the model's precision (and then to the inputs' own dtypes) when fn cannot run in it."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import _autodiff, _differences, _plan, _precision, _verdict
from ._errors import GradientCheckError, one_line
from ._state import PRIMAL_ROW, TRACED_RULE, Run

# the start of JAX's own message there (suites match it: jax.test_util.check_grads raises it)
JAX_NO_JVP = "can't apply forward-mode autodiff (jvp) to a custom_vjp function."
# said where mode="both" meets a custom_vjp (`check_grads` raises on it, as JAX's does)
NO_JVP = (
    "fn contains a jax.custom_vjp function, which has no jvp: only the reverse mode was checked"
)


def evaluate(run: Run, index, rows, h, offsets) -> dict:
    """Run the programs along directions `index` with per-leaf step sizes `rows`, in
    batches of the all-leaf check's size, so that its compiled programs are reused (the
    last batch is padded with repeats of its last direction)."""
    n, size = len(index), run.batch
    if n == size:
        return _evaluate_batch(run, index, rows, h, offsets)
    parts = []
    for start in range(0, n, size):
        idx, r = index[start : start + size], rows[start : start + size]
        pad = size - len(idx)
        if pad:
            idx = np.concatenate([idx, np.repeat(idx[-1:], pad)])
            r = np.concatenate([r, np.repeat(r[-1:], pad, axis=0)])
        parts.append(_evaluate_batch(run, idx, r, h, offsets))
    return {
        name: None if parts[0][name] is None else np.concatenate([p[name] for p in parts])[:n]
        for name in parts[0]
    }


def evaluate_full(run: Run, index, rows, h) -> dict:
    """The full stencil: the evaluations at +-h (with the projections) and at +-h/2."""
    outer = evaluate(run, index, rows, h, _differences.OUTER)
    return complete(outer, evaluate(run, index, rows, h, _differences.INNER))


def complete(outer: dict, inner: dict) -> dict:
    """The full stencil (columns in `_differences.OFFSETS` order) from the evaluations at
    +-h (with the projections) and at +-h/2."""
    out = dict(outer)
    o, i = outer["phis"], inner["phis"]
    out["phis"] = np.stack([o[:, 0], i[:, 0], i[:, 1], o[:, 1]], axis=1)
    return out


def output_scales(probe: dict) -> tuple:
    """(the probe's output scales, its weights of the output entries or None where it
    formed none, `_autodiff.output_weights`): what every program of the check forms its
    output cotangents from."""
    return probe["output_scales"], probe.get("output_weights")


def _cast_scales(scales: tuple, dtype) -> tuple:
    """`output_scales` (or its lowering stand-in) with the scales in `dtype`; the weights,
    powers of two, as they are."""
    return scales[0].astype(dtype), scales[1]


def to_host(tree):
    """A tree of device arrays as NumPy arrays (read back to the host)."""
    return jax.tree_util.tree_map(_plan.host_array, tree)


def _evaluate_batch(run: Run, index, rows, h, offsets) -> dict:
    native, modes = {}, ()
    projections = offsets == _differences.OUTER
    if projections and ("forward" in run.modes or not run.problem.scalar_output):
        modes = tuple(m for m in run.modes if m == "forward" or not run.problem.scalar_output)
        native = _folded(run, modes, index, rows)
        modes = () if native else modes
    if modes:
        try:
            if "forward" in modes and "no_forward" in run.probe:
                raise run.probe["no_forward"]  # the probe's trace met a custom_vjp
            native = to_host(
                run.timer.run(
                    functools.partial(
                        _autodiff.projections, run.problem, modes, run.kind, run.plan
                    ),
                    run.seeds,
                    run.inputs.diff,
                    run.inputs.traced(),
                    # float64 step sizes for float64 params: directions identical to
                    # the reference's, not rounded to float32
                    rows.astype(_precision.accumulator([run.tested])),
                    index,
                    run.signs(index),
                    _cast_scales(output_scales(run.probe), _precision.accumulator([run.tested])),
                )
            )
        except TypeError as err:
            if "forward" not in modes or "custom_vjp" not in str(err):
                raise
            if run.modes == ("forward",):
                raise TypeError(
                    "mode='forward' needs forward-mode autodiff (jvp), but fn contains a "
                    "jax.custom_vjp function, which has no jvp. Use mode='reverse' to "
                    f"check its custom rule. (JAX: {JAX_NO_JVP})"
                ) from err
            run.modes = ("reverse",)
            run.problems.append(NO_JVP)
            return _evaluate_batch(run, index, rows, h, offsets)
    out = _reference(run, index, rows, h, offsets)
    run.evaluations += len(offsets) * len(index) + 1
    if projections:
        out["rev"] = out.pop("test_rev", native.get("rev"))
        out["fwd"] = native.get("fwd")
    return out


def _folded(run: Run, modes, index, rows) -> dict:
    """The projections along directions `index` formed on the host from the probe's
    unit-step ones (`_autodiff.probe_folded`), or {} when it did not project them all."""
    names = [{"reverse": "rev", "forward": "fwd"}[m] for m in modes]
    mats = {name: run.probe.get("fold_" + name) for name in names}
    known = run.probe.get("fold_index")
    if known is None or any(x is None for x in mats.values()):
        return {}
    at = np.minimum(np.searchsorted(known, index), len(known) - 1)  # known is ascending
    if not np.array_equal(known[at], index):
        return {}
    return {name: _autodiff.folded(x, at, rows) for name, x in mats.items()}


def _reference(run: Run, index, rows, h, offsets) -> dict:
    """The finite-difference program, in float64 when the policy allows it; when fn
    cannot run so, in the model's precision (at least float32), and last with every
    input in its own dtype (fn mixes a low-precision array it closes over with its
    inputs, say)."""
    if run.reference is not None:
        with (
            _precision.widened_closures(run.problem.fn) if run.widened else contextlib.nullcontext()
        ):
            return _reference_in(run, run.reference, run.cast, index, rows, h, offsets)
    wanted = _precision.reference_dtype(run.policy, run.tested)
    native = _precision.reference_dtype("native", run.tested)
    attempts = [(wanted, True)]
    if run.policy == "auto" and wanted != native:
        attempts.append((native, True))
    if run.policy != "float64":
        attempts.append((run.tested, False))
    for i, (dtype, cast) in enumerate(attempts):
        try:
            if run.problem.widen and cast and np.dtype(dtype) == np.float64:
                return _rounding_closures_widened(run, dtype, index, rows, h, offsets)
            return _reference_in(run, dtype, cast, index, rows, h, offsets)
        except Exception as err:  # noqa: BLE001 - any failure of fn in that precision
            out = _closures_widened(run, dtype, cast, index, rows, h, offsets, err)
            if out is not None:
                return out
            out = _ints_widened(run, dtype, cast, index, rows, h, offsets, err)
            if out is not None:
                return out
            out = _without_rule(run, dtype, cast, index, rows, h, offsets, err)
            if out is not None:
                return out
            if run.policy == "float64" and _fn_failed(err):
                # fn ran in its own precision (the probe): float64 is what it refused
                raise ValueError(
                    f"precision='float64', but fn could not run in float64 ({one_line(err)})"
                    f"{_hint(err)}. Pass precision='auto' to fall back to the model's "
                    "precision (the report says so), or make fn accept float64 inputs."
                ) from err
            if i + 1 == len(attempts):
                raise
            after = (
                f"finite differences use {attempts[i + 1][0].name}"
                if attempts[i + 1][1]
                else "finite differences leave every input in its own dtype"
            )
            where = f"in {dtype.name}" if cast else "with its inputs in their own dtypes"
            # (not where a rule is being checked on its own already)
            alone = TRACED_RULE.get() or PRIMAL_ROW.get()
            run.problems.append(
                f"fn could not run {where} ({one_line(err)}); {after}, "
                "so the resolution is coarser"
                + (
                    ""
                    if alone
                    # (not verify_rule: a rule refusing float64 falls back there too,
                    # where rules=True evaluates its program, traced in fn, in float64)
                    else " (a custom rule inside, a Pallas kernel's say, is resolved more "
                    "finely on its own: rules=True)"
                )
                + _hint(err)
            )
    raise AssertionError("unreachable")


def _closures_widened(run: Run, dtype, cast, index, rows, h, offsets, err) -> dict | None:
    """The finite differences in float64 with the float32 arrays fn closes over cast to
    float64 too (`_precision.widened_closures`), where fn mixed them with its float64
    inputs and failed (`err`: a scan's carry starting from one changed type); None where
    that is not the failure, or there are none, or it fails again."""
    if not cast or np.dtype(dtype) != np.float64:
        return None
    again = _precision.again_widened(
        run.problem.fn, err, lambda: _reference_in(run, dtype, cast, index, rows, h, offsets)
    )
    if again is None:
        return None
    out, widened = again
    run.widened = True
    run.problems.append(
        f"fn mixed {_HELD_DATA} with its float64 inputs ({one_line(err)}); {_cast_too(widened)}"
    )
    return out


def _ints_widened(run: Run, dtype, cast, index, rows, h, offsets, err) -> dict | None:
    """The finite differences in float64 with fn's int32 array inputs cast to int64, where
    fn mixed them with its own integers, which 64-bit types make int64, and failed (`err`:
    `lax.fori_loop(0, n)` with `n` an int32 argument); None where that is not the failure,
    or there are none, or it fails again."""
    if not cast or np.dtype(dtype) != np.float64 or not _precision.int_mismatch(err):
        return None
    p_arrays, _, a_arrays = run.inputs.traced()
    n = sum(getattr(x, "dtype", None) == np.int32 for x in (*p_arrays, *a_arrays))
    if not n:
        return None
    run.wide_ints = True
    try:
        out = _reference_in(run, dtype, cast, index, rows, h, offsets)
    except Exception:  # noqa: BLE001 - the caller's other fallbacks follow
        run.wide_ints = False
        return None
    run.problems.append(
        f"fn mixed int32 arrays among its inputs with 64-bit integers of its own in float64 "
        f"({one_line(err)}); finite differences in float64 ran with them cast to int64 ({n} "
        f"array{'s' if n > 1 else ''}, the same values)"
    )
    return out


# the notes on data cast for the reference, which say how it ran, not what it found
CAST_NOTES = (
    "fn rounds to float32 in float64 only through",
    "fn mixed int32 arrays among",
    "fn mixed float32 arrays it closes over",
)

# the data `_precision.widened_closures` casts, as the notes name it
_HELD_DATA = (
    "float32 arrays it closes over (or reads from its module's globals, or has bound by "
    "functools.partial)"
)


def _cast_too(n: int) -> str:
    """What the notes of `widened_closures`' casts end with: `n` arrays cast."""
    return (
        f"finite differences in float64 ran with them cast to float64 too ({n} "
        f"array{'s' if n > 1 else ''}, cast exactly: their values are the same)"
    )


def _rounding_closures_widened(run: Run, dtype, index, rows, h, offsets) -> dict:
    """The finite differences in float64 with the float32 arrays fn closes over cast to
    float64 too, where with them as they are fn rounds to float32 (`_problem._rounds_to`:
    a derivative fn takes in them, which JAX returns in their dtype)."""
    with _precision.widened_closures(run.problem.fn):
        out = _reference_in(run, dtype, True, index, rows, h, offsets)
    if not run.widened:
        run.widened = True
        n = run.problem.widen
        run.problems.append(
            f"{CAST_NOTES[0]} {_HELD_DATA}, mixed with its "
            "float64 inputs (a derivative fn takes in them is returned in their dtype); "
            f"{_cast_too(n)}"
        )
    return out


def _without_rule(run: Run, dtype, cast, index, rows, h, offsets, err) -> dict | None:
    """The finite differences in `dtype` without the derivative under test's own rule in
    it, where the program with the rule failed (`err`) and fn alone runs in `dtype` (a
    custom rule's fwd or bwd, or a grad_fn, that refuses float64): fn's values are still
    resolved finely, while the tested derivative's rounding goes unmeasured (it is held to
    the coarser tolerance of a derivative with nothing finer to compare with). None where
    fn alone fails too, or `dtype` has no rule to leave out."""
    if not _verdict.with_rule(run, dtype) or not _fn_failed(err):
        return None
    run.rule_refused = one_line(err)
    try:
        out = _reference_in(run, dtype, cast, index, rows, h, offsets)
    except Exception:  # noqa: BLE001 - fn itself fails in dtype: the caller falls back
        run.rule_refused = ""
        return None
    source = "grad_fn" if run.problem.grad_fn is not None else "the derivative under test"
    run.problems.append(
        f"{source} could not run in {jnp.dtype(dtype).name} ({run.rule_refused}), though fn "
        f"itself does: finite differences use {jnp.dtype(dtype).name}, but the "
        f"{run.tested.name} derivative's own rounding is not measured against its rule in "
        f"{jnp.dtype(dtype).name}, so it is held to a coarser tolerance (the square root of "
        f"{run.tested.name}'s epsilon). A custom rule's fwd/bwd that accepts "
        f"{jnp.dtype(dtype).name} inputs is judged more finely{_hint(err)}"
    )
    return out


def _fn_failed(err) -> bool:
    """Whether `err` is fn's own failure rather than one jaxcheck handles itself (a failed
    check, a traced value that leaked into the program)."""
    if isinstance(err, GradientCheckError | jax.errors.UnexpectedTracerError):
        return False
    return "Computation compiled for" not in str(err)


def _hint(err) -> str:
    """Why fn may have mixed float32 and float64 values, where `err` says it did."""
    if not _precision.stale_constants(err):
        return ""
    if TRACED_RULE.get():
        return f"; {_precision.TRACED_RULE_HINT}"
    return f"; {_precision.STALE_HINT}"


def _reference_in(run: Run, dtype, cast, index, rows, h, offsets) -> dict:
    scales, g = output_scales(run.probe), run.probe.get("grad")
    with _reference_program(run, dtype, cast, index, rows, h, offsets, scales, g) as (
        program,
        args,
    ):
        out = to_host(run.timer.run(program, *args))
    run.reference, run.cast = jnp.dtype(dtype), cast
    return out


def reference_ahead(run: Run, n: int, probe_info: dict) -> None:
    """Lower the first finite-difference program (fn at +-h along the first `n`
    directions, in the reference precision) and start compiling it, while the probe's
    program compiles: its inputs' shapes follow from those of the probe's outputs
    (`probe_info`, `jax.ShapeDtypeStruct`s); their values do not count (`_plan.lower_ahead`)."""
    if run.reference is not None or run.plan.direction_sharding is not None:
        return
    if any(run.plan.leaf_shardings):  # the gradient's sharding is known once it is compiled
        return
    dtype = _precision.reference_dtype(run.policy, run.tested)
    index = np.arange(n, dtype=np.int32)
    rows = np.zeros((n, len(run.inputs.diff)))
    # the probe's scales come to the host as NumPy values, its gradient stays as it is
    scales = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), output_scales(probe_info))
    g = probe_info.get("grad") if run.problem.scalar_output else None
    outer = _differences.OUTER
    widened = run.problem.widen and np.dtype(dtype) == np.float64  # (as `_reference` runs it)
    with (
        _precision.widened_closures(run.problem.fn) if widened else contextlib.nullcontext(),
        _reference_program(run, dtype, True, index, rows, 1.0, outer, scales, g) as (
            program,
            args,
        ),
    ):
        _plan.lower_ahead(program, args)


@contextlib.contextmanager
def _reference_program(run: Run, dtype, cast, index, rows, h, offsets, scales, g):
    """The finite-difference program and its inputs (given the probe's output `scales` and
    gradient `g`), in the precision it is traced in."""
    wide = dtype == jnp.float64
    work = jnp.dtype(dtype) if cast else _precision.accumulator([dtype])
    with _precision.x64_scope(True) if wide else contextlib.nullcontext():
        with_rule = _verdict.with_rule(run, dtype)
        program = functools.partial(
            _differences.reference,
            run.problem,
            run.modes,
            run.kind,
            run.plan,
            offsets,
            offsets == _differences.OUTER,
            with_rule,
            jnp.dtype(dtype) if cast else None,
            work,
        )
        p_arrays, a_floats, a_arrays = run.inputs.traced()
        if run.wide_ints:
            p_arrays, a_arrays = map(_precision.int64_inputs, (p_arrays, a_arrays))
        yield (
            program,
            (
                run.seeds,
                run.inputs.diff,
                (p_arrays, a_floats, a_arrays),
                rows.astype(work),
                index,
                run.signs(index),
                _cast_scales(scales, work),
                g,
                np.asarray(h, work),
            ),
        )
