"""`verify`: the entry point that validates the options, splits params and args into what is
differentiated and what is held fixed, sets up the run state and hands it to the pipeline
(`_pipeline.check`), which returns the `Report`."""

import contextvars
import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterator
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from . import (
    _complex,
    _differences,
    _directions,
    _fingerprint,
    _host,
    _keywords,
    _options,
    _orders,
    _pipeline,
    _plan,
    _precision,
    _problem,
    _rule_report,
    _rule_rows,
    _rule_search,
    _state,
    _tree,
)
from ._errors import RULE_OUTPUTS, SAME_DEVICES_HOW, GradientCheckError, one_line
from ._plan import Timer
from ._report import Report, Status


@_keywords.checked("jaxcheck.verify", "verify(fn, params, *args)")
def verify(
    fn: Callable,
    params: Any,
    *args: Any,
    grad_fn: Callable | None = None,
    has_aux: bool = False,
    order: int = 1,
    num_directions: int = 16,
    sequential: bool = True,
    key: Any = 0,
    mode: Literal["reverse", "forward", "both"] = "reverse",
    precision: Literal["auto", "float64", "native"] = "auto",
    step: float | None = None,
    rtol: float | None = None,
    localize: bool | Literal["auto"] = "auto",
    leaf_directions: int = 8,
    directions: Literal["uniform", "rademacher", "gaussian"] = "uniform",
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    direction_sharding: jax.sharding.NamedSharding | None = None,
    raise_on_failure: bool = False,
    rules: bool | Literal["auto"] = "auto",
    transforms: bool = False,
) -> Report:
    """Check the derivative of `fn` at `params` against finite differences.

    Draws `num_directions` random directions v over the floating-point leaves of `params`
    (each leaf scaled to its own magnitude), evaluates central finite differences of
    fn(params + t v, *args) at t = ±h, ±h/2 for all directions in one jitted, vmapped
    program, and compares their Richardson extrapolation with the projections <g, v> of the
    derivative under test. The result is an estimated relative gradient error with a 95 %
    interval, judged against a tolerance derived from the finite-difference error model
    (step ladder, truncation, roundoff) rather than from a fixed table.

    Args:
        fn: `fn(params, *args)` returning a scalar or a pytree of float or complex arrays
            (then random output cotangents u make it scalar: <u, fn(...)>; a complex output
            counts as its (re, im) pair). With `has_aux`, `(out, aux)`.
        params: any pytree. Floating leaves are differentiated; all other leaves (ints,
            bools, PRNG keys, static fields, functions) are held fixed and listed. Complex
            leaves (holomorphic fn or not, no flag needed) are checked through their real
            view, a trailing (re, im) axis under the same key path, following JAX's
            conventions (`jax.grad` of a real fn is d/d re - i d/d im).
        *args: further inputs, held fixed (complex ones too; Python numbers are passed to fn
            as they are, as under jax.grad).
        grad_fn: a hand-written gradient `grad_fn(params, *args)` to check instead of JAX's
            own (scalar `fn` only); returns a pytree shaped like `params` (for complex leaves
            in JAX's convention, as `jax.grad` returns it).
        has_aux: `fn` returns `(out, aux)`; aux is ignored.
        order: highest order of derivatives checked (1: first derivatives). Order k also
            checks the derivative maps of order k - 1 like fn, as `jax.test_util.check_grads`
            does: the vjp map params -> <vjp(fn)(u), v> (for a scalar fn <grad fn, v>, whose
            gradient is the Hessian-vector product) in reverse mode, the jvp map
            params -> <u, jvp(fn, v)> in forward mode, both in both modes with mode="both";
            u and v are fixed, random, drawn from `key`. With `grad_fn`, order 2 checks
            grad_fn's Jacobian. The report's `parts` hold one report per order and map.
            At most 8 (the programs grow about twofold per order).
        num_directions: number of random directions K for the all-leaf check; with
            `sequential`, the most it takes. 4 to 65536.
        sequential: start with 4 directions (8 for random signs alone, and where at most
            16 parameter elements get signs that span them) and add more (8, 16, 32, ...
            up to `num_directions`; per leaf up to `leaf_directions`) only while the
            relative error's interval straddles the tolerance, or kinks, flat directions,
            noise or a zero derivative make the verdict doubtful. An early look stops only
            when the error clears the tolerance by the 1 - 5 %/L quantile of its F law (L
            early looks, 95 % over them); with K = 16 a correct gradient (error at half the
            tolerance) fails, and a bug at twice the tolerance passes, with probability
            at most 0.64 % each (0.42 % with a fixed K = 16; with random signs alone 0.49 %,
            but for errors they see least, two entries of equal size and opposite sign,
            0.6 %, and 1.3 % where the gradient lies on the same two entries, neither with
            at most 16 parameter elements, whose directions span them). The report's
            `num_directions` is the number taken, `stopped` says why. False: always K
            (also with `direction_sharding`).
        key: int seed or JAX PRNG key. Same key, same result.
        mode: "reverse" (grad/vjp), "forward" (jvp) or "both" (also checks
            <u, J v> = <J^T u, v>, which needs no finite differences; reverse only, said in
            the report, when fn contains a custom_vjp function).
        precision: "auto" (finite differences in float64 when fn runs in float64, with
            64-bit types enabled only inside the check; else the model's precision),
            "float64" (required), or "native" (the model's precision, at least float32).
        step: relative step h to start from; default eps^(1/3) of the reference
            precision (of a lower precision fn rounds to inside, when it casts to one).
            The error model may move to a smaller step, never to a larger one than
            max(step, 0.05). Where a given step's noise raises the tolerance tenfold
            above the smallest that counts, the report says so.
        rtol: smallest relative error treated as a bug, at most 0.5; default derived from
            the precision.
        localize: also check each leaf on its own. "auto": when the check fails, for
            leaves too small for the all-leaf check to see a 0.1 % error in them, and in
            forward mode alone (no gradient to weigh the leaves) for every leaf.
        leaf_directions: directions per leaf when localizing; 2 to 65536. A failing check
            that no leaf check blames checks the leaves again along twice as many.
        directions: "uniform" (random signs times 128 evenly spaced magnitudes, unit
            variance: no error vanishes along many of them), "rademacher" (random signs
            alone: an error on two entries vanishes along half of them, so the first look
            takes 8) or "gaussian" (slower to draw).
        chunk_size: directions evaluated at once (vmapped); chunks run one after another.
            Default: 1 on CPU (fastest there); on accelerators, as many as keep their
            perturbed parameter copies within `memory_budget`.
        memory_budget: bytes of perturbed parameter copies in flight at once on an
            accelerator. Default: a quarter of its free memory. (On CPU one direction runs
            at a time unless `chunk_size` says otherwise.)
        direction_sharding: a `NamedSharding` with a one-axis `PartitionSpec` (say
            `PartitionSpec("data")`) that spreads the directions over that mesh axis;
            `num_directions` must be a multiple of the axis size. Parameters that are
            themselves sharded keep their sharding in every perturbed copy either way.
        raise_on_failure: raise `GradientCheckError` unless the status is "pass".
        rules: find every `custom_vjp`/`custom_jvp` rule fn calls (inside jit, scan,
            while, cond and checkpoint too; a loop body at its first iteration), capture
            the inputs each receives at these params, and check each there with
            `jaxcheck.verify_rule`. The report gets a part listing the rules with their
            names, call sites (file:line) and verdicts, and fails when one is wrong; a rule
            whose inputs cannot be intercepted is listed as such. "auto": only when the
            check fails, or passed only by taking the float32 derivative's distance from
            float64 for rounding; JAX's own rules (jax.nn, jax.numpy) are then listed, not
            checked, and the rule checks leave out the vmap, jit and checkpoint rows (a
            failure seen by finite differences shows in the others). Never with `grad_fn`.
        transforms: also compare, without finite differences, the gradient under
            `jax.jit` with the eager one, `jax.vmap` of the gradient over the leading
            axis of the largest argument that has one of size >= 2 with the example-by-example
            loop, the gradient of `jax.checkpoint(fn)` with the plain one, and forward with
            reverse mode; one row each.

    Returns:
        A `Report`; `report.ok` is True only when the derivative was judged correct.
        When the rules or transforms are checked, the report is composite: `parts` holds
        the gradient check (or its parts by order), then a part per added check (the
        rules part holds one `verify_rule` report per rule, labelled with its call site).

    Raises:
        TypeError, ValueError: bad inputs, with the offending leaf's path.
        GradientCheckError: with `raise_on_failure=True`, when the check did not pass.

    Example:
        >>> import jax.numpy as jnp, jaxcheck
        >>> report = jaxcheck.verify(lambda p: jnp.sum(jnp.sin(p["w"]) ** 2), {"w": jnp.ones(3)})
        >>> report.ok, report.status
        (True, <Status.PASS: 'pass'>)
    """
    options = _options.Options(
        grad_fn=grad_fn,
        has_aux=has_aux,
        order=order,
        num_directions=num_directions,
        sequential=sequential,
        key=key,
        mode=mode,
        precision=precision,
        step=step,
        rtol=rtol,
        localize=localize,
        leaf_directions=leaf_directions,
        directions=directions,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
        direction_sharding=direction_sharding,
        raise_on_failure=raise_on_failure,
        rules=rules,
        transforms=transforms,
    )
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}.")
    refuse_a_checker(fn, "verify(fn, params)")
    refuse_odd_containers(params, args)
    with _tree.settled(params, fn, args) as settled:
        # a second check of fn reuses its programs only while fn (and grad_fn) compute what
        # they did: a global or a setting they read may have changed in between
        fn, options = keyed(fn, settled, args, options)
        return run(fn, settled, args, options)


