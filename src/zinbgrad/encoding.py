"""Design encoding of cells for a :class:`~zinbgrad.ZINBWaVE`: the training cells' design at
fit time, new cells' design against the fitted columns and levels, and gene alignment.

Every function takes the estimator (``model``) explicitly; it reads its hyper-parameters
(``which_X_mu``, ``batch_loadings``, ...) and, for new cells, its fitted record (``X_columns_``,
``batch_info_``, ``var_names_``).
"""

from __future__ import annotations

import numpy as np
import torch

from .data.validate import build_cell_design, check_design_matrix
from .fitted import check_fitted, fitted_masks
from .model.params import Design

__all__ = [
    "align_genes",
    "batch_codes",
    "categories",
    "cell_design",
    "encode_cells",
    "fit_keys",
    "make_design",
    "offset_matrix",
    "select_columns",
    "training_design",
    "training_inputs",
]


# ------------------------------------------------------------------ building blocks
def select_columns(M: np.ndarray, which, what: str) -> np.ndarray:
    """The columns ``which`` (indices or a boolean mask; ``None``: all) of ``M``; ``what``
    names the selection in the error for an index out of range."""
    if which is None:
        return M
    idx = np.atleast_1d(np.asarray(which))
    if idx.dtype == bool:
        idx = np.flatnonzero(idx)
    if idx.size and (idx.min() < 0 or idx.max() >= M.shape[1]):
        raise ValueError(f"{what} selects columns {idx.tolist()} but there are {M.shape[1]}")
    return M[:, idx.astype(int)]


def offset_matrix(O, n: int, J: int, what: str) -> np.ndarray | None:
    """An offset (``O_mu``/``O_pi``, named ``what``) of ``n`` cells and ``J`` genes as an
    (n, 1) or (n, J) float64 array, checked (shape, finite values); ``None`` stays ``None``."""
    if O is None:
        return None
    A = np.asarray(O, dtype=np.float64)
    if A.ndim == 1:
        A = A[:, None]
    if A.ndim != 2 or A.shape[0] != n or A.shape[1] not in (1, J):
        raise ValueError(f"{what} must have shape ({n},), ({n}, 1) or ({n}, {J}); got {A.shape}")
    if not np.isfinite(A).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return A


def batch_codes(Xm: np.ndarray, columns, info: dict) -> np.ndarray:
    """Each cell's batch code (its level's position in ``info["levels"]``) from its batch
    indicator columns of ``Xm`` (named ``columns``; the reference level has none)."""
    key, levels = info["batch_key"], info["levels"]
    cols = [list(columns).index(f"{key}[{lv}]") for lv in levels[1:]]
    Xb = np.asarray(Xm)[:, cols]
    if not np.isin(Xb, (0.0, 1.0)).all() or (Xb.sum(1) > 1).any():
        raise ValueError("the batch columns of X must be 0/1 indicators of one batch per cell")
    return np.where(Xb.sum(1) > 0, Xb.argmax(1) + 1, 0).astype(np.int64)


def make_design(model, Xm, Vm, O_mu, O_pi, device, dtype, columns=None, info=None) -> Design:
    """The :class:`Design` of cells ``Xm`` (genes ``Vm``, offsets ``O_mu``/``O_pi``) under
    ``model``'s column selections (``which_X_mu``, ...); with ``batch_loadings`` or
    ``batch_dispersion``, the cells' batch codes too, from the batch columns of X named by
    ``columns``/``info`` (default: the fitted ``X_columns_``/``batch_info_``)."""

    def t(a):
        return None if a is None else torch.as_tensor(a, dtype=dtype, device=device)

    codes, B = None, 0
    if model.batch_loadings or model.batch_dispersion:
        columns = model.X_columns_ if columns is None else columns
        info = model.batch_info_ if info is None else info
        codes = torch.as_tensor(batch_codes(Xm, columns, info), device=device)
        B = len(info["levels"])
    return Design(
        X_mu=t(np.ascontiguousarray(select_columns(Xm, model.which_X_mu, "which_X_mu"))),
        X_pi=t(np.ascontiguousarray(select_columns(Xm, model.which_X_pi, "which_X_pi"))),
        V_mu=t(np.ascontiguousarray(select_columns(Vm, model.which_V_mu, "which_V_mu"))),
        V_pi=t(np.ascontiguousarray(select_columns(Vm, model.which_V_pi, "which_V_pi"))),
        O_mu=t(O_mu),
        O_pi=t(O_pi),
        batch=codes,
        n_batches=B,
    )


