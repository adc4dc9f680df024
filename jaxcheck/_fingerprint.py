"""What a function computes, as a key for the programs compiled for it: checking the same
function again reuses them, while a function whose behaviour changed in between (a global
or an attribute it reads, a custom rule reading a setting) is checked anew."""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _plan, _rule_search, _tree


@dataclasses.dataclass(frozen=True, eq=False)
class Keyed:
    """`f` itself, equal to another `Keyed` of the same fingerprint, of any function: a
    new lambda computing what an earlier one did (a test suite's `check_grads(lambda x:
    ..., args)` in a parametrized test) reuses the programs compiled for it, where each
    compiled them all again (131 ms a check at order 1 against 4 ms, 479 ms against
    24 ms at order 2). Without a fingerprint (f cannot be traced), equal for the same f."""

    f: Callable
    fingerprint: Any = None  # `of(f, *args)`

    def __call__(self, *args):
        return self.f(*args)

    def _identity(self):
        if self.fingerprint is None:
            return type(self), self.f
        return type(self), self.fingerprint

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self):
        return hash(self._identity())


def of(f, *args, derivative: bool = True, has_aux: bool = False, numbers_from: int | None = None):
    """What `f` (and with `derivative`, its vjp) computes at the shapes and dtypes of `args`:
    f's own jaxpr, or where it calls custom rules not JAX's own, that of f's vjp (their
    bwd and jvp included, which f's own jaxpr names but does not show), and the values it
    closes over (small ones by content, large ones by identity); the jaxpr of its jvp
    where the vjp cannot be traced (forward mode only: a custom_jvp rule's body shows
    there too), then f's own; None where f cannot be traced (its programs are then keyed
    by f alone).
    Leaves of `args` that are not arrays or floats are held as they are, and so are Python
    numbers in `args[numbers_from:]` (as the check holds them: fn may branch on them);
    with `has_aux`, f's output is its first element."""
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

    def with_pullback(*values):
        out, pullback = jax.vjp(call, *values)
        return out, pullback(jax.tree_util.tree_map(_tree.unit_like, out))

    def with_tangent(*values):
        return jax.jvp(call, values, tuple(map(_tree.unit_like, values)))

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
            for traced in (with_pullback, with_tangent):
                try:
                    return _key(jax.make_jaxpr(traced)(*abstract), held)
                except Exception:  # noqa: BLE001, PERF203 - f's own jaxpr, then
                    continue
    return own


def _key(closed, held) -> tuple:
    # the Python functions the jaxpr calls back (a pure_callback's, a kernel's), held (by
    # their own equality, else by identity): printed, they show only their address,
    # which a later function of other behaviour can take once the first is gone
    called = tuple(map(_held, _callables(closed.jaxpr)))
    return str(closed.jaxpr), tuple(map(_tree.digest, closed.consts)), held, called


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
