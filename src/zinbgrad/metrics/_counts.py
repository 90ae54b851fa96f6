"""Corrupted and semi-synthetic counts: the imputation benchmark and binomial thinning."""

from __future__ import annotations

from typing import NamedTuple

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._checks import ArrayLike

__all__ = ["CorruptedCounts", "binomial_thinning_batch", "corrupt_counts", "imputation_error"]


class CorruptedCounts(NamedTuple):
    """Result of :func:`corrupt_counts`.

    Attributes
    ----------
    X
        Corrupted copy of the counts (CSR, explicit zeros removed).
    rows, cols
        Coordinates of the corrupted entries (``int64``, row-major order).
    values
        Their original (non-zero) values.
    """

    X: sp.csr_matrix
    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray


def corrupt_counts(
    X: ArrayLike,
    rate: float = 0.1,
    random_state: int | None = 0,
    *,
    zero_prob: float = 1.0,
) -> CorruptedCounts:
    """Zero out a uniformly chosen fraction of the non-zero counts (imputation benchmark).

    The scVI "uniform" corruption: choose ``floor(rate * nnz)`` of the ``nnz``
    non-zero entries uniformly without replacement and set them to zero. The
    input is not modified.

    Note on the reference code: scVI's ``GeneExpressionDataset.corrupt``
    multiplies each chosen entry by a ``Bernoulli(0.9)`` draw, so only about
    10% of the chosen entries become zero, and its imputation score uses only
    the entries that actually changed. ``zero_prob=0.1`` reproduces that
    literally; the default ``zero_prob=1.0`` zeroes every chosen entry, as
    the paper's text describes.

    Parameters
    ----------
    X
        ``(n_cells, n_genes)`` counts, dense or sparse.
    rate
        Fraction of the non-zero entries chosen, in ``[0, 1]``.
    random_state
        Seed (``numpy.random.default_rng``).
    zero_prob
        Probability that a chosen entry is actually zeroed, in ``(0, 1]``.

    Returns
    -------
    CorruptedCounts
        ``(X, rows, cols, values)``: the corrupted CSR copy and the
        coordinates and original values of the zeroed entries.
    """
    if not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    if not 0.0 < float(zero_prob) <= 1.0:
        raise ValueError(f"zero_prob must be in (0, 1], got {zero_prob}")
    if hasattr(X, "detach"):
        X = X.detach().cpu().numpy()
    if sp.issparse(X):
        M = sp.csr_matrix(X, copy=True)
    else:
        arr = np.asarray(X)
        if arr.ndim != 2:
            raise ValueError(f"X must be 2-D (n_cells, n_genes), got shape {arr.shape}")
        M = sp.csr_matrix(arr)
    if M.ndim != 2:
        raise ValueError(f"X must be 2-D, got shape {M.shape}")
    M.sum_duplicates()
    M.eliminate_zeros()
    M.sort_indices()

    nnz = M.nnz
    n_chosen = int(np.floor(float(rate) * nnz))
    rng = np.random.default_rng(random_state)
    chosen = np.sort(rng.choice(nnz, size=n_chosen, replace=False))
    if zero_prob < 1.0:
        chosen = chosen[rng.random(chosen.size) < zero_prob]

    rows_all = np.repeat(np.arange(M.shape[0], dtype=np.int64), np.diff(M.indptr))
    rows = rows_all[chosen]
    cols = M.indices[chosen].astype(np.int64)
    values = M.data[chosen].copy()
    M.data[chosen] = 0
    M.eliminate_zeros()
    return CorruptedCounts(M, rows, cols, values)


def imputation_error(original_values: ArrayLike, imputed_values: ArrayLike) -> float:
    """Median L1 distance between original and imputed values of the corrupted entries.

    ``median_i |original_i - imputed_i|`` over the corrupted entries (scVI
    ``Posterior.imputation_score``: the median of the absolute differences,
    all cells pooled).

    Parameters
    ----------
    original_values
        Original counts of the corrupted entries (``CorruptedCounts.values``).
    imputed_values
        The model's imputed values (e.g. the mean ``mu``) at the same entries,
        in the same order and shape.

    Returns
    -------
    float
        The median absolute error.
    """
    orig = np.asarray(original_values, dtype=np.float64)
    imp = np.asarray(imputed_values, dtype=np.float64)
    if orig.shape != imp.shape:
        raise ValueError(
            f"original_values and imputed_values differ in shape: {orig.shape} vs {imp.shape}"
        )
    if orig.size == 0:
        raise ValueError("no corrupted entries to score")
    if not (np.all(np.isfinite(orig)) and np.all(np.isfinite(imp))):
        raise ValueError("original_values and imputed_values must be finite")
    return float(np.median(np.abs(orig - imp)))