# ------------------------------------------------------------------ the training cells
def cell_design(obs, n: int, X, batch_key, covariate_keys) -> tuple[np.ndarray, list, dict]:
    """The training cells' design (an explicit ``X``, or built from ``obs[batch_key]`` and
    ``obs[covariate_keys]``), its column names and its ``batch_info_``."""
    if X is not None:
        if batch_key is not None or covariate_keys:
            raise ValueError("pass either X or batch_key/covariate_keys, not both")
        Xm = check_design_matrix(X, n, "X", "cells")
        return Xm, [f"x{m}" for m in range(Xm.shape[1])], {}
    Xm, names, info = build_cell_design(obs, n, batch_key=batch_key, covariate_keys=covariate_keys)
    return check_design_matrix(Xm, n, "X (cell covariates)", "cells", names), names, info


def training_inputs(
    model, inp, X, V, O_mu, O_pi, batch_key, covariate_keys
) -> tuple[np.ndarray, list, dict, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The checked design inputs of a fit of ``model`` to the counts ``inp`` (their ``obs``
    and ``shape``), from :meth:`ZINBWaVE.fit`'s arguments: the cell design, its column names,
    its ``batch_info_``, the gene design and the two offsets."""
    n, J = inp.shape
    Xm, xnames, batch_info = cell_design(inp.obs, n, X, batch_key, covariate_keys)
    if model.batch_loadings and "batch_key" not in batch_info:
        raise ValueError(
            "batch_loadings=True needs batch_key (the obs column of the batches whose "
            "loadings may differ)"
        )
    if model.batch_dispersion and "batch_key" not in batch_info:
        raise ValueError(
            "batch_dispersion=True needs batch_key (the obs column of the batches whose "
            "dispersions may differ)"
        )
    Vm = np.ones((J, 1)) if V is None else check_design_matrix(V, J, "V", "genes")
    O_mu_a = offset_matrix(O_mu, n, J, "O_mu")
    O_pi_a = offset_matrix(O_pi, n, J, "O_pi")
    return Xm, xnames, batch_info, Vm, O_mu_a, O_pi_a


def training_design(model, device="cpu", dtype: torch.dtype = torch.float64, X=None) -> Design:
    """The design (X, V, offsets) of a fitted ``model``'s training cells; ``X``: a
    replacement cell design of the shape of ``X_`` (e.g. every cell moved to one batch)."""
    check_fitted(model)
    Xm = model.X_ if X is None else np.asarray(X, dtype=np.float64)
    if Xm.shape != model.X_.shape:
        raise ValueError(f"X has shape {Xm.shape}; the model's X has {model.X_.shape}")
    return make_design(model, Xm, model.V_, model.O_mu_, model.O_pi_, torch.device(device), dtype)


# ------------------------------------------------------------------ new cells
def categories(batch_info: dict | None) -> dict[str, list[str]]:
    """The fitted levels of each categorical obs column in a fit's ``batch_info_`` (older
    files: the batch only)."""
    info = batch_info or {}
    if "categories" in info:
        return info["categories"]
    return {info["batch_key"]: info["levels"]} if "levels" in info else {}


def fit_keys(model) -> tuple[str | None, list[str]]:
    """The ``obs`` columns a fitted ``model``'s design X was built from (see
    :meth:`ZINBWaVE.fit_keys`)."""
    check_fitted(model)
    info = model.batch_info_ or {}
    batch_key = info.get("batch_key")
    if "covariate_keys" in info:
        return batch_key, [str(k) for k in info["covariate_keys"]]
    if "categories" not in info and "batch_key" not in info:  # explicit X, from_params
        if list(model.X_columns_) in ([], ["intercept"]):
            return None, []
        raise ValueError(
            "the model was fitted with an explicit X (its columns come from no obs "
            "column); pass X= with the new cells' design"
        )
    # fitted before the keys were recorded: read them off the column names
    cats = categories(model.batch_info_)
    keys: list[str] = []
    for name in model.X_columns_[1:]:
        key = next((k for k in cats if name.startswith(f"{k}[")), name)
        if key not in keys and key != batch_key:
            keys.append(key)
    return batch_key, keys


def _intercept_only(n: int, M: int) -> np.ndarray:
    Xm = np.zeros((n, M))
    Xm[:, 0] = 1.0
    return Xm


def _check_given_keys(batch_key, covariate_keys, fit_batch, fit_covs) -> None:
    """Keys a caller passed must be the fit's."""
    if batch_key is not None and batch_key != fit_batch:
        raise ValueError(
            f"batch_key={batch_key!r}, but the model was fitted "
            + (f"with batch_key={fit_batch!r}" if fit_batch else "without one")
            + "; new cells are encoded with the fit's keys (leave batch_key out)"
        )
    if covariate_keys is not None:
        given = [covariate_keys] if isinstance(covariate_keys, str) else list(covariate_keys)
        if sorted(given) != sorted(fit_covs):
            raise ValueError(
                f"covariate_keys={given}, but the model was fitted with "
                f"covariate_keys={fit_covs}; new cells are encoded with the fit's keys "
                "(leave covariate_keys out)"
            )


