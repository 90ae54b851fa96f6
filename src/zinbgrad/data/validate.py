"""Input validation and extraction at the API boundary.

Every check raises a ``ValueError`` (or ``KeyError`` for unknown keys) that names the problem;
the user's objects are never modified (conversions always produce new objects).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = [
    "CountsInput",
    "empty_counts_message",
    "empty_rows_and_columns",
    "validate_counts",
    "extract_counts",
    "build_cell_design",
    "check_design_matrix",
]


@dataclass
class CountsInput:
    """Validated counts (CSR, cells x genes) with their names."""

    X: sp.csr_matrix
    obs_names: np.ndarray
    var_names: np.ndarray
    obs: pd.DataFrame | None = None
    #: False where the input had no gene names (arrays, sparse matrices) and they were made up
    named: bool = True


#: How to fit non-integer counts anyway, in Python and on the command line.
NON_INTEGER_HINT = (
    " (pass allow_non_integer=True, or --allow-non-integer to `zinbgrad fit`, to fit them anyway)"
)


def _first(idx: np.ndarray, k: int = 5) -> str:
    shown = ", ".join(str(i) for i in idx[:k])
    return shown + (", ..." if len(idx) > k else "")


def validate_counts(
    X,
    *,
    allow_non_integer: bool = False,
    check_empty: bool = True,
    obs_names=None,
    var_names=None,
    what: str = "counts",
) -> sp.csr_matrix:
    """Return a validated CSR copy (or a read-only view) of a cells x genes count matrix.

    Raises
    ------
    ValueError
        Non-numeric, NaN/inf, negative or (unless ``allow_non_integer``) non-integer values;
        cells or genes with only zeros (when ``check_empty``); an empty matrix.
    """
    if isinstance(X, np.matrix):
        X = np.asarray(X)
    if sp.issparse(X):
        M = sp.csr_matrix(X)  # new object (a copy for non-CSR input)
        if M is X:
            M = X.copy()
        data = M.data
    else:
        arr = np.asarray(X)
        if arr.ndim != 2:
            raise ValueError(f"{what} must be a 2-D cells x genes matrix, got shape {arr.shape}")
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise ValueError(f"{what} must be numeric, got dtype {arr.dtype}")
        M = sp.csr_matrix(arr)
        data = M.data
    if M.shape[0] == 0 or M.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {M.shape})")
    if not np.issubdtype(data.dtype, np.number) and data.dtype != bool:
        raise ValueError(f"{what} must be numeric, got dtype {data.dtype}")
    data = data.astype(np.float64, copy=False)
    bad = ~np.isfinite(data)
    if bad.any():
        raise ValueError(f"{what} contain {int(bad.sum())} NaN or infinite values")
    if (data < 0).any():
        raise ValueError(
            f"{what} contain {int((data < 0).sum())} negative values; ZINB-WaVE needs raw "
            "non-negative counts"
        )
    frac = data != np.round(data)
    if frac.any():
        msg = (
            f"{what} contain {int(frac.sum())} non-integer values (e.g. {data[frac][0]!r}); "
            "ZINB-WaVE models raw counts, not normalized or log-transformed values"
        )
        if not allow_non_integer:
            raise ValueError(msg + NON_INTEGER_HINT)
        warnings.warn(msg + "; fitting anyway (allow_non_integer=True)", stacklevel=3)
    # M still shares its arrays with the caller's matrix: canonicalize (drop explicit zeros,
    # sort the column indices, both in place) only on copies, never on the user's arrays
    indices, indptr = M.indices, M.indptr
    if not M.has_sorted_indices or (data == 0).any():
        indices, indptr = indices.copy(), indptr.copy()
        if np.shares_memory(data, M.data):
            data = data.copy()
    M = sp.csr_matrix((data, indices, indptr), shape=M.shape)
    M.eliminate_zeros()
    M.sort_indices()
    if check_empty:
        empty_cells, empty_genes = empty_rows_and_columns(M)
        if empty_cells.size:
            raise ValueError(empty_counts_message("cells", empty_cells, obs_names))
        if empty_genes.size:
            raise ValueError(empty_counts_message("genes", empty_genes, var_names))
    return M


def empty_rows_and_columns(M: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the cells (rows) and genes (columns) of a CSR matrix without a non-zero
    count (explicit zeros do not count)."""
    nonzero = M.data != 0
    rows = np.repeat(np.arange(M.shape[0]), np.diff(M.indptr))
    cell_nnz = np.bincount(rows[nonzero], minlength=M.shape[0])
    gene_nnz = np.bincount(M.indices[nonzero], minlength=M.shape[1])
    return np.flatnonzero(cell_nnz == 0), np.flatnonzero(gene_nnz == 0)


