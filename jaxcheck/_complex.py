"""Complex parameters and outputs, checked through their real view.

Every complex leaf of `params` becomes a real leaf with a trailing axis of 2 (re, im) under
the same key path, and every complex output leaf its (re, im) view. The real function

    fn_r(params_r, *args) = realview(fn(complexify(params_r), *args))

is checked like any other. JAX differentiates it through `lax.complex`, `real` and `imag`,
whose rules are exact, so the derivative of fn_r that JAX computes is right exactly when
JAX's complex derivative of fn is consistent (its conjugations included): a custom rule
that drops a conjugate, or applies a real-only formula to complex inputs, makes it wrong.
Holomorphic or not makes no difference: the real view has both partial derivatives, so no
`holomorphic=` flag is needed. Cast to float64, the real leaves make complex128, so the
finite differences run in complex128.

A hand-written `grad_fn` of a real fn follows JAX's convention for complex leaves,
`d fn/d re - i d fn/d im` (what `jax.grad` returns), so its real view is (re g, -im g).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _fingerprint, _plan, _problem, _tree


def is_complex(leaf) -> bool:
    if isinstance(leaf, complex):
        return True
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.complexfloating)


def complex_paths(params) -> frozenset:
    """Key paths of the complex leaves of `params`."""
    return frozenset(
        jax.tree_util.keystr(p)
        for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if is_complex(leaf)
    )


def _real_dtype(dtype):
    return jnp.finfo(dtype).dtype


def to_real(params, paths: frozenset):
    """`params` with each complex leaf at `paths` replaced by its (re, im) real view."""

    def one(path, leaf):
        if jax.tree_util.keystr(path) not in paths:
            return leaf
        z = _tree.as_array(leaf)
        dtype = _real_dtype(z.dtype)
        if _plan.multi_device(z) is not None:  # kept on its devices
            return jnp.stack([jnp.real(z), jnp.imag(z)], axis=-1).astype(dtype)
        # on the host, exactly: eagerly on the device, three small programs compile for
        # each new shape
        h = _plan.host_array(z)
        view = np.stack([h.real, h.imag], axis=-1).astype(dtype)
        return jax.device_put(view, z.sharding if z.committed else None)

    return jax.tree_util.tree_map_with_path(one, params)


def to_complex(params_r, paths: frozenset):
    """Inverse of `to_real`: (re, im) leaves at `paths` back to complex."""

    def one(path, leaf):
        if jax.tree_util.keystr(path) not in paths:
            return leaf
        return jax.lax.complex(leaf[..., 0], leaf[..., 1])

    return jax.tree_util.tree_map_with_path(one, params_r)


def _view_outputs(out):
    def one(y):
        y = jnp.asarray(y)
        if not jnp.issubdtype(y.dtype, jnp.complexfloating):
            return y
        return jnp.stack([jnp.real(y), jnp.imag(y)], axis=-1)

    return jax.tree_util.tree_map(one, out)


@dataclasses.dataclass(frozen=True)
class RealView:
    """fn_r: `fn` on the real view of its complex parameters, with real outputs. Compared by
    value, so that checking the same `fn` again reuses its compiled programs."""

    fn: Callable
    paths: frozenset
    has_aux: bool

    @property
    def positional(self) -> bool:
        """Whether fn is check_grads' f, called with its arguments as given (`_problem`)."""
        fn = self.fn.f if isinstance(self.fn, _fingerprint.Keyed) else self.fn
        return getattr(fn, "positional", False)

    def __call__(self, params_r, *args):
        params = to_complex(params_r, self.paths)
        try:
            out = self.fn(params, *args)
        except Exception as err:
            # (fn's own error, with what fn was given: its complex params, not their view)
            _problem.note_inputs(err, "fn", self.fn, params, args)
            raise
        if self.has_aux:
            out, aux = out
            return _view_outputs(out), aux
        return _view_outputs(out)


@dataclasses.dataclass(frozen=True)
class RealGrad:
    """The real view of a hand-written gradient that follows JAX's complex convention."""

    grad_fn: Callable
    paths: frozenset

    def __call__(self, params_r, *args):
        g = self.grad_fn(to_complex(params_r, self.paths), *args)

        def one(path, leaf):
            if jax.tree_util.keystr(path) not in self.paths:
                return leaf
            leaf = jnp.asarray(leaf)
            real = _real_dtype(leaf.dtype) if is_complex(leaf) else leaf.dtype
            return jnp.stack([jnp.real(leaf), -jnp.imag(leaf)], axis=-1).astype(real)

        return jax.tree_util.tree_map_with_path(one, g)


