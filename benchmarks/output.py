"""Derived numbers (floor, stencil cost, ratios against their targets), the table and the plot."""

import json
import math
from pathlib import Path

# name: (comparison, target, what it divides); check_grads_vs_warm's target depends on size.
# "warm" is the default check's time to verdict (sequential directions); the fixed-K check
# keeps its own, older target.
TARGETS = {
    "warm_vs_stencil": ("<=", 1.3, "jaxcheck warm / stencil cost"),
    "warm_vs_floor": ("<=", 1.5, "jaxcheck warm (time to verdict) / floor"),
    "fixed_warm_vs_floor": ("<=", 2.5, "jaxcheck warm with fixed K / floor"),
    "check_grads_vs_warm": (">=", 30.0, "K check_grads calls / jaxcheck warm"),
    "compile_ratio": ("<=", 1.0, "jaxcheck compile / (3 t_compile_vg + 1 s)"),
}
# check_grads_vs_warm: 30x up to 1e5 parameters, 10x up to about 1e6, merely slower above.
CHECK_GRADS_TARGETS = ((1.5e5, ">=", 30.0), (1.5e6, ">=", 10.0))


def _target(name: str, num_params: int) -> tuple[str, float]:
    comparison, target, _ = TARGETS[name]
    if name == "check_grads_vs_warm":
        for limit, comparison, target in CHECK_GRADS_TARGETS:
            if num_params <= limit:
                return comparison, target
        return ">", 1.0
    return comparison, target


def _meets(value: float, comparison: str, target: float) -> bool:
    return {"<=": value <= target, ">=": value >= target, ">": value > target}[comparison]


def derive(entry: dict, num_directions: int) -> None:
    """Adds the floor, the stencil cost and the ratios to a workload's entry."""
    floor, check = entry["floor"], entry["jaxcheck"]
    floor["floor_seconds"] = 2 * num_directions * floor["t_fwd"] + floor["t_vg"]
    floor["stencil_cost_seconds"] = check["num_evaluations"] * floor["t_fwd_ref"] + floor["t_vg"]
    fixed = entry.get("jaxcheck_fixed", {})
    values = {
        "warm_vs_stencil": check["warm_seconds"] / floor["stencil_cost_seconds"],
        "warm_vs_floor": check["warm_seconds"] / floor["floor_seconds"],
        "fixed_warm_vs_floor": fixed.get("warm_seconds", math.nan) / floor["floor_seconds"],
        "check_grads_vs_warm": entry["check_grads"]["seconds"] / check["warm_seconds"],
        "compile_ratio": check["compile_seconds"] / (3 * floor["t_compile_vg"] + 1.0),
    }
    entry["ratios"] = {}
    for name, value in values.items():
        if math.isnan(value):
            continue  # no fixed-K run (a jaxcheck without sequential directions)
        comparison, target = _target(name, entry["num_params"])
        entry["ratios"][name] = {
            "value": value,
            "target": f"{comparison} {target:g}",
            "meets_target": _meets(value, comparison, target),
        }


