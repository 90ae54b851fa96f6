"""Scanpy-style tools: functions that take an AnnData and write their results into it."""

from ._zinbwave import zinbwave

__all__ = ["zinbwave"]
