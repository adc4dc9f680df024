"""The probe: one program at params, before any direction is drawn, that measures the scales
of the parameters, outputs and gradient and whether they are finite. A NaN/Inf found here
ends the check (and, with the caller's debug flags on, is replayed so that JAX names the
primitive that made it)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import _autodiff, _complex, _directions, _evaluate, _localize, _plan, _tree
from ._errors import CotangentKind
from ._host import DEBUG_FLAGS
from ._report import LeafResult, Status
from ._state import CHECKED_LATER, SCALES, Run


def probe(run: Run, reverse: bool, k: int, leaf_k: int, first_look: int) -> None:
    """Run the probe program and keep its values in `run.probe`; for a small problem it
    also projects the derivative under test onto the `k` global directions and the
    `leaf_k` leaf-local ones of localization (`_autodiff.probe_folded`). While it compiles,
    the finite-difference program of the first look (`first_look` directions) is lowered
    and set compiling (`_evaluate.reference_ahead`)."""
    leaf_local = _localize.LEAF_INDEX_OFFSET + np.arange(leaf_k)
    index = np.concatenate([np.arange(k), leaf_local]).astype(np.int32)
    fold = _plan.fold(run.plan, run.modes, run.problem.scalar_output, run.inputs.diff, len(index))
    if run.problem.iterates:
        # (the folded jvp along a direction is the sum of those along its leaves' parts,
        # true of a derivative linear in its tangent: the jvp of a solve that stops short,
        # jax.scipy.sparse.linalg.cg's in float32, is not, and a right one was 14 % off)
        fold = tuple(m for m in fold if m != "forward")
    under_checks(run, reverse)
    plain = functools.partial(_autodiff.probe, run.problem, reverse)
    ahead = functools.partial(_evaluate.reference_ahead, run, first_look)
    args = (run.seeds[1], run.inputs.diff, run.inputs.traced(), _signs(run, index[:0]))
    if fold and _plan.is_compiled(plain, args):
        fold = ()  # compiled already (an earlier check in another mode): no program to save
    try:
        no_forward = None
        if fold:
            values, no_forward = _run_folded(run, reverse, fold, index, plain, args, ahead)
        else:
            values = run.timer.run(plain, *args, ahead=ahead)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as err:
        # (raised by the eager evaluation, jax.jit having failed to trace fn: Python control
        # flow on values is fine there, a conversion jax.grad cannot follow is not)
        if not (reverse and run.problem.grad_fn is None):
            raise
        numpy = isinstance(err, jax.errors.TracerArrayConversionError)
        raise TypeError(
            (
                "fn converts its inputs to NumPy arrays (it calls NumPy on them)"
                if numpy
                else "fn converts its inputs to Python numbers (float(), int() or .item() "
                "on a value computed from params)"
            )
            + ", so jax cannot differentiate it: jax.grad needs fn written with jax.numpy. "
            "To check such a function, pass its hand-written gradient: "
            "verify(fn, params, *args, grad_fn=grad_fn)."
        ) from err
    except TypeError as err:
        # a custom rule giving a complex leaf a real cotangent: the real view's lax.complex
        # cannot transpose it (jax.grad of fn itself returns it, its imaginary part lost)
        bad = []
        if reverse and run.problem.grad_fn is None:
            bad = _complex.real_cotangents(run.problem, run.inputs.diff, run.inputs.traced())
        if not bad:
            raise
        raise CotangentKind(bad) from err
    # the gradient stays on its devices (and sharding); only the small values come over
    run.probe = _on_host(values, run.inputs.diff, run.problem)
    scales = SCALES.get()
    if scales is not None and not scales:  # the first probe of an order >= 2 check
        scales.update(params=run.probe["leaf_scales"], outputs=run.probe["output_scales"])
    if "fold_rev" in run.probe or "fold_fwd" in run.probe:
        run.probe["fold_index"] = index
    if no_forward is not None:  # raised again where forward mode is first needed
        run.probe["no_forward"] = no_forward


def under_checks(run: Run, reverse: bool) -> None:
    """With the caller's `jax_enable_checks` on, trace the derivatives under test (fn's vjp,
    which traces its jvp rules too; or grad_fn, and fn's jvp in forward mode) once, alone
    and without compiling, under JAX's invariant checks, so that what they report about fn
    is raised as it would be outside the check. The compiled programs, which evaluate the
    same derivatives batched over directions, are then traced without them (`_plan`). In
    the first-order part of an order >= 2 check (`CHECKED_LATER`) it leaves them to the
    order-2 part: the vjp of its derivative maps traces fn's jvp and vjp rules again, with
    their own derivatives."""
    if not jax.config.jax_enable_checks or _plan.is_eager() or CHECKED_LATER.get():
        return
    problem, traced = run.problem, run.inputs.traced()
    f = lambda d: problem.outputs(d, traced)  # noqa: E731

    def derivatives(diff):
        out = []
        if reverse and problem.grad_fn is not None:
            out.append(problem.gradient(diff, traced))
        elif reverse:  # a vjp traces fn's jvp rules too (and then transposes them)
            y, vjp_fn = jax.vjp(f, diff)
            return vjp_fn(y)
        if "forward" in run.modes:
            try:
                out.append(jax.jvp(f, (diff,), (diff,))[1])
            except TypeError as err:  # no forward mode through a custom_vjp: said later
                if "custom_vjp" not in str(err):
                    raise
        return out

    try:
        with _plan.user_transfers():
            jax.make_jaxpr(derivatives)(run.inputs.diff)
    except (*_plan.TRACING_ERRORS, ValueError) as err:
        if not _plan.cannot_trace(err):
            raise
        # fn needs concrete values: the programs will run eagerly, under the checks
    except AssertionError:
        # JAX's checks can assert on a staged trace where running the same derivatives op
        # by op passes (jax 0.10: a custom_jvp with a non-differentiable argument, as
        # log_ndtr's): then they are run so, as a test calling jax.vjp would run them
        with _plan.user_transfers():
            jax.block_until_ready(derivatives(run.inputs.diff))


def _run_folded(run: Run, reverse: bool, fold: tuple, index, plain, args, ahead) -> tuple:
    """(the folded probe's values, the TypeError of a custom_vjp in fn under forward mode
    or None)."""
    try:
        values = run.timer.run(
            functools.partial(_autodiff.probe_folded, run.problem, reverse, (run.kind, fold)),
            run.seeds,
            run.inputs.diff,
            run.inputs.traced(),
            index,
            _signs(run, index),
            ahead=ahead,
        )
    except TypeError as err:
        if "forward" not in fold or "custom_vjp" not in str(err):
            raise
        # no jvp through a custom_vjp: the evaluation says so and checks reverse mode
        # (still folded if it was)
        rest = tuple(m for m in fold if m != "forward")
        values = _run_folded(run, reverse, rest, index, plain, args, ahead)[0] if rest else None
        return run.timer.run(plain, *args, ahead=ahead) if values is None else values, err
    return values, None


def _signs(run: Run, index):
    """The host-drawn signs a probe takes (`_autodiff.split_signs`): those of directions
    `index` and of the balancing cotangent; None where they are hashed in the program."""
    signs = run.signs(np.append(index, _autodiff.BALANCE_INDEX).astype(np.int32))
    return _autodiff.split_signs(signs, len(index))


def _on_host(probe: dict, diff: list, problem) -> dict:
    """The probe's scales and finiteness flags as NumPy values; the gradient stays a list
    of device arrays, passed on only for a scalar fn (whose projections are formed from it)."""
    out = {k: _evaluate.to_host(v) for k, v in probe.items() if k != "grad"}
    if "param_squares" not in out:  # a small problem's: summed here
        out["param_squares"] = _host_squares(diff)
    rms_params, out["params_finite"] = _directions.host_rms(out["param_squares"], diff)
    out["leaf_scales"] = _directions.with_floor(rms_params, [max(x.size, 1) for x in diff])
    if "grad" in probe:
        if "grad_squares" not in out:
            out["grad_squares"] = _host_squares(probe["grad"])
        rms_grad, out["grad_finite"] = _directions.host_rms(out["grad_squares"], probe["grad"])
        # (norms beyond float64's range are infinite, as `_directions.balance` takes them)
        with np.errstate(over="ignore"):
            out["grad_norms"] = rms_grad * np.sqrt([max(x.size, 1) for x in diff])
        if problem.scalar_output:
            out["grad"] = probe["grad"]
    for i, packed in enumerate(problem.packed):
        if not packed:
            continue
        x = np.asarray(_plan.host_array(diff[i]), np.float64)
        g = probe["grad"][i] if "grad" in probe else None
        g = None if g is None else np.asarray(_plan.host_array(g), np.float64)
        if g is not None:  # its entries move by their own magnitudes: its share is |g * f|
            with np.errstate(over="ignore"):
                out["grad_norms"][i] = np.linalg.norm(g * _directions.entry_scales(x))
        # the entries that moves of their own sizes hide, checked again at the leaf's scale
        # (`_verify.run`); in forward mode alone, with no derivative per entry, every small one
        hidden = _directions.unseen_entries(x, np.ones_like(x) if g is None else g)
        if hidden.size:
            out.setdefault("unseen", {})[i] = hidden
    return out


def _host_squares(leaves) -> np.ndarray:
    """Per-leaf sums of squares in float64, on the host (the leaves of a small problem)."""
    arrays = [np.asarray(_plan.host_array(x), np.float64).ravel() for x in leaves]
    with np.errstate(over="ignore", invalid="ignore"):  # NaN/Inf: `host_rms` tells them apart
        return np.asarray([np.dot(x, x) for x in arrays], np.float64)


# how the problems end that say an output of fn is NaN/Inf at params
OUTPUT_NONFINITE = " is NaN/Inf at params"


def output_nonfinite(problem: str) -> bool:
    """Whether `problem` says an output of fn is NaN/Inf at params (`nonfinite`)."""
    return problem.startswith("fn's output ") and problem.endswith(OUTPUT_NONFINITE)


def nonfinite(run: Run, paths) -> bool:
    """Whether params, fn's outputs or the gradient hold NaN/Inf at params; each one found
    is added to the problems."""
    pr = run.probe
    found = [
        f"parameter leaf {p or '(root)'} contains NaN/Inf (params are differentiated "
        "whole: a buffer fn does not differentiate, such as an attention mask of -inf, "
        "belongs in *args, held fixed: verify(fn, params, mask))"
        for p, ok in zip(paths, pr["params_finite"])
        if not ok
    ]
    found += [
        f"fn's output {p or '(root)'}{OUTPUT_NONFINITE}"
        for p, ok in zip(run.problem.out_paths, pr["outputs_finite"])
        if not ok
    ]
    if "grad_finite" in pr:
        grad = pr.get("grad") or [None] * len(paths)  # (kept for a scalar fn only)
        found += [
            f"the gradient ({run.problem.source}) of leaf {p or '(root)'} is NaN/Inf"
            f"{_where_nonfinite(g)}"
            for p, ok, g in zip(paths, pr["grad_finite"], grad)
            if not ok
        ]
    if found:
        found += _nonfinite_args(run)
    run.problems += found
    return bool(found)


def _where_nonfinite(g) -> str:
    """Where the gradient leaf `g` is NaN/Inf, as ' at entries i, j (n of size)' (the first
    5); '' for a 0-d leaf or one not at hand."""
    if g is None or not np.ndim(g):
        return ""
    a = np.asarray(_plan.host_array(g))
    bad = np.argwhere(~np.isfinite(a))
    if not len(bad):
        return ""
    named = ", ".join(
        str(tuple(int(j) for j in i)) if a.ndim > 1 else str(int(i[0])) for i in bad[:5]
    )
    more = ", ..." if len(bad) > 5 else ""
    return f" at entr{'y' if len(bad) == 1 else 'ies'} {named}{more} ({len(bad)} of {a.size})"


def nonfinite_leaves(run: Run, paths) -> tuple:
    """A NONFINITE `LeafResult` for each parameter leaf whose value or gradient holds
    NaN/Inf at params (nothing else is judged there)."""
    pr = run.probe
    bad = ~np.asarray(pr["params_finite"], bool)
    if "grad_finite" in pr:
        bad |= ~np.asarray(pr["grad_finite"], bool)
    leaves = zip(paths, run.inputs.diff, bad)
    return tuple(_unmeasured_leaf(p, x, Status.NONFINITE) for p, x, b in leaves if b)


def _unmeasured_leaf(path: str, x, status: Status) -> LeafResult:
    """A `LeafResult` with `status` and no error measured (NaN/Inf, or a wrong kind)."""
    nan = float("nan")
    return LeafResult(path, tuple(np.shape(x)), str(x.dtype), nan, (nan, nan), nan, 0, status)


def nonfinite_tangent_leaves(run: Run, paths) -> tuple:
    """A NONFINITE `LeafResult` for each parameter leaf whose own jvp (along ones) is
    NaN/Inf: forward mode's counterpart of the probe's gradient, which names the leaves in
    reverse mode. One program takes each leaf's tangent with the others' zero; where the
    jvp is NaN/Inf even along zero tangents (a derivative infinite at params, sqrt or a
    division at 0, times the zeros of another leaf's tangent), each leaf is moved alone,
    the others held as constants (a program per leaf: up to `NAMED_ALONE` leaves)."""
    problem, inputs = run.problem, run.inputs
    f = lambda d: problem.outputs(d, inputs.traced())  # noqa: E731

    def finite(diff, tangents):
        return [jnp.all(jnp.isfinite(y)) for y in jax.jvp(f, (diff,), (tangents,))[1]]

    def alone(i, diff, tangent):
        def of_leaf(x):
            return f([x if j == i else d for j, d in enumerate(diff)])

        return [jnp.all(jnp.isfinite(y)) for y in jax.jvp(of_leaf, (diff[i],), (tangent,))[1]]

    eager = _plan.is_eager()
    together = finite if eager else jax.jit(finite)
    apart = alone if eager else jax.jit(alone, static_argnums=0)
    at = [i for i, x in enumerate(inputs.diff) if np.size(x)]
    out = []
    with _plan.own_transfers():
        zeros = [jnp.zeros_like(x) for x in inputs.diff]
        try:
            separable = all(bool(b) for b in together(inputs.diff, zeros))
            if not separable and len(at) > NAMED_ALONE:
                run.problems.append(
                    f"the jvp is NaN/Inf even along zero tangents, and of {len(at)} leaves "
                    f"(more than {NAMED_ALONE}) none is moved alone to name it: a derivative "
                    "inside fn is infinite at params (sqrt or a division at 0)"
                )
                return ()
            for i in at:
                x = inputs.diff[i]
                if separable:
                    tangents = [jnp.ones_like(x) if j == i else z for j, z in enumerate(zeros)]
                    ok = all(bool(b) for b in together(inputs.diff, tangents))
                else:
                    ok = all(bool(b) for b in apart(i, inputs.diff, jnp.ones_like(x)))
                if not ok:
                    out.append(_unmeasured_leaf(paths[i], x, Status.NONFINITE))
        except Exception:  # noqa: BLE001 - the directions found it; no leaf is named
            return ()
    return tuple(out)


# With a jvp NaN/Inf along zero tangents, leaves named by moving each alone, one program
# each, up to this many
NAMED_ALONE = 32


KIND_HINT = (
    "jaxcheck.verify(fn, params, rules=True) or jaxcheck.verify_rule(rule, *args) names the rule"
)


def without_kind_hint(report):
    """`report` without `KIND_HINT` among its problems (where the rule is named already)."""
    kept = tuple(p for p in report.problems if not p.endswith(KIND_HINT))
    return dataclasses.replace(report, problems=kept)


def wrong_kind_leaves(run: Run, bad: list) -> tuple:
    """A FAIL `LeafResult` for each leaf `bad` names (`CotangentKind`: autodiff gives a
    real leaf a complex gradient or a complex leaf a real one), each said in the problems."""
    paths = run.problem.params.paths_of(_tree.DIFF)
    view = run.problem.fn
    complex_paths = view.paths if isinstance(view, _complex.RealView) else frozenset()
    leaves = []
    for i, got in bad:
        p, x = paths[i], run.inputs.diff[i]
        if p in complex_paths:
            run.problems.append(
                f"the reverse pass gives the complex parameter leaf {p or '(root)'} a real "
                f"cotangent ({got}): a custom_vjp's bwd returns a real cotangent for a "
                "complex input (jnp.real of it, say), which drops the imaginary part of the "
                "gradient; return one of the input's complex dtype"
            )
        else:
            run.problems.append(
                f"the gradient (autodiff) of the real parameter leaf {p or '(root)'} "
                f"({x.dtype}) is {got}: a custom_vjp's bwd returns a complex cotangent for "
                "a real input, which jax.grad passes on (an optimizer step would make the "
                "parameter complex); return one of the input's dtype"
            )
        leaves.append(_unmeasured_leaf(p, x, Status.FAIL))
    run.problems.append(KIND_HINT)
    return tuple(leaves)


def _nonfinite_args(run: Run) -> list[str]:
    """A line for each floating leaf of `*args` holding NaN/Inf: fn's inputs that are not
    differentiated, often where a NaN/Inf gradient comes from."""
    paths = run.problem.args.paths_of(_tree.DIFF)
    return [
        f"argument args{p} contains NaN/Inf (held fixed, not differentiated; what is "
        "NaN/Inf above may come from it)"
        for p, x in zip(paths, run.inputs.a_floats)
        if not np.all(np.isfinite(_plan.host_array(x)))
    ]


def replay_nonfinite(run: Run, reverse: bool, found: bool = True) -> None:
    """With the caller's jax_debug_nans/jax_debug_infs on, evaluate fn (and its
    gradient) at params again under those flags, as the caller's own call of fn runs,
    so that JAX's own FloatingPointError names the primitive that made the NaN/Inf, as
    it would outside the check (JAX re-runs a jitted call that made one op by op). Not
    under jax.disable_jit: there the flags see every constant inside JAX's own jitted
    functions, and jax.nn.softmax's -inf tripped jax_debug_infs. (With the flags off,
    or when no primitive of fn trips them, the check reports "nonfinite".) Where the
    check `found` none, a NaN/Inf made and then dropped inside fn (jnp.nan_to_num, a
    jnp.where branch not taken) is raised so too, as fn run eagerly (and
    jax.test_util.check_grads) would raise it; any other error of that evaluation is
    left to the check."""
    nans, infs = DEBUG_FLAGS.get() or (False, False)
    if not (nans or infs) or not np.all(run.probe["params_finite"]):
        return  # NaN/Inf already in params: the report says which leaf
    if not found:
        try:
            replay_nonfinite(run, reverse)
        except FloatingPointError:
            raise
        except Exception:  # noqa: BLE001 - fn not run so eagerly: the check goes on
            pass
        return
    problem, inputs = run.problem, run.inputs
    f = lambda d: problem.outputs(d, inputs.traced())  # noqa: E731
    with jax.debug_nans(nans), jax.debug_infs(infs):
        outs = f(inputs.diff)
        if not reverse:
            # the jvp along ones, as the directions' would make it
            ones = [jnp.ones_like(x) for x in inputs.diff]
            try:
                jax.jvp(f, (inputs.diff,), (ones,))
            except FloatingPointError:
                raise
            except Exception:  # noqa: BLE001 - no forward mode here: the check says why
                pass
            return
        if problem.grad_fn is not None:
            problem.gradient(inputs.diff, inputs.traced())
        else:
            _, vjp_fn = jax.vjp(f, inputs.diff)
            vjp_fn([jnp.ones_like(y) for y in outs])
