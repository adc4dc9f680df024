"""Execution planning: how directions are batched, and compiling a program once per call.

Directions are evaluated with `jax.vmap` inside a chunk; when a chunk size smaller than
the number of directions is given, chunks run one after another with `lax.map`, so memory
grows with the chunk size rather than with the number of directions. By default the chunk
holds as many directions as fit their perturbed parameter copies in `MEMORY_BUDGET`.

Compiled programs are kept (least recently used first out) under the program, its static
configuration (the function under check, the pytree structure, the options) and the shapes
and dtypes of its inputs, so repeated checks of the same function compile nothing. Like
`jax.jit`, values the function closes over are fixed at its first check.

A function that `jax.jit` cannot trace (it converts traced values to NumPy, or branches in
Python on them) is evaluated eagerly instead: the same programs run without `jit`, one
direction and one stencil point at a time.
"""

import collections
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import _precision

_EAGER = contextvars.ContextVar("jaxcheck_eager", default=False)
_MAP_HAS_BATCH_SIZE = "batch_size" in inspect.signature(jax.lax.map).parameters

# What tracing raises when a function needs concrete values.
TRACING_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
)


MEMORY_BUDGET = 1 << 30  # bytes of perturbed parameter copies in flight at once


def default_chunk(num_params: int, num_directions: int, copies: int, itemsize: int = 8):
    """Directions per vmapped chunk so that their `copies` perturbed float64 copies of the
    parameters each fit in MEMORY_BUDGET; None when all directions fit at once."""
    chunk = max(1, MEMORY_BUDGET // max(1, copies * num_params * itemsize))
    return None if chunk >= num_directions else int(chunk)


def map_directions(fn, xs, chunk_size: int | None):
    """Apply `fn` to every row of the arrays `xs`: vmapped, in sequential vmapped chunks, or
    (eagerly) in a Python loop."""
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    if _EAGER.get():
        rows = [fn(*(x[i] for x in xs)) for i in range(n)]
        return jax.tree_util.tree_map(lambda *r: jnp.stack([jnp.asarray(v) for v in r]), *rows)
    if chunk_size is None or chunk_size >= n:
        return jax.vmap(fn)(*xs)
    if _MAP_HAS_BATCH_SIZE:
        return jax.lax.map(lambda row: fn(*row), xs, batch_size=chunk_size)
    return jax.lax.map(lambda row: fn(*row), xs)  # jax < 0.4.31: one direction at a time


@contextlib.contextmanager
def eager():
    token = _EAGER.set(True)
    try:
        yield
    finally:
        _EAGER.reset(token)


_CACHE: collections.OrderedDict = collections.OrderedDict()
CACHE_SIZE = 64
compilations = 0  # programs compiled so far in this process


def _cache_key(fn, args):
    """The cache key of a partial(program, *static) applied to `args` (it may turn out
    unhashable)."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    avals = tuple((np.shape(x), str(x.dtype), bool(getattr(x, "weak_type", False))) for x in leaves)
    x64 = _precision.x64_enabled()
    return (fn.func, fn.args, tuple(sorted(fn.keywords.items())), treedef, avals, x64)


def _compile(fn, args):
    global compilations
    key = _cache_key(fn, args) if isinstance(fn, functools.partial) else None
    try:
        cached = None if key is None else _CACHE.get(key)
    except Exception:  # noqa: BLE001 - unhashable or incomparable static leaves: no reuse
        key, cached = None, None
    if cached is not None:
        _CACHE.move_to_end(key)
        return cached
    compiled = jax.jit(fn).lower(*args).compile()
    compilations += 1
    if key is not None:
        _CACHE[key] = compiled
        if len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return compiled


@dataclasses.dataclass
class Timer:
    """Runs the programs of a check, jitted (or eagerly when fn cannot be traced), and
    keeps their compile and run seconds."""

    compile_s: float = 0.0
    run_s: float = 0.0
    eager_reason: str | None = None

    def run(self, fn, *args):
        """Compile `fn` ahead of time for `args`, then run it; times both separately."""
        if self.eager_reason is None:
            t0 = time.perf_counter()
            try:
                compiled = _compile(fn, args)
            except TRACING_ERRORS as err:
                self.eager_reason = type(err).__name__
            else:
                t1 = time.perf_counter()
                out = jax.block_until_ready(compiled(*args))
                self.compile_s += t1 - t0
                self.run_s += time.perf_counter() - t1
                return out
        t1 = time.perf_counter()
        with eager():
            out = jax.block_until_ready(fn(*args))
        self.run_s += time.perf_counter() - t1
        return out
