"""A float32 model that casts to float32 (its params, as a mixed-precision policy does, its
activations and its logits), through a correct custom_vjp tanh: the tolerance its check
reaches, and the time of a cold `verify` and of a warm `Checker` call. Run it on two
versions of jaxcheck, one after the other, to compare them.

    python benchmarks/casting_model.py     # a few seconds on 2 CPU cores
"""

import time

import jax
import jax.numpy as jnp

import jaxcheck


@jax.custom_vjp
def act(x):
    return jnp.tanh(x)


act.defvjp(lambda x: (jnp.tanh(x), x), lambda x, g: (g * (1 - jnp.tanh(x) ** 2),))


def main():
    keys = jax.random.split(jax.random.key(0), 4)
    params = {
        "w1": jax.random.normal(keys[0], (64, 128)) * 0.1,
        "w2": jax.random.normal(keys[1], (128, 128)) * 0.1,
        "w3": jax.random.normal(keys[2], (128, 10)) * 0.1,
    }
    x = jax.random.normal(keys[3], (256, 64))

    def loss(p):
        p = jax.tree.map(lambda a: a.astype(jnp.float32), p)
        h = act(x @ p["w1"]).astype(jnp.float32)
        h = act(h @ p["w2"])
        return jnp.mean(jax.nn.logsumexp((h @ p["w3"]).astype(jnp.float32), -1))

    start = time.perf_counter()
    report = jaxcheck.verify(loss, params)
    cold = time.perf_counter() - start
    checker = jaxcheck.Checker(loss)
    checker(params)
    start = time.perf_counter()
    checker(params)
    warm = time.perf_counter() - start
    print(
        f"{report.status.value}: relative error {report.relative_error:.1e}, tolerance "
        f"{report.tolerance:.1e}; cold verify {cold:.2f} s, warm Checker {warm * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