def refuse_a_checker(fn, call: str) -> None:
    """Refuse a `Checker` given as the function to check (it would be called on traced
    values, and say that verify cannot be traced)."""
    from ._checker import Checker  # noqa: PLC0415 - _checker imports this module

    if isinstance(fn, Checker):
        raise TypeError(
            f"fn is a jaxcheck.Checker, a check of a function, not a function to check: in "
            f"{call} pass the loss function itself (checker.fn), or call the checker as "
            "checker(params, *args)."
        )


def keyed(fn, params, args, options: _options.Options) -> tuple:
    """(fn, options) with fn and grad_fn keyed by what they compute at params and args
    (`_fingerprint`), for the compiled programs."""
    with _host.x64_as_checked(params):
        fingerprint = _fingerprint.of(
            fn, params, *args, has_aux=options.has_aux, numbers_from=1, order=options.order
        )
        fn = _fingerprint.Keyed(fn, fingerprint)
        if options.grad_fn is not None:
            g = options.grad_fn
            # (its own derivative too where an order >= 2 check differentiates it)
            traced = _fingerprint.of(
                g,
                params,
                *args,
                derivative=options.order >= 2,
                numbers_from=1,
                order=max(options.order - 1, 1),
            )
            options = dataclasses.replace(options, grad_fn=_fingerprint.Keyed(g, traced))
    return fn, options


def refuse_odd_containers(params, args) -> None:
    """Raise, naming it, on a dict among the inputs whose keys JAX cannot sort, or an
    iterator (a generator), which would hand fn other values at each of the many calls of
    a check, then run out (a bare StopIteration from inside fn)."""
    is_iterator = lambda x: isinstance(x, Iterator)  # noqa: E731
    for where, tree in (("params", params), ("args", args)):
        try:
            flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_iterator)[0]
        except (TypeError, ValueError):
            _tree.refuse_unsortable_keys(tree, where)  # (names a dict JAX cannot sort)
            raise
        for path, leaf in flat:
            if is_iterator(leaf):
                raise TypeError(
                    f"{where}{jax.tree_util.keystr(path)} is an iterator "
                    f"({type(leaf).__name__}): a check traces and evaluates fn many times, "
                    "and an iterator gives other values at each call, then runs out. Pass "
                    "the values themselves (an array, or a list(...) of them)."
                )


def _same_devices(params, args) -> None:
    """Raise where arrays of params and args are committed to different devices, which
    jax.jit (and so the check) refuses, naming them."""
    where = _tree.mixed_devices({"params": params, "args": args})
    if where:
        raise ValueError(
            f"params and args hold arrays committed to different devices ({where}). "
            f"{SAME_DEVICES_HOW}"
        )


def _id(device) -> int:
    return device.id


