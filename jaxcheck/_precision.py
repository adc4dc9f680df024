"""Precision policy: which dtype the finite-difference reference is computed in, and its steps."""

import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

POLICIES = ("auto", "float64", "native")


def eps(dtype) -> float:
    return float(jnp.finfo(dtype).eps)


def lowest(dtypes) -> np.dtype:
    """The least precise of `dtypes` (largest machine epsilon)."""
    return max((jnp.dtype(d) for d in dtypes), key=eps)


def widening():
    """The dtype promotion under which fn is traced with its inputs widened to float64:
    standard. fn valid under strict promotion at its own dtypes (float32 params and data,
    a param cast to float32 on purpose) mixes float32 with float64 once its inputs are
    widened, which strict refuses and standard resolves to float64, as the reference
    wants; where fn runs under strict, it computes the same under standard."""
    return jax.numpy_dtype_promotion("standard")


def accumulator(dtypes) -> np.dtype:
    """float64 when any of the floating `dtypes` is 64-bit, else float32: the dtype sums
    and products of them are formed in. Chosen explicitly (not by `jnp.promote_types`,
    which refuses float32 with bfloat16 under `jax.numpy_dtype_promotion("strict")`). A
    complex dtype counts as its parts' (complex64 as float32)."""
    wide = any(_real_size(d) >= 8 for d in dtypes)
    return jnp.dtype(jnp.float64 if wide else jnp.float32)


def _real_size(dtype) -> int:
    """The bytes of `dtype`'s real numbers (of each part of a complex one)."""
    dtype = jnp.dtype(dtype)
    return jnp.finfo(dtype).dtype.itemsize if jnp.issubdtype(dtype, jnp.inexact) else dtype.itemsize


def x64_enabled() -> bool:
    """Whether 64-bit types are on now (works across jax versions and config APIs)."""
    return jax.dtypes.canonicalize_dtype(np.float64) == np.float64


def x64_scope(enabled: bool):
    """A context in which 64-bit types are on (or off), restored on exit.

    Newer jax has `jax.enable_x64`; older versions (0.4.38 among them) have it in
    `jax.experimental`.
    """
    if x64_enabled() == enabled:
        return contextlib.nullcontext()
    if callable(getattr(jax, "enable_x64", None)):
        return jax.enable_x64(enabled)
    import jax.experimental as jex  # noqa: PLC0415

    return jex.enable_x64() if enabled else jex.disable_x64()


def _global_x64() -> bool | None:
    """The process-wide `jax_enable_x64` (under any thread's own `jax.enable_x64`), or None
    where this JAX does not tell it."""
    try:
        from jax._src import config  # noqa: PLC0415 - internal: feature-detected

        return bool(config.enable_x64.get_global())
    except Exception:  # noqa: BLE001 - any other JAX
        return None


@contextlib.contextmanager
def x64_everywhere(needed: bool):
    """64-bit types on for every thread while a program with callbacks runs, where they
    are on only in this one (`x64_scope`). XLA may call back from a thread of its
    own, where JAX reads the global setting: with it off, JAX turns the callback's float64
    arguments into float32 and then refuses the float32 result it gets back for a float64
    one. Only jaxcheck's own float64 programs with callbacks set it, for their run."""
    if not needed or not x64_enabled() or _global_x64() is not False:
        yield  # nothing to do, or a JAX whose global setting cannot be told apart
        return
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)


def stale_constants(err: BaseException) -> bool:
    """Whether `err` reads like float32 and float64 values (or complex64 and complex128)
    mixed once 64-bit types were switched on: JAX caches what a function closed over (a
    float64 NumPy constant becomes float32 while 64-bit types are off) without telling the
    two settings apart, so a function traced before with them off can mix its stale
    float32 constants with float64 values (`STALE_HINT`); so does float32 data that fn
    closes over (`widened_closures`)."""
    if not isinstance(err, TypeError | ValueError | RuntimeError):
        return False
    text = str(err)
    mixed = bool(re.search(r"float32|f32\b|complex64|c64\b", text)) and bool(
        re.search(r"float64|f64\b|complex128|c128\b", text)
    )
    # in JAX's words for mismatched operands (a fn refusing float64 on purpose, "kernel
    # expects float32, got float64", says what it is without the hint)
    return mixed and bool(_MISMATCH.search(text))


