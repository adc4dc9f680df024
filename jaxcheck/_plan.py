"""Execution planning: how directions are batched, and compiling a program once per call.

Directions are evaluated with `jax.vmap` inside a chunk; when a chunk size smaller than
the number of directions is given, chunks run one after another with `lax.map`, so memory
grows with the chunk size rather than with the number of directions.
"""

import dataclasses
import inspect
import time

import jax


def map_directions(fn, xs, chunk_size: int | None):
    """Apply `fn` to every row of the arrays `xs`: vmapped, or in sequential vmapped chunks."""
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    if chunk_size is None or chunk_size >= n:
        return jax.vmap(fn)(*xs)
    if _MAP_HAS_BATCH_SIZE:
        return jax.lax.map(lambda row: fn(*row), xs, batch_size=chunk_size)
    return jax.lax.map(lambda row: fn(*row), xs)  # jax < 0.4.31: one direction at a time


_MAP_HAS_BATCH_SIZE = "batch_size" in inspect.signature(jax.lax.map).parameters


@dataclasses.dataclass
class Timer:
    """Compile and run seconds of the programs a check executed."""

    compile_s: float = 0.0
    run_s: float = 0.0

    def run(self, fn, *args):
        """Compile `fn` ahead of time for `args`, then run it; times both separately."""
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        t1 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        t2 = time.perf_counter()
        self.compile_s += t1 - t0
        self.run_s += t2 - t1
        return out
