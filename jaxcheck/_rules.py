"""`verify_rule`: every property of one function's derivative rules, one report row each.

A function with a `jax.custom_vjp` or `jax.custom_jvp` rule (or any function) is checked at
the given arguments for:

- primal: the output of the rule's forward pass (the `fwd` of a custom_vjp, the primal
  output of a custom_jvp rule) equals the function's own output;
- vjp vs finite differences: `verify` of `args -> f(*args)`, with random output cotangents,
  the float64 reference and leaf localization (the leaves are named `args[i]...`);
- jvp linearity: jvp(a v + b w) = a jvp(v) + b jvp(w) for random tangents and scalars;
- transpose: <u, J v> by the jvp equals <J^T u, v> by the vjp (for a custom_jvp the vjp is
  the transpose JAX derives from the rule), in the real part of the bilinear pairing, where
  JAX's vjp is the transpose of every real-linear jvp (|z|^2 of a complex z too);
- cotangent types: each input's cotangent has its shape and dtype (float0 for integer
  inputs); positions in `nondiff_argnums` are held fixed;
- unused outputs (several outputs only): the vjp when one output alone is used, so that
  the others' cotangents reach the rule as symbolic zeros (where it declares
  `symbolic_zeros=True`), against the vjp with those cotangents set to zero;
- vmap, jit, checkpoint: primal, vjp and jvp of the rule under `jax.vmap` (on a batch of
  nearby points) equal the example-by-example values, under `jax.jit` the eager ones, under
  `jax.checkpoint` the plain ones.

All but the finite-difference rows compare two computations that must agree up to
rounding, with a tolerance from the dtype (`_rule_rows`). A rule that is only right in
float64 is caught by a last row, taken when the inputs are in a lower precision, the
float64 reference was used, and the rule in the inputs' precision is more than
`NATIVE_ROUNDING` eps away from the same rule in float64: the vjp in the inputs' own
precision against finite differences in that precision (the float64 row forgives the
float32 rule whatever its distance from the same rule in float64, which it takes for
rounding).
"""

import dataclasses
import functools
import math
import re
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from . import (
    _directions,
    _fingerprint,
    _host,
    _keywords,
    _options,
    _plan,
    _precision,
    _probe,
    _problem,
    _report,
    _rule_rows,
    _rule_search,
    _tree,
)
from ._error_model import Comparison
from ._errors import (
    NO_DERIVATIVE,
    RULE_OUTPUTS,
    SAME_DEVICES_HOW,
    GradientCheckError,
    one_line,
)
from ._report import Report, Status
from ._state import PRIMAL_ROW

BATCH = 3  # examples in the vmap row
NUM_PAIRS = 4  # (u, v) pairs of the transpose row
MAX_OUTPUTS = 4  # outputs left unused one at a time in the unused-outputs row
NATIVE_ROUNDING = 100.0  # the native-precision row runs above this rounding, in eps


@_keywords.checked("jaxcheck.verify_rule", "verify_rule(f, *args)")
def verify_rule(
    f: Callable,
    *args: Any,
    key: Any = 0,
    num_directions: int = 16,
    precision: Literal["auto", "float64", "native"] = "auto",
    rtol: float | None = None,
    leaf_directions: int = 8,
    order: int = 1,
    raise_on_failure: bool = False,
) -> Report:
    """Check every property of the derivative rules of `f` at `args`.

    One row per property, each in the report's table and as a labelled part:

    - primal: the rule's forward pass (a custom_vjp's `fwd`, a custom_jvp rule's primal
      output) equals `f`'s own output;
    - vjp vs finite differences: `verify` of `args -> f(*args)`, with random output
      cotangents, the float64 reference and leaf localization (leaves named `args[i]...`;
      input entries that are NaN/Inf, a mask's -inf, held at their values, the others
      moved);
      for lower-precision inputs whose rule is far from itself in float64, also the vjp
      against finite differences in the inputs' precision (a rule only right in float64);
    - jvp linearity: jvp(a v + b w) = a jvp(v) + b jvp(w);
    - transpose: <u, J v> by the jvp equals <J^T u, v> by the vjp;
    - cotangent types: each cotangent has its input's shape and dtype (float0 for integer
      inputs); `nondiff_argnums` are held fixed;
    - unused outputs (several outputs): the vjp with one output used (the others'
      cotangents are symbolic zeros) equals the vjp with their cotangents zero;
    - vmap, jit, checkpoint: primal, vjp and jvp of the rule under `jax.vmap` (a batch of
      nearby points), `jax.jit` and `jax.checkpoint` equal the plain ones.

    All rows but the finite-difference ones must agree to 1000 eps of the inputs' dtype
    (the primal row to 0.2 at most: 25 bfloat16 quanta).
    The jvp rows are skipped, with a note, for a custom_vjp function (it has no jvp).

    Args:
        f: the function, `f(*args)` returning an array or a pytree of float arrays; a
            `jax.custom_vjp`/`jax.custom_jvp` object or any JAX-traceable function. Its
            `nondiff_argnums`, if any, are held fixed (for an `equinox.filter_custom_vjp`,
            every argument after the first).
        *args: the inputs, any pytrees. Floating leaves are differentiated; integer leaves
            are held fixed (their cotangent must be float0).
        key: int seed or JAX PRNG key for the random tangents, cotangents and directions.
        num_directions: directions of the finite-difference row.
        precision: reference precision of the finite-difference row (as in `verify`).
        rtol: smallest relative error of the finite-difference row treated as a bug, and a
            looser tolerance for the rows compared without finite differences.
        leaf_directions: directions per leaf when the finite-difference row localizes.
        order: highest order of derivatives the finite-difference row checks (`verify`'s
            `order`): at 2, a custom_vjp whose backward pass is right but is not
            differentiated correctly (a `stop_gradient` in it, a wrong rule inside it)
            fails that row. The other rows check the rule itself.
        raise_on_failure: raise `GradientCheckError` unless every row passes.

    Returns:
        A composite `Report`: `parts` holds one report per property (its `label` names
        the property), `checks` one row per property; the status is the worst of theirs.

    Raises:
        TypeError: `f` is not callable, or JAX cannot differentiate it at `args` at all (a
            bwd returning a bare array for one input, cotangents of the wrong number or
            shape, a fwd without residuals): JAX's error, with what a rule must return.
        GradientCheckError: with `raise_on_failure=True`, when a property does not hold.

    Example:
        >>> import jax, jax.numpy as jnp, jaxcheck
        >>> report = jaxcheck.verify_rule(jax.nn.softplus, jnp.linspace(-2.0, 2.0, 5))
        >>> report.ok, [p.label for p in report.parts][:2]
        (True, ['primal', 'vjp vs finite differences'])
    """
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}.")
    # the options the finite-difference rows pass to verify, refused here as verify would
    _options.make(
        key=key,
        num_directions=num_directions,
        precision=precision,
        rtol=rtol,
        leaf_directions=leaf_directions,
        order=order,
        raise_on_failure=raise_on_failure,
    )
    # like verify: a traced input would fail every row, and the rule's rows are not what
    # refused them; jaxcheck's own transfers are allowed under a caller's transfer guard
    _host.refuse_traced({"args": args}, who="verify_rule")
    where = _tree.mixed_devices({"args": args})
    if where:  # (each row would fail at it, and call the rule wrong)
        raise ValueError(
            f"verify_rule: the inputs hold arrays committed to different devices ({where}). "
            f"{SAME_DEVICES_HOW}"
        )
    with _plan.own_transfers():  # (NumPy inputs are put on the device here, as by verify)
        rule = Rule.make(f, args)
        _differentiable(rule)
        _runnable(rule)
        report = check_rule(
            f, args, key, num_directions, precision, rtol, leaf_directions, order=order
        )
        if not _has_rule(rule):
            report = dataclasses.replace(report, problems=(NO_RULE, *report.problems))
    if raise_on_failure and not report.ok:
        raise GradientCheckError(report)
    return report


