"""The function under check, seen as a map from differentiable leaves to output leaves."""

import collections
import dataclasses
import inspect
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _fingerprint, _plan, _precision, _retype, _rule_search, _tree

# how an error for an output with no elements begins (check_grads passes there, as JAX does)
EMPTY_OUTPUT = "every output leaf of fn is empty"


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The traced inputs: floating parameter leaves, other parameter arrays, and the
    floating and other array leaves of `*args`."""

    diff: list
    p_arrays: list
    a_floats: list
    a_arrays: list

    def cast(self, dtype) -> "Inputs":
        return Inputs(
            _tree.cast(self.diff, dtype),
            self.p_arrays,
            _tree.cast(self.a_floats, dtype),
            self.a_arrays,
        )

    def traced(self):
        return (self.p_arrays, self.a_floats, self.a_arrays)


@dataclasses.dataclass(frozen=True)
class Problem:
    fn: Callable
    grad_fn: Callable | None
    has_aux: bool
    params: _tree.Split
    args: _tree.Split
    out_treedef: Any = None
    out_paths: tuple[str, ...] = ()
    out_shapes: tuple[tuple[int, ...], ...] = ()
    out_dtypes: tuple[str, ...] = ()
    rounds_to: str | None = None  # see `_rounds_to`
    rounds_at: str = ""  # where fn's trace first casts to `rounds_to` (file:line)
    # how many float32 arrays fn closes over are cast to float64 for the reference, where
    # fn rounds to float32 with them as they are and not with them cast (`_rounds_to`)
    widen: int = 0
    # indices of the differentiable leaves whose values reach no such cast (see `_rounds_to`)
    unrounded: tuple[int, ...] = ()
    # fn's casts to float32 round only in float64, and with its float32 values held in
    # float64 it rounds nothing (`_retype`): the float64 reference runs so
    retyped: bool = False
    float32_products: bool = False  # see `_float32_products`
    has_rules: bool = False  # fn calls a custom_vjp/custom_jvp rule (seen in its jaxpr)
    iterates: bool = False  # fn runs a lax.while_loop stopping on values (a solver, say)
    # no output of fn's trace is computed from a differentiable leaf (fn reads a global
    # copy of the params, say): a flat fn is then no verdict on anything
    unread: bool = False
    # fn calls code whose arithmetic is hidden from its jaxpr (a callback, a kernel: `OPAQUE`)
    opaque: bool = False
    # fn draws from jax.random.gamma (beta and dirichlet draw from it), whose derivative in
    # its shape parameter is not that of the sample at a fixed key
    samples_gamma: bool = False
    # fn draws random bits (dropout's bernoulli, uniform or normal in the default dtype:
    # other numbers in float64 than in float32), or gamma samples (another sample in float64)
    draws_random: bool = False
    # per differentiable leaf: a small vector of packed quantities, whose entries are moved
    # in proportion to their own magnitudes (`_directions.packed_leaves`)
    packed: tuple[bool, ...] = ()
    notes: tuple[str, ...] = ()  # said in the report's problems
    # why fn's evaluations must not be batched by jax.vmap (`unbatched`), or ""
    unbatched: str = ""

    @property
    def source(self) -> str:
        """What computes the derivative under test: "grad_fn" or "autodiff"."""
        return "grad_fn" if self.grad_fn is not None else "autodiff"

    @property
    def scalar_output(self) -> bool:
        return len(self.out_shapes) == 1 and self.out_shapes[0] == ()

    @property
    def value_with_gradient(self) -> bool:
        """Whether fn's value may be taken from jax.value_and_grad of fn: a scalar fn whose
        derivative is autodiff through no custom rule (a rule computes a primal of its own,
        which is compared with fn's), so that fn is traced once for both (at many small
        leaves a trace of fn costs as much as its compile)."""
        return self.scalar_output and self.grad_fn is None and not self.has_rules

    def call(self, diff, p_arrays, a_floats, a_arrays):
        params = _tree.merge(self.params, diff, p_arrays)
        args = _tree.merge(self.args, a_floats, a_arrays)
        return params, args

    def outputs(self, diff, traced) -> list:
        params, args = self.call(diff, *traced)
        out = self.fn(params, *args)
        if self.has_aux:
            out = out[0]
        outs = [jnp.asarray(y) for y in jax.tree_util.tree_leaves(out)]
        shapes = tuple(tuple(y.shape) for y in outs)
        if self.out_shapes and shapes != self.out_shapes:
            # (a NumPy fn evaluated eagerly at the points of the stencil: a traced fn's
            # output structure cannot change with the values)
            got = f"arrays of shapes {list(shapes)}" if outs else f"{type(out).__name__}"
            raise ValueError(
                f"fn returned {got} at a point near params (params + t v, t a finite-"
                f"difference step), where at params it returned shapes "
                f"{list(self.out_shapes)}: fn must return the same structure of arrays at "
                "every point near params (does it return None, or another shape, for some "
                "inputs: a guard against values out of its domain?)."
            )
        return outs

    def gradient(self, diff, traced) -> list:
        """The hand-written gradient's leaves for the differentiable parameters."""
        params, args = self.call(diff, *traced)
        grad = called("grad_fn", self.grad_fn, params, args)
        treedef = self.params.treedef
        if not jax.tree_util.treedef_is_leaf(treedef) and _is_single_array(grad):
            n = treedef.num_leaves
            raise TypeError(
                f"grad_fn returned a single array (shape {np.shape(grad)}) where a pytree like "
                f"params, with {'1 leaf' if n == 1 else f'{n} leaves'} "
                f"({', '.join(self.params.paths)}), was expected. Return the gradient with the "
                "structure of params (jax.grad(fn) does)."
            )
        grads = _tree.match_gradient(self.params, grad)
        # (sharded as its parameter where the mesh's axes are Explicit: a tensor-parallel
        # grad_fn may return another layout, which does not mix with the directions')
        return [_plan.typed_like(jnp.asarray(g), d) for g, d in zip(grads, diff)]

    def scalarize(self, outs: list, cot: list | None):
        if cot is None:
            return outs[0]
        acc = _precision.accumulator([y.dtype for y in outs])
        return sum(_plan.vdot(c.astype(acc), y.astype(acc)) for c, y in zip(cot, outs))


