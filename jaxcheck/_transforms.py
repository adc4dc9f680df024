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
from ._error_model import SAFETY
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
    args: "_Args"
    cotangent: object = None  # None: ones

    def __call__(self, diff, args):
        args = self.args.rebuild(args)
        out = self.fn(_tree.merge(self.split, diff, self.arrays), *args)
        out = out[0] if self.has_aux else out
        leaves = jax.tree_util.tree_leaves(out)
        weights = self.cotangent or [jnp.ones(jnp.shape(y), jnp.result_type(y)) for y in leaves]
        terms = [_contracted(y, w) for y, w in zip(leaves, weights)]
        acc = _precision.accumulator([t.dtype for t in terms] or [jnp.float32])
        return sum((t.astype(acc) for t in terms), jnp.zeros((), acc))

    def gradient(self, diff, args):
        if self.grad_fn is not None:
            full = _tree.merge(self.split, diff, self.arrays)
            grad = self.grad_fn(full, *self.args.rebuild(args))
            return _tree.match_gradient(self.split, grad)
        return jax.grad(self)(diff, args)


def _contracted(y, w):
    """sum(w y), real: for a complex output, its real and imaginary parts each weighted by
    w (its real parts alone left a wrong imaginary part's derivative unseen)."""
    if jnp.iscomplexobj(y):
        real, imag = jnp.real(y), jnp.imag(y)
        return jnp.sum(real * w.astype(real.dtype)) + jnp.sum(imag * w.astype(imag.dtype))
    return jnp.sum(y * w.astype(jnp.result_type(y)))


@dataclasses.dataclass(frozen=True)
class _Args:
    """The leaves of fn's args that the rows pass through the transformations (arrays),
    and the others (Python numbers, strings, functions: a mode flag, an activation), held
    as they are, as `verify` holds them: jax.jit cannot take a string, and a Python bool
    that fn branches on must stay one."""

    treedef: object
    traced: tuple  # per leaf: whether it is an array
    held: tuple  # the leaves that are not
    paths: tuple  # the key paths of the arrays, as args[...]

    @classmethod
    def of(cls, args) -> tuple["_Args", list]:
        flat, treedef = jax.tree_util.tree_flatten_with_path(args)
        traced = tuple(_tree.is_array(x) for _, x in flat)
        held = tuple(x for (_, x), t in zip(flat, traced) if not t)
        paths = tuple(jax.tree_util.keystr(p) for (p, _), t in zip(flat, traced) if t)
        return cls(treedef, traced, held, paths), [x for (_, x), t in zip(flat, traced) if t]

    def rebuild(self, arrays):
        arrays, held = iter(arrays), iter(self.held)
        leaves = [next(arrays) if t else next(held) for t in self.traced]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def check(fn, params, args, o, rounding: float = 0.0) -> tuple[Report | None, list]:
    """The transforms part of the report (one row per transformation; None where no
    transformation could trace fn), and notes on the rows not checked. `rounding`: the
    derivative's own rounding (relative) that the check of fn measured; the rows, which
    compute it in other orders, allow for it."""
    # (complex leaves as they are: the rows compare gradients, of JAX's convention for a
    # real loss, with each other, and pair them with tangents as jax.jvp does)
    split, diff, arrays = _tree.split(params, "params", complex_diff=True)
    spec, traced = _Args.of(tuple(args))
    dtype = _precision.lowest([x.dtype for x in diff])
    # (a loss that cancels, a batch norm over a column of one value: the float32 gradient
    # is 5e-3 off the same rule in float64, and forward mode 4e-4 off reverse mode)
    tol = max(_rule_rows.tolerance(dtype, o.rtol), SAFETY * rounding)
    rng = np.random.default_rng(int(_directions.seeds(o.key, "transforms", ("",))[0]))
    loss = _Loss(fn, split, arrays, o.has_aux, o.grad_fn, spec)
    try:
        out = jax.eval_shape(lambda d: fn(_tree.merge(split, d, arrays), *args), diff)
        out = out[0] if o.has_aux else out
        loss.cotangent = [
            jnp.asarray(rng.integers(0, 2, y.shape) * 2.0 - 1.0, jnp.float32)
            for y in jax.tree_util.tree_leaves(out)
        ]
    except Exception:  # noqa: BLE001 - the rows report fn's error themselves
        pass
    rows, notes, refused = [], [], {}  # refused: {label: what JAX raised tracing fn}

    def add(label, what, compute):
        row = _row(label, what, tol, dtype, compute, refused)
        if row is not None:
            rows.append(row)
        return row

    add("jit", "gradient under jax.jit vs eager", lambda: _jit(loss, diff, traced, tol))
    batch, note = _batch_axis(traced, spec.paths)
    loop = None
    if batch is not None:
        try:
            examples, loop = _loop(loss, diff, traced, batch)
        except _UNTRACEABLE as err:
            refused["vmap"] = err
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
        add("vmap", what, lambda: _vmap(loss, diff, batch[0], examples, loop, what, tol))
    if o.grad_fn is None:
        what = "gradient of jax.checkpoint(fn) vs plain"
        add("checkpoint", what, lambda: _remat(loss, diff, traced, what, tol))
        what = "<grad, v> by reverse mode vs the jvp along v"
        row = add("forward vs reverse", what, lambda: _fwd_rev(loss, diff, traced, rng, what, tol))
        if (
            row is not None
            and any("custom_vjp" in p for p in row.problems)
            and row.status is Status.FAIL
        ):
            rows.remove(row)
            notes.append(
                "transforms: forward vs reverse not checked: fn holds a custom_vjp function, "
                "which has no jvp"
            )
    else:
        notes.append("transforms: with grad_fn, only jit and vmap are checked")
    if refused:
        traced = "fn or grad_fn" if o.grad_fn is not None else "fn"
        they = "they trace" if len(refused) > 1 else "it traces"
        err = one_line(next(iter(refused.values())))
        notes.insert(
            0,
            f"transforms: {', '.join(refused)} not checked: {they} {traced}, which needs "
            f"concrete values ({err}); to have them checked, compute with jax.numpy and "
            "jax.lax (jnp.where for a mask, lax.cond for a branch), and pass flags as Python "
            "values in args",
        )
    if not rows:  # no transformation could trace fn: the notes say why
        return None, notes
    part = _rule_rows.compose(rows, "transforms")
    failing = [r.label for r in rows if r.status is Status.FAIL]
    label = _LABELS[failing[0]] if failing else "the gradient under transformations"
    return dataclasses.replace(part, label=label), notes


