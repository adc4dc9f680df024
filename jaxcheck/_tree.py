"""Splitting pytrees into the leaves that are differentiated, traced or held fixed."""

import contextlib
import contextvars
import dataclasses
import hashlib
import numbers
import re
import sys
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Leaf kinds.
DIFF = "diff"  # floating-point array: differentiated (params) or upcast (args)
ARRAY = "array"  # any other array (ints, bools, PRNG keys): traced, held fixed
STATIC = "static"  # not an array (Python ints, strings, functions): closed over, held fixed


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """How the leaves of one pytree are handled; rebuild the tree with `merge`. Equal for
    the same structure and static leaves (Python floats by their bits: 0.0 and -0.0 are
    different constants to fn, arctan2 says)."""

    treedef: Any
    paths: tuple[str, ...]
    kinds: tuple[str, ...]
    statics: tuple[Any, ...]  # the STATIC leaves, in order

    def paths_of(self, kind: str) -> tuple[str, ...]:
        return tuple(p for p, k in zip(self.paths, self.kinds) if k == kind)

    def _key(self):
        statics = tuple(digest(x) if type(x) is float else x for x in self.statics)
        return self.treedef, self.paths, self.kinds, statics

    def __eq__(self, other):
        return isinstance(other, Split) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())


def unit_like(y):
    """Ones like `y`: the unit tangent or cotangent JAX takes for it (float0 zeros for an
    integer or bool `y`, whose derivatives JAX types so)."""
    y = jnp.asarray(y)
    if jnp.issubdtype(y.dtype, jnp.inexact):
        return jnp.ones_like(y)
    return np.zeros(y.shape, jax.dtypes.float0)


def filled(leaves, at, values):
    """A copy of the list `leaves` with `values` at positions `at`: the flat arguments of
    a function traced over some of its leaves, the others held as they are."""
    full = list(leaves)
    for i, x in zip(at, values, strict=True):
        full[i] = x
    return full


def is_array(x) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


def _kind(leaf, path: str, where: str, complex_diff: bool = False) -> str:
    # complex parameters reach the pipeline only as their real (re, im) view (`_complex`):
    # one that gets here was missed there; complex data in `args` is simply held fixed
    if isinstance(leaf, bool | int | complex) or not (is_array(leaf) or isinstance(leaf, float)):
        if isinstance(leaf, complex) and where == "params":
            raise TypeError(_complex_message(where, path))
        return STATIC
    if isinstance(leaf, float) and where == "args":
        # a Python number held fixed stays one, as under jax.grad: fn may pass it where JAX
        # takes no tracer (a custom_vjp's nondiff_argnums, a Python `if`)
        return STATIC
    dtype = jnp.result_type(leaf) if isinstance(leaf, float) else leaf.dtype
    if isinstance(leaf, np.ndarray) and leaf.dtype.kind in "OSU":  # objects, strings, bytes
        if where == "params" and leaf.dtype.kind == "O" and _numbers(leaf):
            # (held fixed, a bug in what it feeds passed unseen; jax.grad refuses it)
            raise TypeError(
                f"params leaf {path or '(root)'} is a NumPy array of dtype object holding "
                f"numbers, which JAX does not differentiate (jax.grad refuses it): pass it "
                f"as a float array, np.asarray(x, np.float32), or, to hold it fixed, in args."
            )
        return STATIC
    if jnp.issubdtype(dtype, jnp.complexfloating):
        if complex_diff:
            return DIFF
        if where == "params":
            raise TypeError(_complex_message(where, path))
        return ARRAY
    if jnp.issubdtype(dtype, jnp.floating):
        return DIFF
    return ARRAY


def _numbers(x: np.ndarray) -> bool:
    return x.size > 0 and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) for v in x.flat
    )


def _complex_message(where: str, path: str) -> str:
    return (
        f"{where} leaf {path or '(root)'} is complex where a real view was expected; "
        "check it with jaxcheck.verify, which views complex leaves as (re, im) pairs, or pass "
        "the real and imaginary parts as separate float leaves."
    )


# floating arrays of `*args` held as they are, never cast for the reference (those
# check_grads' f closes over, taken as its arguments: constants of f, `_closure`); by
# identity, so that the other args of checks nested in the check (a rule's inputs, an
# order-2 map's tangents) are cast as ever
ARGS_AS_THEY_ARE = contextvars.ContextVar("ARGS_AS_THEY_ARE", default=())