NO_RULE = (
    "f calls no jax.custom_vjp or jax.custom_jvp at these inputs: the rows check the "
    "derivative JAX computes for f (as jaxcheck.verify does), not a rule of yours"
)


def _has_rule(rule: "Rule") -> bool:
    """Whether f calls a custom_vjp or custom_jvp at the rule's inputs (True where it
    cannot be told)."""
    try:
        closed = jax.make_jaxpr(rule.call)(rule.inputs)
    except Exception:  # noqa: BLE001 - only a question: the rows say what failed
        return True
    return _rule_search.calls(closed.jaxpr, "custom_vjp", "custom_jvp")


def _differentiable(rule: "Rule") -> None:
    """Refuse a rule with nothing to differentiate: no floating input, or no floating
    output."""
    for path, x in jax.tree_util.tree_flatten_with_path(rule.inputs)[0]:
        if not isinstance(x, jax.Array | np.ndarray | np.generic | bool | int | float | complex):
            where = "args" + jax.tree_util.keystr(path)
            raise TypeError(
                f"verify_rule: {where} is a {type(x).__name__} ({_tree.describe(x)}), not an "
                "array or a number. Every input f differentiates must be an array; pass other "
                "values through nondiff_argnums or close over them (functools.partial)."
            )
    floats = [x for x in rule.leaves() if _rule_rows.inexact(x)]
    if floats and all(np.size(x) == 0 for x in floats):
        raise ValueError(
            "verify_rule: every floating-point input of f is empty (shapes: "
            f"{', '.join(str(np.shape(x)) for x in floats)}): there is nothing to check. Pass "
            "inputs with at least one element."
        )
    if not floats:
        raise ValueError(
            "verify_rule: f's inputs hold no floating-point array (outside nondiff_argnums) "
            "to differentiate; pass the inputs whose derivatives the rule defines as float "
            "arrays."
        )
    try:
        out = jax.eval_shape(rule.call, rule.inputs)
    except Exception:  # noqa: BLE001 - the rows report f's own error
        return
    if not any(jnp.issubdtype(o.dtype, jnp.inexact) for o in jax.tree_util.tree_leaves(out)):
        dtypes = sorted({str(o.dtype) for o in jax.tree_util.tree_leaves(out)}) or ["none"]
        raise ValueError(
            f"verify_rule: f returns no floating-point output (dtypes: {', '.join(dtypes)}); "
            "a derivative rule maps float inputs to float outputs."
        )


def _reverse_shapes(rule: "Rule"):
    """The shapes of the rule's vjp at its inputs, traced abstractly (raises JAX's error
    where it has none)."""

    def reverse(inputs):
        out, pullback = jax.vjp(rule.call, inputs)
        return pullback(jax.tree_util.tree_map(_tree.unit_like, out))

    return jax.eval_shape(reverse, rule.inputs)


def _forward_shapes(rule: "Rule"):
    """The shapes of the rule's jvp at its inputs, traced abstractly."""

    def forward(inputs):
        # (ones: JAX skips a rule whose tangents are all symbolic zeros)
        return jax.jvp(rule.call, (inputs,), (jax.tree_util.tree_map(_tree.unit_like, inputs),))

    return jax.eval_shape(forward, rule.inputs)