_STRUCTURES = _plan.Kept()


def with_output_structure(problem: Problem, inputs: Inputs) -> Problem:
    """Trace `fn` abstractly once to learn and validate its output structure (remembered
    for the same function and input shapes: tracing a model costs milliseconds)."""
    try:
        key = (problem, _plan.signature((inputs.diff, inputs.traced())))
        known = _STRUCTURES.find(key)
    except Exception:  # noqa: BLE001 - unhashable static leaves: trace every time
        key, known = None, None
    if known is not None:
        return known
    problem = _with_output_structure(problem, inputs)
    if key is not None:
        _STRUCTURES.keep(key, problem)
    return problem


def forget(fn) -> None:
    """Drop the structures remembered for `fn` (one that closed over a traced value)."""
    for key in [k for k in _STRUCTURES if k[0].fn is fn]:
        del _STRUCTURES[key]


def _with_output_structure(problem: Problem, inputs: Inputs) -> Problem:

    def call(diff, traced):
        params, args = problem.call(diff, *traced)
        out = called("fn", problem.fn, params, args)
        if not problem.has_aux:
            return _arrays_only(out)
        if not (isinstance(out, tuple | list) and len(out) == 2):
            what = f"an array of shape {out.shape}" if hasattr(out, "shape") else type(out).__name__
            raise TypeError(
                f"has_aux=True, so fn must return a pair (output, aux); it returned {what}. "
                "Return (loss, aux) or drop has_aux=True."
            )
        return _arrays_only(out[0])  # aux may hold anything, even values jax cannot trace

    try:
        out, jaxpr = _shapes(call, inputs.diff, inputs.traced())
    except ValueError as err:
        if not str(err).startswith(_plan.UNHASHABLE_STATIC):
            raise
        raise ValueError(_static_message(problem, inputs)) from err
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(out)
    if not with_paths:
        raise TypeError(
            "fn returned no array output (an empty pytree or None). It must return a scalar "
            "or a pytree of float arrays."
        )
    for key_path, leaf in with_paths:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"fn's output leaf {jax.tree_util.keystr(key_path) or '(root)'} has dtype {dtype}; "
                "only floating and complex outputs can be differentiated. Cast it to a float dtype "
                "or move it into the auxiliary output with has_aux=True."
            )
    if not any(math.prod(leaf.shape) for _, leaf in with_paths):
        shapes = ", ".join(
            f"{jax.tree_util.keystr(p) or '(root)'} {tuple(leaf.shape)}" for p, leaf in with_paths
        )
        raise ValueError(
            f"{EMPTY_OUTPUT} ({shapes}): there is no derivative to check. Return at least one "
            "element (a scalar loss, for example)."
        )
    problem = dataclasses.replace(
        problem,
        out_treedef=treedef,
        out_paths=tuple(jax.tree_util.keystr(p) for p, _ in with_paths),
        out_shapes=tuple(tuple(leaf.shape) for _, leaf in with_paths),
        out_dtypes=tuple(str(leaf.dtype) for _, leaf in with_paths),
        **({} if jaxpr is None else _rounds_to(jaxpr, inputs.diff, call, inputs, problem.fn)),
        float32_products=jaxpr is not None and _float32_products(jaxpr.jaxpr),
        has_rules=jaxpr is not None and _rule_search.calls(jaxpr.jaxpr, "custom_vjp", "custom_jvp"),
        iterates=jaxpr is not None and _iterates(jaxpr.jaxpr),
        unread=jaxpr is not None and not _reads(jaxpr.jaxpr, len(inputs.diff)),
        opaque=jaxpr is not None and _runs(jaxpr.jaxpr, *OPAQUE),
        samples_gamma=jaxpr is not None and _runs(jaxpr.jaxpr, "random_gamma"),
        draws_random=jaxpr is not None and _runs(jaxpr.jaxpr, "random_bits", "random_gamma"),
        unbatched="" if jaxpr is None else unbatched(jaxpr.jaxpr),
    )
    if problem.grad_fn is not None:
        notes = _check_gradient_shapes(problem, inputs)
        problem = dataclasses.replace(problem, notes=notes)
    if jaxpr is not None and not problem.has_aux and isinstance(out, tuple) and len(out) == 2:
        notes = _aux_like(jaxpr, out, len(inputs.diff))
        problem = dataclasses.replace(problem, notes=(*problem.notes, *notes))
    return problem


