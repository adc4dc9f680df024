"""Benchmark workloads: float32 JAX models with fixed data, and the planted gradient bug."""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

MLP_INPUTS = 32
MLP_OUTPUTS = 8
MLP_HIDDEN_LAYERS = 3
BATCH = 64
# Relative size of the planted bug: small enough that a loose check misses it.
BUG_SCALE = 1.001


@dataclasses.dataclass(frozen=True)
class Workload:
    """One model: `fn(params, *args)` is a scalar loss; the same `fn` object serves every method."""

    name: str
    kind: str  # "mlp", "transformer" or "cnn": picks the torch translation
    description: str
    fn: Callable
    params: Any
    args: tuple
    planted_leaf: str  # jax.tree_util.keystr path of the leaf whose gradient the bug scales
    config: dict

    @property
    def num_params(self) -> int:
        return sum(leaf.size for leaf in jax.tree_util.tree_leaves(self.params))


def _dense(key, fan_in: int, fan_out: int) -> dict:
    w_key, b_key = jax.random.split(key)
    return {
        "w": jax.random.normal(w_key, (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in),
        # Nonzero biases, so their gradients are not trivially checked at zero.
        "b": 0.1 * jax.random.normal(b_key, (fan_out,), jnp.float32),
    }


# ---------------------------------------------------------------------------------------------
# MLP


def mlp_loss(params, x, y):
    """tanh MLP, mean squared error against fixed targets."""
    h = x
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    out = h @ params[-1]["w"] + params[-1]["b"]
    return jnp.mean((out - y) ** 2)


def mlp_param_count(width: int) -> int:
    sizes = [MLP_INPUTS] + [width] * MLP_HIDDEN_LAYERS + [MLP_OUTPUTS]
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def mlp_width(target_params: float) -> int:
    """Hidden width whose MLP has the parameter count closest to `target_params`."""
    # The count is quadratic in the width: solve, then look at the integer neighbours.
    a = MLP_HIDDEN_LAYERS - 1
    b = MLP_INPUTS + MLP_OUTPUTS + MLP_HIDDEN_LAYERS
    c = MLP_OUTPUTS - target_params
    root = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    candidates = [max(1, math.floor(root)), math.ceil(root)]
    return min(candidates, key=lambda w: abs(mlp_param_count(w) - target_params))


def mlp_workload(name: str, target_params: float, seed: int) -> Workload:
    width = mlp_width(target_params)
    sizes = [MLP_INPUTS] + [width] * MLP_HIDDEN_LAYERS + [MLP_OUTPUTS]
    key = jax.random.key(seed)
    param_key, x_key, y_key = jax.random.split(key, 3)
    layer_keys = jax.random.split(param_key, len(sizes) - 1)
    params = [_dense(k, a, b) for k, a, b in zip(layer_keys, sizes[:-1], sizes[1:])]
    x = jax.random.normal(x_key, (BATCH, MLP_INPUTS), jnp.float32)
    y = jax.random.normal(y_key, (BATCH, MLP_OUTPUTS), jnp.float32)
    return Workload(
        name=name,
        kind="mlp",
        description=f"tanh MLP {'-'.join(map(str, sizes))}, batch {BATCH}",
        fn=mlp_loss,
        params=params,
        args=(x, y),
        planted_leaf="[1]['w']",
        config={"sizes": sizes},
    )


# ---------------------------------------------------------------------------------------------
# Transformer block

LAYER_NORM_EPS = 1e-5
# Masked attention logits: finite, so no inf - inf appears in finite differences.
MASKED_LOGIT = -1e9


def layer_norm(x, p):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + LAYER_NORM_EPS) * p["scale"] + p["bias"]


def transformer_block(params, x, num_heads: int):
    """Pre-layernorm block: causal multi-head self-attention and a GELU MLP, with residuals."""
    batch, seq, d_model = x.shape
    head_dim = d_model // num_heads
    h = layer_norm(x, params["ln1"])
    qkv = h @ params["attn"]["qkv"]["w"] + params["attn"]["qkv"]["b"]
    q, k, v = (t.reshape(batch, seq, num_heads, head_dim) for t in jnp.split(qkv, 3, axis=-1))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    weights = jax.nn.softmax(jnp.where(causal, logits, MASKED_LOGIT), axis=-1)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, seq, d_model)
    x = x + attended @ params["attn"]["out"]["w"] + params["attn"]["out"]["b"]
    h = layer_norm(x, params["ln2"])
    hidden = jax.nn.gelu(h @ params["mlp"]["fc1"]["w"] + params["mlp"]["fc1"]["b"])
    return x + hidden @ params["mlp"]["fc2"]["w"] + params["mlp"]["fc2"]["b"]


def _layer_norm_params(key, d_model: int) -> dict:
    scale_key, bias_key = jax.random.split(key)
    return {
        "scale": 1.0 + 0.1 * jax.random.normal(scale_key, (d_model,), jnp.float32),
        "bias": 0.1 * jax.random.normal(bias_key, (d_model,), jnp.float32),
    }


