"""Finding the custom derivative rules a model calls, and the inputs each one receives.

`fn(params, *args)` is traced to a jaxpr, which is then evaluated equation by equation
with the concrete params and args. Every `custom_vjp`/`custom_jvp` call equation (found by
its primitive's name, which differs across JAX versions) records the values it receives,
and the rule is later re-bound on them (`Found.function`): that callable has the model's
own rule, differentiable, at the model's own point.

Sub-jaxprs are followed where their inputs are known: calls (`jit`, `closed_call`,
`checkpoint`/`remat`) get the caller's values; a `cond` runs the branch its index takes;
the body of a `scan` or a `while` loop is evaluated once, at its first iteration (the
report says so); every other higher-order primitive (`shard_map`, a primitive of a
future JAX) is run as it is, and the rules inside it are listed without inputs, as not
intercepted. A custom rule is checked as a whole: the rules its own primal, fwd, bwd or
jvp call are not looked for (a wrong one inside is named as the rule around it).
"""

import dataclasses
import functools
import itertools
import os
import re
import site
import sysconfig
from typing import Any

import jax
import numpy as np

from . import _precision, _retype, _tree

OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# where installed packages live: JAX counts their files as the user's unless they lie
# below the standard library (a system Python's site-packages does, a virtualenv's not)
_INSTALLED = tuple(
    os.path.join(os.path.abspath(p), "")
    for p in {
        *(sysconfig.get_paths()[k] for k in ("purelib", "platlib")),
        *getattr(site, "getsitepackages", list)(),
        site.getusersitepackages(),
    }
    if p
)
_CALLS = ("pjit", "jit", "closed_call", "core_call", "remat", "remat2", "checkpoint")
_CALL_NAMES = {  # how a call primitive is named in the report
    "pjit": "jit",
    "closed_call": "jit",
    "core_call": "jit",
    "remat": "checkpoint",
    "remat2": "checkpoint",
}
_JAX_DIR = os.path.dirname(jax.__file__) + os.sep
SUBJAXPR_KEYS = ("jaxpr", "jaxprs", "branches", "body_jaxpr", "cond_jaxpr", "call_jaxpr")


@dataclasses.dataclass(frozen=True)
class Found:
    """One custom rule called by the model."""

    kind: str  # "custom_vjp" or "custom_jvp"
    name: str  # the decorated function's name
    where: str  # file:line (function) of the call site
    context: str  # e.g. "scan body, first iteration"; "" at the top level
    eqn: Any = dataclasses.field(repr=False, compare=False)
    inputs: tuple | None = dataclasses.field(default=None, repr=False, compare=False)
    note: str = ""  # why the inputs were not captured
    # the values the rule's function closes over (arrays fn's trace lifted into the call),
    # held fixed: JAX differentiates a custom rule in its explicit arguments only
    consts: tuple = dataclasses.field(default=(), repr=False, compare=False)
    # per argument of the rule's call, the index in `inputs` of its value: one traced
    # value passed as several arguments (custom_root hands the closed-over arrays to
    # both its function and its solver) is one input, perturbed as one, as in the model
    positions: tuple | None = dataclasses.field(default=None, repr=False, compare=False)
    calls: int = dataclasses.field(default=1, compare=False)  # calls merged into this one
    # indices in `inputs` of the constants of fn's trace (a Python number passed to the
    # rule, as a temperature): held fixed, as they are in the model
    constants: tuple = dataclasses.field(default=(), compare=False)
    # indices of the rule's outputs that nothing in fn uses (a flash-attention rule's
    # log-sum-exp, a solver's statistics): left out of its check, as fn's derivative never
    # sends them a cotangent
    dead: tuple = dataclasses.field(default=(), compare=False)
    # the same rule's equation where fn is traced in float64 (None where it cannot be):
    # the equation recorded at float32 is typed float32 throughout, its literals included,
    # and refuses float64 inputs, which would leave the rule's reference in float32
    wide: Any = dataclasses.field(default=None, repr=False, compare=False)
    # the paths of the params leaves the rule's inputs depend on (None where its inputs
    # were not followed): a rule no failing leaf reaches cannot be what fails it
    sources: frozenset | None = dataclasses.field(default=None, compare=False)
    # tells rule objects of one name apart (`_identity`)
    identity: tuple = dataclasses.field(default=(), repr=False, compare=False)
    # the rule's other calls from this site with inputs that depend on params (a
    # tree_map or a Python loop over layers), as (their place among its calls, counted
    # from 1; the call), at most `MAX_OTHER_CALLS_KEPT` of them: checked where fn fails and
    # this call passes (`_rule_report`)
    others: tuple = dataclasses.field(default=(), repr=False, compare=False)

    @property
    def in_jax(self) -> bool:
        """Whether the rule is one of JAX's own (`jax_own`)."""
        return jax_own(self.eqn)

    @property
    def title(self) -> str:
        inside = f" ({self.context})" if self.context else ""
        return f"{self.kind} {self.name} at {self.where}{inside}"

    def function(self):
        """The rule as a function of its inputs, differentiable through the rule."""
        eqn, consts, positions = self.eqn, list(self.consts), self.positions

        dead = self.dead

        def rule(*xs):
            if positions is not None:
                xs = [xs[i] for i in positions]
            values = consts + list(xs)
            wide = _widened(eqn, self.wide, values)
            if wide is None and _held_wider(eqn, values):
                out = _retype.rule_at(eqn, values)
            elif wide is None:
                out = _bind(eqn, values)
            else:  # (non-float outputs as recorded: an int64 count back to int32)
                out = _bind(self.wide, wide)
                out = [
                    jax.numpy.asarray(y, v.aval.dtype) if _other_int(y, v.aval.dtype) else y
                    for y, v in zip(out, eqn.outvars)
                ]
            if len(out) == 1:
                return out[0]
            return tuple(None if i in dead else y for i, y in enumerate(out))

        rule.__name__ = self.name
        rule.nondiff_argnums = self.constants  # read by verify_rule: held fixed
        return rule