def _static_message(problem: Problem, inputs: Inputs) -> str:
    """What to do when a jax.jit function in fn got one of the leaves jaxcheck passes as
    arrays (and traces) for a static argument, which jax.jit must hash."""
    scalars = [
        f"{where}{path}"
        for where, split, leaves in (
            ("params", problem.params, inputs.diff),
            ("args", problem.args, inputs.a_floats),
        )
        for path, x in zip(split.paths_of(_tree.DIFF), leaves)
        if np.ndim(x) == 0
    ]
    which = ""
    if 0 < len(scalars) <= 3:
        which = f" (likely {' or '.join(scalars)}, a float scalar)"
    return (
        "fn could not be traced: a jax.jit function in fn has a static argument "
        "(static_argnums or static_argnames) that got one of the float values jaxcheck "
        f"differentiates{which}, as an array or a traced value, which jax.jit cannot hash "
        f"(JAX: {_plan.UNHASHABLE_STATIC}). {STATIC_HOW}"
    )


# the fix for a float passed on to a static argument of jax.jit (`_static_message`)
STATIC_HOW = (
    "jaxcheck passes every float leaf of params (and NumPy floats in args) to fn as arrays. "
    "Hold that value fixed: pass it in args as a Python float (kept as it is), or close "
    "over it (functools.partial, or a lambda)."
)


def _aux_like(closed_jaxpr, out, num_diff: int) -> tuple[str, ...]:
    """A note when the second of two outputs carries no derivative from params (a
    constant, or computed through comparisons): an auxiliary output without has_aux=True?
    The trace's first `num_diff` inputs are the differentiable parameter leaves."""
    jaxpr = closed_jaxpr.jaxpr
    n_first = len(jax.tree_util.tree_leaves(out[0]))
    tainted = _carries_derivative(jaxpr, [i < num_diff for i in range(len(jaxpr.invars))])
    second = jaxpr.outvars[n_first:]
    if any(_is_tainted(v, tainted) for v in second):
        return ()
    return (
        f"{AUX_NOTE} (no derivative flows to it): if it is an auxiliary output, pass "
        "has_aux=True; it was checked as an output",
    )


AUX_NOTE = "fn returns a pair whose second part does not depend on params"  # (`_aux_like`)


def called(name: str, f, params, args):
    """`f(params, *args)`; where Python refuses the call itself (f takes another number of
    arguments), a TypeError that says how jaxcheck calls it."""
    if isinstance(f, _fingerprint.Keyed):  # (a key for the compiled programs only)
        f = f.f
    try:
        return f(params, *args)
    except TypeError as err:
        tb = err.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is None or tb.tb_frame.f_code is not called.__code__:
            note_inputs(err, name, f, params, args)
            raise  # raised inside f: its own error
        how = (
            f"Define it as def {name}(params, *args), or close over fixed values with "
            "functools.partial."
        )
        if _unpacked_fits(f, params, args):
            n = len(args[0])
            how = (
                f"The extra arguments were given as one {type(args[0]).__name__} of {n}, "
                f"which {name} takes as {n} arguments: pass them one by one, "
                f"verify(fn, params, *args) (verify(fn, params, x, y), not "
                "verify(fn, params, (x, y)))."
            )
        raise TypeError(
            f"{name} was called as {name}(params, *args) with {1 + len(args)} positional "
            f"argument(s) (params and the {len(args)} extra argument(s) given after them) and "
            f"refused them: {err}. {how}"
        ) from err
    except Exception as err:
        note_inputs(err, name, f, params, args)
        raise  # raised inside f: its own error


def _unpacked_fits(f, params, args) -> bool:
    """Whether `args` is one tuple or list whose entries `f` would take as its arguments
    after params (`verify(fn, params, (x, y))` for `fn(params, x, y)`)."""
    if len(args) != 1 or type(args[0]) not in (tuple, list) or len(args[0]) < 2:
        return False
    try:
        signature = inspect.signature(f)
        signature.bind(params, *args[0])
    except (TypeError, ValueError):
        return False
    return True


def note_inputs(err: Exception, name: str, f, params, args) -> None:
    """Add to an error raised inside `f` (its own, kept as it is) what jaxcheck passed it,
    where `f` was called as `f(params, *args)`: params and data given in each other's
    place (`verify(loss, x, params)`) otherwise show only as an error deep inside f."""
    # (check_grads' f takes its args as given: nothing of jaxcheck's to show; a call
    # nested in another noted it already)
    noted = any(n.startswith(_RAISED_INSIDE) for n in getattr(err, "__notes__", ()))
    if isinstance(f, _fingerprint.Keyed):  # (a key for the compiled programs only)
        f = f.f
    if getattr(f, "positional", False) or noted:
        return
    shown = f"params = {_tree.outline(params)}"
    if args:
        shown += f" and args = {_tree.outline(args)}"
    err.add_note(
        f"{_RAISED_INSIDE}{name}, called by jaxcheck as {name}(params, *args) with {shown}; "
        "params, the argument differentiated, comes first)"
    )


_RAISED_INSIDE = "(raised inside "  # how `note_inputs`' note starts


def _is_single_array(x) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic | float | int)


