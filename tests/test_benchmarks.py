"""Smoke test of the benchmark script: a quick run writes its results and jaxcheck passes."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "run.py"
QUICK_WORKLOADS = {"mlp-1e3"}  # the smallest: the test checks the plumbing, not speed
MACHINE_KEYS = {"platform", "device_kind", "cpu_count", "jax", "jaxlib", "torch", "python", "date"}
ENTRY_KEYS = {
    "num_params",
    "jaxcheck",
    "floor",
    "check_grads",
    "torch_gradcheck",
    "coordinate_fd",
    "planted_bug",
    "planted_bug_1pct",
    "jaxcheck_fixed",
    "memory",
    "ratios",
}
RATIOS = {
    "warm_vs_stencil",
    "warm_vs_floor",
    "fixed_warm_vs_floor",
    "check_grads_vs_warm",
    "compile_ratio",
}


def test_quick_benchmark(tmp_path):
    only = ",".join(sorted(QUICK_WORKLOADS))
    command = [sys.executable, str(SCRIPT), "--quick", "--only", only, "--out", str(tmp_path)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # The timeout only stops a hung run; a quick run takes well under a minute.
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = json.loads((tmp_path / "cpu-quick.json").read_text())
    assert {"machine", "config", "workloads"} <= results.keys()
    assert MACHINE_KEYS <= results["machine"].keys()
    assert results["config"]["num_directions"] == 4
    assert {entry["name"] for entry in results["workloads"]} == QUICK_WORKLOADS
    for entry in results["workloads"]:
        assert ENTRY_KEYS <= entry.keys(), entry["name"]
        assert RATIOS <= entry["ratios"].keys(), entry["name"]
        assert entry["jaxcheck"]["status"] == "pass", entry["name"]
        assert entry["jaxcheck"]["warm_compiles_nothing"], entry["name"]
        assert entry["jaxcheck_fixed"]["num_directions"] == 4  # K, fixed
        assert entry["jaxcheck_fixed"]["warm_compiles_nothing"], entry["name"]
        for bug, scale in (("planted_bug", 1.001), ("planted_bug_1pct", 1.01)):
            result = entry[bug]
            assert result["gradient_scale"] == scale
            for method in ("jaxcheck", "jaxcheck_fixed"):
                check = result[method]
                assert check["status"] == "fail", (bug, method)
                assert check["failing_leaves"] == [result["planted_leaf"]], (bug, method)
                assert 4 <= check["num_directions"] <= check["max_directions"] == 4
        assert entry["torch_gradcheck"] == {"skipped": "--quick"}

    assert (tmp_path / "cpu-quick.md").read_text().startswith("# jaxcheck benchmark")
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "timing-quick.png").stat().st_size > 0


SUITE = ROOT / "benchmarks" / "suite.py"


def test_quick_suite(tmp_path):
    """A few cases of the test-suite benchmark: both tools run in their own process, jaxcheck
    passes the correct functions and fails the planted bug; two rounds per tool, each case
    timed by its fastest."""
    command = [sys.executable, str(SUITE), "--quick", "--cases", "2", "--rounds", "2"]
    command += ["--out", str(tmp_path)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = json.loads((tmp_path / "suite_cpu-quick.json").read_text())
    assert results["config"] == {"order": 1, "quick": True, "num_cases": 2}
    cases = results["cases"]
    assert [c["buggy"] for c in cases] == [True, False]
    for case in cases:
        want = "fail" if case["buggy"] else "pass"
        assert case["jaxcheck"]["verdict"] == want, case
        assert case["check_grads"]["verdict"] in ("pass", "fail", "error"), case
        assert case["jaxcheck"]["seconds"] > 0 and case["check_grads"]["cpu_seconds"] > 0
    summary = results["summary"]
    assert summary["verdicts_lost"] == []
    assert summary["jaxcheck"]["verdicts"] == {"correct": {"pass": 1}, "buggy": {"fail": 1}}
    assert summary["rounds"] == 2
    for tool in ("jaxcheck", "check_grads"):
        per_round = summary["round_totals_cpu"][tool]
        assert len(per_round) == 2
        # each case's fastest round: no more than any one round's total
        assert summary[tool]["total_cpu_seconds"] <= min(per_round) + 1e-9
    assert summary["ratio_total"] == pytest.approx(
        summary["jaxcheck"]["total_seconds"] / summary["check_grads"]["total_seconds"]
    )
    assert "jaxcheck verdicts lost: none" in (tmp_path / "suite_cpu-quick.md").read_text()


def test_big_leaf_smoke(tmp_path):
    """The big-leaf benchmark on a small leaf: it writes its ratios, the correct gradient
    passes and the 1 % bug fails."""
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "big_leaf.py"),
        "--size", "1e4", "--repeats", "1", "--out", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "big_leaf_cpu.json").read_text())
    assert result["size"] == 10_000 and result["status"] == "pass"
    assert result["bug_1pct"]["status"] == "fail"
    assert result["warm_over_floor"] == pytest.approx(result["warm_s"] / result["floor_s"])
    assert result["memory_bound_bytes"] == 10_000 * 8 * 7
    assert "(target <= 1.5)" in done.stdout
