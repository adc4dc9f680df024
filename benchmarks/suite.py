"""A test-suite workload: one cold gradient check each of many small functions.

    python benchmarks/suite.py [--quick] [--order 1|2] [--out DIR] [--cases N] [--rounds N]

A test suite checks many small, new functions once each, so what a check costs there is
mostly compilation. Each case here is checked once by `jaxcheck.verify` and once by
`jax.test_util.check_grads` at the same order; every case builds a fresh function object, as
a parametrized pytest test does. Each tool runs all cases in its own fresh process (both
in the same order): JAX keeps compiled primitives and traces for the life of a process, so
in a shared process the second tool would inherit the first one's compilations, and which
went first would decide the comparison. A separate process is what a suite that uses one of
the tools sees. See benchmarks/README.md ("Test-suite workload").
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
TOOLS = ("jaxcheck", "check_grads")
QUICK_CASES = 15
BUG = 1.03  # planted bugs scale a derivative by 3 % (or drop a term)


@dataclasses.dataclass(frozen=True)
class Case:
    """One check: `make()` returns a fresh (fn, params) pair; fn(params) is checked."""

    name: str
    group: str
    make: Callable
    dtype: str = "float32"
    buggy: bool = False
    custom_vjp: bool = False  # check_grads cannot run forward mode through it


# -- the functions ----------------------------------------------------------------------------


def _cases() -> list[Case]:
    """The case list; imports jax lazily so that the driver process stays light."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def array(shape, dtype, seed, positive=False, low=0.0):
        rng = np.random.RandomState(seed)
        x = rng.uniform(0.5, 1.5, shape) if positive else rng.randn(*shape)
        return jnp.asarray(x + low, dtype)

    cases = []

    def add(name, group, make, **kw):
        cases.append(Case(name, group, make, **kw))

    unary = {
        "sin": (jnp.sin, False),
        "cos": (jnp.cos, False),
        "tanh": (jnp.tanh, False),
        "exp": (jnp.exp, False),
        "log": (jnp.log, True),
        "sqrt": (jnp.sqrt, True),
        "logistic": (jax.nn.sigmoid, False),
        "erf": (jax.scipy.special.erf, False),
        "softplus": (jax.nn.softplus, False),
        "square": (jnp.square, False),
        "reciprocal": (jnp.reciprocal, True),
        "rsqrt": (lax.rsqrt, True),
        "log1p": (jnp.log1p, True),
        "expm1": (jnp.expm1, False),
        "arctan": (jnp.arctan, False),
        "sinh": (jnp.sinh, False),
        "gelu": (jax.nn.gelu, False),
    }
    shapes = [(), (3,), (4, 5), (2, 3, 4)]
    for i, (name, (op, positive)) in enumerate(unary.items()):
        for j, shape in enumerate(shapes):
            seed = 100 * i + j

            def make(op=op, shape=shape, positive=positive, seed=seed, reduce=j % 2 == 0):
                x = array(shape, jnp.float32, seed, positive)
                if reduce:  # half the cases scalar, half with an array output
                    return (lambda p: jnp.sum(op(p) * jnp.sin(p))), x
                return (lambda p: op(p)), x

            add(f"{name}{list(shape)}", "unary", make)

    binary = {
        "add": jnp.add,
        "sub": jnp.subtract,
        "mul": jnp.multiply,
        "div": jnp.divide,
        "pow": jnp.power,
        "atan2": jnp.arctan2,
        "hypot": jnp.hypot,
        "logaddexp": jnp.logaddexp,
        "maximum": jnp.maximum,
    }
    for i, (name, op) in enumerate(binary.items()):
        for j, shape in enumerate([(3,), (4, 5)]):
            seed = 2000 + 10 * i + j

            def make(op=op, shape=shape, seed=seed):
                p = {
                    "a": array(shape, jnp.float32, seed, True),
                    "b": array(shape, jnp.float32, seed + 5),
                }
                return (lambda p: op(p["a"], p["b"])), p

            add(f"{name}{list(shape)}", "binary", make)

    reductions = {
        "sum": jnp.sum,
        "mean": jnp.mean,
        "prod": jnp.prod,
        "max": jnp.max,
        "logsumexp": jax.scipy.special.logsumexp,
        "norm": lambda x, axis=None: jnp.sqrt(jnp.sum(x * x, axis=axis)),
        "var": jnp.var,
        "std": jnp.std,
    }
    for i, (name, op) in enumerate(reductions.items()):
        for axis in (None, 1):
            seed = 3000 + 10 * i + (axis or 0)

            def make(op=op, axis=axis, seed=seed):
                x = array((4, 5), jnp.float32, seed, True)
                return (lambda p: op(jnp.sin(p), axis=axis)), x

            add(f"{name}(axis={axis})", "reduction", make)

    def linear(name, shapes, f):
        seed = 4000 + len(cases)

        def make(seed=seed):
            p = {k: array(s, jnp.float32, seed + i) for i, (k, s) in enumerate(shapes.items())}
            return (lambda p: f(**p)), p

        add(name, "linear algebra", make)

    linear("dot[3]", {"a": (3,), "b": (3,)}, lambda a, b: jnp.dot(a, b))
    linear("matmul[4,5]@[5,3]", {"a": (4, 5), "b": (5, 3)}, lambda a, b: a @ b)
    linear("batched matmul", {"a": (2, 3, 4), "b": (2, 4, 2)}, lambda a, b: a @ b)
    linear(
        "einsum ij,jk,k",
        {"a": (4, 5), "b": (5, 3), "c": (3,)},
        lambda a, b, c: jnp.einsum("ij,jk,k->i", a, b, c),
    )
    linear("outer", {"a": (3,), "b": (4,)}, lambda a, b: jnp.sum(jnp.outer(a, b) ** 2))
    linear("matvec tanh", {"a": (4, 5), "b": (5,)}, lambda a, b: jnp.tanh(a @ b))
    linear("trace", {"a": (4, 4)}, lambda a: jnp.trace(a @ a))
    linear(
        "solve",
        {"a": (3, 3), "b": (3,)},
        lambda a, b: jnp.linalg.solve(a + 4.0 * jnp.eye(3, dtype=a.dtype), b),
    )
    linear(
        "conv1d",
        {"x": (1, 2, 8), "w": (3, 2, 3)},
        lambda x, w: lax.conv_general_dilated(x, w, (1,), "SAME"),
    )
    linear(
        "conv2d",
        {"x": (1, 2, 5, 5), "w": (3, 2, 3, 3)},
        lambda x, w: jnp.sum(lax.conv_general_dilated(x, w, (1, 1), "VALID") ** 2),
    )
    linear(
        "conv2d strided",
        {"x": (2, 1, 6, 6), "w": (2, 1, 2, 2)},
        lambda x, w: lax.conv_general_dilated(x, w, (2, 2), "VALID"),
    )

    def structural(name, shape, f, positive=False):
        seed = 5000 + len(cases)

        def make(seed=seed):
            return (lambda p: f(p)), array(shape, jnp.float32, seed, positive)

        add(name, "structural", make)

    structural("cumsum", (5,), lambda p: jnp.cumsum(p * p))
    structural("cumprod", (4,), jnp.cumprod, positive=True)
    structural("cumsum axis 1", (3, 4), lambda p: jnp.cumsum(jnp.sin(p), axis=1))
    structural("sort", (6,), lambda p: jnp.sort(p) * jnp.arange(1.0, 7.0, dtype=p.dtype))
    structural("slice", (4, 5), lambda p: p[1:3, ::2] ** 2)
    structural("pad", (3, 3), lambda p: jnp.pad(jnp.sin(p), ((1, 0), (0, 2))))
    structural("concatenate", (4,), lambda p: jnp.concatenate([p, p**2, jnp.exp(p)]))
    structural(
        "reshape/transpose",
        (2, 3, 4),
        lambda p: jnp.transpose(p.reshape(6, 4)) @ p.reshape(6, 4)[:, 0],
    )
    structural("gather", (6,), lambda p: p[jnp.array([0, 2, 2, 5])] ** 3)
    structural(
        "scatter add",
        (5,),
        lambda p: jnp.zeros(3, p.dtype).at[jnp.array([0, 1, 1, 2, 0])].add(p * p),
    )
    structural("dynamic slice", (6,), lambda p: lax.dynamic_slice(jnp.tanh(p), (2,), (3,)))
    structural("roll", (5,), lambda p: jnp.roll(p, 2) * p)
    structural("where", (3, 4), lambda p: jnp.where(p > 0, jnp.sin(p), p**2))
    structural("select_n", (5,), lambda p: lax.select(p > 0.1, p * 3.0, jnp.exp(p)))
    structural("clip", (6,), lambda p: jnp.clip(p, -0.8, 0.8) * p)
    structural("softmax", (4, 5), lambda p: jax.nn.softmax(p, axis=-1))
    structural(
        "log_softmax", (6,), lambda p: jax.nn.log_softmax(p) * jnp.arange(6.0, dtype=p.dtype)
    )

    def control(name, shape, f):
        seed = 6000 + len(cases)

        def make(seed=seed):
            return (lambda p: f(p)), array(shape, jnp.float32, seed)

        add(name, "control flow", make)

    def rnn(p):
        def step(h, x):
            h = jnp.tanh(p["w"] @ h + x)
            return h, jnp.sum(h)

        _, ys = lax.scan(step, p["h0"], p["xs"])
        return ys

    def make_rnn(seed=6500):
        p = {
            "w": array((3, 3), jnp.float32, seed) * 0.5,
            "h0": array((3,), jnp.float32, seed + 1),
            "xs": array((4, 3), jnp.float32, seed + 2),
        }
        return (lambda p: rnn(p)), p

    add("scan rnn", "control flow", make_rnn)
    control("cond", (3,), lambda p: lax.cond(jnp.sum(p) > 0, jnp.sin, jnp.cos, p))
    control("fori_loop", (4,), lambda p: lax.fori_loop(0, 3, lambda i, x: jnp.sin(x) * p, p))
    control(
        "fori_loop carry",
        (3,),
        lambda p: lax.fori_loop(
            0, 4, lambda i, c: (c[0] * 0.5 + jnp.tanh(c[1]), jnp.tanh(c[1]) + p), (p, p)
        )[0],
    )
    control("scan cumulative", (5,), lambda p: lax.scan(lambda c, x: (c * x + 1.0, c), 1.0, p)[1])
    control("switch", (3,), lambda p: lax.switch(1, [jnp.sin, jnp.cos, jnp.tanh], p) * p)

    # custom rules: a correct twin and a buggy twin of each
    def custom(name, shape, build, positive=False, vjp=False):
        for buggy in (False, True):
            seed = 7000 + len(cases)

            def make(buggy=buggy, seed=seed):
                return build(BUG if buggy else 1.0), array(shape, jnp.float32, seed, positive)

            add(
                f"{name} ({'wrong rule' if buggy else 'correct rule'})",
                "custom rule",
                make,
                buggy=buggy,
                custom_vjp=vjp,
            )

    def jvp_sin(scale):
        @jax.custom_jvp
        def f(x):
            return jnp.sin(x)

        f.defjvp(
            lambda primals, tangents: (f(primals[0]), scale * jnp.cos(primals[0]) * tangents[0])
        )
        return lambda p: jnp.sum(f(p) * p)

    def vjp_tanh(scale):
        @jax.custom_vjp
        def f(x):
            return jnp.tanh(x)

        def fwd(x):
            y = jnp.tanh(x)
            return y, y

        f.defvjp(fwd, lambda y, g: ((1 - y * y) * g * scale,))
        return lambda p: f(p) * 2.0

    def jvp_logsumexp(scale):
        @jax.custom_jvp
        def f(x):
            return jnp.log(jnp.sum(jnp.exp(x)))

        def rule(primals, tangents):
            (x,), (t,) = primals, tangents
            w = jax.nn.softmax(x)
            # the buggy twin overweights the first element
            w = w.at[0].multiply(scale)
            return f(x), jnp.sum(w * t)

        f.defjvp(rule)
        return lambda p: f(p)

    def vjp_product(scale):
        @jax.custom_vjp
        def f(a):
            return a[0] * a[1]

        def bwd(a, g):
            # the buggy twin gets the second factor's cotangent wrong by a few %
            return (jnp.stack([g * a[1], g * a[0] * scale]),)

        f.defvjp(lambda a: (f(a), a), bwd)
        return lambda p: f(p) ** 2

    def jvp_log(scale):
        @jax.custom_jvp
        def f(x):
            return jnp.log(x)

        shift = 0.0 if scale == 1.0 else 0.03
        f.defjvp(lambda primals, tangents: (f(primals[0]), tangents[0] / (primals[0] + shift)))
        return lambda p: f(p)

    def vjp_clip_gradient(scale):
        @jax.custom_vjp
        def f(x):
            return x

        f.defvjp(lambda x: (x, None), lambda _, g: (g * scale,))
        return lambda p: jnp.sum(jnp.tanh(f(p)) ** 2)

    def jvp_mlp_layer(scale):
        @jax.custom_jvp
        def act(x):
            return jnp.tanh(x)

        act.defjvp(
            lambda primals, tangents: (
                act(primals[0]),
                scale * (1 - jnp.tanh(primals[0]) ** 2) * tangents[0],
            )
        )
        return lambda p: jnp.sum(act(p.reshape(4, 5) @ jnp.ones((5, 2), p.dtype)) ** 2)

    custom("custom_jvp sin", (3,), jvp_sin)
    custom("custom_vjp tanh", (4,), vjp_tanh, vjp=True)
    custom("custom_jvp logsumexp", (5,), jvp_logsumexp)
    custom("custom_vjp product", (2,), vjp_product, vjp=True)
    custom("custom_jvp log", (3,), jvp_log, positive=True)
    custom("custom_vjp clip_gradient", (2, 3), vjp_clip_gradient, vjp=True)
    custom("custom_jvp activation in a layer", (20,), jvp_mlp_layer)

    # small models
    def mlp(p, x):
        h = x
        for i, layer in enumerate(p):
            h = h @ layer["w"] + layer["b"]
            if i < len(p) - 1:
                h = jnp.tanh(h)
        return jnp.mean(h**2)

    def make_mlp(dtype, seed):
        def make():
            sizes = [4, 8, 8, 2]
            p = [
                {
                    "w": array((m, n), dtype, seed + i) / np.sqrt(m),
                    "b": array((n,), dtype, seed + 10 + i) * 0.1,
                }
                for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:]))
            ]
            x = array((3, 4), dtype, seed + 20)
            return (lambda p: mlp(p, x)), p

        return make

    def conv_net(p, x):
        h = jnp.tanh(lax.conv_general_dilated(x, p["k1"], (1, 1), "SAME"))
        h = jnp.tanh(lax.conv_general_dilated(h, p["k2"], (2, 2), "VALID"))
        return jnp.sum((h.reshape(h.shape[0], -1) @ p["w"]) ** 2)

    def make_conv(dtype, seed):
        def make():
            p = {
                "k1": array((3, 2, 3, 3), dtype, seed) * 0.3,
                "k2": array((2, 3, 2, 2), dtype, seed + 1) * 0.3,
                "w": array((8, 3), dtype, seed + 2) * 0.3,
            }
            x = array((2, 2, 4, 4), dtype, seed + 3)
            return (lambda p: conv_net(p, x)), p

        return make

    def attention(p, x):
        mu = jnp.mean(x, -1, keepdims=True)
        h = (x - mu) / jnp.sqrt(jnp.var(x, -1, keepdims=True) + 1e-5) * p["g"]
        q, k, v = h @ p["q"], h @ p["k"], h @ p["v"]
        s = q @ k.T / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
        s = jnp.where(jnp.tril(jnp.ones(s.shape, bool)), s, -1e9)
        y = x + jax.nn.softmax(s, axis=-1) @ v @ p["o"]
        return jnp.mean(jax.nn.gelu(y @ p["m1"]) @ p["m2"])

    def make_attention(dtype, seed):
        def make():
            d = 4
            p = {k: array((d, d), dtype, seed + i) * 0.5 for i, k in enumerate("qkvo")}
            p["g"] = array((d,), dtype, seed + 5, True)
            p["m1"] = array((d, 2 * d), dtype, seed + 6) * 0.5
            p["m2"] = array((2 * d, d), dtype, seed + 7) * 0.5
            x = array((5, d), dtype, seed + 8)
            return (lambda p: attention(p, x)), p

        return make

    for dtype in ("float32", "float64"):
        add(f"MLP 4-8-8-2 {dtype}", "model", make_mlp(dtype, 8000), dtype=dtype)
        add(f"conv net {dtype}", "model", make_conv(dtype, 8100), dtype=dtype)
        add(f"attention block {dtype}", "model", make_attention(dtype, 8200), dtype=dtype)

    def make_buggy_mlp():
        @jax.custom_vjp
        def scaled(w):
            return w

        scaled.defvjp(lambda w: (w, None), lambda _, g: (g * BUG,))
        fn, p = make_mlp("float32", 8000)()
        return (
            lambda q: fn(
                [
                    dict(layer, w=scaled(layer["w"])) if i == 1 else layer
                    for i, layer in enumerate(q)
                ]
            )
        ), p

    add("MLP, one layer's gradient 3 % off", "model", make_buggy_mlp, buggy=True, custom_vjp=True)

    # compositions
    def composition(name, shape, f, positive=False):
        seed = 9000 + len(cases)

        def make(seed=seed):
            return (lambda p: f(p)), array(shape, jnp.float32, seed, positive)

        add(name, "composition", make)

    composition(
        "layernorm",
        (3, 6),
        lambda p: (p - p.mean(-1, keepdims=True)) / jnp.sqrt(p.var(-1, keepdims=True) + 1e-5),
    )
    composition("rms norm", (8,), lambda p: p / jnp.sqrt(jnp.mean(p * p) + 1e-6))
    composition(
        "cross entropy",
        (4, 5),
        lambda p: -jnp.mean(jax.nn.log_softmax(p)[jnp.arange(4), jnp.array([0, 3, 1, 4])]),
    )
    composition("sin(exp(tanh))", (5,), lambda p: jnp.sin(jnp.exp(jnp.tanh(p))))
    composition("polynomial", (4,), lambda p: jnp.polyval(p, 0.7 * jnp.ones((), p.dtype)))
    composition("rational", (3,), lambda p: (p**2 + 1) / (p**4 + 2), positive=True)
    composition(
        "pairwise distances",
        (4, 2),
        lambda p: jnp.sum(jnp.sqrt(jnp.sum((p[:, None] - p[None]) ** 2, -1) + 1e-3)),
    )
    composition(
        "gaussian log-density", (5,), lambda p: jax.scipy.stats.norm.logpdf(p, 0.3, 1.7).sum()
    )
    composition("swish chain", (2, 3, 4), lambda p: jax.nn.swish(jax.nn.swish(p) * 1.5))

    # float64 (64-bit types on for both tools) and a few half precision cases
    wide = ["sin", "tanh", "exp", "log", "logistic", "erf", "softplus", "rsqrt", "gelu", "arctan"]
    for i, name in enumerate(wide):
        op, positive = unary[name]
        for j, shape in enumerate([(3,), (4, 5)]):

            def make(op=op, shape=shape, positive=positive, seed=10000 + 10 * i + j):
                x = array(shape, jnp.float64, seed, positive)
                return (lambda p: jnp.sum(op(p) * p)), x

            add(f"{name}{list(shape)} float64", "float64", make, dtype="float64")
    for dtype in ("bfloat16", "float16"):
        for name in ("sin", "tanh", "square"):
            op, positive = unary[name]

            seed = 11000 + len(cases)

            def make(op=op, dtype=dtype, seed=seed, positive=positive):
                x = array((3,), dtype, seed, positive)
                return (lambda p: jnp.sum(op(p))), x

            add(f"{name}[3] {dtype}", "half precision", make, dtype=dtype)

    def wrong_float64(scale):
        @jax.custom_jvp
        def f(x):
            return jnp.exp(x)

        f.defjvp(lambda primals, tangents: (f(primals[0]), scale * f(primals[0]) * tangents[0]))
        return lambda p: jnp.sum(f(p))

    for buggy in (False, True):
        add(
            f"custom_jvp exp float64 ({'wrong rule' if buggy else 'correct rule'})",
            "custom rule",
            lambda buggy=buggy: (
                wrong_float64(BUG if buggy else 1.0),
                array((4,), jnp.float64, 12000),
            ),
            dtype="float64",
            buggy=buggy,
        )
    return cases