def real_cotangents(problem, diff, traced) -> list:
    """For a check through the real view whose reverse pass failed to trace: the
    differentiable leaves that are complex and get a real cotangent from fn's own vjp
    (traced abstractly, with those leaves complex), as (index, the cotangent's dtype).
    Empty where there is none, or where fn's vjp cannot be traced so either."""
    view = problem.fn
    if not isinstance(view, RealView):
        return []
    paths = problem.params.paths_of(_tree.DIFF)
    is_view = [p in view.paths for p in paths]
    specs = [
        jax.ShapeDtypeStruct(d.shape[:-1], _COMPLEX[jnp.dtype(d.dtype).name]) if c else d
        for d, c in zip(diff, is_view)
    ]

    def complex_leaf(path, leaf):  # a complex leaf held fixed is still its real view here
        if jax.tree_util.keystr(path) in view.paths and not is_complex(leaf):
            return jax.lax.complex(leaf[..., 0], leaf[..., 1])
        return leaf

    def f(dc):
        params, args = problem.call(dc, *traced)
        out = view.fn(jax.tree_util.tree_map_with_path(complex_leaf, params), *args)
        return [jnp.asarray(y) for y in jax.tree_util.tree_leaves(out[0] if view.has_aux else out)]

    def cotangents(dc):
        outs, pull = jax.vjp(f, dc)
        return pull([jnp.ones_like(y) for y in outs])[0]

    try:
        got = jax.eval_shape(cotangents, specs)
    except Exception:  # noqa: BLE001 - no diagnosis: the caller's error stands
        return []
    return [
        (i, jnp.dtype(g.dtype).name)
        for i, (g, c) in enumerate(zip(got, is_view))
        if c and not is_complex(g)
    ]


def has_complex_outputs(fn, params, args, has_aux: bool) -> bool:
    """Whether fn returns a complex leaf at (params, *args) (traced abstractly, every array
    leaf as its shape and dtype, complex parameters too; False when it cannot be traced,
    then the caller's error stands)."""
    leaves, treedef = jax.tree_util.tree_flatten((params, args))
    at = [i for i, x in enumerate(leaves) if _tree.is_array(x)]

    def call(*arrays):
        p, a = jax.tree_util.tree_unflatten(treedef, _tree.filled(leaves, at, arrays))
        out = fn(p, *a)
        return out[0] if has_aux and isinstance(out, tuple | list) else out

    try:
        out = jax.eval_shape(call, *(leaves[i] for i in at))
    except Exception:  # noqa: BLE001 - untraceable fn: nothing to learn here
        return False
    return any(is_complex(y) for y in jax.tree_util.tree_leaves(out))


_COMPLEX = {"float32": "complex64", "float64": "complex128"}


def restore_leaves(report, params, paths: frozenset):
    """The report with its leaf rows showing the complex leaves' own shape and dtype."""
    if not paths:
        return report
    original = {
        jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }

    def fix(leaf_result):
        if leaf_result.path not in paths:
            return leaf_result
        # the complex dtype that was checked (a NumPy complex128 leaf with 64-bit types
        # off is checked as complex64, as jax would compute it)
        checked = _COMPLEX.get(leaf_result.dtype, leaf_result.dtype)
        shape = tuple(np.shape(original[leaf_result.path]))
        return dataclasses.replace(leaf_result, shape=shape, dtype=checked)

    return dataclasses.replace(
        report,
        leaves=tuple(fix(x) for x in report.leaves),
        parts=tuple(restore_leaves(p, params, paths) for p in report.parts),
    )


def real_problem(fn: Callable, params: Any, grad_fn, has_aux: bool, paths: frozenset):
    """(fn_r, params_r, grad_fn_r) for complex leaves at `paths` (all of params' complex
    leaves; empty when only the outputs are complex)."""
    fn_r = RealView(fn, paths, has_aux)
    grad_r = None if grad_fn is None else RealGrad(grad_fn, paths)
    return fn_r, to_real(params, paths), grad_r
