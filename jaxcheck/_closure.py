"""Arrays a function closes over, taken as its arguments: a test checking a new lambda over
new data of the same shapes (`check_grads(lambda w: loss(w, x, y), (w,))`, x and y drawn
anew for each case) runs the programs compiled for the first, where the data, constants
of each program, made each compile anew (0.06 s a check at order 1 against JAX's 0.003 s,
0.31 s against 0.024 s at order 2)."""

import dataclasses
import types
import weakref
from collections.abc import Callable

import jax
import numpy as np

from . import _fingerprint, _precision, _tree


@dataclasses.dataclass(frozen=True, eq=False)
class Lifted:
    """`f` made anew from its code with the values at `slots` (("cell", i): its closure
    cell i; ("default", j): its default argument j) taken from the trailing arguments:
    `Lifted(...)(*args, *values)` is f(*args) with those replaced by `values` (each a
    pytree of arrays, flattened by `treedefs`). Equal for the same code and globals, equal
    other values, and lifted values of the same structures, shapes and dtypes, whatever
    those values are."""

    f: types.FunctionType
    slots: tuple  # (kind, index) of each value taken as arguments
    treedefs: tuple  # the pytree structure of each one

    def __call__(self, *a):
        n = sum(t.num_leaves for t in self.treedefs)
        args, leaves = a[: len(a) - n], a[len(a) - n :]
        cells, defaults = list(self.f.__closure__ or ()), list(self.f.__defaults__ or ())
        for (kind, i), treedef in zip(self.slots, self.treedefs):
            value = jax.tree.unflatten(treedef, leaves[: treedef.num_leaves])
            leaves = leaves[treedef.num_leaves :]
            if kind == "cell":
                cells[i] = types.CellType(value)
            else:
                defaults[i] = value
        g = types.FunctionType(
            self.f.__code__,
            self.f.__globals__,
            self.f.__name__,
            tuple(defaults) if self.f.__defaults__ is not None else None,
            tuple(cells) if self.f.__closure__ is not None else None,
        )
        g.__kwdefaults__ = self.f.__kwdefaults__
        return g(*args)

    def __post_init__(self):
        code, globals_, cells, defaults, keywords = _fingerprint.same_function(self.f)
        cells, defaults = list(cells), list(defaults)
        for (kind, i), treedef in zip(self.slots, self.treedefs):
            leaves = jax.tree.leaves(_value(self.f, kind, i))
            shapes = (treedef, tuple((np.shape(x), np.dtype(x.dtype)) for x in leaves))
            if kind == "cell":
                cells[i] = shapes
            else:
                defaults[i] = shapes
        identity = (code, globals_, tuple(cells), tuple(defaults), keywords)
        object.__setattr__(self, "_identity", identity)

    def __eq__(self, other):
        return type(other) is Lifted and self._identity == other._identity

    def __hash__(self):
        return hash(self._identity)


def _value(f, kind: str, i: int):
    return f.__closure__[i].cell_contents if kind == "cell" else f.__defaults__[i]


def lift(f: Callable, args: tuple) -> tuple[Lifted, tuple] | None:
    """(Lifted f, the values it takes after `args`): the closure cells and default
    arguments of the Python function `f` holding an array, or a tuple, list or dict of
    them (a lambda binding its data as `lambda w, x=x: ...`); None where there is none,
    or where f computes otherwise with them as arguments (`_same_program`). Arrays
    JAX would see otherwise are left as constants: weak-typed ones (as arguments they would
    promote as strong ones), arrays committed to a device, typed PRNG keys, and tracers."""
    if not isinstance(f, types.FunctionType) or not (f.__closure__ or f.__defaults__):
        return None
    lifted, treedefs, values = [], [], []
    slots = [("cell", i) for i in range(len(f.__closure__ or ()))]
    slots += [("default", j) for j in range(len(f.__defaults__ or ()))]
    for kind, i in slots:
        try:
            contents = _value(f, kind, i)
        except ValueError:  # an empty cell
            continue
        if not (_tree.is_array(contents) or isinstance(contents, tuple | list | dict)):
            continue
        try:
            leaves, treedef = jax.tree.flatten(contents)
        except Exception:  # noqa: BLE001 - a dict JAX cannot sort: a constant, as it was
            continue
        if leaves and all(map(_liftable, leaves)):
            lifted.append((kind, i))
            treedefs.append(treedef)
            values.append(contents)
    if not lifted:
        return None
    g, held = Lifted(f, tuple(lifted), tuple(treedefs)), tuple(jax.tree.leaves(values))
    # (f checked again over the same values at inputs of the same types: decided already)
    seen = (_held_values(f), _types(args))
    decided = _DECIDED.get(f)
    if decided is None or not _same_values(decided[0], seen):
        decided = seen, _same_program(f, g, args, held, seen[0])
        _DECIDED[f] = decided
    return (g, held) if decided[1] else None


