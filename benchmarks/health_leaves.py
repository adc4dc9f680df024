"""Trace and compile time of a jitted sgd step with and without `gradient_health`, for a
model of many small leaves (`--leaves`, 16 entries each).

    python benchmarks/health_leaves.py --leaves 300     # about 5 s on 2 CPU cores
"""

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import jaxcheck


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--leaves", type=int, default=300)
    n = parser.parse_args().leaves
    params = {f"layer{i:04d}": jnp.full((16,), 0.1) for i in range(n)}
    x = jnp.linspace(-1.0, 1.0, 16)

    def loss(p, x):
        return sum(jnp.sum(jnp.tanh(p[k] * x + 0.1) ** 2) for k in sorted(p))

    chains = {
        "sgd": optax.sgd(1e-3),
        "gradient_health + sgd": optax.chain(jaxcheck.gradient_health(), optax.sgd(1e-3)),
    }
    for name, opt in chains.items():

        def step(p, s, x, opt=opt):
            updates, s = opt.update(jax.grad(loss)(p, x), s, p)
            return optax.apply_updates(p, updates), s

        start = time.perf_counter()
        lowered = jax.jit(step).lower(params, opt.init(params), x)
        traced = time.perf_counter() - start
        start = time.perf_counter()
        lowered.compile()
        compiled = time.perf_counter() - start
        print(f"{n} leaves, {name}: trace and lower {traced:.2f} s, XLA compile {compiled:.2f} s")


if __name__ == "__main__":
    main()
