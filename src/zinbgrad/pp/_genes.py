"""Gene selection by the variance of the raw counts (the scVI benchmarks' selection)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp

__all__ = ["gene_variances", "select_top_variance_genes"]


def gene_variances(
    adata: ad.AnnData, layer: str | None = None, n_cells: int | None = None
) -> np.ndarray:
    """Population variance (``ddof=0``) of every gene's raw counts.

    Parameters
    ----------
    adata
        Cells x genes AnnData.
    layer
        Layer holding the counts (``None``: ``X``).
    n_cells
        Use only the first ``n_cells`` cells (``None``: all).

    Returns
    -------
    numpy.ndarray
        ``float64`` array of length ``n_vars``.
    """
    X = adata.X if layer is None else adata.layers[layer]
    if X is None:
        raise ValueError("adata.X is empty")
    if n_cells is not None:
        if n_cells < 1:
            raise ValueError(f"n_cells must be positive, got {n_cells}")
        X = X[: min(int(n_cells), X.shape[0])]
    n = X.shape[0]
    if n == 0:
        raise ValueError("no cells to compute gene variances from")
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        mean = np.asarray(X.sum(axis=0, dtype=np.float64)).ravel() / n
        sq = X.copy()
        sq.data = np.asarray(sq.data, dtype=np.float64) ** 2
        mean_sq = np.asarray(sq.sum(axis=0)).ravel() / n
        return np.maximum(mean_sq - mean**2, 0.0)
    return np.asarray(X, dtype=np.float64).var(axis=0)


def select_top_variance_genes(
    adata: ad.AnnData,
    n_top: int,
    layer: str | None = None,
    *,
    n_cells: int | None = None,
    return_mask: bool = False,
) -> ad.AnnData | np.ndarray:
    """Keep the ``n_top`` genes of highest raw-count variance (the scVI selection).

    The variance is the population variance (``ddof=0``) of each gene's raw
    counts over cells, without normalisation or log transform, as in the scVI
    loaders: ``CortexDataset`` ranks genes by ``np.std(X, axis=0)`` of the raw
    counts and keeps 558; ``BrainLargeDataset`` ranks by the variance of the
    raw counts (``StandardScaler(with_mean=False).var_`` in the 2018 code, the
    sparse ``E[x^2] - E[x]^2`` in later versions) computed on the first cells of
    the file (100,000 in the 2018 code, 10,000 later) and keeps 720. Ranking by
    standard deviation and by variance is identical. Ties are broken in favour
    of the earlier gene.

    Parameters
    ----------
    adata
        Cells x genes AnnData with raw counts.
    n_top
        Number of genes to keep (``1 <= n_top <= n_vars``).
    layer
        Layer holding the counts (``None``: ``X``).
    n_cells
        Compute the variances on the first ``n_cells`` cells only (the BRAIN
        protocol); ``None`` uses every cell (the CORTEX protocol).
    return_mask
        Return the boolean gene mask instead of a new AnnData.

    Returns
    -------
    anndata.AnnData or numpy.ndarray
        A copy of ``adata`` restricted to the selected genes, in their original
        order, with ``var["count_variance"]``; or the boolean mask of length
        ``n_vars``.
    """
    if not isinstance(n_top, (int, np.integer)) or isinstance(n_top, bool):
        raise ValueError(f"n_top must be an integer, got {n_top!r}")
    if not 1 <= n_top <= adata.n_vars:
        raise ValueError(f"n_top must be in [1, {adata.n_vars}] (n_vars), got {n_top}")
    var = gene_variances(adata, layer=layer, n_cells=n_cells)
    order = np.argsort(-var, kind="stable")
    mask = np.zeros(adata.n_vars, dtype=bool)
    mask[order[:n_top]] = True
    if return_mask:
        return mask
    out = adata[:, mask].copy()
    out.var["count_variance"] = var[mask]
    return out
