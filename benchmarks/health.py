"""Cost of checks during training, on a jitted Adam step of a ~1e6-parameter MLP.

1. `gradient_health` overhead: the same jitted step with and without it in the optax chain,
   timed in interleaved rounds (A, B, B, A, ...) of `--steps` steps each; the ratio of the
   medians is reported, and the per-round ratios' spread.
2. A gradient check every 100 steps: the warm time of `jaxcheck.PeriodicCheck`'s check
   (K = 16 directions, float64 reference, default options) on the trained parameters, on a
   whole training batch and on 16 of its examples, as a fraction of the wall time of the
   100 training steps it covers; the first, compiling check is reported separately.

    python benchmarks/health.py            # about a minute on 2 CPU cores
    python benchmarks/health.py --quick    # a smaller MLP, a few seconds
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxcheck


def mlp(sizes, key):
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, k = jax.random.split(key)
        w = jax.random.normal(k, (n_in, n_out), jnp.float32) / np.sqrt(n_in)
        params[f"layer{i}"] = {"w": w, "b": jnp.zeros(n_out, jnp.float32)}
    return params


def loss(params, x, labels):
    h = x
    for i in range(len(params)):
        p = params[f"layer{i}"]
        h = h @ p["w"] + p["b"]
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(h, labels))


def make_step(opt):
    @jax.jit
    def step(params, state, x, labels):
        grads = jax.grad(loss)(params, x, labels)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def run_steps(step, params, state, batches, n):
    """Wall and process CPU seconds of n steps (CPU time is what other processes on a shared
    machine disturb least)."""
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        x, labels = batches[i % len(batches)]
        params, state = step(params, state, x, labels)
    jax.block_until_ready((params, state))
    return (time.perf_counter() - start, time.process_time() - cpu), params, state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds per variant")
    parser.add_argument("--steps", type=int, default=25, help="training steps per round")
    parser.add_argument("--checks", type=int, default=5, help="warm checks timed")
    args = parser.parse_args(argv)

    sizes = (64, 128, 10) if args.quick else (784, 1024, 256, 10)
    batch = 128
    params = mlp(sizes, jax.random.key(0))
    num_params = sum(x.size for x in jax.tree.leaves(params))
    r = np.random.default_rng(0)
    batches = [
        (
            jnp.asarray(r.standard_normal((batch, sizes[0])), jnp.float32),
            jnp.asarray(r.integers(0, sizes[-1], batch), jnp.int32),
        )
        for _ in range(4)
    ]
    plain = optax.adam(1e-3)
    watched = optax.chain(jaxcheck.gradient_health(), optax.adam(1e-3))
    variants = {"adam": (make_step(plain), plain), "health+adam": (make_step(watched), watched)}
    state = {name: opt.init(params) for name, (_, opt) in variants.items()}
    current = {name: params for name in variants}
    for name, (step, _) in variants.items():  # compile and warm up
        _, current[name], state[name] = run_steps(step, current[name], state[name], batches, 5)

    times = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    order = list(variants)
    for i in range(args.rounds):
        for name in order if i % 2 == 0 else order[::-1]:
            step = variants[name][0]
            (seconds, cpu_seconds), current[name], state[name] = run_steps(
                step, current[name], state[name], batches, args.steps
            )
            times[name].append(seconds / args.steps)
            cpu[name].append(cpu_seconds / args.steps)
    print(
        f"MLP {sizes}, {num_params:,} parameters, batch {batch}, float32, "
        f"{jax.devices()[0].platform} x{jax.device_count()}"
    )
    for label, t in (("wall", times), ("CPU", cpu)):
        med = {name: statistics.median(v) for name, v in t.items()}
        per_round = sorted(a / b for a, b in zip(t["health+adam"], t["adam"]))
        print(
            f"{label} time per step: adam {1e3 * med['adam']:.2f} ms, gradient_health + adam "
            f"{1e3 * med['health+adam']:.2f} ms: overhead {med['health+adam'] / med['adam']:.3f}x"
            f" (medians of {args.rounds} interleaved rounds x {args.steps} steps; per-round "
            f"ratios {per_round[0]:.3f}..{per_round[-1]:.3f}, median "
            f"{statistics.median(per_round):.3f})"
        )
    med = {name: statistics.median(v) for name, v in times.items()}
    summary = jaxcheck.health(state["health+adam"])
    assert summary.steps > 0 and not any(leaf.nonfinite_steps for leaf in summary.leaves)

    p = current["health+adam"]
    x, labels = batches[0]
    step_seconds = med["health+adam"]
    for rows in (batch, 16):
        check = jaxcheck.PeriodicCheck(loss, every=100, num_directions=16)
        for k in range(args.checks + 1):
            report = check(100 * k, p, x[:rows], labels[:rows])
            assert report.ok, str(report)
        for record in check.history:
            rep = record.report
            print(
                f"  check at step {record.step} on {rows} examples: {rep.status.value}, "
                f"{record.seconds:.2f} s (compile {rep.compile_seconds:.2f} s, "
                f"{rep.num_compiled} programs), {rep.num_evaluations} evaluations of the loss"
            )
        cold = check.history[0].seconds
        warm = statistics.median(r.seconds for r in check.history[1:])
        fraction = warm / (100 * step_seconds)
        print(
            f"check every 100 steps on {rows} examples of the batch: warm check "
            f"{1e3 * warm:.0f} ms (median of {args.checks}; first check with compilation "
            f"{cold:.2f} s) = {100 * fraction:.1f} % of 100 training steps "
            f"({1e3 * 100 * step_seconds:.0f} ms wall)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
