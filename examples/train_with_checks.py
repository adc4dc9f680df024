"""Gradient checks during training: a custom_vjp layer that goes wrong after some steps.

An MLP is trained with optax on synthetic data. Its hidden layer is a fused dense + SiLU
`jax.custom_vjp` whose backward pass is right for small pre-activations and 5 % off where
they pass a threshold, which training reaches only after some steps (the weights grow).
`jaxcheck.gradient_health` watches every gradient leaf on every step, inside the jitted
step; `jaxcheck.PeriodicCheck` checks the gradient every N steps on the current parameters
and a fixed check batch. One batch has corrupted labels, which the health flags mark as an
exploding gradient.

    python examples/train_with_checks.py            # caught at the first check after it starts
    python examples/train_with_checks.py --healthy  # right backward: every check passes

It prints one line per check and writes a plot (matplotlib; `pip install "jaxcheck[examples]"`).
"""

import argparse
import io
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxcheck

THRESHOLD = 2.5  # |pre-activation| past which the planted bug is live
FEATURES, HIDDEN = 8, 32


def make_layer(buggy: bool):
    """`silu(x @ w + b)` as one custom_vjp "kernel"; `buggy` plants the large-value bug."""

    @jax.custom_vjp
    def fused_dense_silu(w, b, x):
        z = x @ w + b
        return z * jax.nn.sigmoid(z)

    def fwd(w, b, x):
        z = x @ w + b
        s = jax.nn.sigmoid(z)
        return z * s, (w, x, z, s)

    def bwd(res, g):
        w, x, z, s = res
        dz = g * (s + z * s * (1.0 - s))
        if buggy:  # the kernel's path for large values scales the local derivative wrongly
            dz = jnp.where(jnp.abs(z) > THRESHOLD, 1.05 * dz, dz)
        return x.T @ dz, jnp.sum(dz, axis=0), dz @ w.T

    fused_dense_silu.defvjp(fwd, bwd)
    return fused_dense_silu


def init(key):
    k1, k2, k3 = jax.random.split(key, 3)

    def dense(k, n_in, n_out, scale=1.0):
        w = scale * jax.random.normal(k, (n_in, n_out), jnp.float32) / np.sqrt(n_in)
        return {"w": w, "b": jnp.zeros(n_out, jnp.float32)}

    # Small hidden weights: the pre-activations start near 1 and grow while training.
    return {
        "hidden": dense(k1, FEATURES, HIDDEN, 0.2),
        "middle": dense(k2, HIDDEN, HIDDEN),
        "out": dense(k3, HIDDEN, 1),
    }


def make_loss(layer):
    def loss(params, x, y):
        h = layer(params["hidden"]["w"], params["hidden"]["b"], x)
        h = jnp.tanh(h @ params["middle"]["w"] + params["middle"]["b"])
        pred = (h @ params["out"]["w"] + params["out"]["b"])[:, 0]
        return jnp.mean((pred - y) ** 2)

    return loss


