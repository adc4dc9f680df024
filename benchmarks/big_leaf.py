"""One very large leaf: time to verdict against the float64 forwards a fixed-K check needs.

    python benchmarks/big_leaf.py [--size N] [--repeats R] [--out DIR]

`fn(w) = mean(sin(w) ** 2)` on a float32 leaf of N elements (default 5e7). A check with
K = 16 directions that the two-point stage settles evaluates fn 2K + 1 = 33 times in float64;
the target is a warm `jaxcheck.verify` within 1.5x of those 33 float64 forwards, with its
peak memory (XLA's own figure, `report.peak_memory_bytes`) within the bound the README
gives, N x 8 x (2c + 5) bytes with c = 1 direction in flight on CPU. A 1 % bug in the
gradient must still fail. Writes `big_leaf_<platform>.json` into DIR.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from measure import enable_x64, median_seconds

import jaxcheck

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
FORWARDS = 33  # 2K + 1 for K = 16


def loss(w):
    return jnp.mean(jnp.sin(w) ** 2)


def buggy_gradient(w):
    return jax.grad(loss)(w) * 1.01


def measure(size: int, repeats: int) -> dict:
    w = jax.random.uniform(jax.random.key(0), (size,), jnp.float32, -2.0, 2.0)
    with enable_x64():
        w64 = w.astype(jnp.float64)
        forward64 = jax.jit(loss)
        t64, _ = median_seconds(lambda: forward64(w64), repeats)

    t0 = time.perf_counter()
    cold = jaxcheck.verify(loss, w)
    cold_s = time.perf_counter() - t0
    warm_s, report = [], cold
    for _ in range(repeats):
        t0 = time.perf_counter()
        report = jaxcheck.verify(loss, w)
        warm_s.append(time.perf_counter() - t0)
    warm = statistics.median(warm_s)

    t0 = time.perf_counter()
    bug = jaxcheck.verify(loss, w, grad_fn=buggy_gradient)
    bug_s = time.perf_counter() - t0

    bound = size * 8 * (2 * 1 + 5)
    return {
        "platform": jax.devices()[0].platform,
        "jax": jax.__version__,
        "size": size,
        "float64_forward_s": t64,
        "floor_s": FORWARDS * t64,
        "cold_s": cold_s,
        "warm_s": warm,
        "warm_runs_s": warm_s,
        "warm_over_floor": warm / (FORWARDS * t64),
        "status": report.status.value,
        "directions": report.num_directions,
        "stopped": report.stopped,
        "peak_memory_bytes": report.peak_memory_bytes,
        "memory_bound_bytes": bound,
        "peak_over_bound": None
        if report.peak_memory_bytes is None
        else report.peak_memory_bytes / bound,
        "bug_1pct": {
            "status": bug.status.value,
            "seconds": bug_s,
            "directions": bug.num_directions,
        },
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=5e7, help="elements of the leaf")
    parser.add_argument("--repeats", type=int, default=3, help="warm runs (median)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the results")
    args = parser.parse_args(argv)
    if args.size < 1 or args.repeats < 1:
        parser.error("--size and --repeats must be at least 1")
    result = measure(int(args.size), args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"big_leaf_{result['platform']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{result['size']:.1e} elements: warm {result['warm_s']:.2f} s "
        f"({result['directions']} directions, {result['status']}), "
        f"33 float64 forwards {result['floor_s']:.2f} s: {result['warm_over_floor']:.2f}x "
        f"(target <= 1.5); cold {result['cold_s']:.2f} s; peak "
        f"{(result['peak_memory_bytes'] or 0) / 2**30:.2f} GiB of a "
        f"{result['memory_bound_bytes'] / 2**30:.2f} GiB bound; 1 % bug: "
        f"{result['bug_1pct']['status']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
