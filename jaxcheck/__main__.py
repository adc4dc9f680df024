"""Command line: `python -m jaxcheck demo`."""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxcheck", description=__doc__)
    parser.add_argument(
        "--version", action="version", version=_versions(), help="versions of jaxcheck and JAX"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="check built-in examples (correct gradients and planted bugs)")
    parser.parse_args(argv)
    from ._demo import main as demo  # noqa: PLC0415 - import jax only when needed

    return demo()


def _versions() -> str:
    """jaxcheck's version and those of the JAX it runs on (what a bug report needs), read
    from package metadata so that JAX is not imported to print them."""
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    def of(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return ", ".join(f"{name} {of(name)}" for name in ("jaxcheck", "jax", "jaxlib"))


if __name__ == "__main__":
    sys.exit(main())