#: How to get past cells / genes without counts, in every message that names them.
_EMPTY_HINTS = {
    "cells": "they have no latent position; remove them first (e.g. "
    "scanpy.pp.filter_cells(adata, min_counts=1)) or pass empty_cells='exclude' "
    "(--empty-cells exclude) to leave them out of the fit",
    "genes": "remove them first (e.g. scanpy.pp.filter_genes(adata, min_counts=1)) or "
    "pass empty_genes='exclude' (the default; --empty-genes exclude) to leave them out of the fit",
}


def empty_counts_message(what: str, idx: np.ndarray, names=None, hint: bool = True) -> str:
    """``"N genes have only zero counts (A, B, ...)"``, naming them by ``names`` (or by
    index, ``"index 3, 7"``, when there are none) - the same words on every path (in memory,
    streamed, distributed)."""
    idx = np.asarray(idx)
    shown = _first(np.asarray(names)[idx]) if names is not None else "index " + _first(idx)
    msg = f"{idx.size} {what} have only zero counts ({shown})"
    return msg + ("; " + _EMPTY_HINTS[what] if hint else "")


def extract_counts(data, layer: str | None = None, **kw) -> CountsInput:
    """Validated counts and names from an AnnData, an array or a scipy.sparse matrix."""
    try:
        import anndata as ad
    except ImportError:  # pragma: no cover - anndata is a dependency
        ad = None
    if ad is not None and isinstance(data, ad.AnnData):
        if layer is None:
            X = data.X
            if X is None:
                raise ValueError("adata.X is empty; pass layer= with the raw counts")
        else:
            if layer not in data.layers:
                raise KeyError(
                    f"layer {layer!r} not found in adata.layers (available: "
                    f"{sorted(data.layers.keys())})"
                )
            X = data.layers[layer]
        if getattr(data, "isbacked", False) and layer is None:
            X = data.X[:]  # backed mode: use zinbgrad's streaming fit for data beyond memory
        obs_names = np.asarray(data.obs_names)
        var_names = np.asarray(data.var_names)
        M = validate_counts(X, obs_names=obs_names, var_names=var_names, **kw)
        return CountsInput(M, obs_names, var_names, data.obs)
    if isinstance(data, pd.DataFrame):
        obs_names, var_names = np.asarray(data.index), np.asarray(data.columns)
        M = validate_counts(data.to_numpy(), obs_names=obs_names, var_names=var_names, **kw)
        return CountsInput(M, obs_names, var_names, None)
    M = validate_counts(data, **kw)
    n, J = M.shape
    var_names = np.array([f"gene{j}" for j in range(J)])
    return CountsInput(M, np.arange(n).astype(str), var_names, named=False)


def check_design_matrix(M, n_rows: int, what: str, rows_are: str) -> np.ndarray:
    """A finite 2-D float matrix with ``n_rows`` rows and full column rank."""
    A = np.asarray(M, dtype=np.float64)
    if A.ndim == 1:
        A = A[:, None]
    if A.ndim != 2:
        raise ValueError(f"{what} must be a 2-D matrix, got shape {A.shape}")
    if A.shape[0] != n_rows:
        raise ValueError(
            f"{what} has {A.shape[0]} rows but there are {n_rows} {rows_are}; it needs one row "
            f"per {rows_are[:-1]}"
        )
    if not np.isfinite(A).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    if A.shape[1] > 0:
        rank = np.linalg.matrix_rank(A)
        if rank < A.shape[1]:
            raise ValueError(
                f"{what} is rank deficient (rank {rank} < {A.shape[1]} columns): remove "
                "collinear columns (e.g. a full set of batch indicators next to the intercept)"
            )
    return A


