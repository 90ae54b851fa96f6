"""Readers for the original files of the scVI benchmark data sets, and the scVI gene selection.

Moved (issue 16): the readers to :mod:`zinbgrad.datasets`, the gene selection to
:mod:`zinbgrad.pp`; their names stay importable from here.
"""

from __future__ import annotations

from ..datasets import (
    ZEISEL_METADATA_KEYS as ZEISEL_METADATA_KEYS,  # as before, outside __all__
)
from ..datasets import (
    read_10x_h5,
    read_counts,
    read_loom,
    read_zeisel_txt,
)
from ..pp import gene_variances as gene_variances  # as before, outside __all__
from ..pp import select_top_variance_genes

__all__ = [
    "read_zeisel_txt",
    "read_loom",
    "read_10x_h5",
    "read_counts",
    "select_top_variance_genes",
]