def _check_obs(model, obs, keys: list[str]) -> None:
    """``obs`` holds every column the fit's design was built from."""
    hint = (
        "; pass reference_batch=True to encode every new cell as the reference batch "
        f"({(model.batch_info_ or {}).get('reference', 'zero covariates')!r}), or an "
        "explicit X"
    )
    if obs is None:
        raise ValueError(
            f"the model was fitted with obs columns {keys}: new cells need an AnnData "
            "with them in .obs" + hint
        )
    missing = [k for k in keys if k not in obs.columns]
    if missing:
        raise KeyError(
            f"the model was fitted with obs column(s) {missing}, missing from the new "
            f"cells' .obs (its columns: {list(obs.columns)})" + hint
        )


def _design_from_obs(model, obs, n: int, fit_batch, fit_covs) -> np.ndarray:
    """New cells' X from their ``obs``, encoded against the fitted levels and columns."""
    cats = categories(model.batch_info_)
    Xb, names, _ = build_cell_design(
        obs, n, batch_key=fit_batch, covariate_keys=fit_covs, categories=cats
    )
    columns = model.X_columns_
    Xm = np.zeros((n, len(columns)))
    for k, nm in enumerate(names):
        if nm not in columns:
            raise ValueError(
                f"covariate column {nm!r} is not in the fitted model (its columns: {columns})"
            )
        Xm[:, columns.index(nm)] = Xb[:, k]
    return Xm