# per function, (what it closed over and the types of the inputs, whether it was lifted)
_DECIDED = weakref.WeakKeyDictionary()


def _types(args) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple(
        (np.shape(x), str(getattr(x, "dtype", type(x))), getattr(x, "weak_type", None))
        for x in leaves
    )


def _same_values(a, b) -> bool:
    (cells_a, types_a), (cells_b, types_b) = a, b
    return types_a == types_b and all(map(_same_contents, cells_a, cells_b))


def _same_program(f, g, args, held, before: tuple) -> bool:
    """Whether f(*args) and g(*args, *held) trace to the same primitives, at args as they
    are and cast to float64 (as the reference traces them; the held arrays as they are,
    as f's constants stay): JAX computes some things otherwise over a traced value than
    over a constant (`lax.reduce_window` over a traced initial value is a primitive
    without derivatives, where a constant one makes it `reduce_window_max`), and f may
    read its data in Python, which a traced value refuses. Not where tracing f changes
    what it closes over (f writes to a cell: it leaks a traced value, which the check
    then says, as it did; `before`: `_held_values(f)` before any trace)."""
    try:
        with jax.enable_checks(False):
            if not _alike(lambda *a: f(*a), g, args, held):
                return False
            with _precision.x64_scope(True):
                wide = [_wide(x) for x in jax.tree.leaves(args)]
                wide = jax.tree.unflatten(jax.tree.structure(args), wide)
                return _alike(lambda *a: f(*a), g, wide, held)
    except Exception:  # noqa: BLE001 - f as it is, then (the check says why it fails)
        return False
    finally:
        after = _held_values(f)
        if not all(map(_same_contents, before, after)):
            # (left as the trace left it: the check's own trace of f then finds the
            # traced value f leaked, and says so, as it did)
            return False  # noqa: B012 - (f's own write is what decides it)


def _alike(f, g, args, held) -> bool:
    """Whether f(*args) and g(*args, *held) trace to the same primitives, none of them a
    callback (whose Python code may read the data, which g's cells hold traced)."""
    own = jax.make_jaxpr(f)(*args)
    taken = jax.make_jaxpr(g)(*args, *held)
    primitives = _primitives(own.jaxpr)
    return primitives == _primitives(taken.jaxpr) and "callback" not in str(primitives)


_EMPTY = object()


def _held_values(f) -> tuple:
    """What f's closure cells and default arguments hold, to compare by identity."""
    return (*map(_contents, f.__closure__ or ()), *map(_of, f.__defaults__ or ()))


def _contents(cell):
    try:
        return _of(cell.cell_contents)
    except ValueError:  # an empty cell
        return _EMPTY


def _of(value):
    """`value` to compare by identity: a container as its structure and leaves (an entry
    written into a dict f closes over is a change too)."""
    if isinstance(value, tuple | list | dict):
        try:
            leaves, treedef = jax.tree.flatten(value)
        except Exception:  # noqa: BLE001 - a dict JAX cannot sort: the container alone
            return value
        return value, treedef, tuple(leaves)
    return value


def _same_contents(a, b) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) == 3:
        return a[0] is b[0] and a[1] == b[1] and all(x is y for x, y in zip(a[2], b[2]))
    return a is b


def _wide(x):
    """`x` as the reference traces it: a floating array (or Python float) as float64."""
    if isinstance(x, float) or (_tree.is_array(x) and jax.dtypes.issubdtype(x.dtype, np.floating)):
        return jax.ShapeDtypeStruct(np.shape(x), np.float64)
    return x


def _primitives(jaxpr) -> tuple:
    """The primitives of `jaxpr` in order, with their outputs' types and their parameters
    (sub-jaxprs as theirs; functions, made anew at each trace, by their kind alone)."""
    return tuple(
        (
            eqn.primitive.name,
            tuple(str(v.aval) for v in eqn.outvars),
            tuple((k, _parameter(v)) for k, v in sorted(eqn.params.items())),
        )
        for eqn in jaxpr.eqns
    )


def _parameter(value):
    if hasattr(value, "eqns"):
        return _primitives(value)
    if hasattr(getattr(value, "jaxpr", None), "eqns"):
        return _primitives(value.jaxpr)
    if isinstance(value, tuple | list):
        return tuple(map(_parameter, value))
    if callable(value):
        return "function"
    return repr(value)


def _liftable(x) -> bool:
    if isinstance(x, np.ndarray):
        return x.dtype.kind in "biufc"
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
        return False
    if getattr(x, "weak_type", False) or getattr(x, "committed", True):
        return False
    return not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
