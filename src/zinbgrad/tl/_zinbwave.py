"""``zinbgrad.tl.zinbwave``: fit ZINB-WaVE and store the model inside the AnnData."""

from __future__ import annotations

import json
import warnings

import numpy as np

from ..data.validate import check_anndata, check_key
from ..estimator import ZINBWaVE, resolve_device
from ..model.params import Params

__all__ = ["zinbwave", "store_model", "model_elements", "model_from_anndata", "resolve_model"]


def model_elements(model: ZINBWaVE, key_added: str = "X_zinbwave") -> dict[str, dict]:
    """What :func:`store_model` writes, by AnnData element: ``{"obsm": {...}, "varm": {...},
    "var": {column: values}, "uns": {key: value}}`` (also written into .h5ad files on disk
    without loading them, :func:`zinbgrad.data.writer.add_elements`).

    Everything is serialized here, before anything is written: a failure leaves no keys.
    """
    check_key(key_added, "key_added")
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
    # copies (see _rows): editing the AnnData must not change the model (nor the model the
    # AnnData)
    # cells / genes left out of the fit (without counts) get NaN rows
    obsm = {
        key_added: _rows(model.W_, cells),
        # W as principal scores of W alpha_mu: another representation for neighbours / UMAP
        key_added + "_scores": _rows(model.latent_scores(), cells),
        key_added + "_gamma_mu": _rows(model.gamma_mu_.T, cells),
        key_added + "_gamma_pi": _rows(model.gamma_pi_.T, cells),
        key_added + "_X": _rows(model.X_, cells),
    }
    varm = {
        f"{key_added}_{name}": _rows(getattr(model, name + "_").T, genes)
        for name in ("alpha_mu", "alpha_pi", "beta_mu", "beta_pi")
    }
    varm[f"{key_added}_V"] = _rows(model.V_, genes)
    delta = getattr(model, "delta_mu_", None)
    if delta is not None:  # batch-specific loading offsets: genes x (batch, factor)
        varm[f"{key_added}_delta_mu"] = _rows(delta.reshape(-1, delta.shape[-1]).T, genes)
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
    check_anndata(adata, what)


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
    genes = Params.GENE_FIELDS + Params.OPTIONAL_GENE_FIELDS
    return {k: (v[..., idx] if k in genes else v) for k, v in path.items()}


def model_from_anndata(adata, key: str = "X_zinbwave", *, device="auto") -> ZINBWaVE:
    """Rebuild the fitted :class:`ZINBWaVE` stored by :func:`zinbwave` / :func:`store_model`.

    The stored model is checked as :meth:`ZINBWaVE.load` checks a file (every array present,
    with the shape the others imply and finite values). ``device`` is where the model
    computes; it is not stored (see :meth:`ZINBWaVE.load`).

    Raises
    ------
    KeyError
        No model under ``key``.
    ValueError
        The stored model is incomplete, edited into an inconsistent state or unreadable.
    """
    _check_anndata(adata)
    if key not in adata.uns or key not in adata.obsm:
        raise KeyError(f"no zinbgrad model under key {key!r}; run zinbgrad.tl.zinbwave first")
    resolve_device(device)
    try:
        model = _rebuild(adata, key)
        model._check_consistency()
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise ValueError(f"adata holds no valid zinbgrad model under key {key!r}: {msg}") from err
    model.device = device
    return model


def _rebuild(adata, key: str) -> ZINBWaVE:
    def get(element: str, name: str):
        store = getattr(adata, element)
        if name not in store:
            raise KeyError(f"adata.{element}[{name!r}] is missing")
        return store[name]

    def array(element: str, name: str) -> np.ndarray:  # a copy: the model owns its arrays
        return np.array(get(element, name), dtype=np.float64)

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
    unknown = sorted(set(params) - set(ZINBWaVE().get_params()))
    if unknown:
        raise ValueError(f"unknown hyperparameters {unknown}")
    model = ZINBWaVE(**{k: v for k, v in params.items() if k != "device"})
    fitted = key + "_fitted"
    genes = np.asarray(adata.var[fitted], dtype=bool) if fitted in adata.var else None
    if genes is None:  # stored before genes could be left out: all were fitted
        genes = np.ones(adata.n_vars, dtype=bool)
    cells = np.asarray(adata.obs[fitted], dtype=bool) if fitted in adata.obs else None
    if cells is None:
        cells = np.ones(adata.n_obs, dtype=bool)
    model.W_ = array("obsm", key)[cells]
    model.gamma_mu_ = array("obsm", key + "_gamma_mu")[cells].T
    model.gamma_pi_ = array("obsm", key + "_gamma_pi")[cells].T
    model.X_ = array("obsm", key + "_X")[cells]
    for name in ("alpha_mu", "alpha_pi", "beta_mu", "beta_pi"):
        setattr(model, name + "_", array("varm", f"{key}_{name}")[genes].T)
    model.V_ = array("varm", f"{key}_V")[genes]
    model.delta_mu_ = None
    if f"{key}_delta_mu" in adata.varm:
        d = array("varm", f"{key}_delta_mu")[genes].T
        model.delta_mu_ = d.reshape(-1, model.W_.shape[1], d.shape[1])
    model.zeta_ = array("var", f"{key}_zeta")[genes]
    model.O_mu_ = model.O_pi_ = None
    model.var_names_in_ = np.asarray(adata.var_names).astype(str)
    model.gene_fitted_, model.cell_fitted_ = genes, cells
    model.var_names_ = model.var_names_in_[genes]
    model.obs_names_ = np.asarray(adata.obs_names).astype(str)[cells]
    model.n_features_in_ = len(model.var_names_)
    model.X_columns_ = [str(c) for c in np.atleast_1d(field("X_columns"))]
    model.penalty_params_ = parsed("penalty_params")
    model.batch_info_ = parsed("batch_info")
    model.loglik_, model.penalty_ = float(field("loglik")), float(field("penalty"))
    model.objective_ = float(field("objective"))
    model.aic_, model.bic_ = float(field("aic")), float(field("bic"))
    model.n_params_, model.n_iter_ = int(field("n_params")), int(field("n_iter"))
    model.converged_, model.fit_time_ = bool(field("converged")), float(field("fit_time"))
    model.fit_path_ = _fit_path(u, model.var_names_)
    h = field("history")
    cols = ("epoch", "loglik", "objective", "seconds")
    if not hasattr(h, "get") or any(np.ndim(h.get(k)) != 1 for k in cols):
        raise TypeError(f"adata.uns[{key!r}]['history'] must map {cols} to 1-D arrays")
    model.history_ = [{k: float(h[k][i]) for k in cols} for i in range(len(h["epoch"]))]
    return model


def resolve_model(adata, key: str = "X_zinbwave", model: ZINBWaVE | None = None) -> ZINBWaVE:
    """``model`` (checked to be a fitted :class:`ZINBWaVE`), or the one stored in ``adata``
    under ``key`` when ``model`` is None."""
    _check_anndata(adata)
    if model is None:
        return model_from_anndata(adata, key)
    if not isinstance(model, ZINBWaVE):
        raise TypeError(f"model must be a fitted zinbgrad.ZINBWaVE, got {type(model).__name__}")
    model._check_fitted()
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
    check_key(key_added, "key_added")
    target = adata.copy() if copy else adata
    model = ZINBWaVE(n_components, **kwargs)
    model.fit(target, layer=layer, batch_key=batch_key, covariate_keys=covariate_keys)
    store_model(target, model, key_added)
    return target if copy else model