def _onto_mesh(sharding, splits, groups) -> tuple:
    """The arrays of params and args on the devices of `direction_sharding`'s mesh, where
    the directions run: NumPy arrays and uncommitted ones replicated there (copies: the
    caller's arrays stay where they are); a committed array elsewhere refused, naming it,
    as jax.jit would refuse it without saying which."""
    mesh_devices = set(sharding.mesh.devices.flat)
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    (p_split, a_split), (diff, p_arrays, a_floats, a_arrays) = splits, groups
    named = [
        (p_split.paths_of(_tree.DIFF), diff, "params"),
        (p_split.paths_of(_tree.ARRAY), p_arrays, "params"),
        (a_split.paths_of(_tree.DIFF), a_floats, "args"),
        (a_split.paths_of(_tree.ARRAY), a_arrays, "args"),
    ]
    out = []
    for paths, leaves, name in named:
        placed = []
        for path, x in zip(paths, leaves, strict=True):
            if isinstance(x, jax.Array) and getattr(x, "committed", False):
                if set(x.devices()) != mesh_devices:
                    on = ", ".join(str(d) for d in sorted(x.devices(), key=_id))
                    raise ValueError(
                        f"direction_sharding spreads the directions over the devices of its "
                        f"mesh ({', '.join(str(d) for d in sorted(mesh_devices, key=_id))}), "
                        f"but {name}{path} is committed to {on}. Put params and args on the "
                        "mesh's devices, say jax.device_put(x, NamedSharding(mesh, "
                        "PartitionSpec())), or use a mesh of the devices that hold them."
                    )
                _refuse_shared_axis(sharding, x, f"{name}{path}")
                placed.append(x)
            else:
                placed.append(jax.device_put(x, replicated))
        out.append(placed)
    return tuple(out)


def _refuse_shared_axis(sharding, x, name: str) -> None:
    """Refuse an array sharded over a mesh axis of `direction_sharding` on a mesh of
    Explicit axes: there the directions' axis, added in front of it by vmap, cannot take
    the same mesh axis (JAX raises a ShardingTypeError from inside fn)."""
    spec = getattr(getattr(x, "sharding", None), "spec", None)
    if spec is None or not _plan.explicit_axes(sharding):
        return
    axes = {a for entry in spec if entry is not None for a in _names(entry)}
    shared = sorted(axes & set(_names(sharding.spec[0])))
    if shared:
        raise ValueError(
            f"direction_sharding spreads the directions over mesh axis {shared[0]!r}, and "
            f"{name} is sharded over it too (PartitionSpec{tuple(spec)}); on a mesh of "
            "Explicit axes an array cannot be split over one axis twice, as the directions "
            "batched over it would be. Spread the directions over a mesh axis that no "
            "array of params and args is sharded over, or give the mesh Auto axes."
        )


def _names(entry) -> tuple:
    return (entry,) if isinstance(entry, str) else tuple(entry)