def seconds(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if value < 1.0:
        return f"{value * 1e3:.3g} ms"
    return f"{value:.3g} s"


def _timed(result: dict | None) -> str:
    if result is None or "skipped" in result:
        return "—"
    return seconds(result["seconds"])


def _ratio(entry: dict, name: str) -> str:
    ratio = entry["ratios"].get(name)
    if ratio is None:
        return "—"
    return f"{ratio['value']:.2f}" + ("" if ratio["meets_target"] else " ✗")


def _bug(result: dict | None) -> str:
    if not result or not result.get("jaxcheck"):
        return "—"
    check = result["jaxcheck"]
    named = check["failing_leaves"] == [result["planted_leaf"]]
    where = "" if check["status"] != "fail" else ", leaf named" if named else ", other leaves too"
    return f"{check['status']} ({check['relative_error']:.1e}{where}; {check['num_directions']})"


def _bytes(value: float | None) -> str:
    if value is None:
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def markdown(results: dict) -> str:
    machine, config = results["machine"], results["config"]
    k = config["num_directions"]
    lines = [
        f"# jaxcheck benchmark: {config['device']}{' (quick)' if config['quick'] else ''}",
        "",
        f"{machine['device_kind']} ({machine['platform']}, {machine['cpu_count']} CPUs), "
        f"jax {machine['jax']}, jaxlib {machine['jaxlib']}, torch {machine['torch'] or '—'}, "
        f"Python {machine['python']}, {machine['date']}. K = {k} directions; warm times are "
        f"medians of {config['repeats']} calls.",
        "",
    ]
    header = [
        "workload",
        "params",
        "status",
        "t_fwd",
        "floor",
        "stencil cost",
        "jaxcheck cold",
        "compile",
        "warm (directions)",
        "fixed-K warm",
        f"check_grads ×{k}",
        f"torch gradcheck ×{k}",
        "coord. FD",
        "warm/stencil (≤ 1.3)",
        "warm/floor (≤ 1.5)",
        "fixed/floor (≤ 2.5)",
        "check_grads/warm (≥ 30 to 1e5, ≥ 10 to 1e6)",
        "compile ratio (≤ 1)",
        "peak mem",
        "peak/(n·8)",
        "peak/bound",
        "planted 0.1 % bug: jaxcheck (directions)",
        "check_grads",
        "planted 1 % bug: jaxcheck (directions)",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in results["workloads"]:
        check, floor, bug = entry["jaxcheck"], entry["floor"], entry["planted_bug"]
        memory = entry["memory"]
        peak_ratio = memory["peak_over_params_times_8"]
        row = [
            entry["name"],
            f"{entry['num_params']:,}",
            check["status"],
            seconds(floor["t_fwd"]),
            seconds(floor["floor_seconds"]),
            seconds(floor["stencil_cost_seconds"]),
            seconds(check["cold_wall_seconds"]),
            seconds(check["compile_seconds"]),
            f"{seconds(check['warm_seconds'])} ({check['num_directions']})",
            seconds(entry.get("jaxcheck_fixed", {}).get("warm_seconds")),
            _timed(entry["check_grads"]),
            _timed(entry["torch_gradcheck"]),
            _timed(entry["coordinate_fd"]),
            _ratio(entry, "warm_vs_stencil"),
            _ratio(entry, "warm_vs_floor"),
            _ratio(entry, "fixed_warm_vs_floor"),
            _ratio(entry, "check_grads_vs_warm"),
            _ratio(entry, "compile_ratio"),
            _bytes(memory["peak_memory_bytes"]),
            "—" if peak_ratio is None else f"{peak_ratio:.2f}",
            "—" if memory["peak_over_bound"] is None else f"{memory['peak_over_bound']:.2f}",
            _bug(bug),
            "caught" if bug["check_grads"]["caught"] else "missed",
            _bug(entry.get("planted_bug_1pct")),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "✗: target missed. floor = 2K·t_fwd + t_vg; stencil cost = E·t_fwd_ref + t_vg with E "
        "the evaluations jaxcheck's stencil made in the reference dtype; compile ratio = "
        "compile / (3·t_compile_vg + 1 s); peak/(n·8): jaxcheck's peak memory over the "
        "parameters' float64 size; peak/bound: over n·8·(2c + 5) + 2c·activations (README).",
    ]
    notes = []
    for entry in results["workloads"]:
        for method in ("torch_gradcheck", "coordinate_fd"):
            if "skipped" in entry[method]:
                notes.append(f"- {entry['name']}: {method} skipped: {entry[method]['skipped']}")
        alarms = entry["check_grads"]["assertion_errors"]
        if alarms:
            notes.append(
                f"- {entry['name']}: check_grads raised on the correct model in {alarms} of "
                f"{entry['check_grads']['calls']} calls"
            )
        failures = entry["torch_gradcheck"].get("failures")
        if failures:
            notes.append(f"- {entry['name']}: torch gradcheck failed {failures} times")
        if not entry["jaxcheck"]["warm_compiles_nothing"]:
            notes.append(f"- {entry['name']}: a warm jaxcheck call compiled (see JSON)")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


# Plotted methods: label -> (that method's seconds in a workload entry or None, line style);
# the two computed lower references are dashed.
COLORS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6")
OTHER_MARKERS = {"transformer": "^", "cnn": "s"}
SERIES = {
    "jaxcheck warm": (lambda e: e["jaxcheck"]["warm_seconds"], "-"),
    "jaxcheck warm, fixed K": (lambda e: e.get("jaxcheck_fixed", {}).get("warm_seconds"), ":"),
    "floor (2K fwd + vg)": (lambda e: e["floor"]["floor_seconds"], "--"),
    "stencil cost (E fwd_ref + vg)": (lambda e: e["floor"]["stencil_cost_seconds"], "--"),
    "check_grads ×K": (lambda e: e["check_grads"]["seconds"], "-"),
    "torch gradcheck ×K": (lambda e: e["torch_gradcheck"].get("seconds"), "-"),
    "coordinate FD": (lambda e: e["coordinate_fd"].get("seconds"), "-"),
}


def plot(out_dir: Path, suffix: str) -> Path | None:
    """timing{suffix}.png from the cpu and gpu results in `out_dir`, one panel per device.
    Returns None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    panels = []
    for device in ("cpu", "gpu"):
        path = out_dir / f"{device}{suffix}.json"
        if path.exists():
            panels.append(json.loads(path.read_text()))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, results in zip(axes[0], panels):
        entries = sorted(results["workloads"], key=lambda e: e["num_params"])
        # lines join the MLP sizes only; the other models are single marked points
        mlps = [e for e in entries if e["name"].startswith("mlp")]
        others = [e for e in entries if not e["name"].startswith("mlp")]
        for color, (label, (pick, style)) in zip(COLORS, SERIES.items()):
            points = [(e["num_params"], pick(e)) for e in mlps if pick(e) is not None]
            if points:
                xs, ys = zip(*points)
                ax.loglog(xs, ys, style, marker="o", color=color, label=label)
            for e in others:
                if pick(e) is not None:
                    ax.loglog(
                        e["num_params"], pick(e), OTHER_MARKERS.get(e["name"], "D"), color=color
                    )
        for name, marker in OTHER_MARKERS.items():
            if any(e["name"] == name for e in others):
                ax.plot([], [], marker, color="gray", label=f"{name} (single model)")
        ax.set_xlabel("parameters (lines: tanh MLPs)")
        ax.set_ylabel("warm time (s)")
        config, machine = results["config"], results["machine"]
        # On CPU jax's device kind is just "cpu"; the processor's name says more.
        hardware = machine["cpu"] if config["device"] == "cpu" else machine["device_kind"]
        ax.set_title(f"{config['device'].upper()}: {hardware}, K = {config['num_directions']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / f"timing{suffix}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
