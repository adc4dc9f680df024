"""Models and planted gradient bugs shared by the tests.

Each `Case` is a function, a point, and what a correct checker must say about it: the
expected status and, for bugs confined to one leaf, that leaf's path.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def enable_x64(enabled: bool = True):
    """A context with 64-bit types on (or off): `jax.enable_x64` in newer jax,
    `jax.experimental` before."""
    if callable(getattr(jax, "enable_x64", None)):
        return jax.enable_x64(enabled)
    from jax import experimental  # noqa: PLC0415

    return experimental.enable_x64() if enabled else experimental.disable_x64()


# -- planted bugs: identity in the forward pass, wrong in the backward pass ---------------


def _identity_with_backward(transform):
    """x -> x whose backward pass returns transform(cotangent, c) instead of the cotangent."""

    @jax.custom_vjp
    def wrapped(x, c):
        return x

    wrapped.defvjp(lambda x, c: (x, c), lambda c, ct: (transform(ct, c), jnp.zeros_like(c)))
    return wrapped


def _add_fixed_noise(ct, rel):
    """ct plus a fixed pseudo-random vector of norm rel * |ct|."""
    noise = jnp.sin(jnp.arange(ct.size, dtype=ct.dtype) * 12.9898 + 1.0).reshape(ct.shape)
    return ct + rel * jnp.linalg.norm(ct) * noise / jnp.linalg.norm(noise)


_BUGS = {
    "scale": (_identity_with_backward(lambda ct, s: ct * s), lambda size: 1 + size),
    "clip": (_identity_with_backward(lambda ct, c: jnp.clip(ct, -c, c)), lambda size: size),
    "perturb": (_identity_with_backward(_add_fixed_noise), lambda size: size),
}


def bug(kind: str, size: float):
    """A function x -> x whose backward pass has the named bug: "scale" multiplies the
    gradient by 1 + size, "clip" clips it to [-size, size], "perturb" adds a fixed vector of
    relative size `size`."""
    wrapped, parameter = _BUGS[kind]
    return lambda x: wrapped(x, jnp.asarray(parameter(size), x.dtype))


def scaled_sin(factor: float):
    """sin with a custom_jvp whose derivative is `factor` times the true one (1: correct)."""

    @jax.custom_jvp
    def f(x):
        return jnp.sin(x)

    @f.defjvp
    def _jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return f(x), factor * jnp.cos(x) * t

    return f


def tanh_with_backward(factor: float):
    """tanh as a custom_vjp named `act` whose backward pass is `factor` times right (1:
    correct)."""

    @jax.custom_vjp
    def act(z):
        return jnp.tanh(z)

    act.defvjp(lambda z: (jnp.tanh(z), z), lambda z, g: (factor * g * (1 - jnp.tanh(z) ** 2),))
    return act


def sin_with_second_derivative(scale: float):
    """sin as a custom_jvp whose jvp calls cos, a custom_jvp whose own jvp is `scale` times
    right: right at order 1, `scale` times off in its second derivative."""

    @jax.custom_jvp
    def cos(x):
        return jnp.cos(x)

    cos.defjvp(lambda p, t: (jnp.cos(p[0]), -scale * jnp.sin(p[0]) * t[0]))

    @jax.custom_jvp
    def sin(x):
        return jnp.sin(x)

    sin.defjvp(lambda p, t: (jnp.sin(p[0]), cos(p[0]) * t[0]))
    return sin


def relu_sloped_at_zero(slope: float):
    """relu as a custom_vjp whose derivative at 0 is `slope` (between its one-sided slopes
    0 and 1 for a slope in [0, 1]; JAX's is 0)."""

    @jax.custom_vjp
    def relu(x):
        return jnp.maximum(x, 0.0)

    def backward(x, g):
        return (g * jnp.where(x > 0, 1.0, jnp.where(x == 0, slope, 0.0)),)

    relu.defvjp(lambda x: (relu(x), x), backward)
    return relu


def identity(x):
    return x


# -- models -------------------------------------------------------------------------------


def _rng(seed=0):
    return np.random.default_rng(seed)


def mlp_params(sizes, dtype, scale=1.0, seed=0):
    r = _rng(seed)
    layers = []
    for m, n in zip(sizes[:-1], sizes[1:]):
        layers.append(
            {
                "w": jnp.asarray(r.normal(size=(m, n)) * scale / np.sqrt(m), dtype),
                "b": jnp.asarray(r.normal(size=(n,)) * 0.1 * scale, dtype),
            }
        )
    return {"layers": layers}


def mlp_loss(wrap=None, where=None, loss_scale=1.0):
    """tanh MLP with squared loss; `wrap` is applied to leaf ('layers', i, name) == where."""

    def loss(params, x, y):
        h = x
        n = len(params["layers"])
        for i, layer in enumerate(params["layers"]):
            w, b = layer["w"], layer["b"]
            if where == (i, "w"):
                w = wrap(w)
            if where == (i, "b"):
                b = wrap(b)
            h = h @ w + b
            if i < n - 1:
                h = jnp.tanh(h)
        return loss_scale * jnp.mean((h - y) ** 2)

    return loss


def mlp_data(sizes, dtype, batch=8, seed=1):
    r = _rng(seed)
    x = jnp.asarray(r.normal(size=(batch, sizes[0])), dtype)
    y = jnp.asarray(r.normal(size=(batch, sizes[-1])), dtype)
    return x, y


def conv_loss(wrap=identity):
    def loss(params, x):
        k = wrap(params["kernel"])
        y = jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        y = jax.nn.gelu(y + params["bias"])
        return jnp.mean(y**2) + jnp.mean(y @ params["head"])

    return loss


def conv_params(dtype, seed=0):
    r = _rng(seed)
    return {
        "kernel": jnp.asarray(r.normal(size=(3, 3, 2, 4)) * 0.3, dtype),
        "bias": jnp.asarray(r.normal(size=(4,)) * 0.1, dtype),
        "head": jnp.asarray(r.normal(size=(4, 3)), dtype),
    }


def attention_loss(wrap=identity):
    def loss(params, x):
        q = x @ params["wq"]
        k = x @ wrap(params["wk"])
        v = x @ params["wv"]
        a = jax.nn.softmax(q @ k.T / np.sqrt(q.shape[-1]), axis=-1)
        return jnp.sum(jnp.tanh(a @ v) * params["wo"])

    return loss


def attention_params(dtype, seed=0, d=6, t=5):
    r = _rng(seed)
    return {
        name: jnp.asarray(r.normal(size=(d, d)) / np.sqrt(d), dtype) for name in ("wq", "wk", "wv")
    } | {"wo": jnp.asarray(r.normal(size=(t, d)), dtype)}


def layernorm_loss(wrap=identity):
    def loss(params, x):
        mu = jnp.mean(x, -1, keepdims=True)
        var = jnp.var(x, -1, keepdims=True)
        y = (x - mu) / jnp.sqrt(var + 1e-5) * wrap(params["gamma"]) + params["beta"]
        return jnp.sum(jnp.sin(y))

    return loss


def scan_loss(wrap=identity):
    def loss(params, xs):
        def step(h, x):
            h = jnp.tanh(h @ wrap(params["wh"]) + x @ params["wx"])
            return h, jnp.sum(h)

        _, outs = jax.lax.scan(step, jnp.zeros(params["wh"].shape[0], xs.dtype), xs)
        return jnp.sum(outs**2)

    return loss


def fori_loss(wrap=identity):
    def loss(params, x):
        def body(i, h):
            return jnp.sin(h * wrap(params["a"]) + params["c"])

        return jnp.sum(jax.lax.fori_loop(0, 5, body, x))

    return loss


def xent_loss(wrap=identity, logit_scale=50.0):
    def loss(params, x, labels):
        logits = logit_scale * (x @ wrap(params["w"]) + params["b"])
        return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    return loss


def ill_conditioned_loss(wrap=identity):
    """A float32 loss whose correct float32 gradient is 6.5e-5 (relative) from the float64
    truth (a variance over a large offset), at `ill_conditioned_params()`."""
    z = jnp.asarray(_rng().normal(size=200), jnp.float32)

    def loss(p):
        a = wrap(p["a"]) * z
        return jnp.sum((a - jnp.mean(a)) ** 2) / jnp.sum(a**2 + 1e4)

    return loss


def ill_conditioned_params():
    return {"a": jnp.asarray(3e3, jnp.float32)}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    fn: Callable
    params: Any
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    expect: str = "pass"
    leaf: str | None = None  # the wrong leaf, for single-leaf bugs


def model_cases(dtype) -> list[Case]:
    """Correct models and single-leaf planted bugs, for `dtype`."""
    r = _rng(3)
    sizes = (5, 16, 16, 3)
    x, y = mlp_data(sizes, dtype)
    img = jnp.asarray(r.normal(size=(2, 6, 6, 2)), dtype)
    seq = jnp.asarray(r.normal(size=(5, 6)), dtype)
    lab = jnp.asarray([0, 2, 1, 2, 0, 1, 1, 0])
    xs = jnp.asarray(r.normal(size=(7, 3)), dtype)
    rnn = {
        "wh": jnp.asarray(r.normal(size=(4, 4)) * 0.5, dtype),
        "wx": jnp.asarray(r.normal(size=(3, 4)) * 0.5, dtype),
    }
    fori = {
        "a": jnp.asarray(r.normal(size=(6,)), dtype),
        "c": jnp.asarray(r.normal(size=(6,)), dtype),
    }
    xent = {"w": jnp.asarray(r.normal(size=(5, 3)) * 0.3, dtype), "b": jnp.zeros(3, dtype)}
    ln = {
        "gamma": jnp.asarray(1 + 0.1 * r.normal(size=(6,)), dtype),
        "beta": jnp.asarray(0.1 * r.normal(size=(6,)), dtype),
    }
    cases = []
    for kind, size in (("scale", 0.01), ("perturb", 0.01), ("scale", -1.0)):
        wrap = bug(kind, size)
        tag = f"{kind}{size:+g}"
        cases += [
            Case(
                f"mlp-{tag}",
                mlp_loss(wrap, (1, "w")),
                mlp_params(sizes, dtype),
                (x, y),
                expect="fail",
                leaf="['layers'][1]['w']",
            ),
            Case(
                f"conv-{tag}",
                conv_loss(wrap),
                conv_params(dtype),
                (img,),
                expect="fail",
                leaf="['kernel']",
            ),
            Case(
                f"attention-{tag}",
                attention_loss(wrap),
                attention_params(dtype),
                (seq,),
                expect="fail",
                leaf="['wk']",
            ),
            Case(f"scan-{tag}", scan_loss(wrap), rnn, (xs,), expect="fail", leaf="['wh']"),
            Case(f"fori-{tag}", fori_loss(wrap), fori, (seq[0],), expect="fail", leaf="['a']"),
            Case(f"xent-{tag}", xent_loss(wrap), xent, (x, lab), expect="fail", leaf="['w']"),
            Case(
                f"layernorm-{tag}",
                layernorm_loss(wrap),
                ln,
                (seq,),
                expect="fail",
                leaf="['gamma']",
            ),
        ]
    cases += [
        Case("mlp", mlp_loss(), mlp_params(sizes, dtype), (x, y)),
        Case("conv", conv_loss(), conv_params(dtype), (img,)),
        Case("attention", attention_loss(), attention_params(dtype), (seq,)),
        Case("scan", scan_loss(), rnn, (xs,)),
        Case("fori", fori_loss(), fori, (seq[0],)),
        Case("xent", xent_loss(), xent, (x, lab)),
        Case("layernorm", layernorm_loss(), ln, (seq,)),
        Case(
            "mlp-bias-clip",
            mlp_loss(bug("clip", 1e-3), (2, "b")),
            mlp_params(sizes, dtype),
            (x, y),
            expect="fail",
            leaf="['layers'][2]['b']",
        ),
    ]
    return cases


def fresh_programs(monkeypatch) -> None:
    """Empty caches of compiled programs for the rest of a test that counts what a check
    compiles (a new function of the same code as an earlier one's reuses its programs)."""
    from jaxcheck import _plan  # noqa: PLC0415

    for name in ("_CACHE", "_ONCE", "_JITTED"):
        monkeypatch.setattr(_plan, name, type(getattr(_plan, name))())
    monkeypatch.setattr(_plan, "_PENDING", {})
