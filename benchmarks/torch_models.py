"""The benchmark models in torch (float64, as gradcheck requires), weights copied from JAX."""

import math

import jax
import numpy as np
import torch
import torch.nn.functional as F
from workloads import LAYER_NORM_EPS, MASKED_LOGIT, Workload


def mlp_loss(params, x, y):
    h = x
    for layer in params[:-1]:
        h = torch.tanh(h @ layer["w"] + layer["b"])
    out = h @ params[-1]["w"] + params[-1]["b"]
    return torch.mean((out - y) ** 2)


def layer_norm(x, p):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + LAYER_NORM_EPS) * p["scale"] + p["bias"]


def transformer_loss(params, x, num_heads: int):
    batch, seq, d_model = x.shape
    head_dim = d_model // num_heads
    h = layer_norm(x, params["ln1"])
    qkv = h @ params["attn"]["qkv"]["w"] + params["attn"]["qkv"]["b"]
    q, k, v = (t.reshape(batch, seq, num_heads, head_dim) for t in qkv.chunk(3, dim=-1))
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool, device=x.device))
    weights = torch.softmax(torch.where(causal, logits, MASKED_LOGIT), dim=-1)
    attended = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, seq, d_model)
    x = x + attended @ params["attn"]["out"]["w"] + params["attn"]["out"]["b"]
    h = layer_norm(x, params["ln2"])
    # jax.nn.gelu defaults to the tanh approximation.
    hidden = F.gelu(h @ params["mlp"]["fc1"]["w"] + params["mlp"]["fc1"]["b"], approximate="tanh")
    out = x + hidden @ params["mlp"]["fc2"]["w"] + params["mlp"]["fc2"]["b"]
    return torch.mean(out**2)


def conv_same(x_nhwc, w_hwio, b):
    # torch convolves NCHW with OIHW kernels; a 3x3 "SAME" convolution pads by 1.
    out = F.conv2d(x_nhwc.permute(0, 3, 1, 2), w_hwio.permute(3, 2, 0, 1), b, padding=1)
    return out.permute(0, 2, 3, 1)


def cnn_loss(params, x, y):
    h = torch.tanh(conv_same(x, params["conv1"]["w"], params["conv1"]["b"]))
    h = torch.tanh(conv_same(h, params["conv2"]["w"], params["conv2"]["b"]))
    # Flattened in NHWC order, as in JAX, so the dense head's weights line up.
    out = h.reshape(h.shape[0], -1) @ params["head"]["w"] + params["head"]["b"]
    return torch.mean((out - y) ** 2)


def _tensor(array, device, requires_grad=False):
    data = torch.from_numpy(np.asarray(array, dtype=np.float64).copy()).to(device)
    return data.requires_grad_(requires_grad)


def build(workload: Workload, device: str):
    """`(loss, inputs)`: `loss(*inputs)` is the workload's loss of the float64 parameters
    `inputs` (flattened in JAX's leaf order); data are held fixed in float64."""
    leaves, treedef = jax.tree_util.tree_flatten(workload.params)
    inputs = tuple(_tensor(leaf, device, requires_grad=True) for leaf in leaves)
    data = tuple(_tensor(arg, device) for arg in workload.args)
    if workload.kind == "mlp":
        model = mlp_loss
    elif workload.kind == "cnn":
        model = cnn_loss
    elif workload.kind == "transformer":

        def model(params, x):
            return transformer_loss(params, x, workload.config["num_heads"])
    else:
        raise ValueError(f"no torch translation for workload kind {workload.kind!r}")

    def loss(*tensors):
        # tree_unflatten accepts any leaves: the torch tensors take the JAX parameters' places.
        return model(jax.tree_util.tree_unflatten(treedef, list(tensors)), *data)

    return loss, inputs
