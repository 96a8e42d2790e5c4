"""The ``pyebpflb`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pyebpflb",
        description="Kubernetes-style service load balancing in the kernel with eBPF.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="build a sandbox and balance a service through it")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from pyebpflb import demo

        return demo.run()
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
