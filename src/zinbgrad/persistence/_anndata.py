"""The fitted state inside an AnnData (``.obsm``, ``.varm``, ``.var``, ``.obs``, ``.uns``)."""

from __future__ import annotations

import json
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.validate import check_anndata, check_key
from ..fitted import GENE_ARRAYS, OPTIONAL_ARRAYS, fitted_masks, latent_scores
from ._state import get_state, hyperparameters, set_state, unfitted_model

if TYPE_CHECKING:
    from ..estimator import ZINBWaVE

#: The columns of the history stored in an AnnData (one 1-D array each).
HISTORY_COLUMNS = ("epoch", "loglik", "objective", "seconds")


def model_elements(model: ZINBWaVE, key_added: str = "X_zinbwave") -> dict[str, dict]:
    """What :func:`store_model` writes, by AnnData element: ``{"obsm": {...}, "varm": {...},
    "var": {column: values}, "obs": {column: values}, "uns": {key: value}}`` (also written
    into .h5ad files on disk without loading them, :func:`zinbgrad.data.writer.add_elements`).

    Everything is serialized here, before anything is written: a failure leaves no keys.
    """
    check_key(key_added, "key_added")
    s = get_state(model)
    uns = {
        "params": json.dumps(hyperparameters(model)),
        "X_columns": np.asarray(s["X_columns_"], dtype=str),
        "penalty_params": json.dumps(s["penalty_params_"]),
        "batch_info": json.dumps(s["batch_info_"]),
        "loglik": s["loglik_"],
        "penalty": s["penalty_"],
        "objective": s["objective_"],
        "aic": s["aic_"],
        "bic": s["bic_"],
        "n_params": s["n_params_"],
        "n_iter": s["n_iter_"],
        "converged": s["converged_"],
        "fit_time": s["fit_time_"],
        "history": {k: np.asarray([h[k] for h in s["history_"]]) for k in HISTORY_COLUMNS},
    }
    if s["fit_path_"]:  # which projections of new cells follow (see ZINBWaVE.transform)
        uns["fit_path"] = dict(s["fit_path_"])
        uns["fit_path_var_names"] = np.asarray(s["var_names_"], dtype=str)
    genes, cells = s["gene_fitted_"], s["cell_fitted_"]
    # copies (see _rows): editing the AnnData must not change the model (nor the model the
    # AnnData); cells / genes left out of the fit (without counts) get NaN rows
    obsm = {
        key_added: _rows(s["W_"], cells),
        # W as principal scores of W alpha_mu: another representation for neighbours / UMAP
        key_added + "_scores": _rows(latent_scores(model), cells),
        key_added + "_gamma_mu": _rows(s["gamma_mu_"].T, cells),
        key_added + "_gamma_pi": _rows(s["gamma_pi_"].T, cells),
        key_added + "_X": _rows(s["X_"], cells),
    }
    varm = {
        f"{key_added}_{name}": _rows(s[name + "_"].T, genes)
        for name in ("alpha_mu", "alpha_pi", "beta_mu", "beta_pi")
    }
    varm[f"{key_added}_V"] = _rows(s["V_"], genes)
    delta = s["delta_mu_"]
    if delta is not None:  # batch-specific loading offsets: genes x (batch, factor)
        varm[f"{key_added}_delta_mu"] = _rows(delta.reshape(-1, delta.shape[-1]).T, genes)
    if s["zeta_batch_"] is not None:  # dispersion per batch level: genes x batches
        varm[f"{key_added}_zeta_batch"] = _rows(s["zeta_batch_"].T, genes)
    return {
        "obsm": obsm,
        "varm": varm,
        "var": {
            f"{key_added}_zeta": _rows(s["zeta_"], genes),
            f"{key_added}_fitted": genes.copy(),
        },
        "obs": {f"{key_added}_fitted": cells.copy()},
        "uns": {key_added: uns},
    }


