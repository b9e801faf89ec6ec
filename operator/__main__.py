"""`python -m fedkube.operator operator|crds ...`: the operator's sub-commands without the
`fedkube` entry point (e.g. `kopf`-style deployments and tests that run it as a process)."""

from __future__ import annotations

import argparse
import logging
import sys

from .cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedkube.operator")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
