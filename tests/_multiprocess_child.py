"""One process of the 2-process check in `tests/test_multiprocess.py`; not a test module.

Run by path: `python _multiprocess_child.py PROCESS_ID NUM_PROCESSES PORT OUT_JSON`. It joins a
`jax.distributed` job on localhost with 4 simulated CPU devices, builds the global mesh of all
processes' devices, shards an MLP's weights over it (FSDP style), runs `jaxcheck.verify` on
the correct model, on one with a 0.1 % bug in one layer's weight gradient and on one whose
gradient there is NaN, then spreads the directions over a mesh axis that spans the
processes, and writes each report's fields (or the traceback of what `verify` raised) to
OUT_JSON so that the parent can compare them across processes.

Exit status 3 with a line "UNSUPPORTED: <why>" on stderr means this JAX cannot run CPU
collectives across processes; any other failure is a real one.
"""

import os
import re
import sys

LOCAL_DEVICES = 4

if __name__ == "__main__":  # not when the test imports the constants below
    # the device count of a process is fixed when jax starts: set it before the import,
    # replacing any count inherited from the parent
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", "")
    )
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={LOCAL_DEVICES}"
    os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax._src import lib  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxcheck  # noqa: E402
from cases import bug, mlp_data, mlp_loss, mlp_params  # noqa: E402  (this file's folder is sys.path[0])

UNSUPPORTED = 3
SIZES = (16, 64, 32, 8)  # every weight's first axis divides over the 8 global devices
BUGGY_LAYER = 1


def use_cpu_collectives() -> str:
    """Turn on gloo CPU collectives across processes under whichever option this JAX has
    (`jax_cpu_collectives_implementation`, "gloo" by default in JAX 0.10; the older boolean
    `jax_cpu_enable_gloo_collectives`); returns what was set. Raises LookupError when this
    jaxlib was built without gloo; with neither option, JAX's default is left to be tried."""
    names = set(jax.config.values)
    if not _has_gloo():
        raise LookupError("this jaxlib has no gloo collectives (no make_gloo_tcp_collectives)")
    if "jax_cpu_collectives_implementation" in names:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        return "jax_cpu_collectives_implementation=gloo"
    if "jax_cpu_enable_gloo_collectives" in names:
        jax.config.update("jax_cpu_enable_gloo_collectives", True)
        return "jax_cpu_enable_gloo_collectives=True"
    return "JAX's default (no option to set)"


def _has_gloo() -> bool:
    # where jaxlib's extension module lives has moved between versions
    holders = (
        getattr(lib, "_jax", None),
        getattr(lib, "xla_extension", None),
        getattr(getattr(lib, "xla_client", None), "_xla", None),
    )
    return any(hasattr(h, "make_gloo_tcp_collectives") for h in holders if h is not None)


def global_array(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array whose shards every process cuts from the same full host value."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def mlp(mesh: Mesh):
    """The MLP of `cases.mlp_params` / `cases.mlp_data` as global arrays: weights split along
    their first axis over "fsdp", biases and data replicated."""
    split, replicated = NamedSharding(mesh, P("fsdp")), NamedSharding(mesh, P())
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: global_array(np.asarray(x), split if path[-1].key == "w" else replicated),
        mlp_params(SIZES, jnp.float32),
    )
    x, y = (global_array(np.asarray(v), replicated) for v in mlp_data(SIZES, jnp.float32))
    return params, x, y


def fields(report) -> dict:
    return {
        "status": str(report.status.value),
        "relative_error": float(report.relative_error),
        "interval": [float(v) for v in report.interval],
        "tolerance": float(report.tolerance),
        "num_directions": int(report.num_directions),
        "failing_leaves": [leaf.path for leaf in report.leaves if leaf.status == "fail"],
        "leaves": {leaf.path: str(leaf.status.value) for leaf in report.leaves},
        # None where no finite differences were taken (a nonfinite report)
        "numeric": np.ravel(report.numeric).tolist() if report.numeric is not None else None,
        "analytic": np.ravel(report.analytic).tolist() if report.analytic is not None else None,
        "problems": all_problems(report),
        "text": str(report),
    }


def all_problems(report) -> list[str]:
    """The problems of a report and of all its parts (a composite report lists only the
    headline ones)."""
    out = list(report.problems)
    for part in report.parts:
        out += [p for p in all_problems(part) if p not in out]
    return out


def attempt(verify) -> dict:
    """The report's fields, or the traceback of what `verify()` raised. Both processes run
    the same host code on the same values, so an exception happens in both and neither is
    left waiting in a collective for the other."""
    start = time.perf_counter()
    try:
        out = fields(verify())
    except Exception:
        out = {"raised": traceback.format_exc()}
    return out | {"seconds": time.perf_counter() - start}


def checks(result: dict, num_processes: int) -> None:
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    params, x, y = mlp(mesh)
    w = params["layers"][BUGGY_LAYER]["w"]
    result["weights_fully_addressable"] = bool(w.is_fully_addressable)
    result["correct"] = attempt(lambda: jaxcheck.verify(mlp_loss(), params, x, y))
    buggy = mlp_loss(bug("scale", 1e-3), (BUGGY_LAYER, "w"))
    result["buggy"] = attempt(lambda: jaxcheck.verify(buggy, params, x, y))
    # a NaN in the gradient of a leaf that spans both processes: single-process verify says
    # "nonfinite" and names the leaf
    broken = mlp_loss(bug("scale", float("nan")), (BUGGY_LAYER, "w"))
    result["nonfinite"] = attempt(lambda: jaxcheck.verify(broken, params, x, y))
    # directions over "data" (one row of the mesh per process), parameters over "fsdp": the
    # per-direction results come from both processes
    grid = Mesh(np.array(jax.devices()).reshape(num_processes, LOCAL_DEVICES), ("data", "fsdp"))
    result["data_rows_by_process"] = [
        sorted({d.process_index for d in row}) for row in grid.devices
    ]
    params, x, y = mlp(grid)
    over = NamedSharding(grid, P("data"))
    result["spread"] = attempt(
        lambda: jaxcheck.verify(mlp_loss(), params, x, y, direction_sharding=over)
    )


def main(process_id: int, num_processes: int, port: int, out: str) -> int:
    try:
        collectives = use_cpu_collectives()
    except LookupError as err:
        print(f"UNSUPPORTED: {err}", file=sys.stderr)
        return UNSUPPORTED
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=30,
    )
    result = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "global_devices": jax.device_count(),
        "collectives": collectives,
    }
    try:
        checks(result, num_processes)
    except Exception:  # the parent reports the traceback of whichever process failed
        result["error"] = traceback.format_exc()
    with open(out, "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