def _runnable(rule: "Rule") -> None:
    """Refuse a rule that JAX cannot differentiate at all at these inputs: a bwd that
    returns a bare array for a one-input primal (the missing comma of `(g,)`), cotangents
    of the wrong number or shape, a fwd that returns no (output, residuals) pair, a jvp
    tangent of the wrong dtype. Every row would fail with the same error, and a failing
    primal row would call a rule that cannot run "wrong". Found abstractly, compiling
    nothing. A jvp JAX cannot transpose is a finding of the rows (the jvp runs, and the
    linearity row says why), so only a rule with neither mode is refused."""
    try:
        _reverse_shapes(rule)
    except Exception as err:  # noqa: BLE001 - refused below unless forward mode runs
        try:
            # (a custom_vjp's jvp fails only when run, not traced: its jaxpr tells)
            if _jvp_note(rule) is not None:
                raise
            _forward_shapes(rule)
        except Exception:  # noqa: BLE001 - neither mode: JAX's reverse-mode error says why
            _refuse_uncallable(rule)
            raise TypeError(
                "verify_rule: JAX cannot differentiate f at these inputs, so no property of "
                f"its rule can be checked. jax.vjp(f) raises {one_line(err, 600)}\nFix the "
                f"rule first: {RULE_OUTPUTS}"
            ) from err


def _refuse_uncallable(rule: "Rule") -> None:
    """Raise a TypeError where f itself cannot be called at the inputs (the inputs, not
    the rule, are then to blame: (x,) passed for x, one argument too many)."""
    try:
        jax.eval_shape(rule.call, rule.inputs)
    except Exception as err:  # noqa: BLE001 - said with how args are passed
        kinds = ", ".join(type(a).__name__ for a in rule.args)
        raise TypeError(
            f"verify_rule: f itself cannot be called at these inputs, f(*args) with "
            f"{len(rule.args)} argument(s) ({kinds}): {one_line(err, 300).rstrip('.:')}. "
            "verify_rule(f, *args) passes args to f as they are, f(*args): for f(x), call "
            "verify_rule(f, x), not verify_rule(f, (x,))."
        ) from err


def check_rule(
    f,
    args,
    key,
    num_directions,
    precision,
    rtol,
    leaf_directions,
    identity=None,
    full=True,
    order=1,
) -> Report:
    """The composite report of `verify_rule` (without raising). `identity`: what makes two
    rules the same for the compiled programs of the finite-difference rows (default: `f`
    itself); a rule found in a model is re-bound on every check, its identity is its call
    site in that model, so a training loop's repeated checks compile nothing new. Without
    `full`, the vmap, jit and checkpoint rows are left out (`_rule_report`: looking for
    the rule behind a failed check, which finite differences already see). `order`: of the
    finite-difference rows."""
    # `_verify` reaches this module through verify(rules=...): import it when called
    from ._verify import KINKS_LEFT_TO_CALLER, verify  # noqa: PLC0415

    def plain(*a, **k):  # the vjp rows check the rule alone, not the rules inside it
        # (the entries at the rule's kinks are held fixed here: `_kinks_held`)
        token, kinks = PRIMAL_ROW.set(True), KINKS_LEFT_TO_CALLER.set(True)
        try:
            return verify(*a, rules=False, transforms=False, order=order, **k)
        finally:
            KINKS_LEFT_TO_CALLER.reset(kinks)
            PRIMAL_ROW.reset(token)

    rule = Rule.make(f, args, identity)
    parts = check(rule, key, num_directions, precision, rtol, leaf_directions, plain, full)
    # (the rule is what is checked: no advice to check it to name it)
    return _probe.without_kind_hint(_rule_rows.compose(parts, "the rule", parts[1]))


@dataclasses.dataclass(frozen=True)
class Rule:
    """`f` at `args`, split into the differentiated inputs and the ones held fixed."""

    f: Callable
    args: tuple
    fixed: frozenset  # positions held fixed (nondiff_argnums)
    identity: Any = None

    @classmethod
    def make(cls, f, args, identity=None) -> "Rule":
        nondiff = getattr(f, "nondiff_argnums", ()) or ()
        if _filter_custom_vjp(f):  # (equinox differentiates its first argument alone)
            nondiff = range(1, len(args))
        identity = ("f", f) if identity is None else ("given", identity)
        return cls(f, tuple(args), frozenset(int(i) for i in nondiff), identity)

    @property
    def inputs(self) -> tuple:
        """The differentiated positions' values (None at the fixed positions)."""
        return tuple(None if i in self.fixed else a for i, a in enumerate(self.args))

    def call(self, inputs):
        full = [self.args[i] if i in self.fixed else x for i, x in enumerate(inputs)]
        return self.f(*full)

    def leaves(self):
        return jax.tree_util.tree_leaves(self.inputs)

    @property
    def dtype(self):
        # (JAX's dtypes of the inputs, read without converting them: see `_rule_rows.inexact`)
        dtypes = [jnp.result_type(x) for x in self.leaves()]
        floats = [d for d in dtypes if jnp.issubdtype(d, jnp.inexact)]
        return _precision.lowest(floats) if floats else jnp.dtype(jnp.float32)


def _filter_custom_vjp(f) -> bool:
    """Whether `f` is an `equinox.filter_custom_vjp` function (differentiated in its first
    argument alone: its others take no tangent)."""
    kind = type(f)
    return kind.__name__ == "filter_custom_vjp" and kind.__module__.startswith("equinox")


def check(
    rule: Rule, key, num_directions, precision, rtol, leaf_directions, verify, full=True
) -> list:
    """The reports of every property of `rule` (without `full`: but the transforms'), in
    row order."""
    rng = np.random.default_rng(int(_directions.seeds(key, "rule", ("",))[0]))
    tol = _rule_rows.tolerance(rule.dtype, rtol)
    jvp_note = _jvp_note(rule)
    vjp_note = _forward_only(rule) if jvp_note is None else None
    draws = _Draws(rule, rng, jvp_note is None, vjp_note is None)
    parts = [_primal(draws, _rule_rows.tolerance(rule.dtype, rtol, _rule_rows.EXACT_CAP))]
    fd = _finite_differences(
        rule, key, num_directions, precision, rtol, leaf_directions, verify, vjp_note
    )
    parts.append(fd)
    if vjp_note is not None:  # the rows of the vjp cannot run
        parts.append(_linearity(draws, tol))
    else:
        if jvp_note is None:
            parts += [_linearity(draws, tol), _transpose(draws, tol)]
        parts.append(_cotangent_types(draws))
        if len(jax.tree_util.tree_leaves(draws.out)) > 1:
            parts.append(_unused_outputs(draws, tol))
    if full:
        # a rule that rounds through a lower precision inside agrees with itself under a
        # transformation only to a few of that precision's quanta
        transformed_tol = max(tol, 10 * _precision.eps(_rounds_to(draws, rule.dtype)))
        for name in ("vmap", "jit", "checkpoint"):
            parts.append(_transformed(draws, name, transformed_tol))
    for note in (jvp_note, vjp_note):
        if note is not None:
            parts[0] = dataclasses.replace(parts[0], problems=parts[0].problems + (note,))
    native = _native(rule, fd, key, num_directions, rtol, leaf_directions, verify, vjp_note)
    if getattr(rule.f, "symbolic_zeros", False):
        parts += _symbolic_zero_paths(
            rule, key, num_directions, precision, rtol, leaf_directions, verify, vjp_note
        )
    return parts + ([native] if native is not None else [])