@_host.host_side
def run(fn, params, args: tuple, options: _options.Options) -> Report:
    """Check `fn` at `params` with validated `options`."""
    if not _orders.INSIDE.get():  # complex leaves and orders > 1 become first-order checks
        return _rule_report.checked(
            fn, params, args, options, lambda o: _orders.run(fn, params, args, o, run)
        )
    o = options
    p_split, diff, p_arrays = _tree.split(params, "params")
    a_split, a_floats, a_arrays = _tree.split(args, "args")
    opaque = [
        f"{path or '(root)'} is a {name} object, which JAX does not see into (its class is "
        "not a registered pytree)"
        for path, name in _tree.opaque(p_split)
    ]
    if opaque and not diff:
        raise ValueError(
            f"params has no floating-point leaf to differentiate: {'; '.join(opaque)}. "
            "Register the class as a pytree (jax.tree_util.register_dataclass or "
            "register_pytree_node, or make it an equinox.Module), or pass its arrays in a "
            "dict."
        )
    if not diff:
        fixed = [f"{p or '(root)'} {d}" for p, d in _tree.held_fixed(p_split, p_arrays)]
        raise ValueError(
            f"params has no floating-point leaf to differentiate (held fixed: "
            f"{', '.join(fixed) or 'none'}). Pass the parameters to check as float arrays."
        )
    if not any(x.size for x in diff):
        shapes = ", ".join(
            f"{p or '(root)'} {tuple(x.shape)}" for p, x in zip(p_split.paths_of(_tree.DIFF), diff)
        )
        raise ValueError(
            f"every floating-point leaf of params is empty ({shapes}): there is nothing to "
            "check. Pass parameters with at least one element."
        )
    _same_devices(params, args)
    if o.direction_sharding is not None:
        diff, p_arrays, a_floats, a_arrays = _onto_mesh(
            o.direction_sharding, (p_split, a_split), (diff, p_arrays, a_floats, a_arrays)
        )
    inputs = _problem.Inputs(diff, p_arrays, a_floats, a_arrays)
    problem = _problem.Problem(fn, o.grad_fn, o.has_aux, p_split, a_split)
    problem = _problem.with_output_structure(problem, inputs)
    packed = _directions.packed_leaves(diff)
    if _UNPACKED.get():
        packed = (False,) * len(packed)
    seen = _state.PACKED_SEEN.get()
    if seen is not None:  # a Checker's call: packed once, packed at its later calls
        key = (p_split.paths, tuple((x.shape, str(x.dtype)) for x in diff))
        packed = seen[key] = tuple(map(max, seen.get(key, packed), packed))
    problem = dataclasses.replace(problem, packed=packed)
    tested = _precision.lowest(x.dtype for x in diff)
    reference = _precision.reference_dtype(o.precision, tested)
    plan = _plan.make_plan(
        diff,
        o.num_directions,
        len(_differences.OUTER),
        jnp.dtype(reference).itemsize,
        chunk_size=o.chunk_size,
        budget=o.memory_budget,
        direction_sharding=o.direction_sharding,
        other_elements=sum(np.size(x) for x in jax.tree_util.tree_leaves(inputs.traced())),
    )

    runs = []

    def check(plan, problems, problem=problem):
        state = _state.Run(
            problem=problem,
            inputs=inputs,
            modes=("reverse", "forward") if o.mode == "both" else (o.mode,),
            seeds=(
                _directions.seeds(o.key, "params", p_split.paths_of(_tree.DIFF)),
                _directions.seeds(o.key, "outputs", problem.out_paths),
            ),
            kind=o.directions,
            plan=plan,
            tested=tested,
            policy=o.precision,
            rtol=o.rtol,
            timer=Timer(),
            problems=problems,
        )
        runs.append(state)
        return _pipeline.check(
            state,
            o.num_directions,
            o.step,
            o.localize,
            o.leaf_directions,
            _tree.held_fixed(p_split, p_arrays),
            sequential=o.sequential,
        )

    hidden = [
        f"params leaf {leaf}: its arrays were held fixed, not checked; register the class as "
        "a pytree to check them"
        for leaf in opaque
    ]
    if problem.unbatched and plan.direction_sharding is None:
        plan = _plan.looped(plan)
        hidden.append(
            f"{problem.unbatched}: its directions and stencil points were evaluated one at a "
            "time, which is slower"
        )
    kinks_looked = False  # (whether the look at packed leaves held kinks fixed)
    try:
        report = check(plan, list(hidden))
        unseen = runs[-1].probe.get("unseen") if report.status is Status.PASS else None
        if unseen:
            again = functools.partial(check, plan, list(hidden))
            alone = None
            paths = p_split.paths_of(_tree.DIFF)
            if o.grad_fn is None:  # (a grad_fn takes all of params)
                alone = _alone(fn, params, args, o, paths, sorted(unseen))

            def held():
                nonlocal kinks_looked
                kinks_looked = True
                return _kinks_held(fn, params, args, o, paths, sorted(unseen))

            report = _packed_again(report, unseen, problem, p_split, alone or again, hidden, held)
    except ValueError as err:
        # JAX's words for a while_loop, and for a primitive without a transpose rule
        said = ("Reverse-mode differentiation does not work", "Linearization failed")
        if not any(text in str(err) for text in said):
            raise
        # JAX's own words first, so that what matched them before still does
        raise ValueError(
            f"{str(err).strip().splitlines()[0]} fn cannot be differentiated in reverse "
            f"mode, which the check asks for (mode={o.mode!r}). If it has a forward mode, "
            "check that: verify(..., mode='forward'), or modes=('fwd',) in check_grads."
        ) from err
    except AssertionError as err:
        pullback = functools.partial(_pullback, fn, params, args, o.has_aux)
        opaque = _opaque_tangent(fn, params, args, o.has_aux)
        if opaque and o.mode != "forward":
            raise ValueError(
                f"JAX could not form fn's reverse-mode derivative ({one_line(err)}; "
                f"jax.grad(fn) raises the same): fn computes a tangent with a {opaque} (a "
                "Pallas kernel or a callback, as a custom_jvp's tangent kernel), which JAX "
                "cannot transpose into a vjp, so fn has no reverse mode. verify(..., "
                "mode='forward') checks it in forward mode (modes=('fwd',) in check_grads); "
                "jaxcheck.verify_rule(rule, *inputs) checks such a rule alone."
            ) from err
        if not (_rule_rows.untransposed(err) or _rule_rows.untransposed_when_traced(err, pullback)):
            raise
        raise ValueError(
            f"JAX could not transpose fn's jvp into a vjp ({one_line(err)}, in JAX's "
            f"backward pass; jax.grad(fn) raises the same): {_NONLINEAR_TANGENT}"
        ) from err
    except TypeError as err:
        if not str(err).startswith(_RULE_SHAPES):
            raise
        raise TypeError(
            f"{' '.join(str(err).split())[:600]}\nfn calls a custom rule that JAX cannot "
            f"differentiate (jax.grad(fn) raises the same): {RULE_OUTPUTS} "
            "jaxcheck.verify_rule(rule, *inputs) checks the rule alone."
        ) from err
    except jax.errors.JaxRuntimeError as err:
        if plan == _plan.looped(plan) or plan.direction_sharding is not None:
            raise
        # (a lax.cond batched by vmap runs every branch: an eqx.error_if or a callback that
        # refuses the inputs of a branch fn does not take raises there)
        report = check(
            _plan.looped(plan),
            [
                *hidden,
                f"fn raised where jax.vmap batched its evaluations ({_last_line(err)}); "
                "they were evaluated one at a time, which is slower. A lax.cond whose "
                "predicate vmap batches runs every branch, also those fn does not take, and "
                "a check or callback there may refuse their inputs",
            ],
        )
    except NotImplementedError as err:
        if str(err).startswith("Transpose rule"):
            # (JAX's type kept: a suite that expects jax.grad's error gets it)
            said = one_line(err, typed=False)  # (its type is ours)
            raise NotImplementedError(
                f"{said}: JAX could not transpose fn's jvp into a vjp (jax.grad(fn) "
                f"raises the same). Either {_NONLINEAR_TANGENT} Or fn calls a primitive with "
                "a jvp but no transpose rule, which has no reverse mode either."
            ) from err
        if not _plan.unbatchable(err) or plan == _plan.looped(plan):
            raise
        first = one_line(err)
        if plan.direction_sharding is not None:
            raise ValueError(
                f"fn cannot be batched by jax.vmap ({first}), and direction_sharding "
                "spreads directions over devices by batching them. Leave "
                "direction_sharding=None: directions are then evaluated one at a time."
            ) from err
        # the same directions, each alone: equal results, slower for a small problem
        report = check(
            _plan.looped(plan),
            [
                *hidden,
                f"fn cannot be batched by jax.vmap ({first}); its directions and stencil "
                "points were evaluated one at a time, which is slower",
            ],
        )
    finer = _finer_outputs(problem, runs[-1] if runs else None)
    if report.status is Status.PASS and finer and o.grad_fn is None:
        report = _outputs_alone(report, fn, params, args, o, problem, finer)
    signs_only = (
        sum(np.size(x) for x in diff) <= _directions.SPANNED or o.directions == "rademacher"
    )
    if (
        report.status is Status.FAIL
        and o.order == 1
        and signs_only
        and not (_UNPACKED.get() or kinks_looked)
        # (kinks the directions showed are left out of the verdict already)
        and not (report.num_nonsmooth or any(leaf.num_nonsmooth for leaf in report.leaves))
    ):
        report = _hidden_kinks(report, fn, params, args, o, p_split.paths_of(_tree.DIFF))
    if (
        report.status is Status.INCONCLUSIVE
        and o.order == 1
        and not (_UNPACKED.get() or kinks_looked or KINKS_LEFT_TO_CALLER.get())
        and not _state.MAPS.get()  # (an order >= 2 check's derivative maps: first order only)
        and (report.num_nonsmooth or any(leaf.num_nonsmooth for leaf in report.leaves))
    ):
        report = _off_kinks(report, fn, params, args, o, p_split.paths_of(_tree.DIFF))
    if o.raise_on_failure and not report.ok:
        raise GradientCheckError(report)
    return report


