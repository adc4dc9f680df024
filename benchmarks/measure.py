"""The measurements: each method on one workload, returning plain (JSON-ready) dicts."""

import contextlib
import datetime
import importlib.metadata
import importlib.util
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.test_util import check_grads
from workloads import BUG_SCALE, Workload, plant_bug

import jaxcheck

# Fast calls are repeated until their total reaches this, since one call's time is mostly noise.
MIN_TOTAL_SECONDS = 0.05
MAX_REPEATS = 1000
# Bytes of perturbed parameter copies one chunk of coordinate-wise differences may hold.
COORDINATE_CHUNK_BYTES = 64 * 2**20
COORDINATE_STEP = 1e-3


def enable_x64():
    """A context with 64-bit types on (jax.enable_x64 in new jax, jax.experimental before)."""
    if callable(getattr(jax, "enable_x64", None)):
        return jax.enable_x64(True)
    from jax import experimental

    return experimental.enable_x64(True)


def cast_floats(tree, dtype):
    """`tree` with its floating-point leaves cast to `dtype` (as jaxcheck's reference does with
    params and args alike: a float32 input would otherwise pull parts of fn to float32)."""

    def cast(leaf):
        return leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

    return jax.tree_util.tree_map(cast, tree)


def median_seconds(call: Callable, repeats: int, warm_up: bool = True) -> tuple[float, int]:
    """Median wall time of `call()` (results waited for), after one untimed call unless
    `warm_up` is False, and the number of timed calls."""
    if warm_up:
        jax.block_until_ready(call())
    times = []
    while len(times) < repeats or (sum(times) < MIN_TOTAL_SECONDS and len(times) < MAX_REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(times)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_info(torch_version: str | None) -> dict:
    devices = jax.devices()
    return {
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        "jaxcheck": jaxcheck.__version__,
        "torch": torch_version,
        "numpy": importlib.metadata.version("numpy"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        # Other work on the machine skews every time; this says how busy it was.
        "load_average_at_start": load_average(),
    }


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, where the system reports them."""
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None


def warm_up() -> float:
    """One-time costs (backend start, first compilation, imports) are kept out of the first
    workload's numbers."""

    def tiny(params, x):
        return jnp.sum(jnp.tanh(params * x))

    start = time.perf_counter()
    params, x = jnp.linspace(0.1, 0.5, 4), jnp.arange(4.0)
    jax.block_until_ready(jax.jit(jax.value_and_grad(tiny))(params, x))
    jaxcheck.Checker(tiny, num_directions=4)(params, x)
    return time.perf_counter() - start


def _leaf_summary(report) -> list[dict]:
    return [
        {"path": leaf.path, "relative_error": leaf.relative_error, "status": str(leaf.status)}
        for leaf in report.leaves
    ]


def _checker(fn, num_directions: int, sequential: bool):
    """A `Checker` with sequential directions (the default) or a fixed K; None where this
    jaxcheck has no `sequential` option (fixed K is all it does)."""
    if sequential:
        return jaxcheck.Checker(fn, num_directions=num_directions)
    try:
        return jaxcheck.Checker(fn, num_directions=num_directions, sequential=False)
    except TypeError:
        return None


def _directions(report, num_directions: int) -> dict:
    """How many directions a report's verdict took, of how many, and why it stopped."""
    return {
        "num_directions": report.num_directions,
        "max_directions": getattr(report, "max_directions", 0) or num_directions,
        "stopped": getattr(report, "stopped", ""),
    }


def run_jaxcheck(workload: Workload, num_directions: int, repeats: int, sequential=True) -> dict:
    """A `Checker`'s cold call, then warm calls (which must compile nothing); with
    `sequential=False`, the fixed-K check."""
    checker = _checker(workload.fn, num_directions, sequential)
    if checker is None:
        return {"skipped": "this jaxcheck has no sequential option: every check is fixed-K"}
    start = time.perf_counter()
    cold = checker(workload.params, *workload.args)
    cold_wall = time.perf_counter() - start
    # the same protocol as the floor's timings: one untimed warm call, then at least
    # `repeats` calls and until they add up to MIN_TOTAL_SECONDS
    warm = checker(workload.params, *workload.args)
    warm_times, warm_compiled = [], [warm.num_compiled]
    while len(warm_times) < repeats or (
        sum(warm_times) < MIN_TOTAL_SECONDS and len(warm_times) < MAX_REPEATS
    ):
        start = time.perf_counter()
        warm = checker(workload.params, *workload.args)
        warm_times.append(time.perf_counter() - start)
        warm_compiled.append(warm.num_compiled)
    return {
        "status": str(cold.status),
        "warm_status": str(warm.status),
        "relative_error": cold.relative_error,
        "interval": list(cold.interval),
        "tolerance": cold.tolerance,
        "noise_floor": cold.noise_floor,
        "leaves": _leaf_summary(cold),
        "reference_dtype": cold.reference_dtype,
        **_directions(cold, num_directions),
        "warm_num_directions": warm.num_directions,
        "num_evaluations": cold.num_evaluations,
        "stencil_points": cold.stencil_points,
        "peak_memory_bytes": cold.peak_memory_bytes,
        "warm_peak_memory_bytes": warm.peak_memory_bytes,
        "cold_wall_seconds": cold_wall,
        "compile_seconds": cold.compile_seconds,
        "cold_run_seconds": cold.run_seconds,
        "cold_num_compiled": cold.num_compiled,
        "warm_seconds": statistics.median(warm_times),
        "warm_seconds_all": warm_times,
        "warm_run_seconds": warm.run_seconds,
        "warm_num_compiled": warm_compiled,
        "warm_compiles_nothing": all(n == 0 for n in warm_compiled),
        "checker_compilations": checker.compilations,
    }


def run_floor(workload: Workload, reference_dtype: str, repeats: int) -> dict:
    """Warm times of one jitted forward and value_and_grad (float32), of the forward in the
    reference dtype (params and float args cast), and the compile time of value_and_grad."""
    fn, params, args = workload.fn, workload.params, workload.args
    forward = jax.jit(fn)
    t_fwd, n_fwd = median_seconds(lambda: forward(params, *args), repeats)
    value_and_grad = jax.jit(jax.value_and_grad(fn))
    t_vg, n_vg = median_seconds(lambda: value_and_grad(params, *args), repeats)

    wide = reference_dtype == "float64"
    with enable_x64() if wide else contextlib.nullcontext():
        params_ref, args_ref = cast_floats((params, args), reference_dtype)
        forward_ref = jax.jit(fn)
        t_fwd_ref, n_fwd_ref = median_seconds(lambda: forward_ref(params_ref, *args_ref), repeats)
        stats = forward_ref.lower(params_ref, *args_ref).compile().memory_analysis()
    activation_bytes = getattr(stats, "temp_size_in_bytes", None)

    # A fresh function, so no trace or compilation of `fn` is reused.
    def fresh(params, *args):
        return fn(params, *args)

    start = time.perf_counter()
    jax.jit(jax.value_and_grad(fresh)).lower(params, *args).compile()
    t_compile_vg = time.perf_counter() - start
    return {
        "t_fwd": t_fwd,
        "t_fwd_calls": n_fwd,
        "t_vg": t_vg,
        "t_vg_calls": n_vg,
        "t_fwd_ref": t_fwd_ref,
        "t_fwd_ref_calls": n_fwd_ref,
        "reference_dtype": reference_dtype,
        "activation_bytes_ref": activation_bytes,
        "t_compile_vg": t_compile_vg,
    }


def _check_grads_calls(loss, params, calls: int) -> tuple[float, int]:
    """Seconds for `calls` calls of check_grads and how many raised AssertionError."""
    alarms = 0
    start = time.perf_counter()
    for _ in range(calls):
        try:
            check_grads(loss, (params,), order=1, modes=["rev"])
        except AssertionError:
            alarms += 1
    return time.perf_counter() - start, alarms


def run_check_grads(fn: Callable, workload: Workload, calls: int) -> dict:
    """jax.test_util.check_grads `calls` times after one warm-up call."""

    def loss(params):
        return fn(params, *workload.args)

    start = time.perf_counter()
    _, warmup_alarms = _check_grads_calls(loss, workload.params, 1)
    warmup = time.perf_counter() - start
    seconds, alarms = _check_grads_calls(loss, workload.params, calls)
    return {
        "calls": calls,
        "seconds": seconds,
        "seconds_per_call": seconds / calls,
        "warmup_seconds": warmup,
        "assertion_errors": alarms,
        "warmup_assertion_errors": warmup_alarms,
    }


def torch_version() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return None
    return importlib.metadata.version("torch")


def run_torch_gradcheck(workload: Workload, calls: int, device: str) -> dict:
    """torch.autograd.gradcheck(fast_mode=True) on the float64 torch model, `calls` times
    after one warm-up call."""
    import torch
    import torch_models

    if device == "cuda" and not torch.cuda.is_available():
        return {"skipped": "torch sees no CUDA device"}
    torch.manual_seed(0)
    loss, inputs = torch_models.build(workload, device)
    with enable_x64():
        params64, args64 = cast_floats((workload.params, workload.args), jnp.float64)
        jax_loss = float(workload.fn(params64, *args64))
    with torch.no_grad():
        torch_loss = float(loss(*inputs))
    loss_difference = abs(torch_loss - jax_loss) / max(abs(jax_loss), 1e-300)

    def gradcheck() -> bool:
        return torch.autograd.gradcheck(loss, inputs, fast_mode=True, raise_exception=False)

    start = time.perf_counter()
    warmup_ok = gradcheck()
    warmup = time.perf_counter() - start
    failures = 0
    start = time.perf_counter()
    for _ in range(calls):
        failures += not gradcheck()
    seconds = time.perf_counter() - start
    return {
        "calls": calls,
        "seconds": seconds,
        "seconds_per_call": seconds / calls,
        "warmup_seconds": warmup,
        "failures": failures,
        "warmup_failed": not warmup_ok,
        "loss_relative_difference_to_jax": loss_difference,
        "device": device,
        "torch_threads": torch.get_num_threads(),
    }


def run_coordinate_fd(workload: Workload, repeats: int) -> dict:
    """Central differences along every coordinate (2n float32 evaluations), against jax.grad."""
    fn, args = workload.fn, workload.args
    flat, unravel = ravel_pytree(workload.params)
    n = flat.size
    chunk = int(max(1, min(n, COORDINATE_CHUNK_BYTES // (2 * n * flat.dtype.itemsize))))
    num_chunks = math.ceil(n / chunk)
    # Padding indices repeat the last coordinate; their results are dropped.
    indices = jnp.minimum(jnp.arange(num_chunks * chunk), n - 1).reshape(num_chunks, chunk)

    def flat_loss(x):
        return fn(unravel(x), *args)

    @jax.jit
    def coordinate_differences(x):
        steps = COORDINATE_STEP * jnp.maximum(jnp.abs(x), 1.0)

        def one(i):
            offset = jnp.zeros_like(x).at[i].set(steps[i])
            return (flat_loss(x + offset) - flat_loss(x - offset)) / (2 * steps[i])

        return jax.lax.map(jax.vmap(one), indices).reshape(-1)[:n]

    start = time.perf_counter()
    numeric = jax.block_until_ready(coordinate_differences(flat))
    cold = time.perf_counter() - start
    # The cold call above was the warm-up; at 2n evaluations a second one costs seconds.
    seconds, timed = median_seconds(lambda: coordinate_differences(flat), repeats, warm_up=False)
    analytic = jax.jit(jax.grad(flat_loss))(flat)
    numeric, analytic = np.asarray(numeric, np.float64), np.asarray(analytic, np.float64)
    error = numeric - analytic
    return {
        "num_params": n,
        "evaluations": 2 * n,
        "chunk": chunk,
        "step": f"{COORDINATE_STEP} * max(|x|, 1)",
        "cold_seconds": cold,
        "seconds": seconds,
        "timed_calls": timed,
        "max_relative_error": float(np.max(np.abs(error)) / np.max(np.abs(analytic))),
        "norm_relative_error": float(np.linalg.norm(error) / np.linalg.norm(analytic)),
    }


def _caught(buggy, workload: Workload, num_directions: int, sequential: bool) -> dict | None:
    """One warm jaxcheck call on a buggy model: its verdict, directions and time."""
    checker = _checker(buggy, num_directions, sequential)
    if checker is None:
        return None
    checker(workload.params, *workload.args)
    start = time.perf_counter()
    report = checker(workload.params, *workload.args)
    warm = time.perf_counter() - start
    return {
        "status": str(report.status),
        "relative_error": report.relative_error,
        "interval": list(report.interval),
        "tolerance": report.tolerance,
        "failing_leaves": [leaf.path for leaf in report.leaves if leaf.status != "pass"],
        "leaves": _leaf_summary(report),
        "num_evaluations": report.num_evaluations,
        **_directions(report, num_directions),
        "warm_seconds": warm,
        "warm_num_compiled": report.num_compiled,
    }


def run_planted_bug(
    workload: Workload, num_directions: int, check_grads_calls: int, scale: float = BUG_SCALE
) -> dict:
    """jaxcheck (warm, sequential and fixed-K) and check_grads on the workload with one
    leaf's gradient scaled by `scale`; check_grads only for the default 0.1 % bug."""
    buggy = plant_bug(workload.fn, workload.planted_leaf, scale)
    out = {
        "planted_leaf": workload.planted_leaf,
        "gradient_scale": scale,
        "jaxcheck": _caught(buggy, workload, num_directions, True),
        "jaxcheck_fixed": _caught(buggy, workload, num_directions, False),
    }
    if scale != BUG_SCALE:
        return out
    grads = run_check_grads(buggy, workload, check_grads_calls)
    return out | {
        "check_grads": {
            "calls": check_grads_calls,
            "assertion_errors": grads["assertion_errors"],
            "caught": grads["assertion_errors"] > 0,
            "warmup_assertion_errors": grads["warmup_assertion_errors"],
            "seconds": grads["seconds"],
        },
    }


def _batched_whole(workload: Workload, k: int, itemsize: int) -> bool:
    """Whether jaxcheck's own plan (`_plan.make_plan`, as `verify` calls it) batches every
    direction of `workload` at once."""
    from jaxcheck import _plan  # noqa: PLC0415 - the library's own rule, not a copy

    plan = _plan.make_plan(
        jax.tree_util.tree_leaves(workload.params),
        k,
        2,  # stencil points per direction
        itemsize,
        chunk_size=None,
        budget=None,
        direction_sharding=None,
        other_elements=sum(np.size(x) for x in jax.tree_util.tree_leaves(workload.args)),
    )
    return plan.chunk is None


def memory_summary(workload: Workload, jaxcheck_result: dict, floor: dict, device: str) -> dict:
    """Peak memory of jaxcheck's programs next to the bound documented in README.md,
    params * itemsize_ref * (2 chunk + 5) + 2 chunk * activations (two perturbed copies per
    direction in flight)."""
    n = workload.num_params
    k = jaxcheck_result["max_directions"]
    itemsize = np.dtype(jaxcheck_result["reference_dtype"]).itemsize
    # One direction per chunk on CPU, but all K for a problem small enough to be batched
    # whole there too (jaxcheck's own plan); on GPU assume all K at once.
    chunk = 1 if device == "cpu" and not _batched_whole(workload, k, itemsize) else k
    activations = floor["activation_bytes_ref"] or 0
    peak = jaxcheck_result["peak_memory_bytes"]

    def bound(chunk: int) -> int:
        return n * itemsize * (2 * chunk + 5) + 2 * chunk * activations

    return {
        "peak_memory_bytes": peak,
        "params_times_itemsize_bytes": n * itemsize,
        "peak_over_params_times_8": None if peak is None else peak / (n * 8),
        "chunk_assumed": chunk,
        "activation_bytes_ref": floor["activation_bytes_ref"],
        "bound_bytes": bound(chunk),
        "peak_over_bound": None if peak is None else peak / bound(chunk),
        # The same bound if all K directions ran in one chunk.
        "bound_bytes_all_directions": bound(k),
        "peak_over_bound_all_directions": None if peak is None else peak / bound(k),
    }