def jax_own(eqn) -> bool:
    """Whether the rule of a custom_vjp/custom_jvp equation is one of JAX's own (jax.nn,
    jax.numpy, lax): its function and the functions of its derivative (its jvp; its fwd
    and bwd) defined in files of the jax package."""
    if _custom_gradient_name(eqn) is not None:
        return False  # jax.custom_gradient's wrapper is JAX's, the rule the user's
    if _name(eqn) in USERS_INSIDE:
        return False
    if _JAX_DIR not in _source(_rule_jaxpr(eqn)):
        return False
    # a rule of the user's around a function of JAX's (jax.custom_jvp(jnp.sin) with the
    # user's jvp, jax.custom_vjp(jnp.exp) with the user's fwd and bwd) is the user's
    return _users_rule(eqn) is None


# JAX's rules whose derivative runs functions the user passed in, traced into jaxprs where
# `_users_rule` finds no Python function: lax.custom_root's (its solve and tangent_solve;
# a tangent_solve 1 % off was left unchecked as JAX's own, and the report said fn's error
# was outside the rules)
USERS_INSIDE = frozenset({"_custom_root"})


def derivative_beyond_jaxpr(jaxpr) -> bool:
    """Whether what `jaxpr` computes leaves its derivatives open: it (or a sub-jaxpr,
    inside custom rules too) calls a custom rule that is not JAX's own, whose bwd or jvp
    its jaxpr names but does not show, or any other primitive of a custom_ kind (a custom
    linear solve's transpose)."""
    for eqn in jaxpr.eqns:
        if "custom_" in eqn.primitive.name and not (rule_kind(eqn) and jax_own(eqn)):
            return True
        for value in eqn.params.values():
            if any(derivative_beyond_jaxpr(sub) for sub, _ in jaxprs_of(value)):
                return True
    return False


def rule_kind(eqn) -> str | None:
    name = eqn.primitive.name
    for kind in ("custom_vjp", "custom_jvp"):
        if kind in name:
            return kind
    return None


def _traced(fn, params, args):
    """(fn's closed jaxpr at params and args, traced over their array leaves; the array
    leaves; which leaves they are)."""
    leaves, treedef = jax.tree_util.tree_flatten((params, args))
    from_params = len(jax.tree_util.tree_leaves(params))
    # a Python float or complex among params is a parameter like any other (the check
    # differentiates it as an array): traced too, or a rule taking it would hold it fixed;
    # but for one an equinox Module holds, which the check holds fixed too (`Dropout(p=0.0)`, which
    # eqx.nn.MultiheadAttention holds, asks for a key unless its p is a Python 0)
    leaves, held = list(leaves), _tree.held_by_modules(params)
    for i in [i for i, x in enumerate(leaves[:from_params]) if isinstance(x, float | complex)]:
        if i not in held:
            leaves[i] = _tree.strong_array(leaves[i])
    traced = [
        i for i, x in enumerate(leaves) if _tree.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)
    ]

    def flat(*xs):
        p, a = jax.tree_util.tree_unflatten(treedef, _tree.filled(leaves, traced, xs))
        return fn(p, *a)

    values = [leaves[i] for i in traced]
    return jax.make_jaxpr(flat)(*values), values, traced


def find(fn, params, args, checked=None) -> tuple[list, list]:
    """(the rules `fn(params, *args)` calls, with their inputs where captured; notes).
    `checked`: which of them will be checked (all by default), given their float64
    records (`Found.wide`)."""
    closed, values, traced = _traced(fn, params, args)
    listed = _Search()
    listed.listed([(closed.jaxpr, [])], "", "")
    if not listed.found:  # no rule anywhere: nothing to evaluate op by op
        return [], []
    search = _Search()
    paths = _tree.leaf_paths(params)
    # per input, the params leaf it is: none for args, nor for params leaves the check
    # holds fixed (a PRNG key, an integer step count), whose values a rule's inputs drawn
    # from them do not vary with (noise drawn from a key in params was checked as a
    # parameter, and a right reparameterization rule giving it no gradient called wrong)
    flags = [
        frozenset([paths[i]]) if i < len(paths) and _floating(x.dtype) else NONE
        for i, x in zip(traced, values, strict=True)
    ]
    search.eval(closed.jaxpr, closed.consts, values, "", "", flags)
    found = _unique(search.found)
    return _with_wide(fn, params, args, closed.jaxpr, found, checked), search.notes


