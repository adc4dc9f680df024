"""Host-side guards around a check: it reads numbers back and decides, so it refuses traced
inputs, runs jaxcheck's own programs with the debug flags off (keeping the caller's for fn),
and widens float64 NumPy params to float64 when 64-bit types are off."""

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import _plan, _precision, _problem
from ._errors import GradientCheckError

# the caller's (jax_debug_nans, jax_debug_infs), applied to fn alone when the check finds
# NaN/Inf in it (`_probe.replay_nonfinite`)
DEBUG_FLAGS = contextvars.ContextVar("jaxcheck_debug_flags", default=None)
NOTES = contextvars.ContextVar("jaxcheck_notes", default=())  # for the report's problems
_WIDE_NOTE = (
    "params hold float64 NumPy arrays while 64-bit types are off: the check ran with them "
    "on, so that the float64 parameters are checked as float64 (not rounded to float32)"
)
# set while a check whose float64 NumPy params could not run in float64 runs with 64-bit
# types off: the checks it runs inside do not try again (nor add the note again)
NARROWED = contextvars.ContextVar("jaxcheck_narrowed", default=False)
TRACED = (
    "jaxcheck.{who} runs on the host (it reads numbers back and decides), so it cannot be "
    "called inside jax.jit, jax.grad, jax.vmap or any other transformation."
)


def host_side(run):
    """`run` for concrete inputs only, with jaxcheck's own transfers allowed (the function
    under check keeps the caller's transfer guard): a check reads numbers back and
    decides, so it cannot be traced, and nothing derived from a traced value may reach
    its caches."""

    @functools.wraps(run)
    def checked(fn, params, args, options):
        # float64 NumPy params are checked as float64 (the caller's args keep jax's default)
        if not _widened(params):
            return guarded(fn, params, args, options)
        with _precision.x64_scope(True):
            try:
                with _contextvar(NOTES, NOTES.get() + (_WIDE_NOTE,)):
                    return guarded(fn, params, args, options)
            except GradientCheckError:
                raise
            except Exception as err:
                stale = _precision.stale_constants(err)
                # (or fn refuses float64 inputs: a rule casting its tangent to float32, a
                # Pallas kernel or a callback declaring a float32 output)
                if not stale and not isinstance(err, TypeError | ValueError):
                    raise
                widened = err
                first = (str(err).strip().splitlines() or [""])[0][:100]
                how = "fn mixed float32 and float64 values" if stale else "fn raised"
                note = (
                    "params hold float64 NumPy arrays while 64-bit types are off; with them "
                    f"on, {how} ({type(err).__name__}: {first}), so it was checked as jax "
                    "runs it, with them off (params rounded to float32)"
                    + (f". {_precision.STALE_HINT}" if stale else "")
                )
        with _contextvar(NOTES, NOTES.get() + (note,)), _contextvar(NARROWED, True):
            try:
                return guarded(fn, params, args, options)
            except GradientCheckError:
                raise
            except Exception:
                if stale:
                    raise
                raise widened from None  # (fails as jax runs it too: its first error stands)

    def guarded(fn, params, args, options):
        # jaxcheck's own programs make infinities on purpose (overflow-safe scales, probes
        # far from params): they run with the debug flags off, and the caller's flags are
        # applied to fn alone when the check finds NaN/Inf in it (`_probe.replay_nonfinite`)
        flags = DEBUG_FLAGS.get()  # already set when one check runs others
        if flags is None:
            flags = (jax.config.jax_debug_nans, jax.config.jax_debug_infs)
        # (under the caller's jax.disable_jit() the programs compile all the same: a
        # function that needs it, branching in Python on values, is run eagerly anyway)
        with (
            _plan.own_transfers(),
            jax.debug_nans(False),
            jax.debug_infs(False),
            jax.disable_jit(False),
            _contextvar(DEBUG_FLAGS, flags),
            _contextvar(_plan.RUNNING, _plan.RUNNING.get() or object()),
        ):
            refuse_traced({"params": params, "args": args})
            try:
                return run(fn, params, args, options)
            except (jax.errors.UnexpectedTracerError, TypeError) as err:
                # a closed-over tracer becomes a hidden input of the compiled program, which
                # then refuses its inputs ("compiled for 6 inputs but called with 2"), or a
                # constant of it that XLA cannot hold ("No constant handler for type:
                # DynamicJaxprTracer", a rule in a scan body closing over its index)
                said = str(err)
                leaked = "Computation compiled for" in said or (
                    "No constant handler" in said and "Tracer" in said
                )
                if isinstance(err, TypeError) and not leaked:
                    raise
                _plan.forget(fn)
                _problem.forget(fn)
                if _outside_transformations():  # no enclosing trace: the leak is fn's own
                    raise TypeError(
                        "fn leaks a value it traced: a custom_vjp/custom_jvp defined inside "
                        "fn whose function or rule closes over a value fn computes from its "
                        "inputs (JAX cannot differentiate such a closure: jax.grad(fn) fails "
                        "the same way; pass the value to the rule as an argument), or fn "
                        "keeps a traced value in a global or an attribute and uses it on a "
                        f"later call ({type(err).__name__})."
                    ) from err
                raise TypeError(
                    f"{TRACED.format(who='verify')} fn closes over a traced value (an array "
                    "of an enclosing jax.jit, jax.grad or jax.vmap); pass it as an argument "
                    "instead: verify(fn, params, x)."
                ) from err

    return checked