def _symbolic_zero_paths(rule, key, k, precision, rtol, leaf_k, verify, forward) -> list:
    """A rule defined with symbolic_zeros=True runs other code where an input is not
    differentiated (its tangent a `SymbolicZero`; its cotangent's `perturbed` False), which
    the check of all inputs together never reaches: a jvp 1 % off whenever one input is
    held passed every key, while fn holding that input failed. The rule's derivative
    checked again with each of its inputs held in turn (where it has two or more)."""
    free = [
        i
        for i, x in enumerate(rule.inputs)
        if x is not None and any(_rule_rows.inexact(y) for y in jax.tree_util.tree_leaves(x))
    ]
    if len(free) < 2:
        return []
    return [
        _finite_differences(
            dataclasses.replace(rule, fixed=rule.fixed | {i}),
            key,
            k,
            precision,
            rtol,
            leaf_k,
            verify,
            forward,
            suffix=f", input {i} held (its tangent a symbolic zero)",
        )
        for i in free
    ]


def _jvp_note(rule: Rule) -> str | None:
    """Why the jvp rows are skipped (f calls a custom_vjp function, which has no jvp), or
    None. Found in f's jaxpr: a jvp would only fail on it when run (not under
    `jax.eval_shape`), after compiling everything before it."""
    try:
        closed = jax.make_jaxpr(rule.call)(rule.inputs)
    except Exception:  # noqa: BLE001 - the rows report f's error themselves
        return None
    if not _rule_search.calls(closed.jaxpr, "custom_vjp"):
        return None
    return (
        "f calls a custom_vjp function, which has no forward mode: the jvp rows (linearity, "
        "transpose) were not checked"
    )


# ---- random draws ---------------------------------------------------------------------


def _tangents(rule: Rule, rng):
    return jax.tree_util.tree_map(lambda x: _rule_rows.random_like(x, rng), rule.inputs)


def _typed_like(tree, like):
    """`tree`'s arrays sharded as `like`'s are where those lie on a mesh of Explicit axes
    (a rule's derivatives take only tangents typed as its inputs and outputs there);
    float0 tangents of integer inputs as they are."""

    def typed(x, y):
        if getattr(x, "dtype", None) == jax.dtypes.float0:
            return x
        return _plan.typed_like(x, y)

    return jax.tree_util.tree_map(typed, tree, like)


# ---- the properties -------------------------------------------------------------------


def _derivatives(call, with_jvp: bool, with_vjp: bool = True):
    """(inputs, v, u) -> f's output, the output and cotangents of its vjp with `u`, and
    (with_jvp) the output and tangent of its jvp along `v`: everything the FD-free rows
    compare, one jitted program for all of them."""

    def go(inputs, v, u):
        result = {"f": call(inputs)}
        if with_vjp:
            out, pullback = jax.vjp(call, inputs)
            result["vjp out"], result["vjp"] = out, pullback(_typed_like(u, out))[0]
        if with_jvp:
            result["jvp out"], result["jvp"] = jax.jvp(call, (inputs,), (_typed_like(v, inputs),))
        return result

    return go


@dataclasses.dataclass
class _Draws:
    """The rule's derivative program and the random tangents and cotangents it runs on."""

    rule: Rule
    rng: np.random.Generator
    with_jvp: bool
    with_vjp: bool = True

    def __post_init__(self):
        self.go = _derivatives(self.rule.call, self.with_jvp, self.with_vjp)
        self.out = jax.eval_shape(self.rule.call, self.rule.inputs)
        self._computes = {}  # (what, the arguments' signature) -> fingerprint

    def program(self, what: str, f, *args):
        """f(*args), jitted and kept (`_plan.kept_jit`) under `what` (which program of
        the rule's) and what f computes at args (`_fingerprint.of`: its jaxpr, the rule's
        derivative rules as they run in it, and the values it reads): a rule found in a
        model is re-bound at every check, and each check compiled its programs anew (a
        warm `rules=True` check of a model with 3 rules compiled 9 programs, 2.3 s against
        0.04 s without); a rule redefined or reading another setting since computes
        something else, and is compiled anew. Taken once per `what` and signature of args
        for this rule (the transpose and vmap rows run one program at several draws)."""
        leaves, treedef = jax.tree_util.tree_flatten(args)
        # (arrays by shape and dtype, as the fingerprint takes them; other values as held)
        at = (
            what,
            treedef,
            *(
                _tree.digest(x)
                if np.ndim(x) == 0 and not _tree.is_array(x)
                else (np.shape(x), jnp.result_type(x))
                for x in leaves
            ),
        )
        if at not in self._computes:
            try:
                self._computes[at] = _fingerprint.of(f, *args, derivative=False)
            except Exception:  # noqa: BLE001 - not traced here: not kept
                self._computes[at] = None
        computes = self._computes[at]
        if computes is None:
            return jax.jit(f)(*args)
        # (the signature too: f is the first check's, and a jit retraces it at another
        # structure of args, which another check's rule lays out otherwise)
        return _plan.kept_jit(f, ("rule", at, computes))(*args)

    def jitted(self, inputs, v, u):
        """The derivative program (`_derivatives`), compiled."""
        return self.program("derivatives", self.go, inputs, v, u)

    def run(self, v, u, need: str):
        """The derivative program at the inputs; when it cannot be built (a jvp rule JAX
        cannot transpose), the part `need` ("vjp" or "jvp") alone, so that each row
        reports its own property."""
        try:
            return self.jitted(self.rule.inputs, v, u)
        except Exception:
            if not (self.with_jvp and self.with_vjp):
                raise
            alone = _derivatives(self.rule.call, need == "jvp", need == "vjp")
            return self.program(need, alone, self.rule.inputs, v, u)

    def tangent(self):
        return _tangents(self.rule, self.rng)

    def cotangent(self):
        # (float0 for integer and boolean outputs, as JAX's own vjp takes them)
        return jax.tree_util.tree_map(
            lambda y: _rule_rows.random_like(np.ones(y.shape, y.dtype), self.rng, scale=False),
            self.out,
        )