def data(n, key):
    """A target that needs large hidden pre-activations: steep ramps of random projections."""
    kx, ka = jax.random.split(key)
    x = jax.random.normal(kx, (n, FEATURES), jnp.float32)
    a = jax.random.normal(ka, (FEATURES, 4), jnp.float32)
    y = jnp.sum(jax.nn.relu(3.0 * x @ a) ** 1.5, axis=1) / 10.0
    return x, y


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--healthy", action="store_true", help="the right backward pass")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=25, help="check every N steps")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--corrupt-step", type=int, default=60, help="-1: no corrupted batch")
    parser.add_argument(
        "--plot", default=str(Path(__file__).parents[1] / "docs" / "train_with_checks.png")
    )
    args = parser.parse_args(argv)

    loss = make_loss(make_layer(buggy=not args.healthy))
    params = init(jax.random.key(0))
    x, y = data(4096, jax.random.key(1))
    check_x, check_y = x[:256], y[:256]  # the check looks at a fixed batch
    opt = optax.chain(jaxcheck.gradient_health(), optax.adam(3e-3))
    state = opt.init(params)
    check = jaxcheck.PeriodicCheck(loss, every=args.every, num_directions=16)

    @jax.jit
    def step(params, state, xb, yb):
        grads = jax.grad(loss)(params, xb, yb)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    @jax.jit
    def largest_activation(params):  # ground truth for the report, not used by the checks
        w, b = params["hidden"]["w"], params["hidden"]["b"]
        return jnp.max(jnp.abs(check_x @ w + b))

    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: one line per check is the progress
        tqdm = None
    steps = range(args.steps)
    bar = tqdm(steps, leave=False, disable=None) if tqdm else None
    say = bar.write if bar else print

    rng = np.random.default_rng(0)
    norms, flags, largest = [], [], []
    train_seconds = 0.0
    for i in bar or steps:
        report = check(i, params, check_x, check_y)
        if report is not None:
            r = check.history[-1]
            failing = f"  wrong: {', '.join(r.failing)}" if r.failing else ""
            say(
                f"step {i:4d}  check {r.status.value.upper():4s}  relative error "
                f"{r.relative_error:.1e}  tolerance {r.tolerance:.1e}  ({r.seconds:.2f} s)"
                f"{failing}"
            )
        rows = rng.integers(0, x.shape[0], args.batch)
        xb, yb = x[rows], y[rows]
        if i == args.corrupt_step:
            yb = yb * 50.0  # a corrupted batch: the health flags mark it as exploding
        start = time.perf_counter()
        params, state = step(params, state, xb, yb)
        jax.block_until_ready(params)
        train_seconds += time.perf_counter() - start
        h = state[0]
        norms.append(h.grad_norm)  # device arrays: read once at the end, not per step
        flags.append(jnp.stack([h.vanishing, h.exploding, h.nonfinite]))
        largest.append(largest_activation(params))
    if bar:
        bar.close()

    norms, flags, largest = np.asarray(norms), np.asarray(flags), np.asarray(largest)
    print(jaxcheck.health(state))
    print(
        f"checks: {len(check.history)}, {check.seconds:.1f} s = "
        f"{100 * check.cost_fraction(train_seconds):.0f} % of the training time "
        f"({train_seconds:.1f} s)"
    )
    live = np.flatnonzero(largest > THRESHOLD)
    # `largest[i]` is measured after step i, so the bug is live from check step i + 1 on.
    start = int(live[0]) + 1 if live.size else None
    first = check.first_failure
    if args.healthy:
        print(
            "healthy run: every check passed"
            if first is None
            else f"healthy run: a check FAILED at step {first}"
        )
    elif start is None:
        print(f"the activations never passed {THRESHOLD}: the bug never went live")
    else:
        caught = next((r for r in check.history if r.step >= start), None)
        print(
            f"bug live from step {start} (a pre-activation past {THRESHOLD}); first failing "
            f"check at step {first}"
            + (
                f", the first check after it starts, naming {', '.join(caught.failing)}"
                if caught is not None and caught.step == first
                else ""
            )
        )
        if first is not None:
            print(check.history[[r.step for r in check.history].index(first)].report)
    plot(args.plot, check, norms, flags, list(state[0].paths), start, args.healthy)
    return 0 if (first is None) == args.healthy else 1


def plot(path, check, norms, flags, paths, start, healthy):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6.0), sharex=True, dpi=80)
    steps = [r.step for r in check.history]
    errors = [r.relative_error for r in check.history]
    top.semilogy(steps, errors, "-", color="0.6", lw=1)
    for r in check.history:
        top.semilogy(
            r.step,
            r.relative_error,
            "o" if r.ok else "X",
            color="tab:green" if r.ok else "tab:red",
            ms=7,
        )
    top.semilogy(
        steps, [r.tolerance for r in check.history], "--", color="k", lw=1, label="tolerance"
    )
    if start is not None:
        top.axvline(start, color="tab:red", lw=1, ls=":", label=f"bug live (|z| > {THRESHOLD})")
    top.set_ylabel("gradient relative error")
    top.set_title(
        "train_with_checks.py"
        + (" --healthy" if healthy else "")
        + f": check every {check.every} steps (o pass, x fail)",
        fontsize=10,
    )
    top.legend(fontsize=8, loc="center right")

    x = np.arange(norms.shape[0])
    for j, name in enumerate(paths):
        if name.endswith("['w']"):
            bottom.semilogy(x, norms[:, j], lw=1, label=name)
    for k, (marker, label) in enumerate(
        [("v", "vanishing"), ("^", "exploding"), ("*", "non-finite")]
    ):
        hit = np.argwhere(flags[:, k, :])
        hit = hit[[paths[j].endswith("['w']") for j in hit[:, 1]]] if hit.size else hit
        if hit.size:
            bottom.semilogy(
                hit[:, 0],
                np.nan_to_num(norms[hit[:, 0], hit[:, 1]], nan=1.0),
                marker,
                color="tab:red",
                ms=8,
                ls="none",
                label=label,
            )
    bottom.set_xlabel("step")
    bottom.set_ylabel("gradient norm per layer")
    bottom.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    # A 64-colour palette keeps the committed PNG at a few tens of KB.
    from PIL import Image

    Image.open(buffer).convert("RGB").quantize(64).save(path, optimize=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
