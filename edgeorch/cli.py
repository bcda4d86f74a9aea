"""`edgeorch <command>`: one entry point for every process type and tool."""

from __future__ import annotations

import argparse
import sys


def _add_serve_args(p: argparse.ArgumentParser, default_port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument("--port", type=int, default=default_port, help=f"port (default {default_port})")
    p.add_argument("--log-level", default="INFO")


def _run_splitter(args: argparse.Namespace) -> int:
    from edgeorch.serve import serve, setup_logging
    from services.splitter.app import SplitterSettings, create_app

    setup_logging(args.log_level)
    serve(create_app(SplitterSettings()), args.host, args.port, args.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="edgeorch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("splitter", help="serve the Split Revision planner (POST /v1/plan)")
    _add_serve_args(p, 8002)
    p.set_defaults(func=_run_splitter)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