def _primal(d: _Draws, tol) -> Report:
    def compute():
        v, u = d.tangent(), d.cotangent()
        try:
            r = d.run(v, u, "vjp")
        except Exception:  # noqa: BLE001 - the vjp rows report it; compare the jvp's primal
            if not (d.with_jvp and d.with_vjp):
                raise
            r = d.run(v, u, "jvp")
        outs = [r[k] for k in ("vjp out", "jvp out") if k in r]
        return _rule_rows.exact(name, outs, [r["f"]] * len(outs), tol), ()

    name = "primal: the rule's forward pass vs f"
    return _rule_rows.guarded("primal", name, tol, d.rule.dtype, compute)


def _finite_differences(
    rule, key, k, precision, rtol, leaf_k, verify, forward=None, suffix=""
) -> Report:
    """The rule's vjp against finite differences; its jvp where JAX cannot run it in
    reverse mode (`forward`, the reason: a custom_jvp whose tangent goes through a while
    loop), the derivative fn's forward-mode check uses. `suffix`: what the label adds."""
    label = "vjp vs finite differences" if forward is None else "jvp vs finite differences"
    label += suffix

    def check(mode, kept=None, fn=None, inputs=None):
        report = verify(
            _Called(rule, kept) if fn is None else fn,
            rule.inputs if inputs is None else inputs,
            key=key,
            num_directions=k,
            precision=precision,
            rtol=rtol,
            leaf_directions=leaf_k,
            mode=mode,
        )
        # (a rule's outputs are all checked: verify_rule takes no has_aux to advise)
        notes = tuple(q for q in report.problems if not q.startswith(_problem.AUX_NOTE))
        return dataclasses.replace(report, problems=notes)

    mode = "reverse" if forward is None else "forward"
    try:
        report = check(mode)
        kept = _finite_entries(rule) if report.status is Status.NONFINITE else None
        fixed = _finite_inputs(rule) if report.status is Status.NONFINITE else None
        if kept is not None:
            # judged where the rule is finite at these inputs
            report = check(mode, kept[0])
            report = dataclasses.replace(report, problems=(kept[1], *report.problems))
        elif fixed is not None:
            # judged moving its finite input entries alone
            report = check(mode, fn=fixed[0], inputs=fixed[1])
            report = dataclasses.replace(report, problems=(fixed[2], *report.problems))
        elif report.status is Status.INCONCLUSIVE and report.num_nonsmooth and forward is None:
            held = _kinks_held(rule)
            if held is not None and held[0] is not None:  # judged away from the kinks
                again = check(mode, fn=held[0])
                if again.status in (Status.PASS, Status.FAIL):
                    report = dataclasses.replace(again, problems=(held[1], *again.problems))
            if held is not None and held[2] is not None:  # a slope outside them at one
                from . import _check_grads  # noqa: PLC0415 - it imports this module

                report = _check_grads.outside_fails(report, held[2])
    except Exception as err:  # noqa: BLE001 - a rule that raises under jax.vjp is the finding
        if isinstance(err, ValueError) and NO_DERIVATIVE in str(err):
            # (the derivative of a right rule has none: no order-2 check, as in verify)
            raise ValueError(f"verify_rule: {err}") from err
        problem = _rule_rows.error_problem(label, err)
        comparison = _rule_rows.failed(f"{label}: the {label[:3]} could not be evaluated", math.inf)
        return _rule_rows.part(label, comparison, rule.dtype, 0.0, (problem,))
    return _relabel(report, label + _failed_order(report))


# how the note of a rule judged with the input entries at its kinks held fixed begins
KINKS_HELD = "the rule has a kink (one-sided slopes that differ) at "


def _kinks_held(rule: "Rule") -> tuple | None:
    """Where the rule has a kink at some of its input entries (relu at 0 in a zero-padded
    row), found by moving each entry alone: (the rule with those entries held at their
    values or None where all are kinks, a note saying so, a note where its derivative at a
    kink is not between the one-sided slopes there or None); else None. A wrong slope at
    the other entries was left unjudged, "only 0 of 16 directions are smooth", as every
    direction moves them all; JAX's check_grads, moving all entries by a step, sees it."""
    from . import _check_grads  # noqa: PLC0415 - it imports verify, which imports this

    called = _Called(rule)

    def positional(*inputs):
        return called(inputs)

    with _plan.own_transfers(), jax.debug_nans(False), jax.debug_infs(False):
        try:
            found = _check_grads._one_sided(positional, rule.inputs)
            if found is None:
                return None
            kinks, slopes = found
            outside = _check_grads._outside_slopes(positional, rule.inputs, slopes)
        except Exception:  # noqa: BLE001 - the rule refuses moved inputs: nothing held
            return None
        part = _check_grads._FinitePart.holding(positional, rule.inputs, kinks)
    if part is None:
        return None if outside is None else (None, "", outside)
    n = sum(int(h.sum()) for h in part.held)
    note = (
        f"{KINKS_HELD}{n} input {'entry' if n == 1 else 'entries'}, found by moving each "
        "entry alone; its derivative was judged at the other entries, holding those fixed"
    )
    return part, note, outside