def _with_wide(fn, params, args, jaxpr, found, checked=None) -> list:
    """`found`, each rule with its equation where fn is traced with its floating inputs in
    float64 (`Found.wide`): the equation at the same place in that trace as in fn's
    `jaxpr` (`_rule_places`: a rule fn does not call in float64 gets none); as it is where
    fn refuses float64 or nothing needs it (of the rules `checked` picks)."""

    def needs(f):
        return f.inputs is not None and _narrow(f.eqn) and (checked is None or checked(f))

    if not any(needs(f) for f in found):
        return found

    def wide(x, ints=False):
        if ints and _tree.is_array(x) and x.dtype == np.int32:
            return jax.ShapeDtypeStruct(np.shape(x), np.int64)
        if not _tree.is_array(x) or not _floating(x.dtype):
            return x
        complex_ = jax.numpy.issubdtype(x.dtype, jax.numpy.complexfloating)
        return jax.ShapeDtypeStruct(np.shape(x), np.complex128 if complex_ else np.float64)

    def traced(ints=False):
        with _precision.x64_scope(True), _precision.widening():
            structs = jax.tree_util.tree_map(lambda x: wide(x, ints), (params, args))
            return _traced(fn, structs[0], structs[1])[0]

    try:
        closed = traced()
    except Exception as err:  # noqa: BLE001 - fn refuses float64: its rules are checked as traced
        # (unless fn mixed float32 data it closes over, or int32 arrays among its inputs,
        # with 64-bit values, as the finite-difference reference does: traced with them cast)
        again = _precision.again_widened(fn, err, traced)
        if again is None and _precision.int_mismatch(err):
            try:
                again = (traced(ints=True),)
            except Exception:  # noqa: BLE001 - checked as traced
                again = None
        if again is None:
            return found
        closed = again[0]
    wide_places = _rule_places(closed.jaxpr)
    twins = {id(e): wide_places[p] for p, e in _rule_places(jaxpr).items() if p in wide_places}

    def widened(f):
        twin = twins.get(id(f.eqn))
        return dataclasses.replace(f, wide=twin) if twin is not None and needs(f) else f

    return [
        dataclasses.replace(widened(f), others=tuple((k, widened(g)) for k, g in f.others))
        for f in found
    ]


def _rule_places(jaxpr, prefix=()) -> dict:
    """Every custom rule's equation in `jaxpr` and its sub-jaxprs, by its place: the calls
    around it (each by its primitive, its count among that jaxpr's equations of that
    primitive with sub-jaxprs, and which sub-jaxpr), then the rule (its kind, name,
    definition, call site, input shapes) and its count among such rules there. Other
    equations do not count, so a trace that casts more (bfloat16 sums go through float32)
    gives the same places; a fn that calls another rule in float64 gives another place."""
    out, counts = {}, {}

    def count(ident):
        counts[ident] = counts.get(ident, 0) + 1
        return counts[ident] - 1

    for eqn in jaxpr.eqns:
        if rule_kind(eqn) is not None:
            shapes = tuple(getattr(v.aval, "shape", None) for v in eqn.invars)
            ident = (eqn.primitive.name, _name(eqn), defined_at(eqn), location(eqn), shapes)
            out[(*prefix, ident, count(ident))] = eqn
            continue
        subs = [(key, jaxprs_of(eqn.params.get(key))) for key in SUBJAXPR_KEYS]
        if not any(found for _, found in subs):
            continue
        call = (eqn.primitive.name, count(("call", eqn.primitive.name)))
        for key, found in subs:
            for i, (inner, _) in enumerate(found):
                out.update(_rule_places(inner, (*prefix, call, key, i)))
    return out


def _floating(dtype) -> bool:
    """Whether `dtype` is a floating-point or complex one (bfloat16 too, which NumPy's
    `issubdtype` does not count; not a PRNG key's)."""
    return jax.numpy.issubdtype(dtype, jax.numpy.inexact)


def _narrow(eqn) -> bool:
    """Whether a rule's equation takes a floating input below 64 bits."""
    return any(
        _floating(v.aval.dtype) and not _wide(v.aval.dtype)
        for v in eqn.invars
        if hasattr(v.aval, "dtype")
    )


def _wide(dtype) -> bool:
    """Whether a floating or complex `dtype` has 64-bit parts (complex64's are 32-bit)."""
    return jax.numpy.finfo(dtype).bits >= 64


def _widened(narrow, wide, values) -> list | None:
    """`values` for the rule's float64 equation `wide`, when they are float64 where the
    recorded `narrow` one is typed lower and `wide` takes float64 there; else None (the
    rule is run as recorded)."""
    if wide is None:
        return None
    asked = False
    for value, n, w in zip(values, narrow.invars, wide.invars, strict=True):
        dtype = getattr(value, "dtype", None)
        if dtype is None or not _floating(dtype):
            continue  # a Python number takes the type it is given; keys and ints stay
        if _wide(dtype):
            if w.aval.dtype != dtype:
                return None
            asked = asked or n.aval.dtype != dtype
    if not asked:
        return None
    # (integers too: an index fn makes is int32 in its float32 trace, int64 in its float64 one)
    return [
        jax.numpy.asarray(value, w.aval.dtype) if _numeric(value, w.aval.dtype) else value
        for value, w in zip(values, wide.invars)
    ]