def _arrays_only(out):
    """fn's output, after checking that every leaf is an array or a number."""
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
        if not isinstance(leaf, jax.Array | np.ndarray | np.generic | float | int):
            where = jax.tree_util.keystr(key_path)
            raise TypeError(
                f"fn must return a scalar or a pytree of float arrays; it returned "
                f"{type(leaf).__name__} {_tree.describe(leaf)}"
                f"{' at ' + where if where else ''}. Return arrays (a loss, or model outputs); "
                "put anything else in an auxiliary output with has_aux=True."
            )
    return out


def _shapes(f, *args):
    """(output shapes and dtypes, jaxpr) of f(*args): traced abstractly, or (jaxpr None)
    by calling f when it cannot be traced (it then runs eagerly in the check, too)."""
    try:
        try:
            jaxpr, out = jax.make_jaxpr(f, return_shape=True)(*args)
        except AssertionError:
            if not jax.config.jax_enable_checks:
                raise
            # JAX's checks can assert on a staged trace where running op by op passes
            # (`_probe.under_checks`, which then runs fn's derivatives so, under them)
            with jax.enable_checks(False):
                jaxpr, out = jax.make_jaxpr(f, return_shape=True)(*args)
        return out, jaxpr
    except (*_plan.TRACING_ERRORS, ValueError) as err:
        if not _plan.cannot_trace(err):
            raise
        with _plan.eager():
            out = f(*args)
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(
                np.shape(x), x.dtype if hasattr(x, "dtype") else np.result_type(x)
            ),
            out,
        ), None


def _rounds_to(closed_jaxpr, diff, call, inputs, fn) -> dict:
    """The least precise float dtype that fn explicitly casts values computed from its
    parameters to, when less precise than the parameters themselves (a float32 model
    rounding through float16, say) or than the float64 reference, else None. Such a cast
    stays in the float64 reference: there fn is a staircase of that dtype's quanta, flat
    at the float64 step.

    Parameters cast to their own dtype inside fn (`p.astype(float32)` on float32 params,
    as mixed-precision policies do) leave no trace in fn's own jaxpr, where the cast is a
    no-op, yet round in the float64 reference, as does a cast of them to a more precise
    dtype (bfloat16 params computed in float32): for parameters below float64, fn is
    traced once more as the reference runs it, on float64 parameters, and its casts to
    any dtype below float64 count. Returns the fields `rounds_to`, `rounds_at` and
    `unrounded` of `Problem` (none when there is no such cast): the leaves whose values
    reach no such cast are smooth along their own directions (a float32 weight beside a
    bias cast to float32 in fn), and judged there at the reference's resolution.

    A cast fn makes only because it mixes float32 arrays it closes over with its float64
    parameters (a PINN's residual: a Hessian in float32 collocation points, which JAX
    returns in their dtype) is none: where with those arrays cast to float64
    (`_precision.widened_closures`) the float64 trace casts nothing, the field `widen`
    (their number) is returned instead, and the reference runs with them cast."""
    own = max(_precision.eps(x.dtype) for x in diff)
    traces = [(closed_jaxpr.jaxpr, own)]  # (a trace, the precision its casts go below)
    wide = _precision.eps(jnp.float64)
    if own > wide:
        wide_closed = _traced_in_float64(call, diff, inputs)
        traces += [] if wide_closed is None else [(wide_closed.jaxpr, wide)]

    def rounding(flags, traces=traces) -> dict:
        lowest = {}
        for jaxpr, above in traces:
            for d, at in casts(jaxpr, flags).items():
                if _precision.eps(d) > above:
                    lowest.setdefault(d, at)
        return lowest

    n = len(diff)
    lowest = rounding([True] * n)
    if not lowest:
        return {}
    if len(traces) == 2 and not rounding([True] * n, traces[:1]):  # (fn's own trace: none)
        with _precision.widened_closures(fn) as widened:
            # (a new function: JAX's trace cache, keyed by `call`, holds its first trace)
            fresh = lambda *a: call(*a)  # noqa: E731
            again = _traced_in_float64(fresh, diff, inputs) if widened else None
        if again is not None and not rounding([True] * n, [(again.jaxpr, wide)]):
            return {"widen": widened}
        retyped = _retyped_rounds_nothing(wide_closed, n)
    else:
        retyped = False
    dtype = _precision.lowest(list(lowest))
    unrounded = ()
    if not retyped and 1 < n <= MAX_LEAVES_TRACED_ALONE:
        unrounded = tuple(i for i in range(n) if not rounding([j == i for j in range(n)]))
    return {
        "rounds_to": dtype.name,
        "rounds_at": lowest[dtype] + (CLOSED_RULE if retyped is None else ""),
        "unrounded": unrounded,
        "retyped": bool(retyped),
    }


# in `rounds_at` where fn's casts would round nothing but for a custom rule's derivative
# reading a value fn computed, which its program cannot be evaluated without
CLOSED_RULE = ", where a custom rule's derivative reads a value fn computes"