def _finite_entries(rule: "Rule") -> tuple | None:
    """Where the rule's output is NaN/Inf at some entries of its floating outputs and
    finite at others, its inputs all finite: (the entries kept per floating output leaf,
    a note saying so); else None. fn, finite where it calls the rule, discards the others
    (jnp.where(x > 0, log(x), 0)), as JAX's check_grads compares NaN with NaN."""
    with _plan.own_transfers():
        inputs = [np.asarray(x) for x in rule.leaves() if _rule_rows.inexact(x)]
        if not all(np.all(np.isfinite(x)) for x in inputs):
            return None
        outs = jax.tree_util.tree_leaves(_Called(rule)(rule.inputs))
        kept = tuple(np.isfinite(np.asarray(y)) for y in outs)
    dropped = sum(int(np.size(m) - np.sum(m)) for m in kept)
    if not dropped or not any(np.any(m) for m in kept):
        return None
    total = sum(int(np.size(m)) for m in kept)
    note = (
        f"the rule's output is NaN/Inf at {dropped} of its {total} output entries at these "
        "inputs, which fn discards there (as jnp.where(x > 0, log(x), 0) does): it is "
        "judged at the others, those entries held at 0"
    )
    return kept, note


def _finite_inputs(rule: "Rule") -> tuple | None:
    """Where some entries of the rule's floating inputs are NaN/Inf (a mask of -inf in a
    softmax's scores) and the others finite: (the rule of its inputs with those entries
    held at their values, the inputs with them set to 0, a note saying so); else None.
    `verify`'s advice, to pass such a buffer in *args, does not apply to a rule."""
    with _plan.own_transfers():
        masks = [
            np.isfinite(np.asarray(x)) if _rule_rows.inexact(x) else None
            for x in jax.tree_util.tree_leaves(rule.inputs)
        ]
    held = sum(int(np.size(m) - np.sum(m)) for m in masks if m is not None)
    if not held or not any(np.any(m) for m in masks if m is not None):
        return None
    leaves, treedef = jax.tree_util.tree_flatten(rule.inputs)
    called = _Called(rule)

    def at(inputs):
        moved = jax.tree_util.tree_leaves(inputs)
        full = [x if m is None else jnp.where(m, y, x) for x, y, m in zip(leaves, moved, masks)]
        return called(jax.tree_util.tree_unflatten(treedef, full))

    zeroed = [x if m is None else jnp.where(m, x, jnp.zeros_like(x)) for x, m in zip(leaves, masks)]
    note = (
        f"{held} of the rule's input entries are NaN/Inf (a mask of -inf?): it is judged "
        "moving the others, those held at their values"
    )
    return at, jax.tree_util.tree_unflatten(treedef, zeroed), note


def _forward_only(rule: "Rule") -> str | None:
    """Why the rule's derivative is checked in forward mode: JAX runs its jvp but not its
    vjp, as for a tangent through a while loop (None where the vjp traces, where the jvp
    does not either, or where the jvp is not linear in its tangents, a bug)."""
    try:
        _reverse_shapes(rule)
    except Exception as err:  # noqa: BLE001 - the reason, given in the report
        # (older JAX's, without a message)
        _rule_rows.untransposed_when_traced(err, lambda: _reverse_shapes(rule))
        if _rule_rows.untransposed(err):
            return None  # a jvp not linear in its tangents: the vjp row says why it fails
        try:
            _forward_shapes(rule)
        except Exception:  # noqa: BLE001 - neither mode
            return None
        return (
            "f's jvp cannot run in reverse mode, so its finite differences check the jvp, "
            "and the rows of the vjp (transpose, cotangent types) were not checked "
            f"({one_line(err, 200)})"
        )
    return None


def _failed_order(report: Report) -> str:
    """ " (order 2: vjp map)" for a check of higher orders whose failing part is not the
    first order, or ""."""
    failed = [p for p in report.parts if p.status is Status.FAIL]
    if not failed or _report.order_of(failed[0]) == 1:
        return ""
    return f" ({failed[0].label})"


@dataclasses.dataclass(frozen=True)
class _Called:
    """inputs -> f(*inputs) with the fixed positions filled in (compares by value, so a
    second check of the same rule compiles nothing new)."""

    rule: Rule
    # per floating output leaf, the entries kept (NumPy booleans), the others set to 0; or
    # None: all kept (`_finite_entries`)
    kept: tuple | None = None

    def __call__(self, inputs):
        # integer and boolean outputs (a count, a flag: equinox's wrappers return some)
        # carry no derivative: left out of the finite differences, as None
        outs = jax.tree_util.tree_map(
            lambda y: y if _rule_rows.inexact(y) else None, self.rule.call(inputs)
        )
        if self.kept is None:
            return outs
        leaves, treedef = jax.tree_util.tree_flatten(outs)
        leaves = [jnp.where(m, y, jnp.zeros_like(y)) for m, y in zip(self.kept, leaves)]
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def _key(self):
        # the values at the fixed positions too: a rule right at one value of its
        # nondiff_argnums (beta = 1) must be checked anew at another
        fixed = [self.rule.args[i] for i in sorted(self.rule.fixed)]
        leaves, treedef = jax.tree_util.tree_flatten(fixed)
        kept = () if self.kept is None else tuple(map(_tree.digest, self.kept))
        return self.rule.identity, treedef, tuple(map(_tree.digest, leaves)), kept

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, _Called) and other._key() == self._key()


_ARG_PATH = re.compile(r"(^|wrong: |, |leaf |leaves )\[")


