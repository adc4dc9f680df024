"""Command line: `python -m jaxcheck demo`."""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxcheck", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="check built-in examples (correct gradients and planted bugs)")
    parser.parse_args(argv)
    from ._demo import main as demo  # noqa: PLC0415 - import jax only when needed

    return demo()


if __name__ == "__main__":
    sys.exit(main())