def _finer_outputs(problem, state) -> tuple[int, ...]:
    """Where the check of all of fn's outputs together was judged at the rounding of a low
    precision that some of them are cast to (a bfloat16 copy of the logits beside a
    float32 loss), the indices of fn's other output leaves, of a finer dtype: judged
    alone, at their own resolution. Empty otherwise."""
    if state is None or state.rounds_to is None or len(set(problem.out_dtypes)) < 2:
        return ()
    eps = {d: _precision.eps(np.dtype(d)) for d in set(problem.out_dtypes)}
    coarsest = max(eps.values())
    if coarsest < _precision.eps(state.rounds_to):
        return ()  # (the rounding is fn's own, inside: its finer outputs round as well)
    return tuple(
        i
        for i, (d, shape) in enumerate(zip(problem.out_dtypes, problem.out_shapes))
        if eps[d] < coarsest and math.prod(shape)
    )


@dataclasses.dataclass(frozen=True)
class _Outputs:
    """fn with only some of its output leaves (`keep`, by index), as a tuple; its
    auxiliary output dropped."""

    fn: Callable
    has_aux: bool
    keep: tuple[int, ...]

    def __call__(self, params, *args):
        out = self.fn(params, *args)
        leaves = jax.tree_util.tree_leaves(out[0] if self.has_aux else out)
        return tuple(leaves[i] for i in self.keep)


def _outputs_alone(report: Report, fn, params, args, options, problem, finer) -> Report:
    """A pass judged at the rounding of fn's coarsest outputs, with its finer outputs
    (`finer`) checked again alone: a float32 loss returned beside a bfloat16 copy of the
    logits hid a derivative 20 % off at the bfloat16 tolerance of 0.25. Their failure is
    the verdict; their pass is said."""
    paths = ", ".join(problem.out_paths[i] or "(root)" for i in finer)
    kinds = sorted({problem.out_dtypes[i] for i in finer})
    others = sorted({d for i, d in enumerate(problem.out_dtypes) if i not in finer})
    try:
        alone = run(
            _Outputs(fn, options.has_aux, finer),
            params,
            args,
            dataclasses.replace(options, has_aux=False, raise_on_failure=False),
        )
    except Exception as err:  # noqa: BLE001 - the check of all outputs stands, and says so
        said = (
            f"fn's {' and '.join(kinds)} outputs ({paths}) could not be checked alone "
            f"({one_line(err)})"
        )
        return dataclasses.replace(report, problems=(*report.problems, said))
    said = (
        f"fn's {' and '.join(kinds)} outputs ({paths}), checked alone: "
        f"{alone.status.value}, relative error {alone.relative_error:.1e} (tolerance "
        f"{alone.tolerance:.1e}); with its {' and '.join(others)} outputs, which round to "
        f"that precision, the check of all outputs together resolves no finer than their "
        "rounding"
    )
    if alone.status is Status.FAIL:
        return dataclasses.replace(alone, problems=(said, *alone.problems))
    return dataclasses.replace(report, problems=(*report.problems, said))


def _last_line(err: BaseException) -> str:
    """The error's type and its own words: the last `SomeError: ...` line of its message
    (a callback's error, at the end of the traceback XLA's message carries), else its
    last line with words, leaving out JAX's notes and separators after them."""
    lines = [
        line.strip()
        for line in str(err).splitlines()
        # (not the separators and notes JAX and equinox put after the error's own words)
        if any(c.isalnum() for c in line) and not line.strip().startswith(_BOILERPLATE)
    ]
    # (a callback's own error, as its traceback's last "SomeError: ..." line gives it)
    raised = [line for line in lines if re.match(r"[\w.]*(Error|Exception): ", line)]
    said = (raised or lines or [""])[-1]
    return f"{type(err).__name__}: {said[:300]}"


_BOILERPLATE = ("For simplicity, JAX", "The preceding stack trace", "Set JAX_TRACEBACK")


def _hidden_kinks(report: Report, fn, params, args, options, paths) -> Report:
    """A failure along directions of signs only (±1 entries: a problem of at most
    `_directions.SPANNED` elements, or `directions="rademacher"`), checked for kinks they
    cannot show: relu(a) · c at a = 0 has the same one-sided slopes along every such
    direction where the entries of c sum to 0, so finite differences there take the
    directional slope for a derivative and fail JAX's (a subgradient) by 33 %. Where fn has
    kinks (each entry moved alone), the failure stands only if the derivative at a kink is
    outside the one-sided slopes there, or the other entries, checked with the kinks held
    fixed, fail; else the check is inconclusive and says why."""
    done, held, _ = _searched_kinks(report, fn, params, args, options, paths)
    if done is not None:
        return done
    kinks = "fn has kinks (one-sided slopes that differ, found by moving each entry alone)"
    if held is not None and held.status is Status.FAIL:
        said = (
            f"{kinks}, which directions of signs only may not show; with the entries at them "
            "held fixed, the others fail"
        )
        return dataclasses.replace(held, problems=(said, *held.problems))
    rest = (
        f"with the entries at them held fixed, the others pass (relative error "
        f"{held.relative_error:.1e}, tolerance {held.tolerance:.1e})"
        if held is not None and held.status is Status.PASS
        else "no entry is left to judge once they are held"
        if held is None
        else f"with the entries at them held fixed, the others are not judged either "
        f"({held.status.value})"
    )
    between = (
        f"the derivative under test is {_NEAR_SLOPES}"
        if options.grad_fn is None
        else "grad_fn's derivative at them is not compared with fn's one-sided slopes"
    )
    said = (
        f"{kinks}, and the directions, of signs only, crossed them without showing it (fn's "
        "one-sided slopes agree along each: kinks whose weights cancel): their finite "
        "differences are fn's slopes along them, not its derivative, which does not exist "
        f"here; {between}, and {rest}: not judged. Try a point away from the kinks"
    )
    leaves = tuple(
        dataclasses.replace(leaf, status=Status.INCONCLUSIVE)
        if leaf.status is Status.FAIL
        else leaf
        for leaf in report.leaves
    )
    kept = tuple(q for q in report.problems if not q.startswith("wrong: "))
    checks = tuple(c if c.passed else dataclasses.replace(c, judged=False) for c in report.checks)
    return dataclasses.replace(
        report,
        status=Status.INCONCLUSIVE,
        checks=checks,
        leaves=leaves,
        problems=(said, *kept),
        stopped="",
    )