def _is_categorical(col: pd.Series) -> bool:
    """Whether an obs column becomes indicator columns (non-numeric or boolean)."""
    return not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)


def build_cell_design(
    obs: pd.DataFrame | None,
    n: int,
    *,
    batch_key: str | None = None,
    covariate_keys: str | list[str] | tuple[str, ...] | None = None,
    intercept: bool = True,
    categories: dict[str, list[str]] | None = None,
) -> tuple[np.ndarray, list[str], dict]:
    """Cell-level design X: intercept, batch indicators (first level as reference), covariates.

    Parameters
    ----------
    obs, n
        Cell annotations and the number of cells.
    batch_key
        Column whose levels become indicator columns, whatever its dtype (integer batch codes
        included); the first level is the reference.
    covariate_keys
        Further columns: categorical, string and boolean ones as indicators, numeric ones as
        they are.
    intercept
        Start with a column of ones.
    categories
        The levels (reference first) a fit saw for each categorical column. New cells are
        encoded against them: a cell may come from any subset of the levels, and a level the
        fit did not see is an error. Without it (a fit), the levels come from ``obs``.

    Returns
    -------
    (X, column_names, info)
        ``info["categories"]`` holds the levels of every categorical column and
        ``info["covariate_keys"]`` the covariate columns (the batch's excluded); with a
        ``batch_key``, ``info`` also holds ``batch_key``, its ``levels`` and ``reference``,
        for batch correction later.
    """
    cols: list[np.ndarray] = []
    names: list[str] = []
    info: dict = {}
    seen: dict[str, list[str]] = {}
    if intercept:
        cols.append(np.ones(n))
        names.append("intercept")
    if isinstance(covariate_keys, str):
        covariate_keys = [covariate_keys]
    keys = list(covariate_keys or [])
    if batch_key is not None:
        keys = [batch_key] + [k for k in keys if k != batch_key]
    if keys and obs is None:
        raise ValueError("batch_key / covariate_keys need an AnnData input (with .obs)")
    for key in keys:
        if key not in obs.columns:
            raise KeyError(f"{key!r} not found in adata.obs (available: {list(obs.columns)})")
        col = obs[key]
        if col.isna().any():
            raise ValueError(f"adata.obs[{key!r}] has {int(col.isna().sum())} missing values")
        known = None if categories is None else categories.get(key)
        if known is None and not (key == batch_key or _is_categorical(col)):
            cols.append(np.asarray(col, dtype=np.float64))
            names.append(key)
            continue
        values = np.asarray(col.astype(str))
        if known is not None:
            levels = [str(lv) for lv in known]
            unseen = sorted(set(values) - set(levels))
            if unseen:
                raise ValueError(
                    f"adata.obs[{key!r}] has levels the model was not fitted with: "
                    f"{_first(np.asarray(unseen))} (fitted levels: {levels})"
                )
        else:
            # levels in the column's own order (numeric order for integer batch codes)
            cat = pd.Categorical(col.astype(str) if pd.api.types.is_bool_dtype(col) else col)
            levels = [str(lv) for lv in cat.remove_unused_categories().categories]
            if key == batch_key:
                if len(levels) < 2:
                    raise ValueError(
                        f"batch_key {key!r} has a single level ({levels[0]!r}); nothing to correct"
                    )
                counts = pd.Series(values).value_counts()
                small = [lv for lv in levels if counts[lv] < 2]
                if small:
                    raise ValueError(
                        f"batch(es) {small} of {key!r} have fewer than 2 cells; a batch effect "
                        "cannot be estimated from one cell"
                    )
        if key == batch_key:
            info.update(batch_key=key, levels=levels, reference=levels[0])
        seen[key] = levels
        for lv in levels[1:]:
            cols.append((values == lv).astype(np.float64))
            names.append(f"{key}[{lv}]")
    info["categories"] = seen
    info["covariate_keys"] = [k for k in keys if k != batch_key]
    X = np.column_stack(cols) if cols else np.zeros((n, 0))
    return X, names, info
