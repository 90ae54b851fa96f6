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
    "check_count_dtype",
    "check_unique_names",
    "CountTally",
    "check_anndata",
    "check_key",
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


def check_anndata(adata, what: str = "adata") -> None:
    """A TypeError naming what was passed where an AnnData is needed."""
    import anndata as ad

    if not isinstance(adata, ad.AnnData):
        raise TypeError(
            f"{what} must be an AnnData, got {type(adata).__name__}; for a path or an array use "
            "zinbgrad.ZINBWaVE().fit(...) or read it with anndata.read_h5ad first"
        )


def check_key(key, what: str = "key_added") -> str:
    """A key under which anndata can store an element and read it back: a non-empty string
    without ``/`` (it would become an HDF5 sub-group), not ``.`` or ``..``.

    Raises
    ------
    TypeError
        ``key`` is not a string.
    ValueError
        ``key`` is empty or has a character anndata cannot store.
    """
    if not isinstance(key, str):
        raise TypeError(f"{what} must be a string, got {type(key).__name__} {key!r}")
    if not key.strip():
        raise ValueError(f"{what} must be a non-empty name, got {key!r}")
    if "/" in key or key in (".", ".."):
        raise ValueError(
            f"{what} {key!r} cannot be stored in an .h5ad file (no '/', '.' or '..'); "
            "choose a name such as 'X_zinbwave'"
        )
    return key


def _dtype_error(what: str, dtype) -> str:
    if np.dtype(dtype) == bool:
        return (
            f"{what} are boolean (presence/absence), not counts; ZINB-WaVE needs the raw "
            "integer counts"
        )
    return f"{what} must be numeric, got dtype {dtype}"


def check_count_dtype(dtype, what: str = "counts") -> None:
    """Refuse stored values that cannot be counts: booleans, strings, objects."""
    if not np.issubdtype(np.dtype(dtype), np.number):
        raise ValueError(_dtype_error(what, dtype))


def check_unique_names(obs_names, var_names) -> None:
    """Refuse duplicate cell or gene names: outputs and new cells are matched by name."""
    for what, names, fix in (
        ("gene", var_names, "adata.var_names_make_unique()"),
        ("cell", obs_names, "adata.obs_names_make_unique()"),
    ):
        index = pd.Index(np.asarray(names).astype(str))
        if not index.is_unique:
            dup = index[index.duplicated()].unique()
            raise ValueError(
                f"{len(dup)} {what} names occur more than once ({_first(np.asarray(dup))}); "
                f"make them unique first, e.g. {fix}"
            )


class CountTally:
    """The values of a count matrix that are not raw counts, tallied block by block, and the
    one error (or warning) that names them, for every path (in memory, streamed, distributed).
    """

    def __init__(self) -> None:
        self.nonfinite = self.negative = self.fractional = 0
        self.example: float | None = None

    def add(self, data: np.ndarray) -> None:
        """Tally the stored values of one block (float64)."""
        bad = ~np.isfinite(data)
        self.nonfinite += int(bad.sum())
        finite = data[~bad] if bad.any() else data
        self.negative += int((finite < 0).sum())
        frac = finite != np.round(finite)
        if frac.any():
            self.fractional += int(frac.sum())
            if self.example is None:
                self.example = float(finite[frac][0])

    def check(self, what: str, allow_non_integer: bool, stacklevel: int = 3) -> None:
        """Raise for NaN/infinite or negative values, and for non-integer ones unless
        ``allow_non_integer`` (then warn)."""
        if self.nonfinite:
            raise ValueError(f"{what} contain {self.nonfinite} NaN or infinite values")
        if self.negative:
            raise ValueError(
                f"{what} contain {self.negative} negative values; ZINB-WaVE needs raw "
                "non-negative counts"
            )
        if self.fractional:
            msg = (
                f"{what} contain {self.fractional} non-integer values (e.g. {self.example!r}); "
                "ZINB-WaVE models raw counts, not normalized or log-transformed values"
            )
            if not allow_non_integer:
                raise ValueError(msg + NON_INTEGER_HINT)
            warnings.warn(
                msg + "; fitting anyway (allow_non_integer=True)", stacklevel=stacklevel + 1
            )


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
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(_dtype_error(what, arr.dtype))
        M = sp.csr_matrix(arr)
        data = M.data
    if M.shape[0] == 0 or M.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {M.shape})")
    if not np.issubdtype(data.dtype, np.number):
        raise ValueError(_dtype_error(what, data.dtype))
    data = data.astype(np.float64, copy=False)
    tally = CountTally()
    tally.add(data)
    tally.check(what, allow_non_integer, stacklevel=3)
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