def split(tree, where: str, complex_diff: bool = False) -> tuple[Split, list, list]:
    """Split `tree` into (Split, floating leaves, other array leaves). A Python float in an
    equinox Module is held fixed, as equinox holds it (`held_by_modules`). With
    `complex_diff`, complex arrays count as floating (differentiated as they are, in JAX's
    convention, not through their real view). The floating arrays of args among
    `ARGS_AS_THEY_ARE` are other arrays."""
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    held = held_by_modules(tree)
    paths, kinds, statics, floats, arrays = [], [], [], [], []
    for i, (key_path, leaf) in enumerate(leaves_with_paths):
        path = jax.tree_util.keystr(key_path)
        kind = STATIC if i in held else _kind(leaf, path, where, complex_diff)
        if kind == DIFF and where == "args" and any(leaf is x for x in ARGS_AS_THEY_ARE.get()):
            kind = ARRAY
        paths.append(path)
        kinds.append(kind)
        if kind == DIFF:
            floats.append(strong_array(leaf))
        elif kind == ARRAY:
            arrays.append(leaf)
        else:
            statics.append(leaf)
    return Split(treedef, tuple(paths), tuple(kinds), tuple(statics)), floats, arrays


def held_by_modules(tree) -> set[int]:
    """The indices (in flattening order) of the leaves of `tree` that are Python floats in
    an equinox Module (none where equinox is not imported). equinox differentiates arrays
    only (`eqx.filter_grad`, `eqx.is_inexact_array`): a Python float field of a Module is a
    hyperparameter (`Dropout.p`, `LayerNorm.eps`), and one behind a stop_gradient (a
    dropout rate) would fail the check."""
    module = getattr(sys.modules.get("equinox"), "Module", None)
    if module is None:
        return set()
    nodes = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, module))
    modules = [path for path, node in nodes[0] if isinstance(node, module)]
    if not modules:
        return set()
    return {
        i
        for i, (path, x) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0])
        if type(x) is float and any(path[: len(m)] == m for m in modules)
    }


def settle_weak(params, fn=None, args=()):
    """`params` with each weak-typed inexact leaf (a Python float or complex, a weak-typed
    array) as an array of the dtype it takes beside params' other floating leaves (a
    complex one: beside their inexact leaves), as fn sees it:
    `jnp.sin(x) * y` with a float32 `x` and `y = 2.0` computes in float32 whether or not
    64-bit types are on, and stays valid under strict dtype promotion. Without other
    floating leaves, JAX's default dtype (`strong_array`), unless strict promotion refuses
    fn with it: then the dtype of fn's floating outputs, traced with the weak leaves as
    they are (`x * w` with a float32 `w` that fn closes over is float32, where float64,
    the default with 64-bit types on, meets w). A leaf that dtype would overflow, where it
    is narrower than the leaf's own (1e5 beside float16 leaves), keeps its own: fn may use
    it alone, in its own dtype (where fn combines it with them, it overflows there too)."""
    leaves, treedef = jax.tree.flatten(params)
    held = held_by_modules(params)  # (kept Python floats: `split` holds them fixed)
    weak = [i for i, x in enumerate(leaves) if _weak_inexact(x) and i not in held]
    if not weak:
        return params

    def strong(kind) -> set:  # the real dtypes of the other leaves of that kind
        return {  # (as JAX takes them: NumPy float64 is float32 while 64-bit types are off)
            jnp.finfo(jax.dtypes.canonicalize_dtype(x.dtype)).dtype
            for x in leaves
            if is_array(x) and not _weak_inexact(x) and jnp.issubdtype(x.dtype, kind)
        }

    # a weak float takes its dtype beside the floating leaves (it stays real, in float32
    # beside float32 data, whatever complex leaves there are), or where there are none,
    # beside the complex ones' parts (float32 beside complex64, as fn computes z * 1.5); a
    # weak complex beside every inexact one (complex64 beside complex64 or float32)
    inexact = strong(jnp.inexact)
    real = strong(jnp.floating) or inexact
    if fn is not None and not inexact:
        real = inexact = _output_floats(fn, params, args)
    # (a Python float among params is put on the device by the check itself, as a parameter,
    # and a weak array read back for its overflow: allowed under the caller's
    # jax.transfer_guard("disallow"), as jaxcheck's own transfers are)
    partners = {i: inexact if _complex(leaves[i]) else real for i in weak}
    weak = [i for i in weak if partners[i]]
    with jax.numpy_dtype_promotion("standard"), jax.transfer_guard("allow"):
        for i in weak:
            dtype, own = jnp.result_type(*partners[i], leaves[i]), jnp.result_type(leaves[i])
            if jnp.finfo(dtype).bits < jnp.finfo(own).bits and _overflows(leaves[i], own, dtype):
                dtype = own
            leaves[i] = jnp.asarray(leaves[i], dtype)
    return jax.tree.unflatten(treedef, leaves) if weak else params