def _widened(params) -> bool:
    """Whether a check of `params` runs with 64-bit types on where they are off (float64
    NumPy params are checked as float64)."""
    return _wide_numpy(params) and not _precision.x64_enabled() and not NARROWED.get()


def x64_as_checked(params):
    """The 64-bit setting a check of `params` runs under, for what is traced of fn before
    it (its fingerprint): JAX keeps the float32 conversion of a NumPy array fn closes over,
    made while 64-bit types are off, and hands it to fn's float64 programs later."""
    return _precision.x64_scope(True) if _widened(params) else contextlib.nullcontext()


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


def refuse_traced(trees: dict, who: str = "verify") -> None:
    """Raise a TypeError naming the first traced leaf of `trees` (name -> pytree), or saying
    that a transformation is tracing, for jaxcheck's entry point `who`; a ValueError naming
    the first deleted array (donated to a jitted function) among them, and a TypeError
    naming the first jax.ShapeDtypeStruct (no values to compute with)."""
    traced = TRACED.format(who=who)
    for where, tree in trees.items():
        leaves = jax.tree_util.tree_leaves(tree)
        if not any(_unusable(x) for x in leaves):
            continue
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if isinstance(leaf, jax.ShapeDtypeStruct):
                raise TypeError(
                    f"The {where} leaf {jax.tree_util.keystr(key_path) or '(root)'} is a "
                    f"jax.ShapeDtypeStruct ({leaf.dtype}{list(leaf.shape)}): a shape and dtype "
                    "without values, which fn cannot compute with. Pass an array, say "
                    "jnp.zeros(s.shape, s.dtype) or the model's initialized parameters."
                )
            if _deleted(leaf):
                raise ValueError(
                    f"The {where} leaf {jax.tree_util.keystr(key_path) or '(root)'} is an "
                    "array that has been deleted (donated to a jax.jit function with "
                    "donate_argnums, say, or deleted with .delete()): its buffer is gone. "
                    "Pass the arrays that function returned instead."
                )
            if isinstance(leaf, jax.core.Tracer):
                raise TypeError(
                    f"{traced} The {where} leaf {jax.tree_util.keystr(key_path) or '(root)'} "
                    f"is a traced value. Call {who} outside the transformation, on concrete "
                    "arrays."
                )
    # inside jax.jit even new constants are traced: jaxcheck's programs would be staged
    # into the caller's instead of run. Outside any transformation (where JAX says so
    # itself) there is nothing to try, which spares a dispatch on every check
    if _outside_transformations():
        return
    if isinstance(jnp.zeros((), jnp.float32), jax.core.Tracer):
        raise TypeError(f"{traced} Call it outside jax.jit, on concrete arrays.")


def _unusable(x) -> bool:
    return isinstance(x, jax.core.Tracer | jax.ShapeDtypeStruct) or _deleted(x)


def _deleted(x) -> bool:
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
        return False
    is_deleted = getattr(x, "is_deleted", None)
    return callable(is_deleted) and bool(is_deleted())


def _outside_transformations() -> bool:
    """Whether no JAX transformation is tracing now (False where this JAX does not say)."""
    from jax._src import core  # noqa: PLC0415 - feature-detected, not public

    clean = getattr(core, "trace_state_clean", None)
    return bool(clean()) if callable(clean) else False
