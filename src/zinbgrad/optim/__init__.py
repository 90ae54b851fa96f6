"""Optimization: initialization, batched Newton solvers and the fitting loops.

A fit is a :class:`Problem` (data, design, penalty, K, ...) solved from an
:class:`OptimizerState` (everything the solvers change; what a checkpoint saves) by the
:class:`Engine`'s solvers, picked by :func:`resolve_solver`; :func:`solve` runs a whole fit.
"""

from .engine import Engine, FitOptions, FitResult
from .init import initialize
from .solve import FitOutcome, solve
from .solvers import resolve_solver
from .state import OptimizerState, Problem

__all__ = [
    "Engine",
    "FitOptions",
    "FitOutcome",
    "FitResult",
    "OptimizerState",
    "Problem",
    "initialize",
    "resolve_solver",
    "solve",
]