# Also the method ZINBWaVE.encode_cells (``model`` is then the estimator itself).
def encode_cells(
    model,
    obs,
    n: int,
    *,
    X=None,
    reference_batch: bool = False,
    batch_key: str | None = None,
    covariate_keys: list[str] | str | None = None,
) -> np.ndarray:
    """The design X (n x M, the fit's columns) of ``n`` new cells.

    By default the fit's own ``batch_key`` and ``covariate_keys`` (:meth:`fit_keys`) are
    read from ``obs``: categorical columns are encoded against the fitted levels with the
    fit's reference level (the cells may hold any subset of them), numeric ones as they
    are. A missing column, or a level the fit never saw, is an error that names it. A
    model fitted without covariates ignores ``obs``.

    Parameters
    ----------
    obs
        The new cells' annotations (``adata.obs``), or ``None`` (arrays).
    n
        Number of new cells.
    X
        An explicit design instead (n x M, the fit's columns in order).
    reference_batch
        Encode every cell as the fit's reference batch with zero numeric covariates (an
        intercept only), whatever ``obs`` holds.
    batch_key, covariate_keys
        Optional; when given they must be the fit's (a check, nothing more).
    """
    check_fitted(model)
    M = len(model.X_columns_)
    if X is not None:
        if reference_batch:
            raise ValueError("pass either X or reference_batch=True, not both")
        Xm = check_design_matrix(X, n, "X", "cells")
        if Xm.shape[1] != M:
            raise ValueError(f"X has {Xm.shape[1]} columns; the model has {M}")
        return Xm
    if reference_batch:
        if not model.X_columns_ or model.X_columns_[0] != "intercept":
            raise ValueError("the model was fitted with an explicit X; pass X for the new cells")
        return _intercept_only(n, M)
    fit_batch, fit_covs = fit_keys(model)
    _check_given_keys(batch_key, covariate_keys, fit_batch, fit_covs)
    keys = ([fit_batch] if fit_batch else []) + fit_covs
    if not keys:
        return _intercept_only(n, M)
    _check_obs(model, obs, keys)
    return _design_from_obs(model, obs, n, fit_batch, fit_covs)


def align_genes(model, counts) -> None:
    """Put the genes of ``counts`` (changed in place; from
    :func:`~zinbgrad.data.open.open_counts` or :func:`~zinbgrad.data.validate.extract_counts`)
    in the fitted ``model``'s order: by name when the counts have gene names (extra genes
    dropped, a missing one an error), else by position (the model's genes, or the genes of
    the data passed to fit, of which the fitted ones are kept)."""
    J = len(model.var_names_)
    genes, _, _ = fitted_masks(model)
    if not counts.named and counts.shape[1] == len(genes) != J and counts.X is not None:
        # an array with the columns of the data passed to fit: the fitted ones are used
        counts.X = counts.X[:, np.flatnonzero(genes)]
        counts.shape = counts.X.shape
    if not counts.named:  # an array or sparse matrix: its columns are the model's genes
        if counts.shape[1] != J:
            raise ValueError(
                f"the new counts have {counts.shape[1]} columns but the model has {J} genes; "
                "pass an AnnData or DataFrame with gene names to align genes by name"
            )
        counts.var_names = model.var_names_
        return
    names = np.asarray(counts.var_names).astype(str)
    if names.shape == model.var_names_.shape and (names == model.var_names_).all():
        return
    _check_alignable(model.var_names_, names)
    if counts.X is None:
        raise ValueError(
            "the genes of the .h5ad on disk are not in the model's order; subset/reorder it "
            "to the model's genes (model.var_names_) or load it into memory"
        )
    pos = {g: i for i, g in enumerate(names)}
    idx = np.array([pos[g] for g in model.var_names_])
    counts.X = counts.X[:, idx]
    counts.var_names = model.var_names_
    counts.shape = counts.X.shape


def _check_alignable(fitted: np.ndarray, names: np.ndarray) -> None:
    """Genes can be aligned by name: unique names, every fitted gene present."""
    for what, nm in (("the model's", fitted), ("the new data's", names)):
        if len(np.unique(nm)) < len(nm):
            raise ValueError(
                f"{what} gene names are not unique, so genes cannot be aligned by name; "
                "make them unique (e.g. adata.var_names_make_unique()) or pass the genes "
                "in the model's order"
            )
    missing = np.setdiff1d(fitted, names)
    if missing.size:
        raise ValueError(
            f"{missing.size} genes of the fitted model are missing from the new data "
            f"(e.g. {', '.join(missing[:5])})"
        )
