"""fn's program evaluated with every float32 value in it held in float64.

A float32 model often casts values to float32 that are float32 already (logits before a
softmax, `p.astype(jnp.float32)` in a mixed-precision policy, a flax module's dtype). In
the model each such cast does nothing; in the float64 reference it rounds every value
computed from the parameters to float32, and finite differences then see a staircase of
float32 quanta. `evaluate` runs fn's jaxpr, traced on float64 inputs, with float32 (and
complex64) retyped as float64 (complex128) throughout: its casts, the dtypes its products
accumulate in, the arrays it creates, its loops' carries. The arithmetic is fn's own,
traced as the model traces it (a dtype read in fn's Python code reads what the model
reads); only the precision differs.

Only values computed from the held inputs (fn's parameters) are retyped: what fn computes
from its other inputs (random numbers from a key, a table of positions) it computes as in
its own program, so that the reference evaluates fn's function. It works on the jaxpr,
never on fn or on JAX's functions: nothing that JAX keeps between traces (a jitted
function's cached trace) ever sees a retyped value. A custom rule's primal function is
retyped, and its derivative is the rule's own, its programs (a jvp; a fwd and a bwd) traced
at the dtypes fn's program gives it and retyped too; code whose arithmetic the jaxpr does
not show (a kernel, a callback) gets its inputs in their own dtypes, which rounds, and
`narrows` then says so.
"""

import jax
import numpy as np

# the dtypes held wider, and what they are held in
WIDER = {
    np.dtype(np.float32): np.dtype(np.float64),
    np.dtype(np.complex64): np.dtype(np.complex128),
}

# equations evaluated as their sub-program: calls and rematerialisation
_INLINED = {"jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint"}
# custom rules: their primal functions retyped, their derivatives their own (`_rule`)
RULES = {"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"}
# equations reading the bits of their operand: a value computed from params refuses them
_BITWISE = {"bitcast_convert_type"}
# calls whose programs are not retyped: their inputs are cast back to their own dtypes
_KEPT = {"pallas_call", "pure_callback", "io_callback", "ffi_call", "triton_kernel_call"}
_KEPT |= {"shard_map", "xla_pmap"}


class Refused(Exception):
    """fn's program has a part that cannot be retyped."""


def wider(dtype):
    """The dtype `dtype` is held in (itself, but for float32 and complex64)."""
    return WIDER.get(dtype, dtype) if isinstance(dtype, np.dtype) else dtype


def _up(x):
    dtype = getattr(x, "dtype", None)
    if not isinstance(dtype, np.dtype) or dtype not in WIDER:  # (a PRNG key's: no NumPy's)
        return x
    if isinstance(x, np.ndarray | np.generic):
        return np.asarray(x, wider(dtype))
    return jax.lax.convert_element_type(x, wider(dtype))


def evaluate(jaxpr, consts, *args, held=None) -> list:
    """The outputs of open `jaxpr` at `consts`, `args`, retyped (see the module) where they
    are computed from the inputs flagged in `held` (None: all of them). Values computed
    from the others alone (random numbers, a table of positions, a mask) are computed as
    in fn's own program, so that the reference evaluates fn's function."""
    return _evaluate(jaxpr, consts, args, [True] * len(args) if held is None else held)[0]


def _evaluate(jaxpr, consts, args, held) -> tuple[list, list]:
    """(`evaluate`'s outputs, whether each is computed from a held input)."""
    env, wide = {}, set()

    def read(v):
        if type(v).__name__ == "Literal":
            return np.asarray(v.val) if np.ndim(v.val) == 0 else v.val
        return env[v]

    def widened(v):
        return type(v).__name__ != "Literal" and v in wide

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x, h in zip(jaxpr.invars, args, held, strict=True):
        env[v] = _up(x) if h else x
        if h:
            wide.add(v)
    for eqn in jaxpr.eqns:
        flags = [widened(v) for v in eqn.invars]
        invals = [read(v) for v in eqn.invars]
        if not any(flags):  # as fn computes it
            subfuns, params = _bind_params(eqn)
            outs, out_wide = eqn.primitive.bind(*subfuns, *invals, **params), False
        else:
            outs, out_wide = _equation(eqn, invals, flags)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        out_wide = out_wide if isinstance(out_wide, list) else [out_wide] * len(outs)
        for v, x, w in zip(eqn.outvars, outs, out_wide, strict=True):
            if type(v).__name__ != "DropVar":
                env[v] = _up(x) if w else x
                if w:
                    wide.add(v)
    return [read(v) for v in jaxpr.outvars], [widened(v) for v in jaxpr.outvars]


