"""Rows compared without finite differences (jaxcheck.verify_rule's properties, verify's
transforms): two computations that must agree up to rounding, compared with a tolerance
from the dtype; a report part per row, in which an error raised by either computation is
a failing row that names it; and one composite report from such parts."""

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import _plan, _precision, _tree
from ._error_model import Comparison
from ._errors import one_line
from ._report import SEVERITY, Report, Status, measured

EXACT_EPS = 1000.0  # tolerance of the rows, in machine epsilons of the inputs' dtype
EXACT_FLOOR = 1e-10  # ... never tighter than this (float64 linear algebra reorders sums)
# ... and, for the primal row (a rule's forward pass against its function: the same
# arithmetic), never looser than this: 1000 eps would be 7.8 in bfloat16 and 0.98 in
# float16, where a forward pass 50 % off passed; 0.2 is 25 bfloat16 quanta of RMS error.
# The other rows keep 1000 eps: a correct jvp in bfloat16 (jnp.sinc's, whose tangent
# cancels) is linear to only 0.29 there.
EXACT_CAP = 0.2


def tolerance(dtype, rtol=None, cap=math.inf) -> float:
    """EXACT_EPS eps of `dtype`, at least EXACT_FLOOR and at most `cap`, or `rtol` when that
    is larger."""
    own = min(max(EXACT_EPS * _precision.eps(dtype), EXACT_FLOOR), cap)
    return max(own, rtol or 0.0)


def inexact(x) -> bool:
    # (the dtype read without converting: a NumPy float64 of 1e40 overflowed, and NumPy
    # warned, when cast to float32 with 64-bit types off)
    dtype = x.dtype if hasattr(x, "dtype") else jnp.result_type(x)
    return jnp.issubdtype(dtype, jnp.inexact)


def random_like(x, rng, scale=True):
    """Random signs times x's RMS (1 where x is all zeros) in x's dtype; float0 for ints.
    Drawn on the host: eager jax.numpy on the device compiles small programs for each new
    shape and dtype of a rule's inputs (four for an RMS: 0.1 s or more per rule)."""
    x = _tree.as_array(x)
    if not inexact(x):
        return np.zeros(x.shape, jax.dtypes.float0)
    rms = _rms_on_host(x) if scale else 1.0
    rms = rms if rms > 0 and math.isfinite(rms) else 1.0
    signs = rng.integers(0, 2, size=x.shape) * 2.0 - 1.0
    if jnp.issubdtype(x.dtype, jnp.complexfloating):  # real and imaginary parts both
        signs = (signs + 1j * (rng.integers(0, 2, size=x.shape) * 2.0 - 1.0)) / math.sqrt(2)
    return jax.device_put(np.asarray(signs * rms).astype(x.dtype))


def _rms_on_host(x) -> float:
    """RMS of |x| (of a real x in float64), on the host."""
    h = _plan.host_array(x)
    return rms(np.abs(h) if np.iscomplexobj(h) else np.abs(h.astype(np.float64)))


def _dtype(x):
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def host(x) -> np.ndarray:
    """x read back as float64 (gathered first when it spans several processes); a complex
    x as its real and imaginary parts (a trailing axis of 2), so that both are compared."""
    x = _plan.host_array(x)
    if np.iscomplexobj(x):
        return np.stack([x.real, x.imag], axis=-1).astype(np.float64)
    return x.astype(np.float64)


def flat(tree) -> np.ndarray:
    """The floating leaves of `tree`, as one float64 vector: integer and boolean values (a
    solver's step count, which a vmapped solve may take differently) carry no derivative,
    nor do their float0 tangents."""
    leaves = [
        host(x).ravel()
        for x in jax.tree_util.tree_leaves(tree)
        if _dtype(x) != jax.dtypes.float0 and jnp.issubdtype(_dtype(x), jnp.inexact)
    ]
    return np.concatenate(leaves) if leaves else np.zeros(0)


def rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if np.size(x) else 0.0


