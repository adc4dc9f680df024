"""`verify(..., transforms=True)`: the gradient of fn under JAX's transformations against
the plain one, without finite differences (they must agree up to rounding, so the
comparison is cheap and exact, and catches what finite differences cannot: a batching
rule that mixes the examples of a batch, a rematerialized path that differs).

Rows:
- jit: the gradient under `jax.jit` against the eager one;
- vmap: the gradient of each example of a batch, by `jax.vmap` of the gradient against
  the example-by-example loop. The batch axis: the leading axis of the largest array
  leaf of `args` with a leading axis of size >= 2 (its size is the batch size B, at most
  `MAX_EXAMPLES` examples are used); every array leaf of `args` whose leading axis has size
  B is split along it, the others are shared. An example keeps its axis (size 1), so fn
  sees a batch of one. Without such an argument the row is skipped, and the report says so;
- checkpoint: the gradient of `jax.checkpoint(fn)` against the plain one;
- forward vs reverse: <grad, v> by reverse mode against the jvp along v, for a few random
  v (skipped, with a note, when fn holds a custom_vjp function, which has no jvp).

fn with several outputs is contracted with fixed random cotangents (with ones in the vmap
row, whose outputs change shape with the batch); with `grad_fn`, the hand-written
gradient is checked under jit and vmap only.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from . import _directions, _plan, _precision, _rule_rows, _tree
from ._errors import one_line
from ._report import Report, Status

MAX_EXAMPLES = 16
NUM_TANGENTS = 4


@dataclasses.dataclass
class _Loss:
    """The scalar function of the differentiable leaves whose gradient the rows compare."""

    fn: object
    split: _tree.Split
    arrays: list
    has_aux: bool
    grad_fn: object
    cotangent: object = None  # None: ones

    def __call__(self, diff, args):
        out = self.fn(_tree.merge(self.split, diff, self.arrays), *args)
        out = out[0] if self.has_aux else out
        leaves = jax.tree_util.tree_leaves(out)
        weights = self.cotangent or [jnp.ones(jnp.shape(y), jnp.result_type(y)) for y in leaves]
        terms = [
            jnp.sum(jnp.real(y) * w.astype(jnp.result_type(y))) for y, w in zip(leaves, weights)
        ]
        acc = _precision.accumulator([t.dtype for t in terms] or [jnp.float32])
        return sum((t.astype(acc) for t in terms), jnp.zeros((), acc))

    def gradient(self, diff, args):
        if self.grad_fn is not None:
            full = _tree.merge(self.split, diff, self.arrays)
            return _tree.match_gradient(self.split, self.grad_fn(full, *args))
        return jax.grad(self)(diff, args)


def check(fn, params, args, o) -> Report:
    """The transforms part of the report (one row per transformation)."""
    split, diff, arrays = _tree.split(params, "params")
    args = tuple(args)
    dtype = _precision.lowest([x.dtype for x in diff])
    tol = _rule_rows.tolerance(dtype, o.rtol)
    rng = np.random.default_rng(int(_directions.seeds(o.key, "transforms", ("",))[0]))
    loss = _Loss(fn, split, arrays, o.has_aux, o.grad_fn)
    try:
        out = jax.eval_shape(lambda d: fn(_tree.merge(split, d, arrays), *args), diff)
        out = out[0] if o.has_aux else out
        loss.cotangent = [
            jnp.asarray(rng.integers(0, 2, y.shape) * 2.0 - 1.0, jnp.float32)
            for y in jax.tree_util.tree_leaves(out)
        ]
    except Exception:  # noqa: BLE001 - the rows report fn's error themselves
        pass
    rows, notes = [], []
    rows.append(
        _row(
            "jit",
            "gradient under jax.jit vs eager",
            tol,
            dtype,
            lambda: _jit(loss, diff, args, tol),
        )
    )
    batch, note = _batch_axis(args)
    loop = None
    if batch is not None:
        try:
            loop = _loop(loss, diff, args, batch)
        except Exception as err:  # noqa: BLE001 - fn's own error, said in the note
            notes.append(
                f"transforms: vmap not checked, fn's gradient raised on one example of "
                f"{note} (its leading axis cut to size 1): {one_line(err)}; fn must take "
                "a batch of one for this row"
            )
    if batch is None:
        notes.append(f"transforms: vmap not checked, {note}")
    elif loop is not None:
        what = f"gradient per example by jax.vmap over the leading axis of {note} vs a loop"
        rows.append(
            _row("vmap", what, tol, dtype, lambda: _vmap(loss, diff, args, batch, loop, what, tol))
        )
    if o.grad_fn is None:
        what = "gradient of jax.checkpoint(fn) vs plain"
        rows.append(
            _row("checkpoint", what, tol, dtype, lambda: _remat(loss, diff, args, what, tol))
        )
        what = "<grad, v> by reverse mode vs the jvp along v"
        row = _row(
            "forward vs reverse",
            what,
            tol,
            dtype,
            lambda: _fwd_rev(loss, diff, args, rng, what, tol),
        )
        if any("custom_vjp" in p for p in row.problems) and row.status is Status.FAIL:
            notes.append(
                "transforms: forward vs reverse not checked: fn holds a custom_vjp function, "
                "which has no jvp"
            )
        else:
            rows.append(row)
    else:
        notes.append("transforms: with grad_fn, only jit and vmap are checked")
    part = _rule_rows.compose(rows, "transforms")
    failing = [r.label for r in rows if r.status is Status.FAIL]
    label = _LABELS[failing[0]] if failing else "the gradient under transformations"
    return dataclasses.replace(part, label=label, problems=part.problems + tuple(notes))


_LABELS = {
    "jit": "the gradient under jax.jit",
    "vmap": "the gradient under jax.vmap",
    "checkpoint": "the gradient under jax.checkpoint",
    "forward vs reverse": "forward vs reverse mode",
}


def _row(label, what, tol, dtype, compute) -> Report:
    return _rule_rows.guarded(label, f"{label}: {what}", tol, dtype, compute)


def _jit(loss, diff, args, tol):
    eager = loss.gradient(diff, args)
    jitted = jax.jit(loss.gradient)(diff, args)
    return _rule_rows.exact("jit: gradient under jax.jit vs eager", jitted, eager, tol), ()


def _remat(loss, diff, args, what, tol):
    remat = dataclasses.replace(loss, fn=jax.checkpoint(loss.fn, static_argnums=()))
    plain = jax.jit(loss.gradient)(diff, args)
    return _rule_rows.exact(
        f"checkpoint: {what}", jax.jit(remat.gradient)(diff, args), plain, tol
    ), ()


def _fwd_rev(loss, diff, args, rng, what, tol):
    grad = jax.jit(loss.gradient)(diff, args)

    @jax.jit
    def along(v):
        return jax.jvp(lambda d: loss(d, args), (diff,), (v,))[1]

    by_rev, by_fwd, sizes = [], [], []
    for _ in range(NUM_TANGENTS):
        v = [_rule_rows.random_like(x, rng) for x in diff]
        reverse, size = _rule_rows.dot(grad, v)
        by_rev.append(reverse)
        by_fwd.append(float(along(v)))
        sizes.append(size)
    return _rule_rows.exact(
        f"forward vs reverse: {what}", by_fwd, by_rev, tol, _rule_rows.rms(sizes)
    ), ()


def _batch_axis(args):
    """(per leaf of args: True where it is split along its leading axis, and B), with the
    name of the argument that set B; (None, why) when no argument has a batch axis. B is
    the leading axis of the largest array of args with one of size >= 2 (the first of
    equals): the data, not running statistics that come before it (a batch norm's 16
    means before 32 examples)."""
    paths_leaves = jax.tree_util.tree_flatten_with_path(args)[0]
    candidates = [
        (path, x)
        for path, x in paths_leaves
        if _tree.is_array(x) and np.ndim(x) >= 1 and np.shape(x)[0] >= 2
    ]
    if not candidates:
        return None, "no argument of fn has a leading axis of size >= 2 to batch over"
    path, x = max(candidates, key=lambda c: np.size(c[1]))  # (the first of the largest)
    b = int(np.shape(x)[0])
    split = [_tree.is_array(y) and np.ndim(y) >= 1 and np.shape(y)[0] == b for _, y in paths_leaves]
    return (split, b), f"args{jax.tree_util.keystr(path)} (B = {b})"


def _loop(loss, diff, args, batch) -> list:
    """The gradient of each example of the batch (at most MAX_EXAMPLES), one at a time."""
    split, b = batch
    leaves, treedef = jax.tree_util.tree_flatten(args)
    loss = dataclasses.replace(loss, cotangent=None)  # outputs change shape with the batch

    def example(i):
        picked = [x[i : i + 1] if s else x for x, s in zip(leaves, split)]
        return jax.tree_util.tree_unflatten(treedef, picked)

    grad = jax.jit(loss.gradient)
    return [grad(diff, example(i)) for i in range(min(b, MAX_EXAMPLES))]


def _vmap(loss, diff, args, batch, loop, what, tol):
    split, b = batch
    b = min(b, MAX_EXAMPLES)
    leaves, treedef = jax.tree_util.tree_flatten(args)
    loss = dataclasses.replace(loss, cotangent=None)  # outputs change shape with the batch
    stacked = [
        jnp.stack([jnp.asarray(x)[i : i + 1] for i in range(b)]) if s else x
        for x, s in zip(leaves, split)
    ]
    axes = jax.tree_util.tree_unflatten(treedef, [0 if s else None for s in split])
    batched = jax.jit(jax.vmap(loss.gradient, in_axes=(None, axes)))(
        diff, jax.tree_util.tree_unflatten(treedef, stacked)
    )
    plain = [np.stack([_plan.host_array(g[j]) for g in loop]) for j in range(len(diff))]
    return _rule_rows.exact(f"vmap: {what}", batched, plain, tol), ()