def _retyped_rounds_nothing(closed, n: int) -> bool | None:
    """Whether fn's float64 trace `closed` (its first `n` inputs the differentiable
    leaves), evaluated with its float32 values held in float64 (`_retype`), rounds no
    value computed from them: then the reference runs so. None where a custom rule's
    derivative reads a value of fn's own trace (`CLOSED_RULE`)."""
    try:
        with _precision.x64_scope(True), jax.enable_checks(False), _precision.widening():
            # (as the reference runs it: the parameters held, the data as fn has them)
            held = [i < n for i in range(len(closed.in_avals))]
            shapes = [
                jax.ShapeDtypeStruct(a.shape, _retype.wider(a.dtype) if h else a.dtype)
                for a, h in zip(closed.in_avals, held)
            ]

            def run(*a):
                return _retype.evaluate(closed.jaxpr, closed.consts, *a, held=held)

            again = jax.make_jaxpr(run)(*shapes)
            # its derivative traced too: a rule whose bwd closes over a value fn computed
            # in its own trace reads it there, a tracer of that trace, in no other one
            pulled = jax.make_jaxpr(lambda *a: _pulled_back(lambda *d: run(*d, *a[n:]), a[:n]))
            if any(isinstance(c, jax.core.Tracer) for c in pulled(*shapes).consts):
                return None
    except Exception:  # noqa: BLE001 - a part that cannot be retyped: fn is judged as it rounds
        return False
    if _retype.narrows(again.jaxpr, held):
        return False
    wide = _precision.eps(jnp.float64)
    return all(_precision.eps(d) <= wide for d in casts(again.jaxpr, [True] * n))


def _pulled_back(f, primals) -> list:
    """The cotangents of `primals` that unit cotangents of `f`'s outputs pull back."""
    outs, pull = jax.vjp(f, *primals)
    return pull([_tree.unit_like(o) for o in outs])


# beyond this many leaves, none is looked at alone for the casts its values reach
MAX_LEAVES_TRACED_ALONE = 64


_PRODUCTS = ("dot_general", "conv_general_dilated")


def _float32_products(jaxpr) -> bool:
    """Whether fn multiplies float32 matrices (or convolves) at the default precision,
    which GPUs run in TensorFloat-32 unless `jax_default_matmul_precision` says otherwise."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _PRODUCTS and _default(eqn.params.get("precision")):
            if any(getattr(v.aval, "dtype", None) == jnp.float32 for v in eqn.invars):
                return True
        if any(_float32_products(sub) for sub in _subjaxprs(eqn.params)):
            return True
    return False


def _default(precision) -> bool:
    items = precision if isinstance(precision, tuple | list) else (precision,)
    return all(p is None or p == jax.lax.Precision.DEFAULT for p in items)


def _traced_in_float64(call, diff, inputs):
    """fn's closed jaxpr traced on float64 parameters (None when it cannot be)."""
    try:
        # jaxcheck's own trace, as its compiled programs are: without the caller's checks
        with _precision.x64_scope(True), jax.enable_checks(False), _precision.widening():
            wide = [jax.ShapeDtypeStruct(np.shape(x), jnp.float64) for x in diff]
            # the reference casts the floating args to float64 too
            p_arrays, a_floats, a_arrays = inputs.traced()
            a_wide = [jax.ShapeDtypeStruct(np.shape(x), jnp.float64) for x in a_floats]
            return jax.make_jaxpr(call)(wide, (p_arrays, a_wide, a_arrays))
    except Exception:  # noqa: BLE001 - the reference falls back and says why, elsewhere
        return None


def casts(jaxpr, tainted_inputs, sinks=None) -> dict:
    """Float dtypes (each with where fn's trace first casts to it) of the
    convert_element_type equations of `jaxpr` (and its
    sub-jaxprs) that round a float value depending on the inputs flagged in
    `tainted_inputs` (the leading input variables) on its way to the outputs, and those
    its reduce_precision equations round like.

    Only float values carry a derivative: an integer or boolean (a comparison, argmax) cast
    to float is not rounding, and neither is a cast whose result never reaches an output
    (an auxiliary metric, a running statistic, an unused value). `sinks`: which input refs
    of a kernel's jaxpr hold outputs its caller uses (`_live`)."""
    tainted = _carries_derivative(jaxpr, tainted_inputs)
    live = _live(jaxpr, sinks)
    found = {}
    for eqn in jaxpr.eqns:
        flags = [_is_tainted(v, tainted) for v in eqn.invars]
        if not any(flags) or not any(_is_tainted(v, live) for v in eqn.outvars):
            continue
        if eqn.primitive.name == "convert_element_type":
            dtype = _rounds_like(eqn.params.get("new_dtype"))
            if (
                dtype is not None
                and jnp.issubdtype(dtype, jnp.floating)
                and flags[0]
                and _inexact(eqn.invars[0])  # (an integer counter cast to float is exact)
            ):
                _first(found, jnp.dtype(dtype), eqn)
        elif eqn.primitive.name == "reduce_precision":
            bits = eqn.params.get("mantissa_bits")
            if bits is not None and bits < jnp.finfo(jnp.float64).nmant:
                _first(found, _rounded_like(bits), eqn)
        elif eqn.params.get("preferred_element_type") is not None:
            # a product computed into a given dtype (dot_general, conv_general_dilated):
            # its result is rounded to it, whatever its operands' precision
            dtype = _rounds_like(eqn.params["preferred_element_type"])
            if jnp.issubdtype(dtype, jnp.floating):
                _first(found, jnp.dtype(dtype), eqn)
        elif eqn.primitive.name in OPAQUE:
            for dtype in _narrowed(eqn, flags, live):
                if dtype not in found:
                    found[dtype] = f"{_rule_search.location(eqn)}{DECLARED}{eqn.primitive.name}"
        loop = _loop_bodies(eqn, flags)
        subs = loop if loop is not None else [(sub, None) for sub in _subjaxprs(eqn.params)]
        for sub, inner in subs:
            n = len(sub.invars)
            if inner is None:
                inner = (
                    flags if n == len(flags) else flags[1:] if n == len(flags) - 1 else [True] * n
                )
            for d, at in casts(sub, inner, _kernel_sinks(eqn, sub, live)).items():
                found.setdefault(d, at)
    return found