def _equation(eqn, invals, flags) -> tuple:
    """(The outputs of `eqn` at `invals` (those flagged in `flags` computed from a held
    input), retyped; whether each is computed from a held input: a list, or one flag for
    all.)"""
    name = eqn.primitive.name
    held = [_up(x) if f else x for x, f in zip(invals, flags)]
    if name in RULES:
        return _rule(eqn, held, flags), True
    if name in _INLINED:
        sub = next(
            (eqn.params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr") if k in eqn.params),
            None,
        )
        if sub is None:
            raise Refused(f"{name} without a program")
        if hasattr(sub, "consts"):  # a ClosedJaxpr
            return _evaluate(sub.jaxpr, sub.consts, held, flags)
        return _evaluate(sub, (), held, flags)
    if name in _KEPT:
        own = _declared(held, [getattr(v.aval, "dtype", None) for v in eqn.invars])
        return eqn.primitive.bind(*own, **eqn.params), True
    if name in _BITWISE:  # (its bits are those of the dtype fn has, not of float64's)
        raise Refused(f"{name} of a value computed from params")
    params = {k: _param(name, v) for k, v in eqn.params.items()}
    # (its other float32 inputs cast up too, exactly: the primitive takes one dtype)
    return eqn.primitive.bind(*[_up(x) for x in invals], **params), True


def held_wider(eqn, values) -> list:
    """Per input of `eqn`, whether `values` gives it wider than `eqn` declares it (float64
    for float32): a value held in float64."""
    return [
        _floating(d) and getattr(x, "dtype", d) == wider(d) != d
        for x, d in zip(values, (getattr(v.aval, "dtype", None) for v in eqn.invars))
    ]


def rule_at(eqn, values) -> list:
    """The outputs of custom rule equation `eqn` (of fn's program, typed as fn traced it)
    at `values`, those given wider than it declares (float64 for float32) held so: its
    primal function retyped, its derivative its own, retyped too (`_rule`). A rule behind
    a cast to float32 is typed float32 in fn's float64 trace as well, and its own check
    then judged it only at float32 resolution."""
    declared = [getattr(v.aval, "dtype", None) for v in eqn.invars]
    flags = held_wider(eqn, values)
    # (the others as declared: an index in int64 where fn's program has it in int32)
    values = [
        x if f or not isinstance(d, np.dtype) else jax.numpy.asarray(x, d)
        for x, f, d in zip(values, flags, declared)
    ]
    return _rule(eqn, values, flags)


def _rule(eqn, invals, flags) -> list:
    """A custom rule's outputs: its primal function retyped; its derivative the rule's own,
    its programs retyped (`_jvp_in_float64`, `_vjp_in_float64`), or where they cannot be
    read, bound at the dtypes fn's program gives it (the inputs cast back, the result cast
    up)."""
    sub = next(eqn.params[k] for k in ("call_jaxpr", "fun_jaxpr") if k in eqn.params)
    subfuns, params = _bind_params(eqn)
    dtypes = [getattr(v.aval, "dtype", None) for v in eqn.invars]

    def rule(*xs):
        return eqn.primitive.bind(*subfuns, *xs, **params)

    def narrow(xs):
        return _declared(xs, dtypes)

    def primal(*xs):
        return _evaluate(sub.jaxpr, sub.consts, xs, flags)[0]

    # the rule is differentiated in the inputs computed from params alone: JAX refuses a
    # custom_vjp's closed-over values, equinox its other arrays, as fn's derivative does
    moved = [i for i, (f, d) in enumerate(zip(flags, dtypes)) if f and _floating(d)]

    def part(xs):
        def at(*ys):
            args = list(narrow(xs))
            for i, y in zip(moved, ys):
                args[i] = y
            return rule(*args)

        return at, [narrow(xs)[i] for i in moved]

    def cast_like(ts, ys):
        return [t.astype(y.dtype) if _floating(y.dtype) else t for t, y in zip(ts, ys)]

    nconst = eqn.params.get("num_consts", 0)

    def retyped(program, *args):
        # (None where another JAX lays the programs out otherwise, or the rule is
        # differentiated in its closed-over values, which JAX refuses: no program then)
        if not all(i >= nconst for i in moved):
            return None
        try:
            return program(eqn, *args, flags, moved)
        except Exception:  # noqa: BLE001 - the rule as fn binds it, below
            return None

    if eqn.primitive.name == "custom_jvp_call":
        held = jax.custom_jvp(primal)

        def jvp(primals, tangents):
            values = primal(*primals)
            out = retyped(_jvp_in_float64, primals, tangents)
            if out is None:
                at, ys = part(primals)
                ts = [tangents[i].astype(dtypes[i]) for i in moved]
                out = jax.jvp(at, ys, ts)[1]
            return values, cast_like(out, values)

        held.defjvp(jvp)
        return held(*invals)
    held = jax.custom_vjp(primal)

    def bwd(xs, cts):
        grads = retyped(_vjp_in_float64, xs, cts)
        if grads is None:
            at, ys = part(xs)
            outs, pull = jax.vjp(at, *ys)
            grads = dict(zip(moved, pull(cast_like(cts, outs))))
        return tuple(grads[i].astype(x.dtype) if i in grads else None for i, x in enumerate(xs))

    held.defvjp(lambda *xs: (primal(*xs), xs), bwd)
    return held(*invals)


# A rule's own derivative programs (its jvp, its fwd and bwd) traced at fn's dtypes are
# evaluated retyped as well, so that the reference takes the rule's derivative in float64
# as it does where fn has no cast: a float32 rule's rounding is not counted as its error.
# They are read from the equation's parameters as JAX 0.9 to 0.11 lay them out; with
# another layout the rule's derivative is taken at fn's dtypes (`_rule`).


def _call(fun, *args):
    return fun.call_wrapped(*args) if hasattr(fun, "call_wrapped") else fun(*args)


def _jvp_in_float64(eqn, primals, tangents, flags, moved) -> list:
    """The tangents out of custom_jvp equation `eqn` at `primals` along `tangents` (only
    those of the inputs in `moved` nonzero), its jvp program retyped."""
    nconst = eqn.params["num_consts"]
    fun = eqn.params.get("jvp_jaxpr_fun", eqn.params.get("jvp_jaxpr_thunk"))
    args = range(nconst, len(primals))
    if eqn.params.get("symbolic_zeros"):
        zeros = [i not in moved for i in args]
        nonzero = [_up(tangents[i]) for i in moved]
    else:  # (the rule takes zeros as arrays, as JAX's jvp gives them)
        zeros = [False] * len(args)
        nonzero = [_up(tangents[i]) if i in moved else _zero_tangent(primals[i]) for i in args]
    jaxpr, consts, out_zeros = _call(fun, *zeros)
    outs, _ = _evaluate(
        jaxpr, consts, [*primals[nconst:], *nonzero], [*flags[nconst:], *[True] * len(nonzero)]
    )
    values, rest = outs[: len(out_zeros)], iter(outs[len(out_zeros) :])
    return [_up(_zero_tangent(v) if z else next(rest)) for v, z in zip(values, out_zeros)]


def _zero_tangent(x):
    """A zero tangent of `x`, as JAX's jvp gives one (float0 for an integer)."""
    dtype = jax.numpy.result_type(x)
    if _floating(dtype):
        return jax.numpy.zeros(np.shape(x), dtype)
    return np.zeros(np.shape(x), jax.dtypes.float0)


def _vjp_in_float64(eqn, xs, cts, flags, moved) -> dict:
    """{input index: cotangent} of custom_vjp equation `eqn` at `xs` for `cts`: its fwd
    program retyped, and its bwd, traced at fn's dtypes, retyped on the residuals that
    gives (a cast inside the bwd, a no-op in the model, rounded them)."""
    nconst = eqn.params["num_consts"]
    nonzeros = [i in moved for i in range(nconst, len(xs))]
    fwd, consts = _call(eqn.params["fwd_jaxpr_thunk"], *nonzeros)
    outs, _ = _evaluate(fwd, consts, list(xs[nconst:]), list(flags[nconst:]))
    trees = eqn.params["out_trees"]()
    res_tree = trees[1]
    forwarded = trees[2] if len(trees) > 2 else [None] * res_tree.num_leaves
    made = res_tree.num_leaves - sum(f is not None for f in forwarded)
    values, declared = iter(outs[:made]), iter(v.aval for v in fwd.outvars[:made])
    res, avals = [], []
    for f in forwarded:  # (inputs passed on as residuals stand apart, as JAX lays them out)
        res.append(next(values) if f is None else xs[f])
        avals.append(next(declared) if f is None else eqn.invars[f].aval)
    avals += [v.aval for v in eqn.outvars]
    wanted = [i - nconst for i in moved]

    def bwd(*args):  # (traced at fn's dtypes, then evaluated retyped: its casts as well)
        got = _call(eqn.params["bwd"], *args)
        return [_dense(got[i], eqn.invars[i + nconst].aval) for i in wanted]

    closed = jax.make_jaxpr(bwd)(*[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals])
    flags = [getattr(r, "dtype", None) != a.dtype for r, a in zip(res, avals)]
    grads, _ = _evaluate(
        closed.jaxpr, closed.consts, [*res, *[_up(c) for c in cts]], [*flags, *[True] * len(cts)]
    )
    return dict(zip(moved, grads, strict=True))


def _dense(g, aval):
    """A cotangent the bwd gives, as an array (zeros where it gives none)."""
    return g if hasattr(g, "dtype") else jax.numpy.zeros(aval.shape, aval.dtype)


def _declared(xs, dtypes) -> list:
    """`xs` with the floating ones cast to their `dtypes`, those fn's program declares."""
    return [
        x.astype(d) if _floating(d) and getattr(x, "dtype", d) != d else x
        for x, d in zip(xs, dtypes, strict=True)
    ]


def _bind_params(eqn) -> tuple:
    """(The functions, the parameters) to bind `eqn`'s primitive with, as JAX's own
    evaluation of a jaxpr does: JAX 0.10 returns the parameters alone, earlier versions
    the functions a call takes too."""
    got = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], dict):
        return got
    return (), got


