"""The ``zinbgrad`` command's argument parser and entry point (``main``)."""

from __future__ import annotations

import argparse

from .common import run_command
from .downstream import add_subcommands
from .fit import add_convert_parser, add_demo_parser, add_fit_parser

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``zinbgrad`` and all its subcommands (every ``--help`` shows the
    defaults)."""
    from .. import __version__

    p = argparse.ArgumentParser(
        prog="zinbgrad", description="ZINB-WaVE for single-cell counts, fitted with PyTorch."
    )
    p.add_argument("--version", action="version", version=f"zinbgrad {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (add_fit_parser, add_convert_parser, add_demo_parser):
        add(sub)
    add_subcommands(sub)
    # every --help shows the defaults
    for parser in (p, *sub.choices.values()):
        parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``zinbgrad`` with the arguments ``argv`` (``None``: ``sys.argv[1:]``); returns the
    exit status (see :func:`zinbgrad.cli.common.run_command`)."""
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)