DECLARED = ", by the declared output dtype of a "  # in `rounds_at` where an opaque call rounds
# Calls whose outputs' dtypes the caller declares (a Pallas kernel's out_shape, a callback's
# result shape), whatever the inputs' dtypes: float64 inputs may come out in float32
OPAQUE = {"pallas_call", "pure_callback", "io_callback", "ffi_call", "triton_kernel_call"}


def _narrowed(eqn, flags, live) -> list:
    """The float dtypes of the live outputs of an opaque call (`OPAQUE`) less precise than
    its most precise flagged float input: its declared output dtype rounds them."""
    inputs = [v.aval.dtype for v, f in zip(eqn.invars, flags) if f and _inexact(v)]
    if not inputs:
        return []
    widest = min(_precision.eps(_rounds_like(d)) for d in inputs)
    outputs = [
        jnp.dtype(_rounds_like(v.aval.dtype))
        for v in eqn.outvars
        if _inexact(v) and _is_tainted(v, live)
    ]
    return [d for d in outputs if _precision.eps(d) > widest]


def _rounds_like(dtype):
    """The real dtype a cast to `dtype` rounds like (complex64: float32); None as it is."""
    if dtype is not None and jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.finfo(dtype).dtype
    return dtype


def _loop_bodies(eqn, flags):
    """[(sub-jaxpr, its inputs' flags)] of a scan or while loop, whose carry feeds back: a
    carry that a flagged value reaches in one iteration is flagged in the next (a weight
    entering as a loop constant reaches a cast on the carry from the second step on), to
    a fixed point; None for other equations."""
    name = eqn.primitive.name
    if name == "scan":
        body = eqn.params["jaxpr"].jaxpr
        n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
        return [(body, _fixed_point(body, list(flags), n_consts, n_carry))]
    if name == "while":
        body, cond = eqn.params["body_jaxpr"].jaxpr, eqn.params["cond_jaxpr"].jaxpr
        nc, nb = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
        carry = len(flags) - nc - nb
        inner = _fixed_point(body, list(flags[nc:]), nb, carry)
        return [(body, inner), (cond, list(flags[:nc]) + inner[nb:])]
    return None


def _fixed_point(body, inner: list, start: int, n_carry: int) -> list:
    """`inner` (the flags of `body`'s inputs, its carry at `start`) with every carry that a
    flagged input reaches through `body` (its first `n_carry` outputs) flagged too."""
    for _ in range(n_carry + 1):
        tainted = _carries_derivative(body, inner)
        out = [_is_tainted(v, tainted) for v in body.outvars[:n_carry]]
        new = inner[:start] + [a or b for a, b in zip(inner[start : start + n_carry], out)]
        new += inner[start + n_carry :]
        if new == inner:
            break
        inner = new
    return inner


def _carries_derivative(jaxpr, tainted_inputs) -> set:
    """The variables of `jaxpr` that depend on the inputs flagged in `tainted_inputs`
    through float values (an integer or boolean, as a comparison or argmax gives, carries
    no derivative, nor does the output of a stop_gradient); every output of an equation
    with sub-jaxprs counts as depending on all of its inputs."""
    tainted = {v for v, t in zip(jaxpr.invars, tainted_inputs) if t}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "stop_gradient":
            continue  # (what fn computes from it, as an ODE solver's next step size, is
            # held fixed by design: its rounding is no staircase of the derivative's path)
        if any(_is_tainted(v, tainted) for v in eqn.invars):
            tainted.update(v for v in eqn.outvars if _inexact(v))
    return tainted


def _first(found: dict, dtype, eqn) -> None:
    if dtype not in found:  # (a model may cast at every layer: locate the first only)
        found[dtype] = _rule_search.location(eqn) + _inside_jax(eqn)


# JAX's functions that cast because the caller asks them to (the products, through their
# preferred_element_type)
_CASTS = {"astype", "_astype", "asarray", "array", "convert_element_type", "reduce_precision"}
_CASTS |= {"dot", "matmul", "einsum", "tensordot", "dot_general", "vdot", "inner"}
# JAX's machinery between fn and the function it called (jnp.dot is jitted: the frames
# below fn's are the jit wrapper's and the trace's, down to the equation's bind)
_MACHINERY = (
    "traceback_util.py",
    "pjit.py",
    "core.py",
    "partial_eval.py",
    "source_info_util.py",
    "api.py",
    "linear_util.py",
    "profiler.py",
    "dispatch.py",
)
INSIDE_JAX = ", inside JAX's own "  # in `rounds_at` where JAX's code casts, not fn's