def int_mismatch(err: BaseException) -> bool:
    """Whether `err` reads like int32 and int64 values mixed once 64-bit types were
    switched on: an int32 array given to fn beside a Python int of fn's own, which 64-bit
    types make int64 (`lax.fori_loop(0, n)` with `n` an int32 array refuses the pair)."""
    if not isinstance(err, TypeError | ValueError | RuntimeError):
        return False
    text = str(err)
    mixed = bool(re.search(r"int32|i32\b", text)) and bool(re.search(r"int64|i64\b", text))
    return mixed and bool(_MISMATCH.search(text))


def int64_inputs(arrays: list) -> list:
    """`arrays` with their int32 entries cast to int64 (the values are the same; JAX
    arrays stay JAX arrays, with 64-bit types on: inside `x64_scope(True)`)."""
    return [x.astype(np.int64) if getattr(x, "dtype", None) == np.int32 else x for x in arrays]


_MISMATCH = re.compile(
    r"same d?types?|equal (?:output )?types|dtypes do not match|element types?|"
    r"promotion|incompatible|mismatch|do not match|"
    # (a library function checking its operands: jax.nn.dot_product_attention over float32
    # keys fn reads from its module says "query dtype should be float32, but got float64")
    r"dtype should be|"
    # (a float32 tangent or cotangent that fn closes over, given to jax.jvp, jax.vjp's
    # pullback or a linearized function: a Hessian-vector product's vector, a probe)
    r"unexpected JAX type|inconsistent with the original",
    re.IGNORECASE,
)


TRACED_RULE_HINT = (
    "the rule is checked as fn's trace recorded it, typed in fn's precision, which cannot "
    "run in float64; jaxcheck.verify_rule(rule, *inputs) on the rule's own function "
    "checks it in float64"
)

STALE_HINT = (
    "to check fn in float64, pass any float32 array, dtype or traced jaxpr that fn closes "
    "over or writes as an argument, or cast it to the inputs' dtype; float32 conversions of "
    "NumPy constants fn closes over, which JAX made while 64-bit types were off and reuses "
    "once they are on, need them on before fn first runs, or jax.clear_caches() before the "
    "check"
)


def reference_dtype(policy: str, tested) -> np.dtype:
    """The dtype finite differences are taken in, before trying it out.

    "float64" and "auto" ask for float64; "native" keeps the tested dtype but never goes
    below float32, because a half-precision step of ~eps^(1/3) is not representable.
    """
    if policy in ("auto", "float64"):
        return jnp.dtype(jnp.float64)
    if eps(tested) > eps(jnp.float32):
        return jnp.dtype(jnp.float32)
    return jnp.dtype(tested)


def default_step(dtype) -> float:
    """Relative step h ~ eps^(1/3): balances h^2 truncation against eps/h roundoff."""
    return eps(dtype) ** (1.0 / 3.0)


# the float dtypes of fn's closed-over arrays that `widened_closures` casts, and to what
_WIDER = {"float16": np.float64, "bfloat16": np.float64, "float32": np.float64}
_WIDER_COMPLEX = {"complex64": np.complex128}


