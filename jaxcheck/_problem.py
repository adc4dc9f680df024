"""The function under check, seen as a map from differentiable leaves to output leaves."""

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _plan, _tree


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The traced inputs: floating parameter leaves, other parameter arrays, and the
    floating and other array leaves of `*args`."""

    diff: list
    p_arrays: list
    a_floats: list
    a_arrays: list

    def cast(self, dtype) -> "Inputs":
        return Inputs(
            _tree.cast(self.diff, dtype),
            self.p_arrays,
            _tree.cast(self.a_floats, dtype),
            self.a_arrays,
        )

    def traced(self):
        return (self.p_arrays, self.a_floats, self.a_arrays)


@dataclasses.dataclass(frozen=True)
class Problem:
    fn: Callable
    grad_fn: Callable | None
    has_aux: bool
    params: _tree.Split
    args: _tree.Split
    out_treedef: Any = None
    out_paths: tuple[str, ...] = ()
    out_shapes: tuple[tuple[int, ...], ...] = ()

    @property
    def scalar_output(self) -> bool:
        return len(self.out_shapes) == 1 and self.out_shapes[0] == ()

    def call(self, diff, p_arrays, a_floats, a_arrays):
        params = _tree.merge(self.params, diff, p_arrays)
        args = _tree.merge(self.args, a_floats, a_arrays)
        return params, args

    def outputs(self, diff, traced) -> list:
        params, args = self.call(diff, *traced)
        out = self.fn(params, *args)
        if self.has_aux:
            out = out[0]
        return [jnp.asarray(y) for y in jax.tree_util.tree_leaves(out)]

    def gradient(self, diff, traced) -> list:
        """The hand-written gradient's leaves for the differentiable parameters."""
        params, args = self.call(diff, *traced)
        grads = _tree.match_gradient(self.params, self.grad_fn(params, *args))
        return [jnp.asarray(g) for g in grads]

    def scalarize(self, outs: list, cot: list | None):
        if cot is None:
            return outs[0]
        return sum(jnp.vdot(c, y) for c, y in zip(cot, outs))


_STRUCTURES: collections.OrderedDict = collections.OrderedDict()


def with_output_structure(problem: Problem, inputs: Inputs) -> Problem:
    """Trace `fn` abstractly once to learn and validate its output structure (remembered
    for the same function and input shapes: tracing a model costs milliseconds)."""
    try:
        key = (problem, _plan.signature((inputs.diff, inputs.traced())))
        known = _STRUCTURES.get(key)
    except Exception:  # noqa: BLE001 - unhashable static leaves: trace every time
        key, known = None, None
    if known is not None:
        _STRUCTURES.move_to_end(key)
        return known
    problem = _with_output_structure(problem, inputs)
    if key is not None:
        _STRUCTURES[key] = problem
        if len(_STRUCTURES) > _plan.CACHE_SIZE:
            _STRUCTURES.popitem(last=False)
    return problem


def _with_output_structure(problem: Problem, inputs: Inputs) -> Problem:

    def call(diff, traced):
        params, args = problem.call(diff, *traced)
        out = problem.fn(params, *args)
        if not problem.has_aux:
            return out
        if not (isinstance(out, tuple) and len(out) == 2):
            what = f"an array of shape {out.shape}" if hasattr(out, "shape") else type(out).__name__
            raise TypeError(
                f"has_aux=True, so fn must return a pair (output, aux); it returned {what}. "
                "Return (loss, aux) or drop has_aux=True."
            )
        return out[0]  # aux may hold anything, even values jax cannot trace

    out = _shapes(call, inputs.diff, inputs.traced())
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(out)
    if not with_paths:
        raise TypeError(
            "fn returned no array output (an empty pytree or None). It must return a scalar "
            "or a pytree of float arrays."
        )
    for key_path, leaf in with_paths:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"fn's output leaf {jax.tree_util.keystr(key_path) or '(root)'} has dtype {dtype}; "
                "only real floating outputs can be differentiated. Cast it to a float dtype "
                "or move it into the auxiliary output with has_aux=True."
            )
    problem = dataclasses.replace(
        problem,
        out_treedef=treedef,
        out_paths=tuple(jax.tree_util.keystr(p) for p, _ in with_paths),
        out_shapes=tuple(tuple(leaf.shape) for _, leaf in with_paths),
    )
    if problem.grad_fn is not None:
        _check_gradient_shapes(problem, inputs)
    return problem


def _shapes(f, *args):
    """Output shapes and dtypes of f(*args): traced abstractly, or by calling f when it
    cannot be traced (it then runs eagerly in the check, too)."""
    try:
        return jax.eval_shape(f, *args)
    except _plan.TRACING_ERRORS:
        with _plan.eager():
            out = f(*args)
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(
                np.shape(x), x.dtype if hasattr(x, "dtype") else np.result_type(x)
            ),
            out,
        )


def _check_gradient_shapes(problem: Problem, inputs: Inputs) -> None:
    if not problem.scalar_output:
        raise ValueError(
            "grad_fn was given, but fn does not return a scalar (its output has shapes "
            f"{list(problem.out_shapes)}). A hand-written gradient is only defined for a "
            "scalar fn; reduce the output to a scalar first."
        )
    grads = _shapes(problem.gradient, inputs.diff, inputs.traced())
    paths = problem.params.paths_of(_tree.DIFF)
    for path, g, x in zip(paths, grads, inputs.diff):
        shape = getattr(g, "shape", None)
        if shape != x.shape:
            raise ValueError(
                f"grad_fn returned shape {shape} for the parameter leaf {path or '(root)'}, "
                f"whose shape is {x.shape}. Return one gradient array per parameter with the "
                "parameter's shape (sum over broadcast axes)."
            )
        if not jnp.issubdtype(g.dtype, jnp.floating):
            raise TypeError(
                f"grad_fn returned dtype {g.dtype} for the parameter leaf {path or '(root)'}; "
                "gradients must be floating point."
            )
