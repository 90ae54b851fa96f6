"""``zinbgrad.tl.zinbwave``: fit ZINB-WaVE and store the model inside the AnnData."""

from __future__ import annotations

import json

import numpy as np

from ..estimator import ZINBWaVE

__all__ = ["zinbwave", "store_model", "model_from_anndata"]


def store_model(adata, model: ZINBWaVE, key_added: str = "X_zinbwave") -> None:
    """Write a fitted model into ``adata`` (scanpy conventions).

    * ``obsm[key_added]``: W (cells x K); ``obsm[key_added + "_gamma_mu"/"_gamma_pi"]``;
    * ``varm[key_added + "_alpha_mu"/"_alpha_pi"/"_beta_mu"/"_beta_pi"]`` (genes x K / M);
    * ``var[key_added + "_zeta"]`` (log inverse dispersion);
    * ``uns[key_added]``: settings, X column names, penalties, log-likelihood, history, ...
    """
    adata.obsm[key_added] = model.W_
    adata.obsm[key_added + "_gamma_mu"] = model.gamma_mu_.T
    adata.obsm[key_added + "_gamma_pi"] = model.gamma_pi_.T
    adata.obsm[key_added + "_X"] = model.X_
    for name in ("alpha_mu", "alpha_pi", "beta_mu", "beta_pi"):
        adata.varm[f"{key_added}_{name}"] = getattr(model, name + "_").T
    adata.varm[f"{key_added}_V"] = model.V_
    adata.var[f"{key_added}_zeta"] = model.zeta_
    meta = model._metadata()
    adata.uns[key_added] = {
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
        adata.uns[key_added]["fit_path"] = dict(path)


def model_from_anndata(adata, key: str = "X_zinbwave") -> ZINBWaVE:
    """Rebuild the fitted :class:`ZINBWaVE` stored by :func:`zinbwave` / :func:`store_model`."""
    if key not in adata.uns or key not in adata.obsm:
        raise KeyError(f"no zinbgrad model under key {key!r}; run zinbgrad.tl.zinbwave first")
    u = adata.uns[key]
    model = ZINBWaVE(**json.loads(u["params"]))
    model.W_ = np.asarray(adata.obsm[key], dtype=np.float64)
    model.gamma_mu_ = np.asarray(adata.obsm[key + "_gamma_mu"], dtype=np.float64).T
    model.gamma_pi_ = np.asarray(adata.obsm[key + "_gamma_pi"], dtype=np.float64).T
    model.X_ = np.asarray(adata.obsm[key + "_X"], dtype=np.float64)
    for name in ("alpha_mu", "alpha_pi", "beta_mu", "beta_pi"):
        setattr(model, name + "_", np.asarray(adata.varm[f"{key}_{name}"], dtype=np.float64).T)
    model.V_ = np.asarray(adata.varm[f"{key}_V"], dtype=np.float64)
    model.zeta_ = np.asarray(adata.var[f"{key}_zeta"], dtype=np.float64)
    model.O_mu_ = model.O_pi_ = None
    model.var_names_ = np.asarray(adata.var_names).astype(str)
    model.obs_names_ = np.asarray(adata.obs_names).astype(str)
    model.n_features_in_ = len(model.var_names_)
    model.X_columns_ = [str(c) for c in u["X_columns"]]
    model.penalty_params_ = json.loads(u["penalty_params"])
    model.batch_info_ = json.loads(u["batch_info"])
    model.loglik_, model.penalty_ = float(u["loglik"]), float(u["penalty"])
    model.objective_ = float(u["objective"])
    model.aic_, model.bic_ = float(u["aic"]), float(u["bic"])
    model.n_params_, model.n_iter_ = int(u["n_params"]), int(u["n_iter"])
    model.converged_, model.fit_time_ = bool(u["converged"]), float(u["fit_time"])
    path = u.get("fit_path")
    model.fit_path_ = {k: np.asarray(v) for k, v in path.items()} if path else None
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
    target = adata.copy() if copy else adata
    model = ZINBWaVE(n_components, **kwargs)
    model.fit(target, layer=layer, batch_key=batch_key, covariate_keys=covariate_keys)
    store_model(target, model, key_added)
    return target if copy else model
