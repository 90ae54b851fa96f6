"""Optimization: initialization, batched Newton solvers and the fitting loops."""

from .engine import Engine, FitOptions, FitResult
from .init import initialize

__all__ = ["Engine", "FitOptions", "FitResult", "initialize"]
