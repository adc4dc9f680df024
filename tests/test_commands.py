"""The commands README.md promises: the demo runs, CI runs the README's test command."""

import importlib.metadata
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_opens_with_the_two_commands():
    demo, tests = _readme_commands()[:2]
    assert demo.endswith("python -m jaxcheck demo")
    assert tests.endswith("python -m pytest")
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_demo_runs_and_every_example_comes_out_as_expected():
    result = subprocess.run(
        [sys.executable, "-m", "jaxcheck", "demo"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "6 of 6 examples came out as expected" in out
    assert out.count("jaxcheck.verify: FAIL") == 2
    assert out.count("jaxcheck.verify: PASS") == 4
    assert "! wrong: ['layers'][1]['w']" in out
    # the README shows the first example's report up to its leaf table: it is what runs
    # (numbers aside, whose last digits may move with the jax version)
    readme = (ROOT / "README.md").read_text()
    shown = readme.split("jaxcheck.verify: FAIL — gradient is WRONG\n", 1)[1]
    shown = shown.split("  ...\n", 1)[0]
    number = re.compile(r"\d\.\de[+-]\d\d")
    assert number.sub("#", shown) in number.sub("#", out)


def test_imports_from_a_source_tree_without_package_metadata():
    code = (
        "import importlib.metadata as m\n"
        "def missing(name):\n"
        "    raise m.PackageNotFoundError(name)\n"
        "m.version = missing\n"
        "import jaxcheck\n"
        "print(jaxcheck.__version__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "unknown"


def test_version_names_jaxcheck_and_the_jax_it_runs_on():
    out = subprocess.run(
        [sys.executable, "-m", "jaxcheck", "--version"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    expected = ", ".join(
        f"{name} {importlib.metadata.version(name)}" for name in ("jaxcheck", "jax", "jaxlib")
    )
    assert out.stdout.strip() == expected