_LABELS = {
    "jit": "the gradient under jax.jit",
    "vmap": "the gradient under jax.vmap",
    "checkpoint": "the gradient under jax.checkpoint",
    "forward vs reverse": "forward vs reverse mode",
}


# what JAX raises where a transformation traces a function that needs concrete values (a
# Python `if` on an array, a boolean mask, a NumPy call): no gradient to compare
_UNTRACEABLE = (
    jax.errors.ConcretizationTypeError,
    jax.errors.NonConcreteBooleanIndexError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerIntegerConversionError,
)


def _row(label, what, tol, dtype, compute, refused: dict) -> Report | None:
    """The row, or None (the error in `refused`) where its transformation cannot trace fn."""

    def attempt():
        try:
            return compute()
        except _UNTRACEABLE as err:
            refused[label] = err
            raise

    row = _rule_rows.guarded(label, f"{label}: {what}", tol, dtype, attempt)
    return None if label in refused else row


def _jit(loss, diff, args, tol):
    eager = loss.gradient(diff, args)
    jitted = jax.jit(loss.gradient)(diff, args)
    return _rule_rows.exact("jit: gradient under jax.jit vs eager", jitted, eager, tol), ()


def _remat(loss, diff, args, what, tol):
    # the loss of the arrays alone is checkpointed: the leaves held fixed (a string, an
    # activation function in an equinox Module) are no arguments of jax.checkpoint
    remat = jax.grad(jax.checkpoint(lambda d, a: loss(d, a)))  # (a _Loss is unhashable)
    plain = jax.jit(loss.gradient)(diff, args)
    return _rule_rows.exact(f"checkpoint: {what}", jax.jit(remat)(diff, args), plain, tol), ()


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


def _batch_axis(arrays, paths):
    """(per array of args: True where it is split along its leading axis, and B), with the
    name of the argument that set B; (None, why) when no argument has a batch axis. B is
    the leading axis of the largest array of args with one of size >= 2 (the first of
    equals): the data, not running statistics that come before it (a batch norm's 16
    means before 32 examples)."""
    candidates = [
        (path, x) for path, x in zip(paths, arrays) if np.ndim(x) >= 1 and np.shape(x)[0] >= 2
    ]
    if not candidates:
        return None, "no argument of fn has a leading axis of size >= 2 to batch over"
    path, x = max(candidates, key=lambda c: np.size(c[1]))  # (the first of the largest)
    b = int(np.shape(x)[0])
    split = [np.ndim(y) >= 1 and np.shape(y)[0] == b for y in arrays]
    return (split, b), f"args{path} (B = {b})"


def _loop(loss, diff, arrays, batch) -> tuple[list, list]:
    """(the first examples of the batch, at most MAX_EXAMPLES, each its arrays cut to a
    batch of one; the gradient of each, one at a time)."""
    split, b = batch
    loss = dataclasses.replace(loss, cotangent=None)  # outputs change shape with the batch
    whole = [_replicated(x) if s else x for x, s in zip(arrays, split)]
    examples = [
        [x[i : i + 1] if s else x for x, s in zip(whole, split)]
        for i in range(min(b, MAX_EXAMPLES))
    ]
    grad = jax.jit(loss.gradient)
    return examples, [grad(diff, example) for example in examples]


def _vmap(loss, diff, split, examples, loop, what, tol):
    """The row comparing the gradients of `examples` (`_loop`'s), stacked and batched by
    jax.vmap, with the loop's."""
    loss = dataclasses.replace(loss, cotangent=None)  # outputs change shape with the batch
    stacked = [
        jnp.stack([jnp.asarray(example[j]) for example in examples]) if s else x
        for j, (x, s) in enumerate(zip(examples[0], split))
    ]
    axes = [0 if s else None for s in split]
    batched = jax.jit(jax.vmap(loss.gradient, in_axes=(None, axes)))(diff, stacked)
    plain = [np.stack([_plan.host_array(g[j]) for g in loop]) for j in range(len(diff))]
    return _rule_rows.exact(f"vmap: {what}", batched, plain, tol), ()


def _replicated(x):
    """`x` whole on every device of its mesh where it is sharded over Explicit mesh axes
    (there JAX slices out one example only given the output's sharding); `x` elsewhere."""
    if not _plan.explicitly_sharded(x):
        return x
    return jax.sharding.reshard(x, jax.sharding.PartitionSpec())
