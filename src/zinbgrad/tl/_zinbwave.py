"""``zinbgrad.tl.zinbwave``: fit ZINB-WaVE and store the model inside the AnnData."""

from __future__ import annotations

import json
import warnings

import numpy as np

from ..estimator import ZINBWaVE
from ..model.params import Params

__all__ = ["zinbwave", "store_model", "model_elements", "model_from_anndata"]


def model_elements(model: ZINBWaVE, key_added: str = "X_zinbwave") -> dict[str, dict]:
    """What :func:`store_model` writes, by AnnData element: ``{"obsm": {...}, "varm": {...},
    "var": {column: values}, "uns": {key: value}}`` (also written into .h5ad files on disk
    without loading them, :func:`zinbgrad.data.writer.add_elements`).

    Everything is serialized here, before anything is written: a failure leaves no keys.
    """
    meta = model._metadata()
    uns = {
        "params": json.dumps(meta["hyperparameters"]),
        "X_columns": np.asarray(model.X_columns_, dtype=str),
        "penalty_params": json.dumps(model.penalty_params_),
        "batch_info": json.dumps(model.batch_info_),
        "loglik": model.loglik_,
        "penalty": model.penalty_,
        "objective": model.objective_,
        "aic": model.aic_,
        "bic": model.bic_,
        "n_params": model.n_params_,
        "n_iter": model.n_iter_,
        "converged": model.converged_,
        "fit_time": model.fit_time_,
        "history": {
            k: np.asarray([h[k] for h in model.history_])
            for k in ("epoch", "loglik", "objective", "seconds")
        },
    }
    path = getattr(model, "fit_path_", None)
    if path:  # the fit's path, which projections of new cells follow (see ZINBWaVE.transform)
        uns["fit_path"] = dict(path)
        uns["fit_path_var_names"] = np.asarray(model.var_names_, dtype=str)
    genes, cells, _ = model.fitted_masks()
    # cells / genes left out of the fit (without counts) get NaN rows
    obsm = {
        key_added: _rows(model.W_, cells),
        key_added + "_gamma_mu": _rows(model.gamma_mu_.T, cells),
        key_added + "_gamma_pi": _rows(model.gamma_pi_.T, cells),
        key_added + "_X": _rows(model.X_, cells),
    }
    varm = {
        f"{key_added}_{name}": _rows(getattr(model, name + "_").T, genes)
        for name in ("alpha_mu", "alpha_pi", "beta_mu", "beta_pi")
    }
    varm[f"{key_added}_V"] = _rows(model.V_, genes)
    return {
        "obsm": obsm,
        "varm": varm,
        "var": {
            f"{key_added}_zeta": _rows(model.zeta_, genes),
            f"{key_added}_fitted": genes.copy(),
        },
        "obs": {f"{key_added}_fitted": cells.copy()},
        "uns": {key_added: uns},
    }