def _floating(dtype) -> bool:
    return isinstance(dtype, np.dtype) and np.issubdtype(dtype, np.inexact)


def _param(name, value):
    if isinstance(value, type) and issubclass(value, np.generic):  # (lax.mul's out_dtype)
        value = np.dtype(value)
    if isinstance(value, np.dtype):
        return wider(value)
    if hasattr(value, "jaxpr") and hasattr(value, "consts"):  # a ClosedJaxpr
        return retyped(value)
    if hasattr(value, "eqns") and hasattr(value, "invars"):  # an open Jaxpr
        closed = jax.make_jaxpr(lambda *a: evaluate(value, (), *a))(
            *[_struct(v.aval) for v in value.invars]
        )
        if closed.consts:
            raise Refused("an open sub-program with constants")
        return closed.jaxpr
    if isinstance(value, tuple) and any(hasattr(v, "eqns") or hasattr(v, "consts") for v in value):
        items = [_param(name, v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def _struct(aval):
    return jax.ShapeDtypeStruct(aval.shape, wider(aval.dtype))


def retyped(closed):
    """ClosedJaxpr `closed` traced again through `evaluate`, on its inputs retyped, and all
    its outputs too (a branch or a loop body whose output is computed from no input, a
    constant, gives the type the others give)."""
    return jax.make_jaxpr(lambda *a: [_up(y) for y in evaluate(closed.jaxpr, closed.consts, *a)])(
        *[_struct(a) for a in closed.in_avals]
    )


def function(f, example):
    """`f` (a function of one pytree, as `example`, returning a list of arrays) evaluated
    retyped: traced once at `example` (values or tracers), then its program evaluated."""
    closed = jax.make_jaxpr(f)(example)
    treedef = jax.tree_util.tree_structure(example)

    def wide(x):
        leaves = jax.tree_util.tree_leaves(x)
        if jax.tree_util.tree_structure(x) != treedef:
            raise Refused("another structure")
        return evaluate(closed.jaxpr, closed.consts, *leaves)

    return wide


def narrows(jaxpr, held) -> bool:
    """Whether an equation of `jaxpr` (or of its sub-programs) computes a float value
    narrower than float64 from a float64 one computed from the inputs flagged in `held`: a
    rounding that `evaluate` left in."""
    tainted = {v for v, h in zip(jaxpr.invars, held) if h}
    for eqn in jaxpr.eqns:
        flags = [type(v).__name__ != "Literal" and v in tainted for v in eqn.invars]
        if not any(flags):
            continue
        tainted.update(eqn.outvars)
        if any(_bits(v) == 64 for v, f in zip(eqn.invars, flags) if f) and any(
            0 < _bits(v) < 64 for v in eqn.outvars
        ):
            return True
        for value in eqn.params.values():
            for item in value if isinstance(value, tuple | list) else (value,):
                sub = getattr(item, "jaxpr", item)
                if hasattr(sub, "eqns") and narrows(sub, _sub_flags(eqn, flags, sub)):
                    return True
    return False


def _sub_flags(eqn, flags, sub) -> list:
    """Which inputs of `eqn`'s sub-program `sub` are computed from held inputs: those of
    its equation's inputs that are, where the two line up (a call, a rule, a branch of a
    `cond` after its index); all of them in a loop, whose carries mix."""
    if eqn.primitive.name not in {"while", "scan"}:
        if len(sub.invars) == len(flags):
            return flags
        if eqn.primitive.name == "cond" and len(sub.invars) == len(flags) - 1:
            return flags[1:]
    return [True] * len(sub.invars)


def _bits(v) -> int:
    """The width of a float (a complex's real part) value `v`; 0 for other values."""
    dtype = getattr(getattr(v, "aval", None), "dtype", None)
    if not isinstance(dtype, np.dtype) or not np.issubdtype(dtype, np.inexact):
        return 0
    return np.finfo(dtype).bits