def _relabel(report: Report, label: str) -> Report:
    checks = tuple(dataclasses.replace(c, name=f"{label}: {c.name}") for c in report.checks)
    leaves = tuple(dataclasses.replace(leaf, path=f"args{leaf.path}") for leaf in report.leaves)
    # leaf paths in the notes: a list of them, or one opening a note or after "leaf " or
    # "leaves "
    problems = tuple(_ARG_PATH.sub(r"\1args[", p) for p in report.problems)
    return dataclasses.replace(report, checks=checks, leaves=leaves, problems=problems, label=label)


def _linearity(d: _Draws, tol) -> Report:
    def compute():
        v, w, u = d.tangent(), d.tangent(), d.cotangent()
        a, b = float(d.rng.uniform(0.5, 2.0)), -float(d.rng.uniform(0.5, 2.0))
        combined = jax.tree_util.tree_map(
            lambda x, y: x if x.dtype == jax.dtypes.float0 else (a * x + b * y).astype(x.dtype),
            v,
            w,
        )
        jv, jw, jc = (_rule_rows.floats(d.run(t, u, "jvp")["jvp"]) for t in (v, w, combined))
        expect = [a * x + b * y for x, y in zip(_rule_rows.leaves(jv), _rule_rows.leaves(jw))]
        scale = abs(a) * _rule_rows.rms(_rule_rows.flat(jv)) + abs(b) * _rule_rows.rms(
            _rule_rows.flat(jw)
        )
        return _rule_rows.exact(name, _rule_rows.leaves(jc), expect, tol, scale), ()

    name = "jvp linear in the tangents: jvp(a v + b w) vs a jvp(v) + b jvp(w)"
    return _rule_rows.guarded("jvp linearity", name, tol, d.rule.dtype, compute)


def _transpose(d: _Draws, tol) -> Report:
    def compute():
        by_jvp, by_vjp, sizes = [], [], []
        for _ in range(NUM_PAIRS):
            v, u = d.tangent(), d.cotangent()
            r = d.jitted(d.rule.inputs, v, u)
            forward, size = _rule_rows.dot(u, r["jvp"])
            by_jvp.append(forward)
            by_vjp.append(_rule_rows.dot(r["vjp"], v)[0])
            sizes.append(size)
        return _rule_rows.exact(name, by_jvp, by_vjp, tol, _rule_rows.rms(sizes)), ()

    name = "transpose: <u, J v> by jvp vs <J^T u, v> by vjp"
    return _rule_rows.guarded("transpose", name, tol, d.rule.dtype, compute)


def _unused_outputs(d: _Draws, tol) -> Report:
    """With several outputs, the vjp when only one output is used (the others' cotangents
    reach the rule as symbolic zeros, or as zeros JAX makes for a rule that does not take
    symbolic ones) against the vjp with their cotangents set to zero."""
    rule = d.rule

    def compute():
        u = d.cotangent()
        leaves, treedef = jax.tree_util.tree_flatten(u)

        def alone(i, inputs, ui):
            def used(x):
                return jax.tree_util.tree_leaves(rule.call(x))[i]

            return jax.vjp(used, inputs)[1](ui)[0]

        def zeroed(inputs, cotangent):
            return jax.vjp(rule.call, inputs)[1](cotangent)[0]

        got, want = [], []
        for i in range(min(len(leaves), MAX_OUTPUTS)):
            only = [c if j == i else jnp.zeros_like(c) for j, c in enumerate(leaves)]
            alone_i = functools.partial(alone, i)
            got.append(d.program(("output alone", i), alone_i, rule.inputs, leaves[i]))
            cotangent = jax.tree_util.tree_unflatten(treedef, only)
            want.append(d.program("outputs zeroed", zeroed, rule.inputs, cotangent))
        return _rule_rows.exact(name, got, want, tol), ()

    name = "unused outputs: vjp with one output used vs the others' cotangents zero"
    return _rule_rows.guarded("unused outputs", name, tol, rule.dtype, compute)


def _cotangent_types(d: _Draws) -> Report:
    rule = d.rule

    def compute():
        cots = jax.eval_shape(d.go, rule.inputs, d.tangent(), d.cotangent())["vjp"]
        paths = jax.tree_util.tree_flatten_with_path(rule.inputs)[0]
        got = jax.tree_util.tree_leaves(cots)
        wrong = []
        if len(got) != len(paths):
            wrong.append(f"{len(got)} cotangent leaves for {len(paths)} inputs")
        for (path, x), c in zip(paths, got):
            x = jnp.asarray(x)
            want = x.dtype if _rule_rows.inexact(x) else jnp.dtype(jax.dtypes.float0)
            if tuple(c.shape) != tuple(x.shape) or jnp.dtype(c.dtype) != want:
                wrong.append(
                    f"args{jax.tree_util.keystr(path)}: cotangent {c.dtype}{list(c.shape)}, "
                    f"expected {want}{list(x.shape)}"
                )
        err = float(len(wrong)) / max(len(paths), 1)
        comparison = Comparison(name, err, (err, err), 0.0, 0.0, 0.0, len(paths), not wrong)
        return comparison, tuple(f"cotangent types: {w}" for w in wrong)

    name = "cotangent types: shape and dtype of each input (float0 for integers)"
    problems = ()
    if rule.fixed and _filter_custom_vjp(rule.f):
        problems = (
            f"arguments {sorted(rule.fixed)} held fixed: an equinox filter_custom_vjp "
            "differentiates its first argument alone",
        )
    elif rule.fixed:
        problems = (f"nondiff_argnums {sorted(rule.fixed)} held fixed",)
    report = _rule_rows.guarded("cotangent types", name, 0.0, rule.dtype, compute)
    return dataclasses.replace(report, problems=report.problems + problems)