def _held_wider(eqn, values) -> bool:
    """Whether rule equation `eqn` is given float64 values where it is typed float32 (it
    has no float64 twin: fn casts its inputs to float32 in its float64 trace as well), and
    can be evaluated so (`_retype.rule_at`)."""
    return eqn.primitive.name in _retype.RULES and any(_retype.held_wider(eqn, values))


def _numeric(value, dtype) -> bool:
    """Whether `value` is cast to `dtype` for a rule's float64 equation: floats, and
    integers of another width (keys and booleans stay as they are)."""
    return _floating(dtype) or _other_int(value, dtype)


def _other_int(value, dtype) -> bool:
    """Whether `value` is an integer array and `dtype` an integer type of another width."""
    have = getattr(value, "dtype", None)
    ints = [d is not None and jax.numpy.issubdtype(d, jax.numpy.integer) for d in (have, dtype)]
    return all(ints) and have != dtype


def fn_rule_kinds(fn, params, args) -> frozenset:
    """The kinds of rules ("custom_vjp", "custom_jvp") `fn(params, *args)` calls on its
    way, from one trace of fn (both where it cannot be traced: a fn run eagerly, as a
    boolean mask's indexing asks, may call either)."""
    try:
        closed = _traced(fn, params, args)[0]
    except Exception:  # noqa: BLE001 - only a question
        return frozenset(RULE_KINDS)
    return rule_kinds(closed.jaxpr)


RULE_KINDS = ("custom_vjp", "custom_jvp")


def calls(jaxpr, *kinds: str) -> bool:
    """Whether `jaxpr` calls a rule of one of `kinds` ("custom_vjp", "custom_jvp") on its
    way (in its sub-jaxprs too, not inside another custom rule, whose own rule stands in),
    found in one walk."""
    return bool(rule_kinds(jaxpr) & set(kinds))


def rule_kinds(jaxpr) -> frozenset:
    """The kinds of the rules `jaxpr` calls (see `calls`)."""
    search = _Search()
    search.listed([(jaxpr, [])], "", "")
    return frozenset(f.kind for f in search.found if not _held_tangent(f.eqn))


def _held_tangent(eqn) -> bool:
    """Whether `eqn` is the custom_jvp with which jaxcheck's own derivative maps hold their
    fixed tangent (`_orders._held`): not a rule of fn's."""
    from . import _orders  # noqa: PLC0415 - _orders imports this module

    name, at, where = _source(_rule_jaxpr(eqn)).rpartition(" at ")
    return bool(at) and name == _orders._held.__name__ and where.startswith(_orders.__file__)


# the most other calls of a rule from one site checked (`_rule_report`), among those the
# failing leaves reach, and the most kept to choose them from (`Found.others`)
MAX_OTHER_CALLS = 4
MAX_OTHER_CALLS_KEPT = 64


def _unique(found) -> list:
    """One entry per rule and call site (a layer called in a loop is one rule), with the
    first inputs captured that depend on params (a loop's first layer may take the data
    alone, which the check holds fixed). Rule objects of one name called from one site
    (layers a factory made with different settings) are each a rule, told apart in their
    context."""
    seen, counts, sources, objects, every = {}, {}, {}, {}, {}
    for f in found:
        key = (f.kind, f.name, f.where, f.context, f.identity)
        counts[key] = counts.get(key, 0) + 1
        every.setdefault(key, []).append((counts[key], f))
        if key not in seen or _better_inputs(f, seen[key]):
            seen[key] = f
        before = sources.get(key, NONE)
        sources[key] = None if before is None or f.sources is None else before | f.sources
        objects.setdefault(key[:-1], {}).setdefault(key, None)
    out = []
    for key, f in seen.items():
        others = tuple(
            (i, g)
            for i, g in every[key]
            if g is not f and g.inputs is not None and (g.sources is None or g.sources)
        )[:MAX_OTHER_CALLS_KEPT]
        f = dataclasses.replace(f, calls=counts[key], sources=sources[key], others=others)
        same = list(objects[key[:-1]])
        if len(same) > 1:
            which = f"rule {same.index(key) + 1} of {len(same)} of that name called here"
            f = dataclasses.replace(f, context=_join(f.context, which))
        out.append(f)
    return out


def _better_inputs(f: Found, before: Found) -> bool:
    """Whether call `f` of a rule gives its check more than the call `before` did:
    inputs where there were none, or inputs that depend on params where those did not."""
    if f.inputs is None:
        return False
    return before.inputs is None or (not before.sources and bool(f.sources))


