"""Data sets: small examples shipped with zinbgrad (no download at run time) and readers of
the original files of the scVI benchmark data sets.

Every reader returns an :class:`anndata.AnnData` whose ``X`` holds the raw, integer-valued
counts as a :class:`scipy.sparse.csr_matrix` of shape ``(n_cells, n_genes)``. Large matrices
are never densified as a whole: text rows, loom row blocks and 10x cell blocks are sparsified
one block at a time.

- :func:`read_zeisel_txt`: Zeisel et al. (2015) ``expression_mRNA_17-Aug-2014.txt`` (CORTEX).
- :func:`read_loom`: loom files, e.g. the scVI RETINA ``retina.loom``.
- :func:`read_10x_h5`: 10x Cell Ranger HDF5 (v2 per-genome layout and v3 ``/matrix`` layout),
  e.g. ``1M_neurons_filtered_gene_bc_matrices_h5.h5`` (BRAIN).
- :func:`read_counts`: dispatch on the file extension (``.h5ad``, ``.loom``, ``.h5``, ``.txt``).

The scVI papers' gene selection is :func:`zinbgrad.pp.select_top_variance_genes`.
"""

from __future__ import annotations

from importlib.resources import files

import anndata as ad

from ._counts import read_counts
from ._loom import read_loom
from ._tenx import read_10x_h5
from ._zeisel import ZEISEL_METADATA_KEYS as ZEISEL_METADATA_KEYS  # the file's metadata rows
from ._zeisel import read_zeisel_txt

__all__ = [
    "pbmc_small",
    "read_10x_h5",
    "read_counts",
    "read_loom",
    "read_zeisel_txt",
]


def pbmc_small() -> ad.AnnData:
    """Seurat's ``pbmc_small``: 80 cells x 230 genes of 10x pbmc3k, raw UMI counts.

    ``obs["cell_type"]`` are Seurat clusters, ``obs["batch"]`` an arbitrary two-group split.
    See ``zinbgrad/datasets/README.md`` for the source and licence.
    """
    path = files(__package__) / "pbmc_small.h5ad"
    with path.open("rb") as fh:
        return ad.read_h5ad(fh)
