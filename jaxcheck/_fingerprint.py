"""What a function computes, as a key for the programs compiled for it: checking the same
function again reuses them, while a function whose behaviour changed in between (a global
or an attribute it reads, a custom rule reading a setting) is checked anew."""

import dataclasses
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _plan, _rule_search, _tree


@dataclasses.dataclass(frozen=True, eq=False)
class Keyed:
    """`f` itself, equal to another `Keyed` of equal fingerprint whose function is the same
    function: `f` itself, or a new one made from the same code with equal values in its
    closure (`same_function`), as a test suite's `check_grads(lambda x: ..., args)` in a
    parametrized test makes one at each call: it reuses the programs compiled for the
    first, where each compiled them all again (211 ms a check at order 1, 6 ms now, and
    572 ms against 14 ms at order 2; JAX's check_grads takes 4 and 24 ms). Functions of
    other code are never equal, whatever their fingerprints: the fingerprint is taken at
    the check's own dtypes, and two functions alike there (one casting its float32 input
    to float32) differ in float64, where the reference traces them, and in what their
    custom rules compute beyond the jaxprs of their derivatives."""

    f: Callable
    fingerprint: Any = None  # `of(f, *args)`

    def __post_init__(self):
        # (taken when the key is made: a Checker's key stands for fn as it was at its
        # first call, whose closed-over values its programs hold, as jax.jit's do)
        object.__setattr__(self, "_function", same_function(self.f))

    def __call__(self, *args):
        return self.f(*args)

    def _identity(self):
        return type(self), self._function, self.fingerprint

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self):
        return hash(self._identity())


def same_function(f):
    """A hashable stand-in for the function `f`: for a Python function, its code, globals
    and defaults, and the values it closes over (Python numbers and strings, and small
    arrays, by value; anything else by identity), so that a lambda made anew from the same
    code over equal values is the same function; `f` itself otherwise."""
    if not isinstance(f, types.FunctionType):
        return _held(f)
    cells = []
    for cell in f.__closure__ or ():
        try:
            cells.append(_closed_value(cell.cell_contents))
        except ValueError:  # an empty cell (a name assigned after the function was made)
            cells.append(("empty",))
    defaults = tuple(map(_closed_value, f.__defaults__ or ()))
    keywords = tuple(sorted((k, _closed_value(v)) for k, v in (f.__kwdefaults__ or {}).items()))
    return f.__code__, _tree.Same(f.__globals__), tuple(cells), defaults, keywords


def _closed_value(x):
    if isinstance(x, bool | int | float | complex | str | bytes | type(None)) or _tree.is_array(x):
        try:
            return _tree.digest(x)
        except Exception:  # noqa: BLE001 - a typed key array, a tracer: by identity
            return _tree.Same(x)
    return _tree.Same(x)


