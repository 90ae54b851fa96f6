"""Command-line interface: ``zinbgrad fit``, ``convert``, ``demo`` and the downstream commands.

Modules: :mod:`~zinbgrad.cli.common` (errors and exit codes, path and key checks, reading and
writing .h5ad files and models), :mod:`~zinbgrad.cli.fit` (``fit``, ``convert``, ``demo``),
:mod:`~zinbgrad.cli.downstream` (``normalize``, ``residuals``, ``impute``, ``weights``,
``project``, ``simulate``), :mod:`~zinbgrad.cli.streaming` (layers written block by block) and
:mod:`~zinbgrad.cli.parser` (``build_parser``, ``main``). Each command module registers its
own subcommands; none imports another, so the package has no import cycle.
"""

from .common import check_key, check_output_path, cli_error, write_h5ad_atomic
from .fit import demo_figure
from .parser import build_parser, main

__all__ = [
    "build_parser",
    "check_key",
    "check_output_path",
    "cli_error",
    "demo_figure",
    "main",
    "write_h5ad_atomic",
]
