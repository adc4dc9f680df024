"""Built-in examples for `python -m jaxcheck demo`: correct gradients and planted bugs."""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from ._verify import verify


def linear_regression():
    """The textbook example: y = 3x + 2 + noise, loss = mean((w x + b - y)^2)."""
    r = np.random.default_rng(0)
    x = jnp.asarray(r.random((100, 1)), jnp.float32)
    y = 3 * x + 2 + jnp.asarray(r.random((100, 1)), jnp.float32)
    params = {"w": jnp.asarray([[0.5]], jnp.float32), "b": jnp.asarray([0.1], jnp.float32)}

    def loss(p, x, y):
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    def buggy_grad(p, x, y):  # the classic mistake: the chain rule is dropped
        n = x.shape[0]
        dw = (2 / n) * jnp.sum(p["w"] * x - y)
        db = (2 / n) * (x.sum() - y.sum())
        return {"w": jnp.reshape(dw, (1, 1)), "b": jnp.reshape(db, (1,))}

    def correct_grad(p, x, y):
        n = x.shape[0]
        residual = x @ p["w"] + p["b"] - y
        return {"w": (2 / n) * x.T @ residual, "b": (2 / n) * jnp.sum(residual, axis=0)}

    return loss, params, (x, y), buggy_grad, correct_grad


def _init(r, shape, scale=None):
    scale = 1 / math.sqrt(shape[0]) if scale is None else scale
    return jnp.asarray(r.normal(size=shape) * scale, jnp.float32)


def mlp():
    r = np.random.default_rng(1)
    sizes = (8, 64, 64, 4)
    params = {
        "layers": [
            {"w": _init(r, (m, n)), "b": jnp.zeros(n, jnp.float32)}
            for m, n in zip(sizes[:-1], sizes[1:])
        ]
    }
    x = jnp.asarray(r.normal(size=(32, 8)), jnp.float32)
    labels = jnp.asarray(r.integers(0, 4, size=32))

    def loss(p, x, labels, dense=None):
        h = x
        for i, layer in enumerate(p["layers"]):
            if dense is not None and i == 1:
                h = dense(h, layer["w"]) + layer["b"]
            else:
                h = h @ layer["w"] + layer["b"]
            if i < len(p["layers"]) - 1:
                h = jax.nn.gelu(h)
        logp = jax.nn.log_softmax(h)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

    return loss, params, (x, labels)


@jax.custom_vjp
def bessel_dense(x, w):
    """x @ w with a hand-written backward pass that has a subtle (1 %) bug."""
    return x @ w


def _bessel_fwd(x, w):
    return x @ w, (x, w)


def _bessel_bwd(res, ct):
    x, w = res
    n = x.shape[0]
    # Bug: a Bessel correction n / (n - 1) slipped into the weight gradient; with the
    # demo's batch of 101 rows it is a 1 % error.
    return ct @ w.T, x.T @ ct * (n / (n - 1))


bessel_dense.defvjp(_bessel_fwd, _bessel_bwd)


def cnn():
    r = np.random.default_rng(2)
    params = {
        "conv1": _init(r, (3, 3, 3, 8), 0.2),
        "conv2": _init(r, (3, 3, 8, 8), 0.1),
        "head": _init(r, (8, 10)),
    }
    images = jnp.asarray(r.normal(size=(4, 12, 12, 3)), jnp.float32)
    labels = jnp.asarray(r.integers(0, 10, size=4))

    def loss(p, images, labels):
        dn = ("NHWC", "HWIO", "NHWC")
        h = jax.nn.relu(
            jax.lax.conv_general_dilated(images, p["conv1"], (1, 1), "SAME", dimension_numbers=dn)
        )
        h = jnp.tanh(
            jax.lax.conv_general_dilated(h, p["conv2"], (2, 2), "SAME", dimension_numbers=dn)
        )
        logits = jnp.mean(h, axis=(1, 2)) @ p["head"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    return loss, params, (images, labels)


def attention():
    r = np.random.default_rng(3)
    d, t = 16, 10
    params = {name: _init(r, (d, d)) for name in ("query", "key", "value", "out")}
    params["norm"] = {"scale": jnp.ones(d, jnp.float32), "bias": jnp.zeros(d, jnp.float32)}
    x = jnp.asarray(r.normal(size=(t, d)), jnp.float32)

    def loss(p, x):
        mu = jnp.mean(x, -1, keepdims=True)
        h = (x - mu) / jnp.sqrt(jnp.var(x, -1, keepdims=True) + 1e-5)
        h = h * p["norm"]["scale"] + p["norm"]["bias"]
        q, k, v = h @ p["query"], h @ p["key"], h @ p["value"]
        mask = jnp.tril(jnp.ones((t, t), bool))
        scores = jnp.where(mask, q @ k.T / math.sqrt(d), -1e9)
        y = jax.nn.softmax(scores, axis=-1) @ v @ p["out"]
        return jnp.mean((x + y) ** 2)

    return loss, params, (x,)


def examples():
    """(title, expected status, thunk returning a report) for each demo case."""
    lr_loss, lr_params, lr_args, lr_buggy, lr_correct = linear_regression()
    mlp_loss, mlp_params, mlp_args = mlp()
    cnn_loss, cnn_params, cnn_args = cnn()
    att_loss, att_params, att_args = attention()
    r = np.random.default_rng(4)
    x101 = jnp.asarray(r.normal(size=(101, 8)), jnp.float32)
    labels101 = jnp.asarray(r.integers(0, 4, size=101))
    return [
        (
            "linear regression, textbook hand-written gradient",
            "fail",
            lambda: verify(lr_loss, lr_params, *lr_args, grad_fn=lr_buggy),
        ),
        (
            "linear regression, corrected hand-written gradient",
            "pass",
            lambda: verify(lr_loss, lr_params, *lr_args, grad_fn=lr_correct),
        ),
        (
            "MLP (8-64-64-4, gelu, cross-entropy) through jax.grad",
            "pass",
            lambda: verify(mlp_loss, mlp_params, *mlp_args),
        ),
        (
            "CNN (two convolutions, relu/tanh) through jax.grad",
            "pass",
            lambda: verify(cnn_loss, cnn_params, *cnn_args),
        ),
        (
            "causal self-attention with layer norm through jax.grad",
            "pass",
            lambda: verify(att_loss, att_params, *att_args),
        ),
        (
            "MLP whose second layer is a custom_vjp with a 1 % weight-gradient bug",
            "fail",
            lambda: verify(
                lambda p, x, y: mlp_loss(p, x, y, dense=bessel_dense), mlp_params, x101, labels101
            ),
        ),
    ]


def main() -> int:
    """Print the report of every example; return 0 when each came out as expected."""
    print(f"jaxcheck demo — jax {jax.__version__} on {jax.default_backend()}\n")
    start = time.perf_counter()
    surprises = 0
    for title, expected, run in examples():
        report = run()
        as_expected = report.status == expected
        surprises += not as_expected
        print(f"== {title} (expected: {expected}) ==")
        print(report)
        print()
    total = time.perf_counter() - start
    count = len(examples())
    print(f"{count - surprises} of {count} examples came out as expected in {total:.1f} s.")
    return 1 if surprises else 0
