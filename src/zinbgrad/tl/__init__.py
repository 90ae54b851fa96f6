"""Scanpy-style tools: functions that take an AnnData and write their results into it."""

from ..de import differential_expression
from ._zinbwave import zinbwave

__all__ = ["differential_expression", "zinbwave"]