def _rows(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``values`` (one row per True of ``mask``) spread over all rows, NaN elsewhere; always
    a new array."""
    values = np.asarray(values, dtype=np.float64)
    if mask.all():
        return values.copy()
    out = np.full((len(mask),) + values.shape[1:], np.nan)
    out[mask] = values
    return out


def store_model(adata, model: ZINBWaVE, key_added: str = "X_zinbwave") -> None:
    """Write a fitted model into ``adata`` (scanpy conventions).

    * ``obsm[key_added]``: W (cells x K); ``obsm[key_added + "_gamma_mu"/"_gamma_pi"]``;
    * ``obsm[key_added + "_scores"]``: W as principal scores of ``W alpha_mu``
      (:meth:`ZINBWaVE.latent_scores`), another input for neighbour graphs: in the
      scib-metrics runs of issue 17 it beat W on the PBMC pair (bio conservation +0.037) and
      lost on the thinned Zeisel set (-0.037), so W stays the default;
    * ``obsm[key_added + "_X"]``: the design X;
    * ``varm[key_added + "_alpha_mu"/"_alpha_pi"/"_beta_mu"/"_beta_pi"]`` (genes x K / M),
      ``varm[key_added + "_V"]`` and, with batch-specific loadings,
      ``varm[key_added + "_delta_mu"]`` (genes x batches*K); with a dispersion per batch,
      ``varm[key_added + "_zeta_batch"]`` (genes x batches);
    * ``var[key_added + "_zeta"]`` (log inverse dispersion);
    * ``var[key_added + "_fitted"]`` / ``obs[key_added + "_fitted"]``: whether each gene / cell
      was fitted (see ``empty_genes`` / ``empty_cells`` of :class:`~zinbgrad.ZINBWaVE`: those
      left out have NaN parameters);
    * ``uns[key_added]``: settings, X column names, penalties, log-likelihood, history
      (its columns epoch, loglik, objective, seconds), the fit path, ...

    Offsets (``O_mu``/``O_pi``) are not stored.
    """
    check_anndata(adata)
    genes, cells, _ = fitted_masks(model)
    if (adata.n_obs, adata.n_vars) != (len(cells), len(genes)):
        raise ValueError(
            f"adata is {adata.n_obs} x {adata.n_vars} but the model was fitted on data of "
            f"{len(cells)} x {len(genes)}; store a model in the AnnData it was fitted on"
        )
    elements = model_elements(model, key_added)
    for name in ("obsm", "varm", "var", "obs", "uns"):
        target = getattr(adata, name)
        for k, v in elements[name].items():
            target[k] = v


def from_anndata(cls: type[ZINBWaVE], adata, key: str = "X_zinbwave") -> ZINBWaVE:
    """The ``cls`` model stored in ``adata`` under ``key`` by :func:`store_model`, checked
    as :func:`load` checks a file (no model under ``key``: ``KeyError``; an incomplete,
    inconsistent or unreadable one: ``ValueError``). Its ``device`` is ``"auto"``: the caller
    sets it (:func:`zinbgrad.tl.model_from_anndata` does)."""
    check_anndata(adata)
    if key not in adata.uns or key not in adata.obsm:
        raise KeyError(f"no zinbgrad model under key {key!r}; run zinbgrad.tl.zinbwave first")
    try:
        params, state = _anndata_state(adata, key)
        model = unfitted_model(cls, params)
        set_state(model, state)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise ValueError(f"adata holds no valid zinbgrad model under key {key!r}: {msg}") from err
    return model


def _anndata_state(adata, key: str) -> tuple[dict, dict[str, Any]]:
    """The hyper-parameters and the fitted state stored under ``key``."""

    def array(element: str, name: str) -> np.ndarray:  # a copy: the model owns its arrays
        store = getattr(adata, element)
        if name not in store:
            raise KeyError(f"adata.{element}[{name!r}] is missing")
        return np.array(store[name], dtype=np.float64)

    u = adata.uns[key]
    if not hasattr(u, "get"):
        raise TypeError(f"adata.uns[{key!r}] is not a mapping")

    def field(name: str):
        if name not in u:
            raise KeyError(f"adata.uns[{key!r}][{name!r}] is missing")
        return u[name]

    def parsed(name: str) -> dict:
        value = json.loads(str(field(name)))
        if not isinstance(value, dict):
            raise TypeError(f"adata.uns[{key!r}][{name!r}] is not a JSON mapping")
        return value

    params = parsed("params")
    fitted = key + "_fitted"
    # stored before cells or genes could be left out: all were fitted
    genes = np.asarray(adata.var[fitted], dtype=bool) if fitted in adata.var else None
    genes = np.ones(adata.n_vars, dtype=bool) if genes is None else genes
    cells = np.asarray(adata.obs[fitted], dtype=bool) if fitted in adata.obs else None
    cells = np.ones(adata.n_obs, dtype=bool) if cells is None else cells
    s: dict[str, Any] = {"W_": array("obsm", key)[cells]}
    s["gamma_mu_"] = array("obsm", key + "_gamma_mu")[cells].T
    s["gamma_pi_"] = array("obsm", key + "_gamma_pi")[cells].T
    s["X_"] = array("obsm", key + "_X")[cells]
    for name in ("alpha_mu", "alpha_pi", "beta_mu", "beta_pi"):
        s[name + "_"] = array("varm", f"{key}_{name}")[genes].T
    s["V_"] = array("varm", f"{key}_V")[genes]
    s["delta_mu_"] = None
    if f"{key}_delta_mu" in adata.varm:
        d = array("varm", f"{key}_delta_mu")[genes].T
        s["delta_mu_"] = d.reshape(-1, s["W_"].shape[1], d.shape[1])
    s["zeta_"] = array("var", f"{key}_zeta")[genes]
    s["zeta_batch_"] = None
    if f"{key}_zeta_batch" in adata.varm:
        s["zeta_batch_"] = np.ascontiguousarray(array("varm", f"{key}_zeta_batch")[genes].T)
    s["O_mu_"] = s["O_pi_"] = None
    s["var_names_in_"] = np.asarray(adata.var_names).astype(str)
    s["gene_fitted_"], s["cell_fitted_"] = genes, cells
    s["var_names_"] = s["var_names_in_"][genes]
    s["obs_names_"] = np.asarray(adata.obs_names).astype(str)[cells]
    s["n_features_in_"] = len(s["var_names_"])
    s["X_columns_"] = [str(c) for c in np.atleast_1d(field("X_columns"))]
    s["penalty_params_"] = parsed("penalty_params")
    s["batch_info_"] = parsed("batch_info")
    s["loglik_"], s["penalty_"] = float(field("loglik")), float(field("penalty"))
    s["objective_"] = float(field("objective"))
    s["aic_"], s["bic_"] = float(field("aic")), float(field("bic"))
    s["n_params_"], s["n_iter_"] = int(field("n_params")), int(field("n_iter"))
    s["converged_"], s["fit_time_"] = bool(field("converged")), float(field("fit_time"))
    s["fit_path_"] = _stored_fit_path(u, s["var_names_"])
    h = field("history")
    if not hasattr(h, "get") or any(np.ndim(h.get(k)) != 1 for k in HISTORY_COLUMNS):
        raise TypeError(f"adata.uns[{key!r}]['history'] must map {HISTORY_COLUMNS} to 1-D arrays")
    # epochs as fit records them (integers), the rest as floats
    s["history_"] = [
        {k: (int if k == "epoch" else float)(h[k][i]) for k in HISTORY_COLUMNS}
        for i in range(len(h["epoch"]))
    ]
    return params, s


def _stored_fit_path(u, var_names: np.ndarray) -> dict | None:
    """The stored fit path, restricted to the genes ``adata`` still has.

    Genes may have been subset after the fit (e.g. mitochondrial genes dropped): the path's
    gene axis (the last) is then cut to the remaining genes, by name.
    """
    path = u.get("fit_path")
    if not path:
        return None
    path = {k: np.asarray(v) for k, v in path.items()}
    J = path["zeta"].shape[-1] if "zeta" in path else len(var_names)
    if J == len(var_names) and "fit_path_var_names" not in u:
        return path
    fitted = np.asarray(u.get("fit_path_var_names", []), dtype=str)
    if len(fitted) != J:
        warnings.warn(
            "the stored fit path does not match adata's genes (subset after the fit?); new "
            "cells will start from zinbwave's initialization instead of following it",
            stacklevel=4,
        )
        return None
    pos = {g: j for j, g in enumerate(fitted)}
    if len(pos) < J or any(g not in pos for g in var_names):
        warnings.warn(
            "adata's genes are not a subset of the fitted genes; new cells will start from "
            "zinbwave's initialization instead of following the fit's path",
            stacklevel=4,
        )
        return None
    idx = np.array([pos[g] for g in var_names], dtype=np.int64)
    genes = GENE_ARRAYS + OPTIONAL_ARRAYS
    return {k: (v[..., idx] if k in genes else v) for k, v in path.items()}
