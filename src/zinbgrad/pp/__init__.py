"""Preprocessing in scanpy's style (``zinbgrad.pp``, as ``scanpy.pp``): gene selection."""

from ._genes import gene_variances, select_top_variance_genes

__all__ = ["gene_variances", "select_top_variance_genes"]