def _rows(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``values`` (one row per True of ``mask``) spread over all rows, NaN elsewhere."""
    values = np.asarray(values, dtype=np.float64)
    if mask.all():
        return values
    out = np.full((len(mask),) + values.shape[1:], np.nan)
    out[mask] = values
    return out


def store_model(adata, model: ZINBWaVE, key_added: str = "X_zinbwave") -> None:
    """Write a fitted model into ``adata`` (scanpy conventions).

    * ``obsm[key_added]``: W (cells x K); ``obsm[key_added + "_gamma_mu"/"_gamma_pi"]``;
    * ``varm[key_added + "_alpha_mu"/"_alpha_pi"/"_beta_mu"/"_beta_pi"]`` (genes x K / M);
    * ``var[key_added + "_zeta"]`` (log inverse dispersion);
    * ``var[key_added + "_fitted"]`` / ``obs[key_added + "_fitted"]``: whether each gene / cell
      was fitted (see ``empty_genes`` / ``empty_cells`` of :class:`~zinbgrad.ZINBWaVE`: those
      left out have NaN parameters);
    * ``uns[key_added]``: settings, X column names, penalties, log-likelihood, history, ...
    """
    _check_anndata(adata)
    genes, cells, _ = model.fitted_masks()
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


def _check_anndata(adata, what: str = "adata") -> None:
    import anndata as ad

    if not isinstance(adata, ad.AnnData):
        raise TypeError(
            f"{what} must be an AnnData, got {type(adata).__name__}; for a path or an array use "
            "zinbgrad.ZINBWaVE().fit(...) or read it with anndata.read_h5ad first"
        )


def _fit_path(u, var_names: np.ndarray) -> dict | None:
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
            stacklevel=3,
        )
        return None
    pos = {g: j for j, g in enumerate(fitted)}
    if len(pos) < J or any(g not in pos for g in var_names):
        warnings.warn(
            "adata's genes are not a subset of the fitted genes; new cells will start from "
            "zinbwave's initialization instead of following the fit's path",
            stacklevel=3,
        )
        return None
    idx = np.array([pos[g] for g in var_names], dtype=np.int64)
    return {k: (v[..., idx] if k in Params.GENE_FIELDS else v) for k, v in path.items()}


def model_from_anndata(adata, key: str = "X_zinbwave") -> ZINBWaVE:
    """Rebuild the fitted :class:`ZINBWaVE` stored by :func:`zinbwave` / :func:`store_model`."""
    _check_anndata(adata)
    if key not in adata.uns or key not in adata.obsm:
        raise KeyError(f"no zinbgrad model under key {key!r}; run zinbgrad.tl.zinbwave first")
    u = adata.uns[key]
    model = ZINBWaVE(**json.loads(u["params"]))
    fitted = key + "_fitted"
    genes = np.asarray(adata.var[fitted], dtype=bool) if fitted in adata.var else None
    if genes is None:  # stored before genes could be left out: all were fitted
        genes = np.ones(adata.n_vars, dtype=bool)
    cells = np.asarray(adata.obs[fitted], dtype=bool) if fitted in adata.obs else None
    if cells is None:
        cells = np.ones(adata.n_obs, dtype=bool)
    model.W_ = np.asarray(adata.obsm[key], dtype=np.float64)[cells]
    model.gamma_mu_ = np.asarray(adata.obsm[key + "_gamma_mu"], dtype=np.float64)[cells].T
    model.gamma_pi_ = np.asarray(adata.obsm[key + "_gamma_pi"], dtype=np.float64)[cells].T
    model.X_ = np.asarray(adata.obsm[key + "_X"], dtype=np.float64)[cells]
    for name in ("alpha_mu", "alpha_pi", "beta_mu", "beta_pi"):
        values = np.asarray(adata.varm[f"{key}_{name}"], dtype=np.float64)[genes]
        setattr(model, name + "_", values.T)
    model.V_ = np.asarray(adata.varm[f"{key}_V"], dtype=np.float64)[genes]
    model.zeta_ = np.asarray(adata.var[f"{key}_zeta"], dtype=np.float64)[genes]
    model.O_mu_ = model.O_pi_ = None
    model.var_names_in_ = np.asarray(adata.var_names).astype(str)
    model.gene_fitted_, model.cell_fitted_ = genes, cells
    model.var_names_ = model.var_names_in_[genes]
    model.obs_names_ = np.asarray(adata.obs_names).astype(str)[cells]
    model.n_features_in_ = len(model.var_names_)
    model.X_columns_ = [str(c) for c in u["X_columns"]]
    model.penalty_params_ = json.loads(u["penalty_params"])
    model.batch_info_ = json.loads(u["batch_info"])
    model.loglik_, model.penalty_ = float(u["loglik"]), float(u["penalty"])
    model.objective_ = float(u["objective"])
    model.aic_, model.bic_ = float(u["aic"]), float(u["bic"])
    model.n_params_, model.n_iter_ = int(u["n_params"]), int(u["n_iter"])
    model.converged_, model.fit_time_ = bool(u["converged"]), float(u["fit_time"])
    model.fit_path_ = _fit_path(u, model.var_names_)
    h = u["history"]
    model.history_ = [
        {k: float(h[k][i]) for k in ("epoch", "loglik", "objective", "seconds")}
        for i in range(len(h["epoch"]))
    ]
    return model


def zinbwave(
    adata,
    n_components: int = 10,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    covariate_keys: list[str] | None = None,
    key_added: str = "X_zinbwave",
    copy: bool = False,
    **kwargs,
):
    """Fit ZINB-WaVE to the raw counts of ``adata`` and store the result in it.

    Parameters
    ----------
    adata
        AnnData with raw counts (cells x genes) in ``.X`` or ``layer``. ``.X`` is never changed.
    n_components
        Number of latent factors K.
    layer
        Layer holding the counts.
    batch_key
        ``obs`` column modelled as batch indicators in X (batch correction).
    covariate_keys
        Further ``obs`` columns for X.
    key_added
        ``obsm[key_added]`` receives the latent factors W; see :func:`store_model` for the
        other fields.
    copy
        Work on and return a copy of ``adata``.
    **kwargs
        Hyper-parameters of :class:`zinbgrad.ZINBWaVE` (``epsilon``, ``max_epochs``, ``device``,
        ``random_state``, ...).

    Returns
    -------
    The AnnData copy if ``copy=True``, else the fitted :class:`zinbgrad.ZINBWaVE` model.
    """
    _check_anndata(adata)
    target = adata.copy() if copy else adata
    model = ZINBWaVE(n_components, **kwargs)
    model.fit(target, layer=layer, batch_key=batch_key, covariate_keys=covariate_keys)
    store_model(target, model, key_added)
    return target if copy else model