def exact(name, a, b, tol, scale=None) -> Comparison:
    """`a` against `b` (pytrees or arrays), relative to RMS(b) (or `scale` when larger)."""
    a, b = flat(a), flat(b)
    if a.shape != b.shape:
        return Comparison(name, math.inf, (math.inf, math.inf), 0.0, 0.0, tol, 0, False)
    both = np.isfinite(a) & np.isfinite(b)
    if not np.array_equal(np.isfinite(a), np.isfinite(b)):
        return Comparison(name, math.inf, (math.inf, math.inf), 0.0, 0.0, tol, a.size, False)
    denom = max(rms(b[both]), scale or 0.0) or max(rms(a[both]), 1e-300)
    err = rms(a[both] - b[both]) / denom
    return Comparison(name, err, (err, err), 0.0, 0.0, tol, int(a.size), bool(err <= tol))


def failed(name, tol) -> Comparison:
    return Comparison(name, math.inf, (math.inf, math.inf), 0.0, 0.0, tol, 1, False)


def part(label, comparison: Comparison, dtype, seconds, problems=(), status=None) -> Report:
    """A report of one FD-free property."""
    if status is None:
        status = Status.PASS if comparison.passed else Status.FAIL
    return Report(
        status=status,
        relative_error=comparison.relative_error,
        interval=comparison.interval,
        tolerance=comparison.tolerance,
        noise_floor=0.0,
        checks=(comparison,),
        leaves=(),
        held_fixed=(),
        mode="reverse",
        tested_dtype=str(jnp.dtype(dtype)),
        reference_dtype=str(jnp.dtype(dtype)),
        step=math.nan,
        steps_tried=(),
        num_directions=0,
        num_nonsmooth=0,
        num_nonfinite=0,
        num_subgradient_consistent=0,
        num_evaluations=0,
        problems=tuple(problems),
        compile_seconds=0.0,
        run_seconds=seconds,
        label=label,
    )


def error_problem(label: str, err: Exception) -> str:
    cause = err.__cause__
    if isinstance(cause, Exception) and untransposed(cause):
        err = cause  # (verify's words for fn; the rule's row has its own)
    if untransposed(err):
        return (
            f"{label}: JAX could not transpose the rule's jvp into a vjp ({one_line(err)}, "
            "in JAX's backward pass): a custom_jvp whose tangent is not linear in the input "
            "tangents (an abs, a product or a branch on them) has no vjp; see the jvp "
            "linearity row"
        )
    return f"{label}: {one_line(err)}"


# set on an assertion without a message found, on a second trace, to be raised in one of
# JAX's transpose rules (`untransposed_when_traced`)
UNTRANSPOSED = "_jaxcheck_untransposed"


def untransposed(err: Exception) -> bool:
    """Whether `err` is JAX's assertion while it transposes a linear map (a jvp that is
    not linear in its tangents): `AssertionError: (ValAccum(float32[3]), ...)` in jax
    0.10, naming its internal accumulators or undefined primals (its own frames are
    filtered out of the traceback, so the message is what is left to tell); an assertion
    without a message raised in a transpose rule (`bilinear_transpose`, `_mul_transpose`)
    in older JAX, whose frames are still there."""
    if not isinstance(err, AssertionError):
        return False
    text = str(err)
    if "ValAccum(" in text or "UndefinedPrimal" in text:
        return True
    if getattr(err, UNTRANSPOSED, False):
        return True
    return not text.strip() and any(
        "transpose" in name or name == "backward_pass" for name in _frame_names(err)
    )


def untransposed_when_traced(err: Exception, pullback) -> bool:
    """For an assertion without a message (older JAX's failure to transpose, its frames
    filtered out of the traceback at jax.jit's boundary): whether running `pullback()`
    (fn's vjp, traced abstractly; or the computation that raised it) with JAX's traceback
    filtering off raises one in a transpose rule. If so, `err` is marked, and
    `untransposed(err)` holds from then on."""
    filtering = getattr(getattr(jax, "_src", None), "config", None)
    filtering = getattr(filtering, "traceback_filtering", None)
    if not isinstance(err, AssertionError) or str(err).strip() or filtering is None:
        return False
    try:
        with filtering("off"):
            pullback()
    except AssertionError as again:
        if untransposed(again):
            setattr(err, UNTRANSPOSED, True)
            return True
        return False
    except Exception:  # noqa: BLE001 - another failure: not this one
        return False
    return False


def _frame_names(err: Exception) -> list[str]:
    """The names of the functions in `err`'s traceback."""
    names, tb = [], err.__traceback__
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return names


