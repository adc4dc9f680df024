"""`verify` in a 2-process `jax.distributed` job on this machine: 2 Python processes with 4
simulated CPU devices each, CPU collectives across them, one global 8-device mesh.

Both processes run `tests/_multiprocess_child.py` with the same arguments; each writes its
reports' fields as JSON and the tests here compare them: an FSDP-sharded MLP passes, a 0.1 %
bug in one weight's gradient fails naming that weight, directions spread over a mesh axis
that spans the processes pass, both processes get the same report, and its finite
differences match those of the same check run unsharded in one process. Two known failures
A NaN gradient of a leaf that spans the processes is reported as "nonfinite" (its leaf is
gathered before it is examined on the host).
"""

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from _multiprocess_child import BUGGY_LAYER, SIZES, UNSUPPORTED

import jaxcheck
from cases import mlp_data, mlp_loss, mlp_params

CHILD = Path(__file__).parent / "_multiprocess_child.py"
NUM_PROCESSES = 2
TIMEOUT_S = 120  # both processes together; the job takes 25-35 s on 2 cores
BUGGY_LEAF = f"['layers'][{BUGGY_LAYER}]['w']"
CHECKS = ("correct", "buggy", "spread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_job(tmp: Path) -> list[dict]:
    """Start both processes, wait for both, and return their results (process 0 first);
    skips when this JAX cannot run CPU collectives across processes."""
    port = _free_port()
    # (without this run's compilation cache: the two processes would share its folder, and
    # one reading an entry the other is writing warns)
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["JAX_PLATFORMS"] = "cpu"
    # no compilation cache shared by the processes: JAX writes its entries in place, and one
    # process reading what the other is writing warns
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    procs, logs = [], []
    for i in range(NUM_PROCESSES):
        log = open(tmp / f"log{i}.txt", "w+")  # closed below, after both have ended
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(CHILD), str(i), str(NUM_PROCESSES), str(port)]
                + [str(tmp / f"report{i}.json")],
                cwd=CHILD.parent,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # so that a hung one is killed with its threads
            )
        )
    timed_out = False
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    codes = [p.returncode for p in procs]
    unsupported = [o for o, c in zip(outputs, codes) if c == UNSUPPORTED]
    if unsupported:
        pytest.skip(re.search(r"UNSUPPORTED: .*", unsupported[0]).group(0))
    results = []
    for i in range(NUM_PROCESSES):
        path = tmp / f"report{i}.json"
        results.append(json.loads(path.read_text()) if path.exists() else {})
    errors = [
        f"process {i} (exit {c}):\n{r.get('error') or o[-3000:]}"
        for i, (r, o, c) in enumerate(zip(results, outputs, codes))
        if c != 0 or "error" in r
    ]
    if timed_out:
        errors.insert(0, f"the job did not finish within {TIMEOUT_S} s")
    assert not errors, "\n".join(errors)
    return results


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The job's results, run once per test session: pytest-xdist workers share the outcome
    (results, skip or failure) through a file beside their temporary folders, so the job's
    4 processes do not run twice on the same cores."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return _run_job(tmp_path_factory.mktemp("multiprocess"))
    shared = tmp_path_factory.getbasetemp().parent
    outcome = shared / "multiprocess-outcome.json"
    with open(shared / "multiprocess.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits here for the outcome
        if not outcome.exists():
            try:
                saved = {"results": _run_job(tmp_path_factory.mktemp("multiprocess"))}
            except pytest.skip.Exception as skip:
                saved = {"skip": str(skip.msg)}
            except AssertionError as err:
                saved = {"failure": str(err)}
            outcome.write_text(json.dumps(saved))
    saved = json.loads(outcome.read_text())
    if "skip" in saved:
        pytest.skip(saved["skip"])
    assert "failure" not in saved, saved.get("failure")
    return saved["results"]


def _fields(result: dict, check: str) -> dict:
    """The report fields of one check in one process, failing with the traceback if verify
    raised there."""
    out = result[check]
    assert "raised" not in out, (
        f"{check}: verify raised in process {result['process_index']}:\n" + out.get("raised", "")
    )
    return out


def test_the_job_spans_two_processes_of_four_devices(job):
    for i, r in enumerate(job):
        assert r["process_index"] == i
        assert r["process_count"] == NUM_PROCESSES
        assert (r["local_devices"], r["global_devices"]) == (4, 8)
        # the weights are global arrays: no process holds all of a weight
        assert r["weights_fully_addressable"] is False
        # directions over "data" put one mesh row on each process
        assert r["data_rows_by_process"] == [[0], [1]]


def test_fsdp_sharded_model_passes(job):
    for r in job:
        good = _fields(r, "correct")
        assert good["status"] == "pass", good["text"]
        assert good["relative_error"] < good["tolerance"]


def test_planted_bug_of_0_1_percent_fails_at_its_leaf(job):
    for r in job:
        bad = _fields(r, "buggy")
        assert bad["status"] == "fail", bad["text"]
        assert bad["failing_leaves"] == [BUGGY_LEAF], bad["text"]
        assert f"! wrong: {BUGGY_LEAF}" in bad["text"]
        # a 1e-3 error in one of six equally weighted leaves: about 1e-3 / sqrt(6)
        assert 2e-4 < bad["relative_error"] < 1e-3
        assert bad["relative_error"] > 100 * bad["tolerance"]


def test_directions_over_an_axis_that_spans_the_processes_pass(job):
    for r in job:
        spread = _fields(r, "spread")
        assert spread["status"] == "pass", spread["text"]


@pytest.mark.parametrize("check", CHECKS)
def test_every_process_gets_the_same_report(job, check):
    first, second = (_fields(r, check) for r in job)
    for field in ("status", "relative_error", "interval", "tolerance", "failing_leaves"):
        assert first[field] == second[field], field
    assert first["leaves"] == second["leaves"]
    assert first["numeric"] == second["numeric"]
    assert first["analytic"] == second["analytic"]
    # the printed reports differ only in the timings
    untimed = [re.sub(r"compile [\d.]+ s, run [\d.]+ s", "", r["text"]) for r in (first, second)]
    assert untimed[0] == untimed[1]


def test_same_numbers_as_the_unsharded_model_in_one_process(job):
    params = mlp_params(SIZES, jnp.float32)
    x, y = mlp_data(SIZES, jnp.float32)
    plain = jaxcheck.verify(mlp_loss(), params, x, y)
    # spread directions always take all K (no sequential looks): compared with a fixed K
    fixed = jaxcheck.verify(mlp_loss(), params, x, y, sequential=False)
    r = {check: _fields(job[0], check) for check in ("correct", "spread")}
    assert r["correct"]["status"] == plain.status == "pass"
    # same directions; step sizes come from float32 gradient norms reduced in another order
    np.testing.assert_allclose(r["correct"]["numeric"], np.ravel(plain.numeric), rtol=1e-5)
    np.testing.assert_allclose(r["spread"]["numeric"], np.ravel(fixed.numeric), rtol=1e-5)


_UNREADABLE = "spans non-addressable"  # JAX's message when np.asarray meets such an array


@pytest.mark.parametrize("check", ("correct", "spread"))
def test_no_check_trips_over_arrays_that_span_the_processes(job, check):
    for r in job:
        assert not [p for p in _fields(r, check)["problems"] if _UNREADABLE in p]


def test_a_nan_gradient_of_a_leaf_that_spans_the_processes_is_reported_as_nonfinite(job):
    for r in job:
        assert "raised" not in r["nonfinite"], r["nonfinite"]["raised"]
        broken = _fields(r, "nonfinite")
        assert broken["status"] == "nonfinite", broken["text"]
        assert f"the gradient (autodiff) of leaf {BUGGY_LEAF} is NaN/Inf" in broken["text"]


def test_the_custom_rules_of_a_sharded_model_are_checked(job):
    """The failing check looks for the wrong rule (rules="auto"): the planted custom_vjp
    scales its weight cotangent, so only its vjp row fails, as in one process."""
    for r in job:
        problems = _fields(r, "buggy")["problems"]
        assert not [p for p in problems if _UNREADABLE in p], problems
        assert [p for p in problems if p.startswith("wrong rule:")], problems
        assert not [p for p in problems if "failed:" in p and "primal" in p], problems
