"""Small example data sets shipped with zinbgrad (no download at run time)."""

from __future__ import annotations

from importlib.resources import files

import anndata as ad

__all__ = ["pbmc_small"]


def pbmc_small() -> ad.AnnData:
    """Seurat's ``pbmc_small``: 80 cells x 230 genes of 10x pbmc3k, raw UMI counts.

    ``obs["cell_type"]`` are Seurat clusters, ``obs["batch"]`` an arbitrary two-group split.
    See ``zinbgrad/datasets/README.md`` for the source and licence.
    """
    path = files(__package__) / "pbmc_small.h5ad"
    with path.open("rb") as fh:
        return ad.read_h5ad(fh)