def transformer_workload(
    name: str, seed: int, d_model=128, num_heads=4, seq=32, batch=8, mlp_ratio=4
) -> Workload:
    keys = jax.random.split(jax.random.key(seed), 7)
    params = {
        "ln1": _layer_norm_params(keys[0], d_model),
        "attn": {
            "qkv": _dense(keys[1], d_model, 3 * d_model),
            "out": _dense(keys[2], d_model, d_model),
        },
        "ln2": _layer_norm_params(keys[3], d_model),
        "mlp": {
            "fc1": _dense(keys[4], d_model, mlp_ratio * d_model),
            "fc2": _dense(keys[5], mlp_ratio * d_model, d_model),
        },
    }
    x = jax.random.normal(keys[6], (batch, seq, d_model), jnp.float32)

    def transformer_loss(params, x):
        return jnp.mean(transformer_block(params, x, num_heads) ** 2)

    return Workload(
        name=name,
        kind="transformer",
        description=(
            f"pre-LN transformer block, d_model {d_model}, {num_heads} heads, seq {seq}, "
            f"batch {batch}"
        ),
        fn=transformer_loss,
        params=params,
        args=(x,),
        planted_leaf="['attn']['out']['w']",
        config={"num_heads": num_heads, "d_model": d_model, "seq": seq, "batch": batch},
    )


# ---------------------------------------------------------------------------------------------
# CNN


def conv_same(x, w, b):
    out = jax.lax.conv_general_dilated(
        x, w, window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return out + b


def cnn_loss(params, x, y):
    """Two 3x3 tanh convolutions and a dense head, mean squared error against fixed targets."""
    h = jnp.tanh(conv_same(x, params["conv1"]["w"], params["conv1"]["b"]))
    h = jnp.tanh(conv_same(h, params["conv2"]["w"], params["conv2"]["b"]))
    out = h.reshape(h.shape[0], -1) @ params["head"]["w"] + params["head"]["b"]
    return jnp.mean((out - y) ** 2)


def _conv(key, in_channels: int, out_channels: int) -> dict:
    w_key, b_key = jax.random.split(key)
    fan_in = 9 * in_channels
    return {
        "w": jax.random.normal(w_key, (3, 3, in_channels, out_channels), jnp.float32)
        / math.sqrt(fan_in),
        "b": 0.1 * jax.random.normal(b_key, (out_channels,), jnp.float32),
    }


def cnn_workload(name: str, seed: int, channels=(32, 32), image=(16, 16, 3), batch=8, outputs=10):
    keys = jax.random.split(jax.random.key(seed), 5)
    height, width, in_channels = image
    params = {
        "conv1": _conv(keys[0], in_channels, channels[0]),
        "conv2": _conv(keys[1], channels[0], channels[1]),
        "head": _dense(keys[2], height * width * channels[1], outputs),
    }
    x = jax.random.normal(keys[3], (batch, height, width, in_channels), jnp.float32)
    y = jax.random.normal(keys[4], (batch, outputs), jnp.float32)
    return Workload(
        name=name,
        kind="cnn",
        description=(
            f"CNN conv3x3 {in_channels}->{channels[0]}->{channels[1]} + dense {outputs}, "
            f"inputs {batch}x{height}x{width}x{in_channels} (NHWC)"
        ),
        fn=cnn_loss,
        params=params,
        args=(x, y),
        planted_leaf="['conv2']['w']",
        config={"channels": list(channels), "image": list(image), "batch": batch},
    )


# ---------------------------------------------------------------------------------------------


# Builders by name; lazy, so --only does not allocate the 1e7-parameter model.
FULL_WORKLOADS: dict[str, Callable[[], Workload]] = {
    "mlp-1e4": functools.partial(mlp_workload, "mlp-1e4", 1e4, seed=1),
    "mlp-1e5": functools.partial(mlp_workload, "mlp-1e5", 1e5, seed=2),
    "mlp-1e6": functools.partial(mlp_workload, "mlp-1e6", 1e6, seed=3),
    "mlp-1e7": functools.partial(mlp_workload, "mlp-1e7", 1e7, seed=4),
    "transformer": functools.partial(transformer_workload, "transformer", seed=5),
    "cnn": functools.partial(cnn_workload, "cnn", seed=6),
}
QUICK_WORKLOADS: dict[str, Callable[[], Workload]] = {
    "mlp-1e3": functools.partial(mlp_workload, "mlp-1e3", 1e3, seed=0),
    "mlp-1e4": FULL_WORKLOADS["mlp-1e4"],
}


def plant_bug(fn: Callable, leaf_path: str, scale: float = BUG_SCALE) -> Callable:
    """`fn` with the gradient of one parameter leaf multiplied by `scale` (forward unchanged)."""

    @jax.custom_vjp
    def scale_gradient(x):
        return x

    def forward(x):
        return x, None

    def backward(_, cotangent):
        return (cotangent * scale,)

    scale_gradient.defvjp(forward, backward)

    def buggy_fn(params, *args):
        paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
        paths = [jax.tree_util.keystr(path) for path, _ in paths_and_leaves]
        if leaf_path not in paths:
            raise KeyError(f"no parameter leaf {leaf_path}; leaves are {paths}")
        leaves = [
            scale_gradient(leaf) if path == leaf_path else leaf
            for path, (_, leaf) in zip(paths, paths_and_leaves)
        ]
        return fn(jax.tree_util.tree_unflatten(treedef, leaves), *args)

    return buggy_fn
