"""Run the multi-device checks on 8 simulated CPU devices, in a subprocess so that the
device count of this process (fixed when jax starts) stays one."""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_sharded_checks_on_8_simulated_devices():
    # not as a worker of this run's pytest-xdist: the subprocess is a pytest run of its own
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-n",
            "0",
            "-rs",
            str(HERE / "multidevice" / "test_sharded.py"),
        ],
        cwd=HERE.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "skipped" not in result.stdout, result.stdout[-2000:]
    assert "22 passed" in result.stdout, result.stdout[-2000:]