def of(
    f,
    *args,
    derivative: bool = True,
    has_aux: bool = False,
    numbers_from: int | None = None,
    order: int = 1,
):
    """What `f` (and with `derivative`, its vjp) computes at the shapes and dtypes of `args`:
    f's own jaxpr, or where it calls custom rules not JAX's own, that of f's vjp (their
    bwd and jvp included, which f's own jaxpr names but does not show), and the values it
    closes over (small ones by content, large ones by identity); the jaxpr of its jvp
    where the vjp cannot be traced (forward mode only: a custom_jvp rule's body shows
    there too), then f's own; None where f cannot be traced (its programs are then keyed
    by f alone).
    Leaves of `args` that are not arrays or floats are held as they are, and so are Python
    numbers in `args[numbers_from:]` (as the check holds them: fn may branch on them);
    with `has_aux`, f's output is its first element. `order`: how many derivatives deep
    the check goes: where a derivative calls custom rules again (a rule's jvp calling
    another rule, whose own jvp reads a setting), the next one's jaxpr is taken too, up
    to `order` (beyond, f's identity)."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    first = len(leaves)
    if numbers_from is not None:
        first = len(jax.tree_util.tree_leaves(args[:numbers_from]))
    at = [i for i, x in enumerate(leaves) if _is_value(x) and (i < first or _tree.is_array(x))]
    traced_at = set(at)
    held = tuple(_tree.digest(x) for i, x in enumerate(leaves) if i not in traced_at)

    def call(*values):
        out = f(*jax.tree_util.tree_unflatten(treedef, _tree.filled(leaves, at, values)))
        return out[0] if has_aux else out

    # new functions: JAX's trace cache, keyed by f, would return f's first trace
    abstract = [_abstract(leaves[i]) for i in at]
    # (a key only: the caller's invariant checks apply where the check traces f itself)
    with _plan.own_transfers(), jax.enable_checks(False):
        try:
            closed, shapes = jax.make_jaxpr(call, return_shape=True)(*abstract)
            # (and the arguments' and outputs' structures, which the jaxpr does not show)
            held = (*held, treedef, jax.tree_util.tree_structure(shapes), tuple(at))
            own = _key(closed, held)
        except Exception:  # noqa: BLE001 - the check says why f cannot be traced (or it
            return None  # closes over a traced value, which has no digest)
        # f's own jaxpr decides its derivatives too where it calls no custom rule but
        # JAX's own (jax.nn.relu): only otherwise is the vjp, which costs several times as
        # much to trace, needed to show a rule's bwd or jvp
        if derivative and _rule_search.derivative_beyond_jaxpr(closed.jaxpr):
            # (f's own jaxpr too: the derivative's shows a custom_vjp's fwd, not the
            # primal function it stands beside)
            derived = _derivatives(call, abstract, held, order)
            if derived is not None:
                keys, beyond = derived
                # (where the deepest derivative still calls custom rules again (a bwd
                # calling one), theirs, which a check one order higher takes, show in no
                # jaxpr: f's identity then too)
                return own, *keys, (same_function(f) if beyond else None)
    return own


def _derivatives(call, abstract, held, order: int) -> tuple[list, bool] | None:
    """(the keys of the jaxprs of call's derivative, of that one's derivative, and so on,
    for as long as each calls custom rules again, `order` deep at most; whether the last
    still does), each derivative f's vjp, or where it cannot be traced its jvp; None where
    neither can. The cotangent (tangent) is a traced input scaling ones: with ones alone,
    constants, a custom rule's bwd (jvp) runs on values, folding away what it does with
    its cotangent (a bwd squaring it, or rounding it to float8, read as a right one)."""
    keys, g, scales = [], call, 0
    scale = jax.ShapeDtypeStruct((), np.float32)
    for _ in range(order):
        for make in (_with_pullback, _with_tangent):
            h = make(g, scales)
            try:
                closed = jax.make_jaxpr(h)(*[scale] * (scales + 1), *abstract)
                keys.append(_key(closed, held))
            except Exception:  # noqa: BLE001, PERF203 - the other mode, then
                continue
            break
        else:
            return None if not keys else (keys, True)
        g, scales = h, scales + 1
        if not _rule_search.derivative_beyond_jaxpr(closed.jaxpr):
            return keys, False
    return keys, True


def _with_pullback(g, scales: int):
    """g(*its scales, *values) and its vjp in the values at a cotangent scaled by one more
    scale: a function of the scales and values."""

    def pulled(*a):
        head, last, values = a[:scales], a[scales], a[scales + 1 :]
        out, pullback = jax.vjp(lambda *v: g(*head, *v), *values)
        return out, pullback(jax.tree_util.tree_map(lambda y: _scaled_unit(y, last), out))

    return pulled


def _with_tangent(g, scales: int):
    """g(*its scales, *values) and its jvp in the values at a tangent scaled by one more
    scale: a function of the scales and values."""

    def pushed(*a):
        head, last, values = a[:scales], a[scales], a[scales + 1 :]
        tangents = tuple(_scaled_unit(x, last) for x in values)
        return jax.jvp(lambda *v: g(*head, *v), values, tangents)

    return pushed


def _key(closed, held) -> tuple:
    # the Python functions the jaxpr calls back (a pure_callback's, a kernel's), held (by
    # their own equality, else by identity): printed, they show only their address,
    # which a later function of other behaviour can take once the first is gone
    called = tuple(map(_held, _callables(closed.jaxpr)))
    return str(closed.jaxpr), tuple(map(_tree.digest, closed.consts)), held, called


def _scaled_unit(y, scale):
    """`_tree.unit_like(y)` times the traced scalar `scale` (in y's dtype)."""
    unit = _tree.unit_like(y)
    if unit.dtype == jax.dtypes.float0:
        return unit
    return unit * scale.astype(unit.dtype)


def _held(f):
    try:
        hash(f)
    except TypeError:
        return _tree.Same(f)
    return f


def _callables(jaxpr) -> list:
    """The functions the callbacks of `jaxpr` and its sub-jaxprs call (their `callback`
    parameter; not the thunks a custom rule's equation holds, made anew at each trace)."""
    out = []
    for eqn in jaxpr.eqns:
        if "callback" in eqn.primitive.name and "callback" in eqn.params:
            out.append(eqn.params["callback"])
        for value in eqn.params.values():
            for item in value if isinstance(value, tuple | list) else (value,):
                if hasattr(item, "eqns") or hasattr(getattr(item, "jaxpr", None), "eqns"):
                    out += _callables(getattr(item, "jaxpr", item))
    return out


def _is_value(x) -> bool:
    return _tree.is_array(x) or isinstance(x, float)


def _abstract(x):
    """An array or float as its shape and dtype, not weak-typed (as the check holds it):
    f(jnp.full(3, 0.5)) and f(jnp.ones(3)) are one program."""
    if isinstance(x, float):
        return jax.ShapeDtypeStruct((), jnp.result_type(x))
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype)