# primitives smooth wherever they are finite (sqrt, log and pow only at their domain's
# edge, which is no kink; a scan's count of steps is fixed); a function built of these
# alone has no kink
SMOOTH_PRIMITIVES = frozenset(
    """
    add sub mul div neg exp exp2 log log1p expm1 sin cos tan tanh sinh cosh asin acos atan
    asinh acosh atanh atan2 logistic sqrt rsqrt cbrt pow integer_pow square erf erfc erf_inv
    lgamma digamma dot_general reduce_sum cumsum broadcast_in_dim reshape transpose squeeze
    expand_dims concatenate slice dynamic_slice pad rev copy copy_p conv_general_dilated
    real imag conj complex stop_gradient pjit jit closed_call remat checkpoint
    custom_jvp_call custom_vjp_call custom_vjp_call_jaxpr iota scan
    """.split()
)


def _smooth(fn, params, args, has_aux: bool) -> bool:
    """Whether fn's jaxpr (and every jaxpr inside it) uses only `SMOOTH_PRIMITIVES` and
    casts between floating dtypes: no kink anywhere. False where it cannot be traced."""
    try:
        with _plan.own_transfers():
            closed = jax.make_jaxpr(_output_of(fn, args, has_aux))(params)
    except Exception:  # noqa: BLE001 - not traced: kinks are looked for
        return False

    def smooth(jaxpr) -> bool:
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "convert_element_type":
                if not all(jnp.issubdtype(v.aval.dtype, jnp.inexact) for v in eqn.outvars):
                    return False
            elif name not in SMOOTH_PRIMITIVES:
                return False
            for value in eqn.params.values():
                if not all(smooth(sub) for sub, _ in _rule_search.jaxprs_of(value)):
                    return False
        return True

    return smooth(closed.jaxpr)


# set while `_alone`'s check runs: no leaf of it is packed (it is the second look at them)
_UNPACKED = contextvars.ContextVar("jaxcheck_unpacked", default=False)
# set by check_grads and verify_rule, which hold the entries at kinks fixed themselves (at
# the level of their arguments: `_check_grads._kinked_outcome`, `_rules._kinks_held`) where
# a check is inconclusive, as `_off_kinks` does for verify
KINKS_LEFT_TO_CALLER = contextvars.ContextVar("jaxcheck_kinks_left_to_caller", default=False)


@dataclasses.dataclass(frozen=True)
class _Alone:
    """fn of the leaves of params that `keep` marks (a pytree of params' structure with
    None elsewhere), the other leaves passed in `rest`: equal for equal fn, structure and
    marks, so its compiled programs serve later checks."""

    fn: Callable
    treedef: Any
    keep: tuple

    def __call__(self, sub, rest, *args):
        given, others = iter(jax.tree_util.tree_leaves(sub)), iter(rest)
        leaves = [next(given) if k else next(others) for k in self.keep]
        return self.fn(jax.tree_util.tree_unflatten(self.treedef, leaves), *args)


def _alone(fn, params, args, options, paths, indices):
    """The second look of `_packed_again` at the differentiable leaves `indices` of params
    (their `paths` among `paths`) alone, moved at their scale: the other leaves are passed
    to fn as an argument, held fixed, so its programs carry no directions of theirs (at
    300 small leaves, a second look at one of them through the whole check doubled the
    first call). None where the paths do not pick out those leaves."""
    picked = _picked(params, paths, indices)
    if picked is None:
        return None
    leaves, _, treedef, keep = picked
    sub = _only(treedef, keep, [x for k, x in zip(keep, leaves) if k])
    rest = [x for k, x in zip(keep, leaves) if not k]
    alone = _Alone(fn, treedef, keep)
    return lambda problem: _unpacked_run(alone, sub, (rest, *args), options)


def _picked(params, paths, indices) -> tuple | None:
    """(params' leaves, their paths as `keystr` writes them, params' treedef, whether each
    leaf is one of the differentiable leaves `indices`, whose `paths` are among `paths`), or
    None where the paths do not pick out those leaves."""
    wanted = {paths[i] for i in indices}
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [jax.tree_util.keystr(path) for path, _ in flat]
    keep = tuple(name in wanted for name in names)
    if sum(keep) != len(wanted):
        return None
    return [x for _, x in flat], names, treedef, keep


def _only(treedef, keep, values):
    """The pytree of `treedef` with `values` at the leaves `keep` marks, None elsewhere."""
    given = iter(values)
    return jax.tree_util.tree_unflatten(treedef, [next(given) if k else None for k in keep])


def _unpacked_run(fn, params, args, options) -> Report:
    """`run` as a second look at some leaves: none of them is packed."""
    token = _UNPACKED.set(True)
    try:
        return run(fn, params, args, options)
    finally:
        _UNPACKED.reset(token)


