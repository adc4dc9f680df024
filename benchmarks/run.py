"""Speed, memory and sensitivity of jaxcheck against the usual ways of checking gradients.

    python benchmarks/run.py [--device cpu|gpu] [--quick] [--directions K] [--out DIR]

See benchmarks/README.md for what is measured and the targets.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
METHODS = (
    "jaxcheck",
    "jaxcheck_fixed",
    "floor",
    "check_grads",
    "torch_gradcheck",
    "coordinate_fd",
    "planted_bug",
    "planted_bug_1pct",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument(
        "--quick", action="store_true", help="two tiny MLPs, K = 4, no torch (a smoke run)"
    )
    parser.add_argument(
        "--directions", type=int, default=None, help="K for every method (default 16; quick 4)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the results")
    parser.add_argument("--only", default=None, help="comma-separated workload names to run")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed warm calls per median (default 5; quick 3)"
    )
    parser.add_argument("--max-torch-params", type=float, default=2e6)
    parser.add_argument("--max-coordinate-params", type=float, default=3e4)
    args = parser.parse_args(argv)
    if args.directions is None:
        args.directions = 4 if args.quick else 16
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.directions < 1 or args.repeats < 3:
        parser.error("--directions must be >= 1 and --repeats >= 3")
    return args


class Progress:
    """A tqdm bar over (workload, method) steps, or plain lines when tqdm is missing."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.bar = None if tqdm is None else tqdm(total=total, unit="step", dynamic_ncols=True)
        self.total, self.done = total, 0

    def start(self, label: str) -> None:
        if self.bar is None:
            print(f"[{self.done + 1}/{self.total}] {label}", flush=True)
        else:
            self.bar.set_description(label)

    def finish_step(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def write(self, message: str) -> None:
        if self.bar is None:
            print(message, flush=True)
        else:
            self.bar.write(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _json_ready(value):
    """NaN becomes null and infinities strings, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {key: _json_ready(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def run_workload(workload, args, measure, progress: Progress, torch_version) -> dict:
    """Every method on one workload; `measure` is the measurement module, passed in because
    it can only be imported once JAX_PLATFORMS is set."""
    k, device = args.directions, args.device
    n = workload.num_params
    entry = {
        "name": workload.name,
        "kind": workload.kind,
        "description": workload.description,
        "num_params": n,
        "config": workload.config,
    }

    def step(method: str, compute):
        progress.start(f"{workload.name}: {method}")
        try:
            entry[method] = compute()
        finally:
            progress.finish_step()

    step("jaxcheck", lambda: measure.run_jaxcheck(workload, k, args.repeats))
    check = entry["jaxcheck"]
    if check["status"] != "pass":
        progress.write(
            f"WARNING: {workload.name}: jaxcheck says {check['status']} on the correct model "
            f"(relative error {check['relative_error']:.2e}, tolerance {check['tolerance']:.2e})"
        )
    if not check["warm_compiles_nothing"]:
        progress.write(
            f"ERROR: {workload.name}: warm jaxcheck calls compiled {check['warm_num_compiled']}"
        )
    step("jaxcheck_fixed", lambda: measure.run_jaxcheck(workload, k, args.repeats, False))
    step("floor", lambda: measure.run_floor(workload, check["reference_dtype"], args.repeats))
    step("check_grads", lambda: measure.run_check_grads(workload.fn, workload, k))

    def torch_gradcheck():
        if args.quick:
            return {"skipped": "--quick"}
        if torch_version is None:
            return {"skipped": "torch not installed"}
        if n > args.max_torch_params:
            return {"skipped": f"{n} params > --max-torch-params {args.max_torch_params:g}"}
        torch_device = "cuda" if device == "gpu" else "cpu"
        return _optional(lambda: measure.run_torch_gradcheck(workload, k, torch_device))

    step("torch_gradcheck", torch_gradcheck)

    def coordinate_fd():
        limit = args.max_coordinate_params
        if n > limit:
            return {"skipped": f"{n} params > --max-coordinate-params {limit:g}"}
        # One timed call: 2n evaluations are long enough to time alone.
        return _optional(lambda: measure.run_coordinate_fd(workload, repeats=1))

    step("coordinate_fd", coordinate_fd)
    step("planted_bug", lambda: measure.run_planted_bug(workload, k, k))
    step("planted_bug_1pct", lambda: measure.run_planted_bug(workload, k, k, scale=1.01))
    entry["memory"] = measure.memory_summary(workload, check, entry["floor"], device)
    return entry


def _optional(compute) -> dict:
    """Runs an optional comparison; its failure is recorded instead of ending the run."""
    try:
        return compute()
    except Exception as error:  # the other methods' numbers are still worth keeping
        return {"skipped": f"error: {error!r}"}


def main(argv=None) -> int:
    args = parse_args(argv)
    # jax reads JAX_PLATFORMS when it is imported, so the modules using it come after this.
    os.environ["JAX_PLATFORMS"] = "cuda" if args.device == "gpu" else "cpu"
    if args.device == "gpu":
        # torch shares the GPU; jax would otherwise take most of its memory up front.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    try:
        platforms = {device.platform for device in jax.devices()}
    except Exception as error:  # jax raises RuntimeError or AssertionError, by version
        platforms, reason = set(), f"{type(error).__name__}: {error}".rstrip(": ")
    else:
        reason = f"it sees {', '.join(sorted(platforms))}"
    if args.device not in platforms:
        hint = "; JAX needs its CUDA build for that: pip install 'jax[cuda12]'"
        print(
            f"error: --device {args.device} asked for, but JAX has no {args.device.upper()} "
            f"device ({reason}){hint if args.device == 'gpu' else ''}",
            file=sys.stderr,
        )
        return 2

    import measure
    import output
    import workloads

    builders = workloads.QUICK_WORKLOADS if args.quick else workloads.FULL_WORKLOADS
    if args.only:
        names = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = sorted(set(names) - set(builders))
        if unknown:
            print(
                f"error: unknown workload(s) {', '.join(unknown)}; "
                f"choose from {', '.join(builders)}",
                file=sys.stderr,
            )
            return 2
        builders = {name: builder for name, builder in builders.items() if name in names}

    suffix = "-quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{args.device}{suffix}.json"
    torch_version = measure.torch_version()
    started = time.perf_counter()
    results = {
        "machine": measure.machine_info(torch_version),
        "config": {
            "device": args.device,
            "quick": args.quick,
            "num_directions": args.directions,
            "repeats": args.repeats,
            "max_torch_params": args.max_torch_params,
            "max_coordinate_params": args.max_coordinate_params,
            "workloads": list(builders),
        },
        "startup_seconds": measure.warm_up(),
        "workloads": [],
    }

    progress = Progress(len(builders) * len(METHODS))
    try:
        for builder in builders.values():
            entry = run_workload(builder(), args, measure, progress, torch_version)
            output.derive(entry, args.directions)
            results["workloads"].append(entry)
            results["total_seconds"] = time.perf_counter() - started
            results["load_average_at_end"] = measure.load_average()
            # Written after every workload, so a long run that stops keeps what it measured.
            json_path.write_text(json.dumps(_json_ready(results), indent=2) + "\n")
    finally:
        progress.close()

    markdown_path = args.out / f"{args.device}{suffix}.md"
    table = output.markdown(results)
    markdown_path.write_text(table)
    print(table)
    plot_path = output.plot(args.out, suffix)
    if plot_path is None:
        print("matplotlib is not installed: no plot written")
    written = [json_path, markdown_path] + ([plot_path] if plot_path else [])
    print("wrote " + ", ".join(str(path) for path in written))

    entries = results["workloads"]
    compiled = [e["name"] for e in entries if not e["jaxcheck"]["warm_compiles_nothing"]]
    if compiled:
        print(f"error: warm jaxcheck calls compiled for {', '.join(compiled)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