def select(cases: list[Case], quick: bool) -> list[Case]:
    """All cases, or for --quick an even spread of QUICK_CASES with two buggy twins, one of
    them first (so that `--cases N` keeps one)."""
    if not quick:
        return cases
    first, last = [c for c in cases if c.buggy][:2]
    rest = [c for c in cases if not c.buggy]
    step = max(1, len(rest) // (QUICK_CASES - 2))
    return [first, *rest[::step][: QUICK_CASES - 2], last]


# -- one tool, one process --------------------------------------------------------------------


def _x64(jax, enabled: bool):
    """`jax.enable_x64(enabled)`, or its `jax.experimental` form in older jax."""
    if callable(getattr(jax, "enable_x64", None)):
        return jax.enable_x64(enabled)
    from jax import experimental

    return experimental.enable_x64() if enabled else experimental.disable_x64()


def _check(tool: str, case: Case, order: int) -> dict:
    import jax
    from jax.test_util import check_grads

    import jaxcheck

    x64 = case.dtype == "float64"
    with _x64(jax, x64):
        fn, params = case.make()
        jax.block_until_ready(params)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            if tool == "jaxcheck":
                report = jaxcheck.verify(fn, params, order=order, mode="both")
                out = {
                    "verdict": report.status.value,
                    "relative_error": report.relative_error,
                    "compiled": report.num_compiled,
                    "compile_seconds": report.compile_seconds,
                    "problems": list(report.problems),
                }
            else:
                modes = ("rev",) if case.custom_vjp else ("fwd", "rev")
                check_grads(fn, (params,), order=order, modes=modes)
                out = {"verdict": "pass"}
        except AssertionError as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            out = {"verdict": "fail", "message": " ".join(lines[:3])[:300]}
        except Exception as err:  # noqa: BLE001 - recorded, never hidden
            out = {"verdict": "error", "message": f"{type(err).__name__}: {str(err)[:200]}"}
        out["seconds"] = time.perf_counter() - t0
        # CPU time of the whole process (XLA's compiler threads included): unlike wall
        # time, barely changed by other work on a shared machine
        out["cpu_seconds"] = time.process_time() - c0
    return out


def worker(tool: str, quick: bool, order: int, limit: int | None = None) -> dict:
    """Check every case with `tool`, in this process, after one untimed check of an unrelated
    function (which pays the tool's and the backend's one-time start-up, not per-case work)."""
    import jax
    import jax.numpy as jnp

    cases = select(_cases(), quick)[:limit]
    warm = Case("warm-up", "", lambda: ((lambda p: jnp.sum(p * p * p)), jnp.ones(2, jnp.float32)))
    _check(tool, warm, order)
    jax.block_until_ready(jnp.ones(1))
    return {"tool": tool, "results": [_check(tool, c, order) for c in cases]}


# -- driver -----------------------------------------------------------------------------------


def _run_worker(tool: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", tool, "--order", str(args.order)]
    if args.quick:
        command.append("--quick")
    if args.cases is not None:
        command += ["--cases", str(args.cases)]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"the {tool} process failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fastest(runs: list[dict]) -> dict:
    """One tool's rounds merged: every case with the times of its fastest round (CPU time
    decides) and the first round's verdict, and the verdicts of the rounds where they
    differ (they should not: both tools are deterministic)."""
    merged = []
    for results in zip(*(run["results"] for run in runs)):
        fastest = min(results, key=lambda r: r["cpu_seconds"])
        merged.append({**fastest, "verdict": results[0]["verdict"]})
        if len({r["verdict"] for r in results}) > 1:
            merged[-1]["round_verdicts"] = [r["verdict"] for r in results]
    return {"tool": runs[0]["tool"], "results": merged}


def _summary(cases: list[Case], runs: dict) -> dict:
    out = {}
    for tool in TOOLS:
        results = runs[tool]["results"]
        seconds = [r["seconds"] for r in results]
        cpu = [r["cpu_seconds"] for r in results]
        verdicts = {}
        for kind, want in (("correct", False), ("buggy", True)):
            counts: dict = {}
            for c, r in zip(cases, results):
                if c.buggy == want:
                    counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
            verdicts[kind] = counts
        out[tool] = {
            "total_seconds": sum(seconds),
            "median_seconds": statistics.median(seconds),
            "max_seconds": max(seconds),
            "total_cpu_seconds": sum(cpu),
            "median_cpu_seconds": statistics.median(cpu),
            "verdicts": verdicts,
        }
    jc, cg = out["jaxcheck"], out["check_grads"]
    out["ratio_total"] = jc["total_seconds"] / cg["total_seconds"]
    out["ratio_median"] = jc["median_seconds"] / cg["median_seconds"]
    out["ratio_total_cpu"] = jc["total_cpu_seconds"] / cg["total_cpu_seconds"]
    out["ratio_median_cpu"] = jc["median_cpu_seconds"] / cg["median_cpu_seconds"]
    results = runs["jaxcheck"]["results"]
    out["verdicts_lost"] = [
        c.name
        for c, r in zip(cases, results)
        if (r["verdict"] != "pass") != c.buggy or (c.buggy and r["verdict"] != "fail")
    ]
    return out


def _markdown(cases, runs, summary, machine, order) -> str:
    jc, cg = summary["jaxcheck"], summary["check_grads"]
    lines = [
        f"# Test-suite workload, order {order}",
        "",
        f"{len(cases)} cases, each checked once cold; jax {machine['jax']}, "
        f"{machine['cpu_count']} CPUs, load average {machine['load_average_at_start']} at start; "
        f"{summary['rounds']} round(s) per tool, alternating, each case timed by its fastest "
        f"(total CPU per round: jaxcheck {_seconds(summary['round_totals_cpu']['jaxcheck'])}, "
        f"check_grads {_seconds(summary['round_totals_cpu']['check_grads'])}).",
        "",
        "| | jaxcheck | check_grads | ratio |",
        "|---|---|---|---|",
        f"| total | {jc['total_seconds']:.2f} s | {cg['total_seconds']:.2f} s | "
        f"{summary['ratio_total']:.2f} |",
        f"| median | {1e3 * jc['median_seconds']:.0f} ms | {1e3 * cg['median_seconds']:.0f} ms | "
        f"{summary['ratio_median']:.2f} |",
        f"| slowest | {jc['max_seconds']:.2f} s | {cg['max_seconds']:.2f} s | |",
        f"| total CPU time | {jc['total_cpu_seconds']:.2f} s | {cg['total_cpu_seconds']:.2f} s | "
        f"{summary['ratio_total_cpu']:.2f} |",
        f"| median CPU time | {1e3 * jc['median_cpu_seconds']:.0f} ms | "
        f"{1e3 * cg['median_cpu_seconds']:.0f} ms | {summary['ratio_median_cpu']:.2f} |",
        "",
        "| verdicts | jaxcheck | check_grads |",
        "|---|---|---|",
    ]
    for kind in ("correct", "buggy"):

        def fmt(counts):
            return ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))

        lines.append(f"| {kind} | {fmt(jc['verdicts'][kind])} | {fmt(cg['verdicts'][kind])} |")
    lost = summary["verdicts_lost"]
    lines += ["", f"jaxcheck verdicts lost: {', '.join(lost) if lost else 'none'}", ""]
    lines += [
        "| case | group | dtype | planted bug | jaxcheck | s (CPU s) | check_grads | s (CPU s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, a, b in zip(cases, runs["jaxcheck"]["results"], runs["check_grads"]["results"]):
        lines.append(
            f"| {c.name} | {c.group} | {c.dtype} | {'yes' if c.buggy else ''} | {a['verdict']} | "
            f"{a['seconds']:.3f} ({a['cpu_seconds']:.3f}) | {b['verdict']} | "
            f"{b['seconds']:.3f} ({b['cpu_seconds']:.3f}) |"
        )
    return "\n".join(lines) + "\n"


def _seconds(values) -> str:
    return ", ".join(f"{v:.1f} s" for v in values)


def _strict(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_CASES} cases (a smoke run)")
    parser.add_argument("--order", type=int, choices=(1, 2), default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the results")
    parser.add_argument("--cases", type=int, default=None, help="run only the first N cases")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run each tool's process this many times, alternating; each case's time is "
        "its fastest round's",
    )
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.worker:
        print(json.dumps(_strict(worker(args.worker, args.quick, args.order, args.cases))))
        return 0

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from measure import load_average, machine_info

    cases = select(_cases(), args.quick)[: args.cases]
    load_at_start = load_average()
    rounds = {tool: [] for tool in TOOLS}
    for r in range(args.rounds):
        for tool in TOOLS:  # alternated, so that a slow spell of the machine hits both
            t0 = time.perf_counter()
            rounds[tool].append(_run_worker(tool, args))
            print(
                f"round {r + 1}, {tool}: {len(cases)} cases in "
                f"{time.perf_counter() - t0:.1f} s (process wall time)"
            )
    runs = {tool: _fastest(rounds[tool]) for tool in TOOLS}
    machine = machine_info(None)
    machine["load_average_at_start"] = load_at_start
    machine["load_average_at_end"] = load_average()
    summary = _summary(cases, runs)
    summary["rounds"] = args.rounds
    summary["round_totals_cpu"] = {
        tool: [sum(x["cpu_seconds"] for x in run["results"]) for run in rounds[tool]]
        for tool in TOOLS
    }
    suffix = f"{'-order2' if args.order == 2 else ''}{'-quick' if args.quick else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": machine,
        "config": {"order": args.order, "quick": args.quick, "num_cases": len(cases)},
        "command": " ".join(["python", "benchmarks/suite.py", *(argv or sys.argv[1:])]),
        "summary": summary,
        "cases": [
            {
                "name": c.name,
                "group": c.group,
                "dtype": c.dtype,
                "buggy": c.buggy,
                "jaxcheck": a,
                "check_grads": b,
            }
            for c, a, b in zip(cases, runs["jaxcheck"]["results"], runs["check_grads"]["results"])
        ],
    }
    (args.out / f"suite_cpu{suffix}.json").write_text(json.dumps(_strict(record), indent=1))
    markdown = _markdown(cases, runs, summary, machine, args.order)
    (args.out / f"suite_cpu{suffix}.md").write_text(markdown)
    print(markdown.split("\n\n| case")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