def _packed_again(
    report: Report, unseen: dict, problem, p_split, check, hidden=(), held=None
) -> Report:
    """A pass where a packed leaf's own-size moves hid some entries' derivatives
    (`_directions.unseen_entries`), checked again with those leaves moved at their scale:
    its failure is the verdict; where it is not judged for kinks, judged again with the
    entries at a kink held fixed (`held`, `_kinks_held`); where it is not judged still, the
    pass says so."""
    packed = tuple(p and i not in unseen for i, p in enumerate(problem.packed))
    again = check(dataclasses.replace(problem, packed=packed))
    kinked = ""
    if again.status is Status.INCONCLUSIVE and again.num_nonsmooth and held is not None:
        # (a lasso's zero entries, an entry of relu's input at 0: moved at the leaf's scale,
        # every direction crosses their kinks, and a wrong derivative at a small entry
        # beside them was passed, judged only at its own size)
        found = held()
        if found is not None and found[2] is not None:  # a slope outside them at a kink
            from . import _check_grads  # noqa: PLC0415 - it imports this module

            return _check_grads.outside_fails(report, found[2])
        if found is not None and found[0] is not None:
            if found[0].status in (Status.PASS, Status.FAIL):
                again, kinked = found[0], found[1]
    paths = p_split.paths_of(_tree.DIFF)
    entries = "; ".join(
        f"{paths[i] or '(root)'} entries {', '.join(map(str, hidden[:8]))}"
        + (f" and {len(hidden) - 8} more" if len(hidden) > 8 else "")
        for i, hidden in unseen.items()
    )
    said = (
        "a small leaf whose entries span orders of magnitude moves each entry by its own "
        f"size, which can hide the derivatives of its small entries ({entries}); checked "
        "again with every entry of such a leaf moved at the leaf's scale, "
    )
    if again.status is Status.FAIL:
        # (what the first look held fixed, which a look at some leaves alone does not see)
        kept = (*again.problems, *(q for q in hidden if q not in again.problems))
        return dataclasses.replace(
            again,
            problems=(said + kinked + "it fails", *kept),
            held_fixed=report.held_fixed,
        )
    if again.status is Status.PASS:
        if kinked:
            passed = (
                f"it passes (relative error {again.relative_error:.1e}, tolerance "
                f"{again.tolerance:.1e})"
            )
            return dataclasses.replace(report, problems=(*report.problems, said + kinked + passed))
        return report
    note = (
        f"{said}it was not judged ({again.status.value}: "
        f"{again.problems[0] if again.problems else 'no reason given'}), so those entries' "
        "derivatives are judged only as finely as their own sizes allow"
    )
    return dataclasses.replace(report, problems=(*report.problems, note))


def _searched_kinks(report: Report, fn, params, args, options, paths) -> tuple:
    """`_kinks_held` over every differentiable leaf, where fn's jaxpr can have kinks:
    (the report to return as it is, or None to go on; the check with the kinks held, or
    None; the number of entries held). `report` itself where no kink is found, failed where
    the derivative at a kink is outside fn's one-sided slopes."""
    from . import _check_grads  # noqa: PLC0415 - it imports this module

    if _smooth(fn, params, args, options.has_aux):
        return report, None, 0  # (no kink to look for: each entry moved alone costs a compile)
    found = _kinks_held(fn, params, args, options, paths, range(len(paths)))
    if found is None:
        return report, None, 0
    held, _, outside, n = found
    return None if outside is None else _check_grads.outside_fails(report, outside), held, n


# what `_check_grads._outside_slopes` found of the derivative at each kink, where it passed
_NEAR_SLOPES = (
    "within the range of fn's one-sided slopes and of its derivatives nearby at each kink, "
    "widened by 5 % of the slopes' size"
)


def _off_kinks(report: Report, fn, params, args, options, paths) -> Report:
    """An inconclusive check whose directions crossed kinks, checked again with the entries
    where fn has one (each moved alone) held fixed, as check_grads does (`_kinks_held`):
    the others failing there, or the derivative at a kink outside fn's one-sided slopes,
    fails it (a lasso's entries at 0 beside a row cut off from the loss); the others
    passing is said, and the check stays inconclusive, its kinks not judged."""
    done, held, n = _searched_kinks(report, fn, params, args, options, paths)
    if done is not None:
        return done
    if held is None or held.status not in (Status.PASS, Status.FAIL):
        return report
    entries = (
        f"real or imaginary {'part' if n == 1 else 'parts'} of params' entries, found by "
        "moving each part alone"
        if isinstance(fn, _complex.RealView)  # (complex leaves are moved part by part)
        else f"{'entry' if n == 1 else 'entries'} of params, found by moving each entry alone"
    )
    kinks = (
        f"fn has kinks (one-sided slopes that differ) at {n} {entries}; checked again with "
        "them held fixed, "
    )
    if held.status is Status.FAIL:
        said = f"{kinks}the others fail (the leaf table counts the entries moved)"
        return dataclasses.replace(held, problems=(said, *held.problems))
    said = (
        f"{kinks}the others pass (relative error {held.relative_error:.1e}, tolerance "
        f"{held.tolerance:.1e}), and the derivative under test is {_NEAR_SLOPES}"
        if options.grad_fn is None
        else f"{kinks}the others pass (relative error {held.relative_error:.1e}, tolerance "
        f"{held.tolerance:.1e}); grad_fn's derivative at the kinks is not compared with "
        "fn's one-sided slopes"
    )
    return dataclasses.replace(report, problems=(*report.problems, f"{said}: not judged there"))


@dataclasses.dataclass(frozen=True)
class _Held:
    """fn with the entries at kinks of params' leaves `where` held at their values, called
    as `(sub, leaves, bases, *args)`: `sub` the moving entries of those leaves (their flat
    indices `free`), `leaves` params' leaves, `bases` the leaves `where` as they are. Equal
    for equal fn, structure and entries, so its compiled programs serve a later check."""

    fn: Callable
    treedef: Any
    where: tuple
    free: tuple

    def params(self, sub, leaves, bases):
        moved = list(leaves)
        for i, b, f, v in zip(self.where, bases, self.free, jax.tree_util.tree_leaves(sub)):
            # (in the reference's precision where the free entries are: a cast of them
            # back to the leaf's dtype would make fn a staircase of its quanta)
            moved[i] = b.astype(v.dtype).ravel().at[np.asarray(f, int)].set(v).reshape(b.shape)
        return jax.tree_util.tree_unflatten(self.treedef, moved)

    def __call__(self, sub, leaves, bases, *args):
        return self.fn(self.params(sub, leaves, bases), *args)


