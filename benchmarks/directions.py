"""Cost of drawing directions, next to the forward passes they feed.

    python benchmarks/directions.py [--params N] [--directions K]

For a float64 tanh MLP with about N parameters, times one jitted program that evaluates the
loss at x + h v and x - h v for K directions v, one direction after another (as jaxcheck
does on CPU), with v drawn inside the program by each generator below; and, for scale,
`jax.random.normal` drawing the K x N array alone, and 2K plain forward passes. Prints each
time and its ratio to the 2K forwards.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcheck import _directions

jax.config.update("jax_enable_x64", True)  # a benchmark script: float64 throughout


def mlp(width: int, key):
    sizes = (64, width, width, width, 10)
    params = []
    for m, n in zip(sizes[:-1], sizes[1:]):
        key, sub = jax.random.split(key)
        params.append({"w": jax.random.normal(sub, (m, n)) / np.sqrt(m), "b": jnp.zeros(n)})
    return params


def loss(params, x):
    for i, layer in enumerate(params):
        x = x @ layer["w"] + layer["b"]
        x = jnp.tanh(x) if i < len(params) - 1 else x
    return jnp.mean(x**2)


def median_seconds(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def perturbed_forwards(kind: str):
    """2 evaluations per direction, the direction hashed into the perturbation."""

    def run(params, x, index, h):
        leaves, treedef = jax.tree_util.tree_flatten(params)
        seeds = np.arange(len(leaves), dtype=np.uint32)
        beta = jnp.ones(len(leaves))

        def one(k):
            v = _directions.direction(seeds, k, leaves, beta, kind)

            def phi(t):
                moved = [p + t * d for p, d in zip(leaves, v)]
                return loss(jax.tree_util.tree_unflatten(treedef, moved), x)

            return jnp.stack([phi(h), phi(-h)])

        return jax.lax.map(one, index)

    return jax.jit(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=1e6)
    parser.add_argument("--directions", type=int, default=16)
    args = parser.parse_args()
    width = int((-(64 + 10 + 3) + np.sqrt((64 + 10 + 3) ** 2 + 8 * args.params)) / 4)
    params = mlp(width, jax.random.key(0))
    n = sum(p.size for p in jax.tree_util.tree_leaves(params))
    x = jnp.ones((64, 64))
    k = args.directions
    index, h = jnp.arange(k), jnp.asarray(1e-6)
    forward = jax.jit(loss)
    floor = 2 * k * median_seconds(forward, params, x)
    rows = [("2K plain forwards", floor)]
    for kind in _directions.KINDS:
        rows.append(
            (
                f"2K forwards, {kind} hashed in",
                median_seconds(perturbed_forwards(kind), params, x, index, h),
            )
        )
    normal = jax.jit(lambda key: jax.random.normal(key, (k, n)))
    rows.append((f"jax.random.normal ({k} x {n}) alone", median_seconds(normal, jax.random.key(1))))
    print(f"float64 MLP, {n:,} parameters, K = {k}, {jax.devices()[0].device_kind}")
    for name, seconds in rows:
        print(f"  {name:<42} {seconds * 1e3:9.1f} ms   {seconds / floor:5.2f}x")


if __name__ == "__main__":
    main()