def _bind(eqn, values):
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = []
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
    out = eqn.primitive.bind(*subfuns, *values, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def location(eqn) -> str:
    """Where `eqn` was traced: the innermost frame outside JAX and jaxcheck ("" when there
    is none, as for a rule passed itself as fn: the caller's site stands in), with files
    under the working directory relative to it."""
    try:
        from jax._src import source_info_util  # noqa: PLC0415 - no public API for this

        try:
            frames = source_info_util.user_frames(eqn.source_info.traceback)
        except AttributeError:  # jax < 0.5 takes the source info itself
            frames = source_info_util.user_frames(eqn.source_info)
        # the frames inside jaxcheck's call of fn: jax < 0.8 keeps the whole stack, where
        # the frame past jaxcheck's (a rule passed itself as fn) is verify's caller
        inner = itertools.takewhile(lambda f: not f.file_name.startswith(OWN_DIR), frames)
        frame = next(inner, None)
    except Exception:  # noqa: BLE001 - only a label
        return "unknown location"
    if frame is None:
        return ""
    column = f":{frame.start_column}" if frame.start_column else ""
    return f"{_relative(frame.file_name)}:{frame.start_line}{column} ({frame.function_name})"


def defined_at(eqn) -> str:
    """Where a rule's function was defined, from its traced jaxpr ("" where unknown); for
    the user's rule around a function of JAX's (jax.custom_jvp(jnp.sin)), where the user's
    function of its derivative was."""
    source = _source(_rule_jaxpr(eqn))
    if _JAX_DIR in source:
        source = _users_rule(eqn) or source
    name, at, where = source.rpartition(" at ")
    return f"{_relative(where)} ({name})" if at else ""


def _source(jaxpr) -> str:
    """The function JAX traced a (closed) jaxpr from, as "name at file:line" ("" where
    unknown)."""
    info = getattr(getattr(jaxpr, "jaxpr", jaxpr), "debug_info", None)
    return str(getattr(info, "func_src_info", None) or "")


def _rule_jaxpr(eqn):
    """The primal function's jaxpr of a custom rule's equation (`fun_jaxpr` in jax < 0.5's
    custom_vjp_call_jaxpr); None for other equations."""
    return eqn.params.get("call_jaxpr") or eqn.params.get("fun_jaxpr")


def _relative(path: str) -> str:
    here = os.getcwd() + os.sep
    return path[len(here) :] if path.startswith(here) else path


def _custom_gradient_name(eqn) -> str | None:
    """The name of the user's function behind a `jax.custom_gradient` (a custom_vjp whose
    function, `wrapped_fun`, is defined in JAX), from the innermost user frame of the
    equations it traced; None for any other rule."""
    jaxpr = _rule_jaxpr(eqn)
    inner = getattr(jaxpr, "jaxpr", jaxpr)
    info = _source(jaxpr)
    if not (info.startswith("wrapped_fun ") and _JAX_DIR in info):
        return None
    try:
        from jax._src import source_info_util  # noqa: PLC0415 - no public API for this

        for e in getattr(inner, "eqns", ()):
            frame = source_info_util.user_frame(e.source_info.traceback)
            if frame is not None:
                return frame.function_name.rsplit(".", 1)[-1]  # a qualified name in 3.11+
    except Exception:  # noqa: BLE001 - only a name
        pass
    return "custom_gradient"


def _name(eqn) -> str:
    user = _custom_gradient_name(eqn)
    if user is not None:
        return user
    jaxpr = _rule_jaxpr(eqn)
    info = getattr(getattr(jaxpr, "jaxpr", jaxpr), "debug_info", None)
    text = getattr(info, "func_name", None) or getattr(info, "func_src_info", None) or ""
    name = str(text).split(" at ")[0] or eqn.params.get("name", "") or "<rule>"
    return _wrapped_name(jaxpr, name) or name


def _wrapped_name(jaxpr, name: str) -> str | None:
    """The name of the user's function that a rule's function `name`, a library's wrapper
    (equinox's `filter_custom_jvp` makes `jax.custom_jvp(fn_wrapper)`, whose `fn_wrapper`
    calls the decorated function), calls: the outermost of the user's frames inside the
    wrapper's in the tracebacks of the equations it traced (files JAX counts as the user's,
    not the installed packages'); None where the function is the user's own, or calls none
    of the user's."""
    try:
        from jax._src import source_info_util  # noqa: PLC0415 - no public API for this

        where = _source(jaxpr).rpartition(" at ")[2].rpartition(":")[0]
        if not where or (source_info_util.is_user_filename(where) and not _installed(where)):
            return None
        for e in getattr(getattr(jaxpr, "jaxpr", jaxpr), "eqns", ()):
            frames = list(e.source_info.traceback.frames)  # the innermost first
            at = [
                i
                for i, f in enumerate(frames)
                if f.file_name == where and f.function_name.rsplit(".", 1)[-1] == name
            ]
            inside = [f for f in frames[: at[0]] if at and user_file(f.file_name)]
            if inside:
                return inside[-1].function_name.rsplit(".", 1)[-1]  # a qualified name in 3.11+
    except Exception:  # noqa: BLE001 - only a name
        pass
    return None


def user_file(path: str) -> bool:
    """Whether `path` is the user's code: JAX counts it so (not JAX's nor the standard
    library's), and it is neither an installed package's nor jaxcheck's."""
    from jax._src import source_info_util  # noqa: PLC0415 - no public API for this

    return (
        source_info_util.is_user_filename(path)
        and not _installed(path)
        and not path.startswith(OWN_DIR)
    )


def _installed(path: str) -> bool:
    """Whether `path` lies in a directory of installed packages (site-packages)."""
    return os.path.abspath(path).startswith(_INSTALLED)


# the parameters of a rule's equation holding the functions of its derivative (jax < 0.5:
# jvp_jaxpr_thunk, a plain function)
_RULE_FUNCTIONS = ("jvp_jaxpr_fun", "jvp_jaxpr_thunk", "fwd_jaxpr_thunk", "bwd")


def _users_rule(eqn) -> str | None:
    """Where the first function of a rule's derivative (its jvp; its fwd, its bwd) defined
    outside JAX is defined, as "name at file:line"; None where all are JAX's. A function
    of JAX's around the user's (`custom_jvp.defjvps` wraps the user's jvps in its own) is
    looked into: the functions it holds count."""
    for key in _RULE_FUNCTIONS:
        fun = eqn.params.get(key)
        if fun is None:
            continue
        info = str(getattr(getattr(fun, "debug_info", None), "func_src_info", None) or "")
        if info and _JAX_DIR not in info:
            return info
        held = _outside_jax(fun)
        if held is not None:
            code = held.__code__
            return f"{code.co_name} at {code.co_filename}:{code.co_firstlineno}"
    return None


def _identity(eqn) -> tuple:
    """What tells one rule object from another of the same name: the code of the functions
    of its derivative defined outside JAX and the values their closures hold. Two
    custom_vjp objects a factory made with different settings differ; one object called
    in a loop over layers is one rule."""
    out = []
    for key in _RULE_FUNCTIONS:
        fun = _outside_jax(eqn.params.get(key))
        if fun is not None:
            cells = []
            for cell in fun.__closure__ or ():
                try:
                    cells.append(id(cell.cell_contents))
                except ValueError:  # an empty cell
                    cells.append(None)
            out.append((fun.__code__, tuple(cells)))
        out.extend(_static_args(eqn.params.get(key)))
    return tuple(out)


def _static_args(root, depth: int = 8) -> list:
    """The values of a rule's `nondiff_argnums` that JAX binds into the functions of its
    derivative (`_prepend_static_args`), as keys: one rule object called from a loop with
    `kind="tanh"` then `kind="sin"` runs other code at each, and was checked at the first
    only. Python scalars and strings by value, other objects by id; [] where JAX binds
    none (or binds them otherwise)."""
    found = []
    for obj in _reachable(root, _bound, depth):
        if not (
            isinstance(obj, functools.partial)
            and getattr(obj.func, "__name__", "") == "_prepend_static_args"
            and len(obj.args) > 1
            and isinstance(obj.args[1], tuple)
        ):
            continue
        for held in obj.args[1]:
            value = getattr(held, "val", held)
            simple = isinstance(value, str | int | float | bool | type(None))
            found.append(("static", repr(value) if simple else id(value)))
    return found


def _bound(obj) -> list:
    """What JAX's wrappers of a rule's functions hold: a partial's function and arguments,
    a `WrappedFun`'s transformed function, the closure of a function of JAX's."""
    if isinstance(obj, functools.partial):
        return [obj.func, *obj.args]
    if type(obj).__name__ == "WrappedFun":
        return [getattr(obj, "f_transformed", None)]
    if callable(obj) and _in_jax(obj):
        return _cells(obj)
    return []


def _outside_jax(root, depth: int = 8):
    """The first function defined outside JAX that `root` (a function or JAX's
    `WrappedFun`) is or holds: through the functions JAX wraps (`WrappedFun.f`,
    `functools.partial`, `__wrapped__`), the closures of JAX's functions and the lists and
    tuples in them; None where there is none within `depth` steps."""
    for obj in _reachable(root, _wrapping, depth):
        wrapper = isinstance(obj, list | tuple) or _inner(obj) is not None
        if not wrapper and getattr(obj, "__code__", None) is not None and not _in_jax(obj):
            return obj
    return None


def _inner(obj):
    """The function a partial, a `WrappedFun` or a decorated function wraps, or None."""
    inner = getattr(obj, "func", None) if isinstance(obj, functools.partial) else None
    if type(obj).__name__ == "WrappedFun":
        inner = getattr(obj, "f", None)
    return inner or getattr(obj, "__wrapped__", None)


def _wrapping(obj) -> list:
    """What `_outside_jax` looks into: the items of a list or tuple, the function a wrapper
    wraps, the closure of a function of JAX's."""
    if isinstance(obj, list | tuple):
        return list(obj)
    inner = _inner(obj)
    if inner is not None:
        return [inner]
    if getattr(obj, "__code__", None) is not None and _in_jax(obj):
        return _cells(obj)
    return []


def _in_jax(fn) -> bool:
    """Whether a function's code is in a file of the jax package."""
    code = getattr(fn, "__code__", None)
    return code is not None and _JAX_DIR in os.path.abspath(code.co_filename)


def _cells(fn) -> list:
    """The values a function's closure holds (empty cells left out)."""
    out = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            out.append(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    return out


def _reachable(root, children, depth: int = 8):
    """The objects reachable from `root`, breadth first, each once, at most `depth` levels
    down: `children(obj)` lists what an object holds."""
    level, seen = [root], set()
    for _ in range(depth):
        below = []
        for obj in level:
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            yield obj
            below.extend(children(obj))
        level = below


def jaxprs_of(value):
    """(jaxpr, consts) of every sub-jaxpr in a parameter value."""
    if isinstance(value, tuple | list):
        return [j for v in value for j in jaxprs_of(v)]
    if hasattr(value, "jaxpr") and hasattr(value, "consts"):
        return [(value.jaxpr, list(value.consts))]
    if hasattr(value, "eqns"):
        return [(value, [])]
    return []


class _Search:
    def __init__(self):
        self.found = []
        self.notes = []
        self.dead = ()  # the outputs of the equation being evaluated that nothing uses

    def eval(self, jaxpr, consts, values, context, site, flags):
        """Evaluate `jaxpr`, recording the rules' inputs; `site` is the location of the call
        that holds it, for rules whose own location is all inside JAX (jax.nn's); `flags`:
        per input, the paths of the params leaves it depends on (a rule's inputs that depend
        on none, fn's data, are held fixed when it is checked: fn's derivative never asks
        for theirs)."""
        env, tainted = {}, {}
        for var, value in zip(jaxpr.constvars, consts):
            env[var] = value
        for var, value, flag in zip(jaxpr.invars, values, flags):
            env[var] = value
            if flag:
                tainted[var] = flag
        used = {v for e in jaxpr.eqns for v in e.invars if type(v).__name__ != "Literal"}
        used.update(v for v in jaxpr.outvars if type(v).__name__ != "Literal")
        for eqn in jaxpr.eqns:
            ins = [_literal_or(env, v) for v in eqn.invars]
            fl = [NONE if _literal(v) else tainted.get(v, NONE) for v in eqn.invars]
            self.dead = tuple(i for i, v in enumerate(eqn.outvars) if v not in used)
            outs = self.eqn(eqn, ins, context, site, fl)
            for var, value in zip(eqn.outvars, outs):
                env[var] = value
                if any(fl) and eqn.primitive.name != "stop_gradient":
                    tainted[var] = NONE.union(*fl)
        return [_literal_or(env, v) for v in jaxpr.outvars]

    def eqn(self, eqn, ins, context, site, fl):
        kind = rule_kind(eqn)
        where = location(eqn) or site or defined_at(eqn)
        if kind is not None:
            n = eqn.params.get("num_consts", 0)
            inputs, positions, constants = _tied(eqn.invars[n:], ins[n:])
            held = _unparametrized(fl[n:], positions, len(inputs))
            constants = tuple(sorted(set(constants) | set(held)))
            self.found.append(
                Found(
                    kind,
                    _name(eqn),
                    where,
                    context,
                    eqn,
                    inputs,
                    consts=tuple(ins[:n]),
                    positions=positions,
                    constants=constants,
                    dead=self.dead,
                    sources=NONE.union(*fl),
                    identity=_identity(eqn),
                )
            )
            return _bind(eqn, ins)
        name = eqn.primitive.name
        subs = [j for key in SUBJAXPR_KEYS for j in jaxprs_of(eqn.params.get(key))]
        if not subs:
            return _bind(eqn, ins)
        try:
            if name in _CALLS and len(subs) == 1 and len(subs[0][0].invars) == len(ins):
                inner = _CALL_NAMES.get(name, name)
                return self.eval(*subs[0], ins, _join(context, f"inside {inner}"), where, fl)
            if name == "cond":
                return self.cond(eqn, ins, context, where, fl)
            if name == "scan":
                self.scan(eqn, ins, context, where, fl)
            elif name == "while":
                self.loop(eqn, ins, context, where, fl)
            else:
                self.listed(subs, _join(context, f"inside {name}"), where)
        except Exception as err:  # noqa: BLE001 - the search must never break the check
            self.notes.append(f"inputs inside {name} at {where} not captured: {err}")
            self.listed(subs, _join(context, f"inside {name}"), where)
        return _bind(eqn, ins)

    def cond(self, eqn, ins, context, site, fl):
        branches = eqn.params["branches"]
        index = int(np.clip(int(np.asarray(ins[0])), 0, len(branches) - 1))
        for i, branch in enumerate(branches):
            if i != index:
                self.listed(jaxprs_of(branch), _join(context, "cond branch not taken"), site)
        jaxpr, consts = jaxprs_of(branches[index])[0]
        return self.eval(jaxpr, consts, ins[1:], _join(context, "inside cond"), site, fl[1:])

    def scan(self, eqn, ins, context, site, fl):
        p = eqn.params
        jaxpr, consts = jaxprs_of(p["jaxpr"])[0]
        n_consts, n_carry = _scan_counts(eqn, jaxpr)
        if p["length"] == 0:
            self.listed([(jaxpr, consts)], _join(context, "scan of length 0"), site)
            return
        first = -1 if p.get("reverse") else 0
        xs = [np.asarray(x)[first] for x in ins[n_consts + n_carry :]]
        body_in = [*ins[:n_consts], *ins[n_consts : n_consts + n_carry], *xs]
        # (a carry may come to depend on params in a later iteration: held to do so)
        body_fl = [*fl[:n_consts], *[NONE.union(*fl)] * n_carry, *fl[n_consts + n_carry :]]
        context = _join(context, "scan body, first iteration")
        self.eval(jaxpr, consts, body_in, context, site, body_fl)

    def loop(self, eqn, ins, context, site, fl):
        p = eqn.params
        cond_jaxpr, cond_c = jaxprs_of(p["cond_jaxpr"])[0]
        body_jaxpr, body_c = jaxprs_of(p["body_jaxpr"])[0]
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        carry = ins[nc + nb :]
        cond_in = [*ins[:nc], *carry]
        (go,) = _Search().eval(cond_jaxpr, cond_c, cond_in, context, site, [NONE] * len(cond_in))
        if not bool(np.asarray(go)):
            self.listed([(body_jaxpr, body_c)], _join(context, "while body never run"), site)
            return
        body_in = [*ins[nc : nc + nb], *carry]
        body_fl = [*fl[nc : nc + nb], *[NONE.union(*fl)] * len(carry)]
        context = _join(context, "while body, first iteration")
        self.eval(body_jaxpr, body_c, body_in, context, site, body_fl)

    def listed(self, subs, context, site):
        """The rules inside sub-jaxprs whose inputs are not known: named, not captured."""
        for jaxpr, _ in subs:
            for eqn in jaxpr.eqns:
                kind, where = rule_kind(eqn), location(eqn) or site or defined_at(eqn)
                if kind is not None:
                    found = Found(kind, _name(eqn), where, context, eqn, None, "not intercepted")
                    self.found.append(found)
                    continue
                for key in SUBJAXPR_KEYS:
                    self.listed(jaxprs_of(eqn.params.get(key)), context, where)


def _scan_counts(eqn, body) -> tuple[int, int]:
    """(constants, carries) among a scan's operands. Newer JAX versions may drop the
    `num_consts`/`num_carry` parameters; the shapes tell them apart as well: the body's
    outputs are the carries (same shape outside) then the per-iteration outputs (stacked
    outside, so one axis longer), and its inputs the constants and carries (same shape)
    then the per-iteration inputs (stacked)."""
    p = eqn.params
    if "num_consts" in p and "num_carry" in p:
        return p["num_consts"], p["num_carry"]

    def same_prefix(inner, outer):
        n = 0
        for a, b in zip(inner, outer):
            if a.aval.shape != b.aval.shape:
                break
            n += 1
        return n

    n_carry = same_prefix(body.outvars, eqn.outvars)
    return same_prefix(body.invars, eqn.invars) - n_carry, n_carry


def _tied(invars, values) -> tuple:
    """(the distinct inputs of a rule's call, the index of each argument's value among
    them (None where every argument is a value of its own), the indices of the inputs
    that are literals of fn's trace)."""
    first, inputs, positions, constants = {}, [], [], []
    for var, value in zip(invars, values):
        literal = type(var).__name__ == "Literal"  # (not hashable in every jax version)
        if literal or var not in first:
            if literal:
                constants.append(len(inputs))
            else:
                first[var] = len(inputs)
            positions.append(len(inputs))
            inputs.append(value)
        else:
            positions.append(first[var])
    if len(inputs) == len(positions):
        return tuple(inputs), None, tuple(constants)
    return tuple(inputs), tuple(positions), tuple(constants)


NONE = frozenset()  # the params leaves a value computed from data alone depends on


def _unparametrized(flags, positions, n) -> list:
    """The indices among a rule's `n` distinct inputs (`positions`: the input of each
    argument, None where every argument is its own) that no argument depending on params
    reaches."""
    reached = [False] * n
    for a, flag in enumerate(flags):
        j = a if positions is None else positions[a]
        reached[j] = reached[j] or flag
    return [j for j in range(n) if not reached[j]]


def _literal(v) -> bool:
    return type(v).__name__ == "Literal"


def _literal_or(env, v):
    return v.val if type(v).__name__ == "Literal" else env[v]


def _join(context: str, more: str) -> str:
    """Where a call sits, `more` inside `context`; a loop body inside a loop body of the same
    kind is counted, not repeated."""
    outer, inner = _LOOP_BODY.search(context), _LOOP_BODY.fullmatch(more)
    if outer and inner and outer.group(2) == inner.group(2):
        depth = int(outer.group(1) or 1) + 1
        nested = f"{depth} nested {inner.group(2)} bodies, first iteration of each"
        return context[: outer.start()] + nested
    return f"{context}, {more}" if context else more


# how `_join` names the body of a scan or while loop evaluated at its first iteration
_LOOP_BODY = re.compile(
    r"(?:(\d+) nested )?(scan|while) (?:body|bodies), first iteration(?: of each)?$"
)