def check_design_matrix(
    M, n_rows: int, what: str, rows_are: str, names: list[str] | None = None
) -> np.ndarray:
    """A finite 2-D float matrix with ``n_rows`` rows and full column rank.

    The rank is that of the matrix with its columns scaled to unit norm: collinear columns
    are an error, and so, named apart, is a column on a scale so far from the others' that
    the fit could not tell it from collinear (``names``: the columns' names, for the message).
    """
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
        norms = np.linalg.norm(A, axis=0)
        rank = np.linalg.matrix_rank(A / np.where(norms > 0, norms, 1.0))
        if rank < A.shape[1]:
            raise ValueError(
                f"{what} is rank deficient (rank {rank} < {A.shape[1]} columns): remove "
                "collinear columns (e.g. a full set of batch indicators next to the intercept)"
            )
        if np.linalg.matrix_rank(A) < A.shape[1]:
            scale = np.abs(A).max(axis=0)
            col = int(np.argmax(scale)) if scale.max() > 1 else int(np.argmin(scale))
            label = repr(names[col]) if names is not None and col < len(names) else str(col)
            raise ValueError(
                f"column {label} of {what} is on a scale (largest |value| {scale[col]:.3g}) "
                f"too far from the other columns' ({np.delete(scale, col).max():.3g}): the fit "
                "cannot separate it from them; center and scale it (e.g. (x - mean) / sd)"
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
        col = _obs_column(obs, key)
        known = None if categories is None else categories.get(key)
        if known is None and not (key == batch_key or _is_categorical(col)):
            cols.append(np.asarray(col, dtype=np.float64))
            names.append(key)
            continue
        values = np.asarray(col.astype(str))
        if known is not None:
            levels = _fitted_levels(key, values, known)
        else:
            # levels in the column's own order (numeric order for integer batch codes)
            cat = pd.Categorical(col.astype(str) if pd.api.types.is_bool_dtype(col) else col)
            levels = [str(lv) for lv in cat.remove_unused_categories().categories]
            if key == batch_key:
                _check_batch_levels(key, col, values, levels)
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


def _obs_column(obs: pd.DataFrame, key: str) -> pd.Series:
    """``obs[key]``, which must exist and have no missing values."""
    if key not in obs.columns:
        raise KeyError(f"{key!r} not found in adata.obs (available: {list(obs.columns)})")
    col = obs[key]
    if col.isna().any():
        raise ValueError(f"adata.obs[{key!r}] has {int(col.isna().sum())} missing values")
    return col


def _fitted_levels(key: str, values: np.ndarray, known) -> list[str]:
    """The levels a model was fitted with, as strings; ``values`` must not have others."""
    levels = [str(lv) for lv in known]
    unseen = sorted(set(values) - set(levels))
    if unseen:
        raise ValueError(
            f"adata.obs[{key!r}] has levels the model was not fitted with: "
            f"{_first(np.asarray(unseen))} (fitted levels: {levels})"
        )
    return levels


def _check_batch_levels(key: str, col: pd.Series, values: np.ndarray, levels: list[str]) -> None:
    """A batch column needs at least two levels, each with at least two cells."""
    if len(levels) < 2:
        raise ValueError(
            f"batch_key {key!r} has a single level ({levels[0]!r}); nothing to correct"
        )
    counts = pd.Series(values).value_counts()
    small = [lv for lv in levels if counts[lv] < 2]
    if small and pd.api.types.is_numeric_dtype(col):
        raise ValueError(
            f"batch_key {key!r} is a numeric column with {len(levels)} distinct "
            f"values, {len(small)} of them in a single cell: a batch_key needs a "
            "few levels with several cells each; a numeric covariate goes in "
            "covariate_keys (modelled as a number)"
        )
    if small:
        raise ValueError(
            f"{len(small)} batch(es) of {key!r} have fewer than 2 cells "
            f"({_first(np.asarray(small))}); a batch effect cannot be estimated "
            "from one cell"
        )