def guarded(label, name, tol, dtype, compute):
    """`compute()` -> (Comparison, problems), a failing row naming the error if it raises."""
    start = time.perf_counter()
    try:
        comparison, problems = compute()
    except Exception as err:  # noqa: BLE001 - any error of the rule is the finding
        if effect_refused(err):  # (but JAX's refusal of what the rule is allowed to do)
            comparison = Comparison(name, math.nan, (math.nan, math.nan), 0.0, 0.0, tol, 0, True)
            reason = (
                f"{label}: not checked: JAX cannot run the rule's side effects under that "
                f"transformation ({one_line(err)}); jax.grad of a function calling it runs"
            )
            return part(label, dataclasses.replace(comparison, judged=False), dtype, 0.0, (reason,))
        untransposed_when_traced(err, compute)  # older JAX's, without a message: marked
        return part(label, failed(name, tol), dtype, 0.0, (error_problem(label, err),))
    seconds = time.perf_counter() - start
    if not comparison.passed:
        problems = (
            *problems,
            f"{name}: relative difference {comparison.relative_error:.1e}, tolerance "
            f"{comparison.tolerance:.1e}",
        )
    return part(label, comparison, dtype, seconds, problems)


def effect_refused(err: Exception) -> bool:
    """Whether `err` is JAX refusing a side effect under a transformation (an ordered
    io_callback under jax.vmap or jax.checkpoint), not an error of the rule."""
    text = str(err)
    return (isinstance(err, ValueError) and "Cannot `vmap` ordered IO callback" in text) or (
        isinstance(err, NotImplementedError) and text.startswith("Effects not supported")
    )


def leaves(tree) -> list:
    return [host(x) for x in jax.tree_util.tree_leaves(tree)]


def floats(tree) -> list:
    """The leaves of `tree` that carry a derivative (not float0: the tangents of integer
    and boolean values)."""
    return [x for x in jax.tree_util.tree_leaves(tree) if _dtype(x) != jax.dtypes.float0]


def dot(a, b) -> tuple[float, float]:
    """The real part of the sum of sum(a * b) over leaves (bilinear: complex values are not
    conjugated), the pairing under which JAX's vjp is the transpose of its jvp for every
    real-linear map (a holomorphic one agrees in the imaginary part too, which the real
    part over random complex vectors already tests; |z|^2 or exp(i x) do not); and the sum
    of <|a|, |b|> (the size of its rounding)."""
    pairs = [
        (x, y)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
        if _dtype(x) != jax.dtypes.float0 and np.size(x)
    ]
    pairs = [(_plan.host_array(x), _plan.host_array(y)) for x, y in pairs]
    complex_ = any(np.iscomplexobj(x) or np.iscomplexobj(y) for x, y in pairs)
    wide = np.complex128 if complex_ else np.float64
    total = sum(np.sum(x.astype(wide) * y.astype(wide)) for x, y in pairs)
    size = sum(np.sum(np.abs(x).astype(np.float64) * np.abs(y)) for x, y in pairs)
    return float(np.real(total)), float(size)


def compose(parts, label: str, base: Report | None = None) -> Report:
    """One report from property reports: worst status, its headline, every row; the
    directions and dtypes of the footer from `base` (the finite-difference part)."""
    base = parts[0] if base is None else base
    parts = tuple(parts)
    # (of equally bad parts, the finite differences' numbers: what the rule was judged by;
    # but a number measured before a part that could not be evaluated, whose error is inf)
    worst = min(
        parts,
        key=lambda p: (
            SEVERITY.index(p.status),
            not measured(p),
            p is not base,
        ),
    )
    failing = [p.label for p in parts if p.status is Status.FAIL]
    problems = []
    if failing:
        problems.append(f"failed: {', '.join(failing)}")
    problems += [p for part in parts for p in part.problems]
    return dataclasses.replace(
        worst,
        checks=tuple(c for p in parts for c in p.checks),
        problems=tuple(dict.fromkeys(problems)),
        num_evaluations=sum(p.num_evaluations for p in parts),
        compile_seconds=sum(p.compile_seconds for p in parts),
        run_seconds=sum(p.run_seconds for p in parts),
        num_compiled=sum(p.num_compiled for p in parts),
        label=label,
        parts=parts,
        num_directions=base.num_directions,
        tested_dtype=base.tested_dtype,
        reference_dtype=base.reference_dtype,
    )