@contextlib.contextmanager
def widened_closures(fn, depth: int = 4):
    """While inside, the arrays of a float dtype below float64 that `fn` holds in its
    Python closure, reads from its module's globals by name or has bound by
    `functools.partial` (and so for the functions it reaches so, and jaxcheck's wrappers
    of it, to `depth`; not in libraries' code) are cast to float64, exactly: a scan whose
    carry starts from a float32 array fn closes over fails in float64 otherwise (its
    carry's type changes), and `check_grads` can only be given such data that way. Yields
    how many were cast; each is put back on leaving. Arrays in plain dicts, lists and
    tuples held so are cast too (a copy of the container stands in for it); arrays held in
    other objects fn reaches are not."""
    slots, seen = [], set()

    def wider(value):
        name = str(getattr(value, "dtype", ""))
        if not isinstance(value, jax.Array | np.ndarray):
            return None
        return _WIDER.get(name) or _WIDER_COMPLEX.get(name)

    def holds(value) -> bool:
        """Whether `value` is an array to cast, or a plain container holding one (of at
        most `MAX_CONTAINER` entries: a table of a million numbers beside the data was
        copied at every check)."""
        if wider(value) is not None:
            return True
        if type(value) not in (dict, list, tuple) or len(value) > MAX_CONTAINER:
            return False
        try:
            leaves = jax.tree_util.tree_leaves(value)
        except Exception:  # noqa: BLE001 - keys JAX cannot sort: left as it is
            return False
        return len(leaves) <= MAX_CONTAINER and any(wider(x) is not None for x in leaves)

    def one(x):
        """x cast to its wider dtype, a JAX array staying one (fn may index it with a
        traced index, which a NumPy array refuses)."""
        if isinstance(x, jax.Array):
            with x64_scope(True):
                return jnp.asarray(x, wider(x))
        return np.asarray(x, wider(x))

    def cast(value) -> tuple:
        """(`value` with its arrays cast, how many were)."""
        if wider(value) is not None:
            return one(value), 1
        leaves, treedef = jax.tree_util.tree_flatten(value)
        wide = [x if wider(x) is None else one(x) for x in leaves]
        return jax.tree_util.tree_unflatten(treedef, wide), sum(
            wider(x) is not None for x in leaves
        )

    def visit(obj, left):
        if left < 0 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, functools.partial):
            # (check_grads(functools.partial(f, y=data), ...): data bound to fn by partial)
            args = [holds(a) for a in obj.args]
            keywords = [k for k, v in obj.keywords.items() if holds(v)]
            if any(args) or keywords:
                slots.append((obj, _PARTIAL, obj.__reduce__()[2]))
            for value in (*obj.args, *obj.keywords.values()):
                if callable(value) and not holds(value):
                    visit(value, left - 1)
            visit(obj.func, left - 1)
            return
        code = getattr(obj, "__code__", None)
        if code is None:
            # (jaxcheck's wrappers hold fn as `f` or `fn`; its derivative maps of order >= 2
            # as `inner`, `jvp` and `vjp`: `_orders`)
            for name in ("f", "fn", "func", "__wrapped__", "inner", "jvp", "vjp", "grad_fn"):
                inner = getattr(obj, name, None)
                if callable(inner):
                    visit(inner, left - 1)
            return
        for cell in obj.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if holds(value):
                slots.append((cell, None, value))
            elif callable(value):
                visit(value, left - 1)
        if str(getattr(obj, "__module__", "")).split(".")[0] in _LIBRARIES:
            return
        names = _names(code)
        space = obj.__globals__
        for name in names:
            value = space.get(name)
            if holds(value):
                slots.append((space, name, value))
            elif callable(value) and not isinstance(value, type):
                visit(value, left - 1)

    visit(fn, depth)
    done, count = [], 0
    try:
        for where, name, value in slots:
            try:
                if name is _PARTIAL:
                    func, args, keywords, extra = value
                    bound = {i: cast(a) for i, a in enumerate(args) if holds(a)}
                    named = {k: cast(v) for k, v in keywords.items() if holds(v)}
                    where.__setstate__(
                        (
                            func,
                            tuple(bound[i][0] if i in bound else a for i, a in enumerate(args)),
                            {k: named[k][0] if k in named else v for k, v in keywords.items()},
                            extra,
                        )
                    )
                    done.append((where, name, value))
                    count += sum(n for _, n in (*bound.values(), *named.values()))
                    continue
                wide, n = cast(value)
                if name is None:
                    where.cell_contents = wide
                else:
                    where[name] = wide
            except Exception:  # noqa: BLE001, PERF203 - left as it is (on other hosts, say)
                continue
            done.append((where, name, value))
            count += n
        yield count
    finally:
        for where, name, value in done:
            if name is _PARTIAL:
                where.__setstate__(value)
            elif name is None:
                where.cell_contents = value
            else:
                where[name] = value


def again_widened(fn, err: BaseException, attempt) -> tuple | None:
    """(`attempt()`, how many arrays were cast) with the float32 arrays `fn` closes over
    cast to float64 (`widened_closures`), where `err`, raised by a float64 attempt, reads
    like fn mixing them with its float64 inputs (`stale_constants`); None where it does
    not, where fn closes over none, or where the attempt fails again."""
    if not stale_constants(err):
        return None
    with widened_closures(fn) as widened:
        if not widened:
            return None
        try:
            return attempt(), widened
        except Exception:  # noqa: BLE001 - the caller's other fallbacks follow
            return None


# the most entries of a container whose arrays `widened_closures` casts
MAX_CONTAINER = 1 << 12
# marks a functools.partial's bound arguments in `widened_closures`
_PARTIAL = object()
# modules whose functions' globals `widened_closures` leaves alone
_LIBRARIES = frozenset({"jax", "jaxlib", "numpy", "optax", "flax", "equinox", "jaxcheck"})


def _names(code) -> set:
    """The global names a code object and those nested in it read."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _names(const)
    return names