def _kinks_held(fn, params, args, options, paths, indices) -> tuple | None:
    """Where fn has kinks (one-sided slopes that differ) at some entries of the
    differentiable leaves `indices` (their `paths` among `paths`), found by moving each
    entry alone (`_check_grads._one_sided`): (the check of fn with those entries held at
    their values and the leaves' other entries moved at the leaves' scale, the other leaves
    held fixed, or None where no entry is left to move; a clause saying so; the note of
    `_check_grads._outside_slopes` where autodiff's derivative at a kink is not between the
    one-sided slopes there, else None; the number of entries held); None where there are
    none. A grad_fn is taken at the same entries (and its derivative at the kinks not
    compared)."""
    from . import _check_grads  # noqa: PLC0415 - it imports this module

    picked = _picked(params, paths, indices)
    if picked is None:
        return None
    leaves, names, treedef, keep = picked
    at = [i for i, k in enumerate(keep) if k]

    def full(chosen, where=at):
        moved = list(leaves)
        for i, x in zip(where, chosen):
            moved[i] = x
        return jax.tree_util.tree_unflatten(treedef, moved)

    def value(*chosen):
        out = fn(full(chosen), *args)
        return out[0] if options.has_aux else out

    with _plan.own_transfers(), jax.debug_nans(False), jax.debug_infs(False):
        try:
            # (any kink that the look at the leaf's scale crossed: a lasso's 0.1 |w| at an
            # entry of slope 3 differs by 3 % of its size)
            # (what `value` computes besides fn: its programs serve a later check of fn at
            # the same point, a `Checker`'s next call)
            arg_leaves, arg_tree = jax.tree_util.tree_flatten(args)
            key = (
                fn,
                treedef,
                tuple(at),
                options.has_aux,
                tuple(_tree.digest(x) for i, x in enumerate(leaves) if i not in at),
                arg_tree,
                tuple(map(_tree.digest, arg_leaves)),
            )
            found = _check_grads._one_sided(
                value, [leaves[i] for i in at], share=1e-3, wide=True, key=key
            )
            if found is None:
                return None
            kinks, slopes = found
            if any(math.isinf(k.margin) for k in slopes):
                # a side not smooth at the search's step (a jump; sin at 1e6, whose period
                # the step spans, taken for kinks): no kink to hold with confidence
                return None
            outside = None
            if options.grad_fn is None:
                outside = _check_grads._outside_slopes(
                    value,
                    [leaves[i] for i in at],
                    slopes,
                    [f"params leaf {names[i] or '(root)'}" for i in at],
                    key=key,
                )
        except Exception:  # noqa: BLE001 - fn refuses the moved points: nothing held
            return None
        n = sum(int(np.sum(k)) for k in kinks)
        clause = (
            f"and, as fn has a kink at {n} of those leaves' "
            f"{'entry' if n == 1 else 'entries'} (found by moving each alone), every "
            "direction crossed it there: checked once more holding "
            f"{'it' if n == 1 else 'them'} fixed and moving the others at their leaf's scale "
            "(the leaf table counts the entries moved), "
        )
        # leaves kinked at every entry are held whole
        moving = [(i, k) for i, k in zip(at, kinks) if not np.all(k)]
        if not moving:
            return None, clause, outside, n
        where = [i for i, _ in moving]
        marked = tuple(i in where for i in range(len(leaves)))
        bases = [jnp.asarray(leaves[i]) for i in where]
        free = tuple(tuple(np.flatnonzero(~np.asarray(k).ravel()).tolist()) for _, k in moving)
        start = [b.ravel()[np.asarray(f, int)] for b, f in zip(bases, free)]
    held_fn = _Held(fn, treedef, tuple(where), free)

    def held_grad(sub, leaves, bases, *a):
        grads = jax.tree_util.tree_flatten_with_path(
            options.grad_fn(held_fn.params(sub, leaves, bases), *a)
        )
        by_name = {jax.tree_util.keystr(path): g for path, g in grads[0]}
        return _only(
            treedef,
            marked,
            (jnp.ravel(by_name[names[i]])[np.asarray(f, int)] for i, f in zip(where, free)),
        )

    grad_fn = None if options.grad_fn is None else held_grad
    held = dataclasses.replace(options, grad_fn=grad_fn, raise_on_failure=False)
    try:
        # (the leaves and held values as arguments, held fixed: a later check of the same fn
        # at the same kinks reuses the programs compiled for this one)
        report = _unpacked_run(held_fn, _only(treedef, marked, start), (leaves, bases, *args), held)
    except Exception:  # noqa: BLE001 - the held function fails where fn did not: not judged
        report = None
    return report, clause, outside, n


# why fn's jvp could not be transposed, where JAX's own error does not say
_NONLINEAR_TANGENT = (
    "fn calls a custom_jvp whose tangent is not linear in its input tangents (an abs, a "
    "power, a sine, a product or a branch on them), which has no reverse mode. "
    "verify(..., mode='forward') checks fn in forward mode and names the rule (its jvp "
    "linearity row), as jaxcheck.verify_rule(rule, *inputs) does."
)
# how JAX begins its errors for a custom rule whose outputs have the wrong structure
_RULE_SHAPES = ("Custom VJP bwd rule", "Custom VJP fwd rule", "Custom JVP rule")


def _opaque_tangent(fn, params, args, has_aux: bool) -> str:
    """The name of an opaque call (`_problem.OPAQUE`: a Pallas kernel, a callback) that
    fn's jvp makes beyond those of fn itself: one that computes a tangent, which JAX cannot
    transpose; "" where there is none, or fn's jvp cannot be traced."""

    f = _output_of(fn, args, has_aux)
    tangents = jax.tree_util.tree_map(_tree.unit_like, params)
    try:
        with _plan.own_transfers():
            primal = jax.make_jaxpr(f)(params).jaxpr
            jvp = jax.make_jaxpr(lambda p: jax.jvp(f, (p,), (tangents,)))(params).jaxpr
    except Exception:  # noqa: BLE001 - JAX's error stands
        return ""
    more = _problem.calls(jvp, _problem.OPAQUE) - _problem.calls(primal, _problem.OPAQUE)
    return next(iter(more), "")


def _output_of(fn, args, has_aux: bool):
    """fn's output (its first element with `has_aux`) as a function of params alone."""

    def f(p):
        out = fn(p, *args)
        return out[0] if has_aux else out

    return f


def _pullback(fn, params, args, has_aux: bool) -> None:
    """Trace fn's vjp at params, pulling back unit cotangents (abstractly: nothing runs)."""
    f = _output_of(fn, args, has_aux)

    def pulled(p):
        out, back = jax.vjp(f, p)
        return back(jax.tree_util.tree_map(_tree.unit_like, out))

    jax.make_jaxpr(pulled)(params)
