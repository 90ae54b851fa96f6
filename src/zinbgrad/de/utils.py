"""Input checks and small helpers shared by the differential-expression modules.

Everything here works on the internal **genes x cells** orientation (edgeR's), except where a
function says it converts from the public cells x genes input.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

LOG_1E6 = np.log(1e6)
LOG2 = np.log(2.0)


def to_dense(x: Any, name: str = "counts") -> np.ndarray:
    """Return ``x`` as a dense float64 array (copies sparse input).

    Parameters
    ----------
    x
        A 2-d array-like or ``scipy.sparse`` matrix.
    name
        What ``x`` is, for the error message.

    Returns
    -------
    numpy.ndarray
        ``x`` as float64 (a view when it already is a float64 array).
    """
    if sp.issparse(x):
        x = x.toarray()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-d matrix, got shape {arr.shape}")
    return arr


def check_counts(y: np.ndarray, name: str = "counts") -> None:
    """Raise ``ValueError`` for NaN, infinite, negative or non-integer counts."""
    if not np.all(np.isfinite(y)):
        raise ValueError(f"{name} contain NaN or infinite values")
    if np.any(y < 0):
        raise ValueError(f"{name} contain negative values")
    if np.any(y != np.round(y)):
        raise ValueError(f"{name} must be non-negative integers (found non-integer values)")


def counts_gn(counts: Any) -> np.ndarray:
    """Validated cells x genes counts as a C-contiguous genes x cells float64 copy.

    Parameters
    ----------
    counts
        ``(n_cells, n_genes)`` non-negative integer counts, dense or ``scipy.sparse``.

    Returns
    -------
    numpy.ndarray
        ``(n_genes, n_cells)`` float64 array the caller owns.
    """
    y = to_dense(counts).T.copy()
    check_counts(y)
    return y


def as_design(design: Any, nlib: int) -> np.ndarray:
    """A design matrix as 2-d float64 with one row per cell (a vector is one column).

    Parameters
    ----------
    design
        ``(n_cells, n_coef)`` or ``(n_cells,)`` design.
    nlib
        Number of cells.

    Returns
    -------
    numpy.ndarray
        ``(n_cells, n_coef)`` float64 design.
    """
    x = np.asarray(design, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.shape[0] != nlib:
        raise ValueError(f"design has {x.shape[0]} rows, expected {nlib} (one per cell)")
    return x


def check_full_rank(x: np.ndarray) -> None:
    """Raise ``ValueError`` unless the design ``x`` has full column rank."""
    if np.linalg.matrix_rank(x) < x.shape[1]:
        raise ValueError("design matrix is not of full column rank")


def check_weights(w: Any, shape: tuple[int, int]) -> np.ndarray:
    """Observation weights given cells x genes, as genes x cells; validates the range (0, 1].

    Parameters
    ----------
    w
        ``(n_cells, n_genes)`` weights, or ``None`` for all ones.
    shape
        ``(n_genes, n_cells)``, the shape of the internal count matrix.

    Returns
    -------
    numpy.ndarray
        ``(n_genes, n_cells)`` C-contiguous weights.
    """
    if w is None:
        return np.ones(shape)
    arr = to_dense(w, "weights")
    if arr.shape != (shape[1], shape[0]):
        raise ValueError(
            f"weights have shape {arr.shape}, expected {(shape[1], shape[0])} (cells x genes)"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError("weights contain NaN or infinite values")
    if np.any(arr <= 0) or np.any(arr > 1):
        raise ValueError("weights must lie in (0, 1]")
    return np.ascontiguousarray(arr.T)


def expand_offset(offset: Any, shape: tuple[int, int]) -> np.ndarray:
    """Offsets as a genes x cells matrix from a scalar, a per-cell vector or a cells x genes
    matrix.

    Parameters
    ----------
    offset
        Log-scale offsets: a number, ``(n_cells,)`` or ``(n_cells, n_genes)``.
    shape
        ``(n_genes, n_cells)``.

    Returns
    -------
    numpy.ndarray
        ``(n_genes, n_cells)`` C-contiguous offsets.
    """
    o = np.asarray(offset, dtype=np.float64)
    if o.ndim == 0:
        return np.full(shape, float(o))
    if o.ndim == 1:
        if o.size != shape[1]:
            raise ValueError(f"offset has length {o.size}, expected {shape[1]} (one per cell)")
        return np.broadcast_to(o[None, :], shape).copy()
    if o.shape == (shape[1], shape[0]):
        return np.ascontiguousarray(o.T)
    raise ValueError(f"offset matrix has shape {o.shape}, expected {(shape[1], shape[0])}")


def gene_dispersion(dispersion: Any, ng: int) -> np.ndarray:
    """A given NB dispersion (one number, or one per gene) as a finite, non-negative vector.

    Parameters
    ----------
    dispersion
        A number or ``(n_genes,)`` dispersions.
    ng
        Number of genes.

    Returns
    -------
    numpy.ndarray
        ``(n_genes,)`` float64 dispersions (a copy).
    """
    d = np.asarray(dispersion, dtype=np.float64)
    if d.ndim > 1 or (d.ndim == 1 and d.shape[0] not in (1, ng)):
        raise ValueError(f"dispersion must be a number or one per gene ({ng}), got shape {d.shape}")
    disp = np.broadcast_to(d.ravel() if d.ndim else d, (ng,)).copy()
    if np.any(~np.isfinite(disp)) or np.any(disp < 0):
        raise ValueError("dispersion must be finite and non-negative")
    return disp


def disp_matrix(disp: Any, shape: tuple[int, int]) -> np.ndarray:
    """Broadcast a scalar / per-gene dispersion to a genes x cells matrix (read-only view).

    Parameters
    ----------
    disp
        A number, ``(n_genes,)`` or ``(n_genes, n_cells)`` dispersions.
    shape
        ``(n_genes, n_cells)``.

    Returns
    -------
    numpy.ndarray
        ``(n_genes, n_cells)`` dispersions (a broadcast view unless given as a matrix).
    """
    d = np.asarray(disp, dtype=np.float64)
    if d.ndim == 0:
        return np.broadcast_to(d, shape)
    if d.ndim == 1:
        if d.size != shape[0]:
            raise ValueError(f"dispersion has length {d.size}, expected {shape[0]} (one per gene)")
        return np.broadcast_to(d[:, None], shape)
    if d.shape != shape:
        raise ValueError(f"dispersion matrix has shape {d.shape}, expected {shape}")
    return d


def r_quantile(x: np.ndarray, probs: Any) -> np.ndarray:
    """R's default (type 7) quantile, which is NumPy's default ``"linear"`` method."""
    return np.quantile(np.asarray(x, dtype=np.float64), probs)