@contextlib.contextmanager
def settled(params, fn, args=()):
    """`settle_weak` of `params` for a check of fn(params, *args), under the dtype
    promotion that check needs (`promotion_for`)."""
    # (params themselves where nothing was settled, which `promotion_for` then needs to
    # trace nothing to know)
    weak_settled = settle_weak(params, fn, args)
    with promotion_for(params, weak_settled, fn, args):
        yield weak_settled


@contextlib.contextmanager
def promotion_for(params, settled, fn, args=()):
    """JAX's dtype promotion for a check of fn at `settled` (`settle_weak` of `params`):
    strict promotion, where on, relaxed to standard where fn refuses a Python float (a
    weak-typed leaf) only once settled, and takes it weak: beside complex arguments
    (x * s, x complex64, s = 1.5) or beside a float64 array fn closes over, the float
    settled to float32 meets a dtype strict promotion will not combine it with, while
    JAX's check_grads passes. Standard promotion computes there what the weak float
    does: the other operand's dtype."""
    if jax.config.jax_numpy_dtype_promotion != "strict" or settled is params:
        yield
        return
    if _refused(fn, settled, args) and not _refused(fn, params, args):
        with jax.numpy_dtype_promotion("standard"):
            yield
        return
    yield


def _refused(fn, params, args) -> bool:
    """Whether strict promotion refuses fn(params, *args) or its vjp (traced, not run): a
    custom rule's bwd mixing dtypes is refused under strict promotion as jax.grad meets it,
    and the check must not relax it."""

    def pulled_back(p):
        out, pullback = jax.vjp(lambda q: fn(q, *args), p)
        return pullback(jax.tree.map(unit_like, out))

    with jax.transfer_guard("allow"):  # (the check's own, as in `settle_weak`)
        try:
            # (fn's forward pass is traced on the way: refused there, it is refused here)
            jax.eval_shape(pulled_back, params)
        except _PROMOTION_ERROR:
            return True
        except Exception:  # noqa: BLE001 - only a question; the check says what else fails
            return False
    return False


def _overflows(x, own, narrower) -> bool:
    """Whether a finite value of x (of dtype `own`) is NaN/Inf in the narrower dtype."""
    a = np.asarray(x, own)
    with np.errstate(all="ignore"):
        b = a.astype(narrower)
    return bool(np.any(np.isfinite(a) & ~np.isfinite(b)))


# strict promotion's refusal (in jax.dtypes in newer releases; a ValueError in any)
_PROMOTION_ERROR = getattr(jax.dtypes, "TypePromotionError", None) or getattr(
    jax._src.dtypes, "TypePromotionError", ValueError
)


def _output_floats(fn, params, args) -> set:
    """Where fn refuses its weak leaves in JAX's default dtype for their promotion alone,
    {the real dtype of its floating outputs} with them weak, if they have one; else empty."""
    if jax.config.jax_numpy_dtype_promotion != "strict":
        return set()  # (standard promotion takes any dtype: no trace, a Checker's calls cost none)
    call = lambda p: fn(p, *args)  # noqa: E731
    with jax.transfer_guard_host_to_device("allow"):  # (the check's own, as below)
        strong = jax.tree.map(lambda x: strong_array(x) if _weak_inexact(x) else x, params)
    try:
        jax.eval_shape(call, strong)
        return set()
    except _PROMOTION_ERROR:
        pass
    except Exception:  # noqa: BLE001 - only a question; the check itself says what fails
        return set()
    try:
        out = jax.eval_shape(call, params)
    except Exception:  # noqa: BLE001 - as above
        return set()
    dtypes = {
        jnp.finfo(x.dtype).dtype
        for x in jax.tree.leaves(out)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    }
    return dtypes if len(dtypes) == 1 else set()