def _machinery(path: str) -> bool:
    return path.startswith(_JAX_SRC) and path.endswith(_MACHINERY)


_JAX_PACKAGE = os.path.join(os.path.dirname(jax.__file__), "")
_JAX_SRC = os.path.join(_JAX_PACKAGE, "_src", "")


def _inside_jax(eqn) -> str:
    """ ", inside JAX's own dot_product_attention" where the function of JAX that fn's
    innermost frame calls on the way to the cast `eqn` is not a cast itself (JAX's code
    rounds there whatever the caller's dtypes: jax.nn.dot_product_attention's float32
    softmax), else ""."""
    try:
        frames = list(eqn.source_info.traceback.frames)  # innermost first
        user = next(i for i, f in enumerate(frames) if _rule_search.user_file(f.file_name))
    except Exception:  # noqa: BLE001 - only a label
        return ""
    below = [f for f in reversed(frames[:user]) if not _machinery(f.file_name)]
    if not below:
        return ""  # (a jitted function of JAX's, as jnp.dot: the cast is its equation)
    callee = below[0]
    if not callee.file_name.startswith(_JAX_PACKAGE):
        return ""  # (another library's code, flax's module calls: cast as the user set it up)
    called = callee.function_name.rpartition(".")[2]
    if called in _CASTS or called.startswith(("<", "__")) or "array_methods" in callee.file_name:
        return ""  # (x.astype(...), jnp.float32(x), an operator on an array: fn's own)
    return f"{INSIDE_JAX}{called}"


def _live(jaxpr, sinks=None) -> set:
    """The variables of `jaxpr` that its outputs depend on through float values (every
    output of an equation with sub-jaxprs counts as using all of its inputs; a comparison
    or an integer index passes nothing on), and those written into refs: a
    Pallas kernel returns nothing, and stores its results in its output refs
    (`_REF_WRITES`). With `sinks` (per input variable: a ref whose contents its caller
    uses), only what is written into those refs, or into refs read for them, counts: an
    output the caller drops (a kernel's debug copy in bfloat16) rounds nothing."""
    live = {v for v in jaxpr.outvars if _hashable(v)}
    if sinks is not None:
        live |= {v for v, s in zip(jaxpr.invars, sinks) if s and _hashable(v)}
    for _ in range(2):  # (a scratch ref read, in a loop, before a write seen later)
        for eqn in reversed(jaxpr.eqns):
            writes = eqn.primitive.name in _REF_WRITES and (
                sinks is None or _is_tainted(eqn.invars[0], live)
            )
            # (through float values only: a cast to bfloat16 read by a comparison alone
            # rounds no value fn returns, only where its branch turns)
            if writes or any(_is_tainted(v, live) and _inexact(v) for v in eqn.outvars):
                live.update(v for v in eqn.invars if _hashable(v))
    return live


def _kernel_sinks(eqn, sub, live) -> list | None:
    """For a Pallas kernel's jaxpr `sub`: per input variable, whether it is the ref of an
    output of `eqn` that is `live` (its scalar-prefetch, input and scratch refs are not);
    None for any other sub-jaxpr, or a layout this JAX does not tell."""
    mapping = eqn.params.get("grid_mapping") if eqn.primitive.name == "pallas_call" else None
    try:
        first = mapping.num_index_operands + mapping.num_inputs
        counts = (first, mapping.num_outputs, mapping.num_scratch_operands)
    except AttributeError:
        return None
    if sum(counts) != len(sub.invars) or counts[1] != len(eqn.outvars):
        return None
    used = [_is_tainted(v, live) for v in eqn.outvars]
    return [False] * first + used + [False] * counts[2]


# the state primitives that write into a ref (`o_ref[...] = y`, `pl.store`, `+=` on a ref)
_REF_WRITES = {"swap", "addupdate", "masked_swap", "atomic_rmw"}