def binomial_thinning_batch(
    adata: ad.AnnData,
    frac: float = 0.5,
    effect_sd: float = 0.5,
    random_state: int | None = 0,
    *,
    layer: str | None = None,
    keep_prob: ArrayLike | None = None,
    batch_key: str = "batch",
) -> ad.AnnData:
    """Make a two-batch data set by binomially thinning the counts of one random half.

    The cells are split uniformly at random into batch ``"0"`` (untouched) and
    batch ``"1"`` (``round(frac * n_cells)`` cells). Every count ``x_ij`` of a
    batch-1 cell is replaced by ``Binomial(x_ij, p_j)``, with a gene-specific
    keep probability ``p_j = exp(-|z_j|)``, ``z_j ~ N(0, effect_sd^2)``, i.e.
    a multiplicative technical effect on the expected counts
    (``E[thinned] = p_j x_ij``) of log-scale size ``|z_j|``. Thinning never
    increases a count and keeps integer counts integer.

    Parameters
    ----------
    adata
        Cells x genes AnnData with raw integer counts.
    frac
        Fraction of the cells put in the thinned batch ``"1"``, in ``(0, 1)``.
    effect_sd
        Standard deviation of the log keep probabilities' half-normal
        (``>= 0``; 0 means no effect).
    random_state
        Seed (``numpy.random.default_rng``) of the split, the effects and the
        thinning.
    layer
        Layer holding the counts (``None``: ``X``).
    keep_prob
        Optional explicit ``(n_genes,)`` keep probabilities in ``(0, 1]``,
        used instead of drawing them.
    batch_key
        ``obs`` column receiving the batch (overwritten if present).

    Returns
    -------
    anndata.AnnData
        New AnnData (``X`` CSR) with ``obs[batch_key]`` (categorical ``"0"``,
        ``"1"``) and ``var["keep_prob"]``; ``obs`` and ``var`` columns of the
        input are kept, its layers are not.
    """
    if not 0.0 < float(frac) < 1.0:
        raise ValueError(f"frac must be in (0, 1), got {frac}")
    if not (np.isfinite(effect_sd) and effect_sd >= 0):
        raise ValueError(f"effect_sd must be finite and >= 0, got {effect_sd}")
    M = _integer_counts_csr(adata, layer)
    n_cells, n_genes = M.shape

    rng = np.random.default_rng(random_state)
    in_batch1 = _random_half(rng, n_cells, frac)
    p = _keep_probabilities(rng, keep_prob, effect_sd, n_genes)
    _thin_rows(M, in_batch1, p, rng)

    obs = adata.obs.copy()
    obs[batch_key] = pd.Categorical(np.where(in_batch1, "1", "0"), categories=["0", "1"])
    var = adata.var.copy()
    var["keep_prob"] = p
    return ad.AnnData(X=M, obs=obs, var=var)


def _integer_counts_csr(adata: ad.AnnData, layer: str | None) -> sp.csr_matrix:
    """A CSR copy of the counts (``X`` or ``layer``), checked to be non-negative integers."""
    counts = adata.X if layer is None else adata.layers[layer]
    if counts is None:
        raise ValueError("adata.X is empty")
    M = sp.csr_matrix(counts, dtype=None, copy=True)
    M.sum_duplicates()
    data = np.asarray(M.data)
    if data.size and (np.any(data < 0) or np.any(data != np.round(data))):
        raise ValueError("binomial thinning needs non-negative integer counts")
    return M


def _random_half(rng: np.random.Generator, n_cells: int, frac: float) -> np.ndarray:
    """Boolean mask of ``round(frac * n_cells)`` cells drawn uniformly (one permutation)."""
    n_thin = int(round(float(frac) * n_cells))
    if n_thin in (0, n_cells):
        raise ValueError(f"frac={frac} leaves one batch empty with {n_cells} cells")
    in_batch1 = np.zeros(n_cells, dtype=bool)
    in_batch1[rng.permutation(n_cells)[:n_thin]] = True
    return in_batch1


def _keep_probabilities(
    rng: np.random.Generator, keep_prob: ArrayLike | None, effect_sd: float, n_genes: int
) -> np.ndarray:
    """The genes' keep probabilities: ``keep_prob`` checked, else ``exp(-|N(0, sd^2)|)``."""
    if keep_prob is None:
        return np.exp(-np.abs(rng.normal(0.0, float(effect_sd), size=n_genes)))
    p = np.asarray(keep_prob, dtype=np.float64)
    if p.shape != (n_genes,):
        raise ValueError(f"keep_prob must have shape ({n_genes},), got {p.shape}")
    if not np.all((p > 0) & (p <= 1)):
        raise ValueError("keep_prob must lie in (0, 1]")
    return p


def _thin_rows(M: sp.csr_matrix, rows: np.ndarray, p: np.ndarray, rng: np.random.Generator) -> None:
    """Replace every count of the cells ``rows`` (mask) by ``Binomial(count, p[gene])``, in
    place (explicit zeros removed)."""
    data = np.asarray(M.data)
    row_of = np.repeat(np.arange(M.shape[0]), np.diff(M.indptr))
    sel = rows[row_of]
    thinned = rng.binomial(data[sel].astype(np.int64), p[M.indices[sel]])
    new_data = data.copy()
    new_data[sel] = thinned.astype(new_data.dtype)
    M.data = new_data
    M.eliminate_zeros()