def _complex(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.complexfloating)


def _weak_inexact(x) -> bool:
    """Whether `x` is a weak-typed float or complex (a Python one, or a weak array)."""
    if type(x) in (float, complex):
        return True
    return (
        isinstance(x, jax.Array)
        and jnp.issubdtype(x.dtype, jnp.inexact)  # (a typed key array has no weak_type)
        and x.weak_type
    )


def leaf_paths(tree) -> list[str]:
    """The paths of `tree`'s leaves (`jax.tree_util.keystr`), in order."""
    return [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def strong_array(leaf) -> jax.Array:
    """`leaf` as an array of a fixed (not weak) dtype, so that compiled programs are
    reused across calls (a Python float becomes one too)."""
    if isinstance(leaf, jax.Array) and not leaf.weak_type:
        return leaf
    x = as_array(leaf)
    return jnp.asarray(x, x.dtype)


def as_array(leaf) -> jax.Array:
    """`jnp.asarray(leaf)`; a NumPy array is converted to JAX's dtype for it on the host
    and put on the device as a fresh copy. On the device, `jnp.asarray` compiles a small
    program per new shape (jax 0.10: 10 to 15 ms), and jax reuses what it converted of the
    very array object while 64-bit types were off once they are on (float32 for float64)."""
    if isinstance(leaf, np.ndarray | np.generic):
        dtype = jax.dtypes.canonicalize_dtype(leaf.dtype)
        return jax.device_put(np.array(leaf, dtype, copy=True))
    return jnp.asarray(leaf)


def merge(s: Split, floats, arrays):
    floats, arrays, statics = iter(floats), iter(arrays), iter(s.statics)
    source = {DIFF: floats, ARRAY: arrays, STATIC: statics}
    return jax.tree_util.tree_unflatten(s.treedef, [next(source[k]) for k in s.kinds])


def cast(leaves, dtype):
    """Cast floating leaves to `dtype` (None keeps them); never modifies the inputs."""
    if dtype is None:
        return list(leaves)
    return [jnp.asarray(x, dtype) for x in leaves]


def describe(x) -> str:
    if is_array(x):
        # (jax.dtypes.float0 is a NumPy structured dtype, whose str is its fields)
        name = "float0" if x.dtype == jax.dtypes.float0 else str(x.dtype)
        return f"{name}{list(x.shape)}"
    text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


class _Shown:
    """A leaf shown by its description (`outline`)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def outline(tree, limit: int = 160) -> str:
    """`tree` with each leaf shown as `describe` shows it (`{'w': float32[3, 2]}`), cut at
    about `limit` characters."""
    try:
        text = repr(jax.tree_util.tree_map(lambda x: _Shown(describe(x)), tree))
    except Exception:  # noqa: BLE001 - a node that cannot be rebuilt so: its own repr
        text = repr(tree)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def held_fixed(s: Split, arrays) -> tuple[tuple[str, str], ...]:
    """(path, description) of every leaf that is not differentiated."""
    arrays, statics = iter(arrays), iter(s.statics)
    rows = []
    for path, kind in zip(s.paths, s.kinds):
        if kind == ARRAY:
            rows.append((path, describe(next(arrays))))
        elif kind == STATIC:
            rows.append((path, describe(next(statics))))
    return tuple(rows)


def opaque(s: Split) -> tuple[tuple[str, str], ...]:
    """(path, type name) of every leaf that is an object holding arrays which JAX does not
    see into: a class not registered as a pytree (a plain dataclass, say)."""
    rows = []
    statics = iter(s.statics)
    for path, kind in zip(s.paths, s.kinds):
        if kind != STATIC:
            continue
        leaf = next(statics)
        try:
            fields = list(vars(leaf).values())
        except TypeError:  # no __dict__: a str, a number, a slotted or built-in object
            continue
        if any(
            isinstance(v, jax.Array | np.ndarray) and jnp.issubdtype(v.dtype, jnp.inexact)
            for v in fields
        ):
            rows.append((path, type(leaf).__name__))
    return tuple(rows)


def _pair_hint(s: Split, grad_tree, where: str) -> str:
    """What a pair returned for a gradient most likely is: (value, gradient), as
    jax.value_and_grad returns, or (gradient, aux), as jax.grad(..., has_aux=True) does."""
    if not (isinstance(grad_tree, tuple) and len(grad_tree) == 2):
        return ""
    parts = [
        {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(part)[0]}
        for part in grad_tree
    ]
    wanted = set(s.paths_of(DIFF))
    # a value is one scalar; a gradient has every parameter path
    scalar_first = len(parts[0]) == 1 and np.ndim(next(iter(parts[0].values()))) == 0
    value = scalar_first and wanted <= parts[1].keys()
    aux = wanted <= parts[0].keys()
    if value and aux and not any(np.ndim(x) for x in parts[1].values()):
        # a scalar parameter: (value, gradient) and (gradient, scalar aux) look the same
        return (
            " It returned a pair: a (value, gradient) pair, as jax.value_and_grad returns, "
            f"or a (gradient, aux) pair, as jax.grad(..., has_aux=True) returns? {where} "
            "must return the gradient alone, as jax.grad(fn) does: pass "
            "`lambda p: grad_fn(p)[1]` or `lambda p: grad_fn(p)[0]`."
        )
    if value:
        return (
            " It returned a pair whose second part holds the gradient: a (value, gradient) "
            f"pair, as jax.value_and_grad returns? {where} must return the gradient alone, "
            "as jax.grad(fn) does: pass `lambda p: grad_fn(p)[1]`."
        )
    if aux:
        return (
            " It returned a pair whose first part holds the gradient: a (gradient, aux) "
            f"pair, as jax.grad(..., has_aux=True) returns? {where} must return the "
            "gradient alone: pass `lambda p: grad_fn(p)[0]`."
        )
    return ""


def _renamed_hint(s: Split, by_path: dict) -> str:
    """Where the gradient's leaves are params' own under keys of another kind (the same
    names: `['bias'].value` for `.bias.value`, as flax.nnx's grad of a Module returns a
    State), a hint to return it in params' structure."""
    names = sorted(tuple(re.findall(r"\w+", p)) for p in s.paths_of(DIFF))
    if not names or names != sorted(tuple(re.findall(r"\w+", p)) for p in by_path):
        return ""
    return (
        " Its leaves are params' own under keys of another kind (a flax.nnx State where "
        "params is the Module, or a dict where it is an object, say): return the gradient "
        "in params' structure, or pass params in the gradient's (nnx.state(model))."
    )


def match_gradient(s: Split, grad_tree, where: str = "grad_fn") -> list:
    """Pick, for every differentiable leaf of `s`, the leaf at the same path of `grad_tree`."""
    by_path = {
        jax.tree_util.keystr(p): leaf
        for p, leaf in jax.tree_util.tree_flatten_with_path(grad_tree)[0]
    }
    out = []
    for path, kind in zip(s.paths, s.kinds):
        if kind != DIFF:
            continue
        if path not in by_path:
            under = {p: x for p, x in by_path.items() if p.startswith(path)}
            numbers = [p for p, x in under.items() if isinstance(x, int | float | complex)]
            hint = _pair_hint(s, grad_tree, where) or _renamed_hint(s, by_path)
            if numbers and len(numbers) == len(under):  # (a pair's gradient is an array)
                hint = (
                    f" It returned Python numbers in a list or tuple where the parameter is "
                    f"an array ({', '.join(numbers[:4])}{', ...' if len(numbers) > 4 else ''}"
                    f"): return an array for each parameter leaf (jnp.asarray(...), not "
                    ".tolist()), as jax.grad(fn) does."
                )
            raise ValueError(
                f"{where} returned no gradient for the parameter leaf {path or '(root)'}. It must "
                "return a pytree with the structure of `params` (found leaves: "
                f"{', '.join(p or '(root)' for p in sorted(by_path)) or 'none'}).{hint}"
            )
        out.append(by_path[path])
    extra = sorted(set(by_path) - set(s.paths))
    if extra:
        raise ValueError(
            f"{where} returned leaves that match no parameter leaf: {', '.join(extra)}. It "
            "must return a pytree with the structure of `params` (its leaves: "
            f"{', '.join(p or '(root)' for p in s.paths)}), as jax.grad(fn) does."
        )
    return out


def refuse_unsortable_keys(tree, where: str) -> None:
    """Raise naming a dict in `tree` whose keys JAX cannot sort (keys of several types, as
    "a" beside 1): JAX flattens a dict in the order of its sorted keys and says only that
    its comparator failed."""
    try:
        # (an iterator, which JAX warns of as a leaf, is refused apart: `_verify`)
        jax.tree_util.tree_structure(tree, is_leaf=lambda x: isinstance(x, Iterator))
    except (TypeError, ValueError) as err:
        path, keys = _unsortable(tree, "") if "sort" in str(err) else ("", [])
        if not keys:  # (not found among plain dicts, lists and tuples: JAX's error stands)
            raise
        kinds = ", ".join(sorted({type(k).__name__ for k in keys}))
        raise ValueError(
            f"{where}{path} is a dict whose keys are of several types ({kinds}: "
            f"{', '.join(map(repr, keys[:4]))}{', ...' if len(keys) > 4 else ''}), which JAX, "
            "flattening it in the order of its sorted keys, cannot order. Use keys of one "
            "type (all strings, say)."
        ) from None


def _unsortable(tree, path: str) -> tuple[str, list]:
    """(path, keys) of the first dict in `tree` whose keys cannot be sorted ("" and [] where
    none is found among plain dicts, lists and tuples)."""
    if isinstance(tree, dict):
        try:
            sorted(tree)
        except TypeError:
            return path, list(tree)
        children = [(f"[{k!r}]", v) for k, v in tree.items()]
    elif isinstance(tree, tuple) and hasattr(tree, "_fields"):  # a namedtuple, as JAX names it
        children = [(f".{name}", getattr(tree, name)) for name in tree._fields]
    elif isinstance(tree, list | tuple):
        children = [(f"[{i}]", v) for i, v in enumerate(tree)]
    else:
        return "", []
    for step, child in children:
        found = _unsortable(child, path + step)
        if found[1]:
            return found
    return "", []


def mixed_devices(trees: dict) -> str:
    """Where the arrays of the pytrees `trees` (name -> tree) are committed to more than one
    set of devices, one leaf on each ("params['a'] on cpu:0; params['b'] on cpu:1"); ""
    where they are not."""
    seen = {}
    for name, tree in trees.items():
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if isinstance(x, jax.Array) and _committed(x):
                devices = tuple(sorted(str(d) for d in x.devices()))
                seen.setdefault(devices, f"{name}{jax.tree_util.keystr(path)}")
    if len(seen) < 2:
        return ""
    return "; ".join(f"{leaf} on {', '.join(d)}" for d, leaf in seen.items())


def _committed(x) -> bool:
    """Whether the array `x` is committed to its devices (False for a traced array, inside
    jax.jit, which the jitted program places)."""
    if isinstance(x, jax.core.Tracer):
        # (asked, a tracer raises an error whose message walks the whole trace: per leaf,
        # a jitted step of many leaves traced in time quadratic in their number)
        return False
    try:
        return bool(x.committed)
    except Exception:  # noqa: BLE001 - a tracer has no placement of its own
        return False


def digest(x):
    """A hashable stand-in for the value `x`: small arrays by content, Python scalars and
    strings by value (floats by their bits), a large NumPy array by a hash of all its bytes
    (it may be changed in place anywhere), large JAX arrays (immutable) and other objects by
    identity (held, so that the identity is not another object's later)."""
    if isinstance(x, float):
        return ("float", float(x).hex())
    if isinstance(x, bool | int | complex | str | bytes | type(None)):
        return (type(x).__name__, x)
    if not isinstance(x, jax.Array | np.ndarray | np.generic):
        if type(x).__module__.startswith("jax") and hasattr(x, "__array__"):
            # a constant JAX wraps anew per trace (jax 0.7's LiteralArray, over the NumPy
            # array it closes over): by its content, as that array
            return digest(np.asarray(x))
        return ("object", Same(x))
    if np.size(x) <= 1 << 16:
        data = np.asarray(x)
        return (str(data.dtype), data.shape, data.tobytes())
    if isinstance(x, np.ndarray) and x.dtype != object:
        # (about 25 ms per 4e7 bytes; JAX also wraps a constant anew per trace, so its
        # identity would not do)
        data = memoryview(np.ascontiguousarray(x)).cast("B")
        content = hashlib.sha1(data, usedforsecurity=False).digest()
        return ("numpy", str(x.dtype), x.shape, content)
    return ("array", Same(x))


class Same:
    """Holds an object and compares by identity."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, Same) and other.value is self.value

    def __hash__(self):
        return id(self.value)