def _inexact(v) -> bool:
    dtype = getattr(getattr(v, "aval", None), "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _hashable(v) -> bool:
    try:
        hash(v)
    except TypeError:
        return False
    return True


def _rounded_like(mantissa_bits: int):
    """The float dtype a `lax.reduce_precision` to `mantissa_bits` rounds like (it rounds
    in place, without a cast): the finest one that is at least as coarse, or bfloat16."""
    coarse = [d for d in ("float32", "float16", "bfloat16") if jnp.finfo(d).nmant <= mantissa_bits]
    return jnp.dtype(coarse[0] if coarse else "bfloat16")


def _is_tainted(v, tainted) -> bool:
    try:
        return v in tainted
    except TypeError:  # unhashable literals
        return False


def unbatched(jaxpr) -> str:
    """Why fn's evaluations must not be batched by jax.vmap, or "": a `custom_vmap` in fn
    has a batching rule that stands in for fn's own code under vmap (one whose rule is
    off would be checked in its place), and a `lax.cond` whose predicate vmap batches runs
    every branch, also those fn does not take: one holding a while_loop may then never end
    (its loop runs at inputs it was never meant for); an ordered io_callback has no
    batching rule (JAX raises a ValueError, not the NotImplementedError of others)."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "custom_vmap_call":
            return (
                "fn calls a custom_vmap, whose batching rule jax.vmap would run in place of "
                "fn's own code"
            )
        if name == "io_callback" and eqn.params.get("ordered"):
            return "fn calls an ordered io_callback, which jax.vmap cannot batch"
        if name == "cond" and any(_runs(b.jaxpr, "while") for b in eqn.params["branches"]):
            return (
                "fn has a lax.cond with a while_loop in a branch; jax.vmap turns a cond "
                "whose predicate it batches into a select that runs every branch, where a "
                "loop meant for other inputs may never end"
            )
        for sub in _subjaxprs(eqn.params):
            why = unbatched(sub)
            if why:
                return why
    return ""


def _runs(jaxpr, *primitives: str) -> bool:
    """Whether `jaxpr` (or a sub-jaxpr, a custom rule's function included) runs any of
    `primitives`."""
    return any(
        eqn.primitive.name in primitives
        or any(_runs(s, *primitives) for s in _subjaxprs(eqn.params))
        for eqn in jaxpr.eqns
    )


def _reads(jaxpr, n: int) -> bool:
    """Whether an output of `jaxpr` is computed from one of its first `n` inputs (an
    operation taking such a value is taken to pass it to all its outputs)."""
    live = set(jaxpr.invars[:n])

    def read(v) -> bool:
        return type(v).__name__ != "Literal" and v in live

    for eqn in jaxpr.eqns:
        if any(map(read, eqn.invars)):
            live.update(eqn.outvars)
    return any(map(read, jaxpr.outvars))


def _iterates(jaxpr) -> bool:
    """Whether `jaxpr` (or a sub-jaxpr) runs a `lax.while_loop` whose stopping test reads
    values other than integers (a residual against a tolerance, a time against its end,
    a flag a solver's step sets), as an iterative solver does; a loop counted by integers
    alone (`lax.fori_loop` with bounds known only when it runs) runs the same steps
    whatever the values."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "while" and not _counts(eqn.params["cond_jaxpr"].jaxpr):
            return True
        if any(_iterates(s) for s in _subjaxprs(eqn.params)):
            return True
    return False


def _counts(jaxpr) -> bool:
    """Whether `jaxpr` (a loop's stopping test, with its sub-jaxprs) reads integers only:
    every operation takes integer values, and what it returns as it was given is one."""
    given = set(jaxpr.invars)
    read = [v for eqn in jaxpr.eqns for v in eqn.invars]
    read += [v for v in jaxpr.outvars if type(v).__name__ != "Literal" and v in given]
    integer = all(jnp.issubdtype(getattr(v.aval, "dtype", np.int32), jnp.integer) for v in read)
    return integer and all(_counts(s) for eqn in jaxpr.eqns for s in _subjaxprs(eqn.params))


def calls(jaxpr, primitives) -> collections.Counter:
    """How many times `jaxpr` (with its sub-jaxprs, as `_runs` walks them) calls each of
    `primitives`."""
    found = collections.Counter()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in primitives:
            found[eqn.primitive.name] += 1
        for sub in _subjaxprs(eqn.params):
            found += calls(sub, primitives)
    return found


def _subjaxprs(params):
    for value in params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr  # a ClosedJaxpr
            elif hasattr(item, "eqns") and hasattr(item, "invars"):
                yield item


def _check_gradient_shapes(problem: Problem, inputs: Inputs) -> tuple[str, ...]:
    """Validate grad_fn's output against params; returns notes on its dtypes."""
    if not problem.scalar_output:
        raise ValueError(
            "grad_fn was given, but fn does not return a scalar (its output has shapes "
            f"{list(problem.out_shapes)}). A hand-written gradient is only defined for a "
            "scalar fn; reduce the output to a scalar first."
        )
    grads, _ = _shapes(problem.gradient, inputs.diff, inputs.traced())
    paths = problem.params.paths_of(_tree.DIFF)
    notes = []
    for path, g, x in zip(paths, grads, inputs.diff):
        if jnp.issubdtype(g.dtype, jnp.floating) and _precision.eps(g.dtype) > _precision.eps(
            x.dtype
        ):
            notes.append(
                f"grad_fn returned {jnp.dtype(g.dtype).name} for the parameter leaf "
                f"{path or '(root)'}, whose dtype is {x.dtype}: a gradient rounded to "
                f"{jnp.dtype(g.dtype).name} is judged against {x.dtype} precision and may "
                f"fail for that alone. Return the gradient in {x.dtype}"
            )
        shape = getattr(g, "shape", None)
        if shape != x.shape:
            raise ValueError(
                f"grad_fn returned shape {shape} for the parameter leaf {path or '(root)'}, "
                f"whose shape is {x.shape}. Return one gradient array per parameter with the "
                "parameter's shape (sum over broadcast axes)."
            )
        if jnp.issubdtype(g.dtype, jnp.complexfloating):
            raise TypeError(
                f"grad_fn returned dtype {g.dtype} for the parameter leaf {path or '(root)'}, "
                f"whose dtype is {x.dtype}: the gradient of a real fn in a real parameter is "
                "real, as jax.grad returns it. Return a real gradient (jnp.real of this one "
                "where its imaginary part is zero by construction; where it is not, that "
                "part is the bug)."
            )
        if not jnp.issubdtype(g.dtype, jnp.floating):
            raise TypeError(
                f"grad_fn returned dtype {g.dtype} for the parameter leaf {path or '(root)'}; "
                "gradients must be floating point."
            )
    return tuple(notes)