def _batch(rule: Rule, rng) -> list:
    """BATCH nearby points: the inputs, then the inputs times (1 + 0.1 r), r in [-1, 1]."""

    def moved(x):
        if not _rule_rows.inexact(x):
            return x
        h = _plan.host_array(x)  # on the host, as `_rule_rows.random_like`
        factor = 1 + 0.1 * rng.uniform(-1, 1, h.shape)
        return jax.device_put(np.asarray(h * factor).astype(h.dtype))

    return [rule.inputs] + [jax.tree_util.tree_map(moved, rule.inputs) for _ in range(BATCH - 1)]


def _stack(trees):
    def stack(*xs):
        if _is_key(xs[0]):  # typed PRNG keys have no NumPy form
            return jnp.stack(xs)
        return np.stack([_plan.host_array(x) for x in xs])

    return jax.tree_util.tree_map(stack, *trees)


def _is_key(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


_TRANSFORMS = {
    "vmap": "under jax.vmap vs example by example",
    "jit": "under jax.jit vs eager",
    "checkpoint": "under jax.checkpoint vs plain",
}


def _rounds_to(d: _Draws, dtype):
    """The least precise float dtype the derivative program casts to, where that is less
    precise than `dtype`, else `dtype`. A rule that rounds through bfloat16 inside can
    round differently once compiled (XLA may fuse, reorder or drop a round trip through a
    lower precision)."""
    state = d.rng.bit_generator.state  # tracing draws; the rows keep their draws
    try:
        jaxpr = jax.make_jaxpr(d.go)(d.rule.inputs, d.tangent(), d.cotangent()).jaxpr
    except Exception:  # noqa: BLE001 - the rows that need the program say why it fails
        return dtype
    finally:
        d.rng.bit_generator.state = state
    found = _problem.casts(jaxpr, [True] * len(jaxpr.invars))
    lower = [c for c in found if _precision.eps(c) > _precision.eps(dtype)]
    return _precision.lowest(lower) if lower else dtype


def _transformed(d: _Draws, which: str, tol) -> Report:
    maps = ", vjp" * d.with_vjp + ", jvp" * d.with_jvp
    name = f"{which}: primal{maps} {_TRANSFORMS[which]}"

    def compute():
        if which == "vmap":
            points = _batch(d.rule, d.rng)
            vs = [d.tangent() for _ in points]
            us = [d.cotangent() for _ in points]
            plain = _stack([d.jitted(p, v, u) for p, v, u in zip(points, vs, us)])
            batched = d.program("vmap", jax.vmap(d.go), _stack(points), _stack(vs), _stack(us))
            return _rule_rows.exact(name, batched, plain, tol), ()
        v, u = d.tangent(), d.cotangent()
        plain = d.jitted(d.rule.inputs, v, u)
        if which == "jit":
            return _rule_rows.exact(name, plain, d.go(d.rule.inputs, v, u), tol), ()
        # around the call with nondiff_argnums filled in: those must not be traced
        remat = _derivatives(jax.checkpoint(d.rule.call), d.with_jvp, d.with_vjp)
        return _rule_rows.exact(
            name, d.program("remat", remat, d.rule.inputs, v, u), plain, tol
        ), ()

    if which == "vmap":
        unbatchable = _unbatchable(d, name, tol)
        if unbatchable is not None:
            return unbatchable
    return _rule_rows.guarded(which, name, tol, d.rule.dtype, compute)


def _unbatchable(d: _Draws, name: str, tol) -> Report | None:
    """The vmap row, not judged, where JAX cannot batch the rule's primal at all (a
    `pure_callback` without a `vmap_method`, a primitive without a batching rule): that is
    the rule's declared scope, as `verify` takes it (it evaluates such an fn direction by
    direction), not a wrong derivative. None where the primal batches (its derivatives'
    failures under vmap are findings)."""
    points = [d.rule.inputs, d.rule.inputs]
    try:
        jax.eval_shape(jax.vmap(d.rule.call), _stack(points))
    except NotImplementedError as err:
        if not _plan.unbatchable(err):
            return None  # (the row itself reports it)
        comparison = Comparison(name, math.nan, (math.nan, math.nan), 0.0, 0.0, tol, 0, True)
        comparison = dataclasses.replace(comparison, judged=False)
        reason = (
            f"vmap: not checked: the rule cannot be batched by jax.vmap ({one_line(err)}); "
            "give it a batching rule (pure_callback's vmap_method, say) to have it checked"
        )
        return _rule_rows.part("vmap", comparison, d.rule.dtype, 0.0, (reason,), Status.PASS)
    except Exception:  # noqa: BLE001 - the row itself reports any other error
        return None
    return None


def _native(rule, fd: Report, key, k, rtol, leaf_k, verify, forward=None) -> Report | None:
    """The vjp (the jvp, `forward`, where the rule has no vjp) against finite differences
    in the inputs' own precision, when the float64 row ran for lower-precision inputs: that
    row takes the distance between the rule in the inputs' precision and in float64 for
    rounding, so it cannot see a rule that is only right in float64."""
    if fd.status is not Status.PASS or jnp.dtype(fd.reference_dtype) == jnp.dtype(fd.tested_dtype):
        return None
    tested = fd.checks[0] if fd.checks else None
    if tested is None or tested.rounding <= NATIVE_ROUNDING * _precision.eps(fd.tested_dtype):
        return None  # the rule in float32 is as close to itself in float64 as rounding goes
    report = verify(
        _Called(rule),
        rule.inputs,
        key=key,
        num_directions=k,
        precision="native",
        rtol=rtol,
        leaf_directions=leaf_k,
        mode="reverse" if forward is None else "forward",
    )
    label = (
        f"{'vjp' if forward is None else 'jvp'} vs finite differences in {report.reference_dtype}"
    )
    report = _relabel(report, label)
    if report.status is Status.FAIL:
        report = dataclasses.replace(
            report,
            problems=report.problems
            + (
                f"{label}: the rule is right in float64 but not in {fd.tested_dtype}: "
                f"a code path taken only in {fd.tested_dtype}, or a silent cast to a "
                "lower precision",
            ),
        )
    return report
