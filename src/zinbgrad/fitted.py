"""A fitted :class:`~zinbgrad.ZINBWaVE`'s parameters as torch objects, and the fitted check.

The estimator's fitted attributes are numpy arrays named after the parameters with a trailing
underscore (``beta_mu_``, ``W_``, ...); the functions here turn them into the tensors the
optimizer and the outputs compute with.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from .model.params import Params, block_zeta, linear_predictors
from .optim.engine import FitPath

__all__ = [
    "CELL_ARRAYS",
    "GENE_ARRAYS",
    "OPTIONAL_ARRAYS",
    "check_fitted",
    "fit_path",
    "fitted_masks",
    "gene_information",
    "gene_params",
    "latent_scores",
    "model_params",
]

#: gene parameters (fitted attributes ``name + "_"``, genes in the last axis)
GENE_ARRAYS = ("beta_mu", "beta_pi", "alpha_mu", "alpha_pi", "zeta")
#: gene parameters of optional model parts (``None`` when the model has none)
OPTIONAL_ARRAYS = ("delta_mu",)
#: cell parameters (cells in the last axis, W: cells x K)
CELL_ARRAYS = ("W", "gamma_mu", "gamma_pi")

NOT_FITTED = "this %(name)s model is not fitted yet; call fit() first"


def check_fitted(model) -> None:
    """Raise :class:`sklearn.exceptions.NotFittedError` unless ``model`` is fitted (has
    ``zeta_``: fitted, loaded or built by ``from_params``)."""
    check_is_fitted(model, "zeta_", msg=NOT_FITTED)


def gene_params(model, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The fitted gene parameters of ``model`` as tensors, keyed as :class:`Params` fields
    (``delta_mu`` stacked per batch, (B*K, J), as the engine holds it; absent without
    batch-specific loadings; ``zeta``: ``zeta_batch_``, B x J, with a dispersion per batch)."""
    out = {
        k: torch.as_tensor(getattr(model, k + "_"), dtype=dtype, device=device) for k in GENE_ARRAYS
    }
    for k in OPTIONAL_ARRAYS:
        v = getattr(model, k + "_", None)
        if v is not None:
            out[k] = torch.as_tensor(v.reshape(-1, v.shape[-1]), dtype=dtype, device=device)
    zb = getattr(model, "zeta_batch_", None)
    if zb is not None:  # a dispersion per batch level and gene: the model's own zeta
        out["zeta"] = torch.as_tensor(zb, dtype=dtype, device=device)
    return out


def model_params(model, device="cpu", dtype: torch.dtype = torch.float64) -> Params:
    """All fitted parameters of ``model`` (genes and training cells) as :class:`Params`."""
    check_fitted(model)
    g = gene_params(model, torch.device(device), dtype)
    c = {
        k: torch.as_tensor(getattr(model, k + "_"), dtype=dtype, device=device) for k in CELL_ARRAYS
    }
    return Params(**g, **c)


def fit_path(model, device: torch.device, dtype: torch.dtype) -> FitPath | None:
    """The gene parameters ``model``'s fit passed through (its ``fit_path_``), or ``None``
    when none was recorded (e.g. ``from_params``, the stochastic solver)."""
    arrays = getattr(model, "fit_path_", None)
    if not arrays:
        return None
    return FitPath.from_arrays(arrays, dtype, device)


def fitted_masks(model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(gene_fitted_, cell_fitted_, var_names_in_)`` of ``model`` (see
    :meth:`ZINBWaVE.fitted_masks`): every gene and cell for a model without them."""
    genes = getattr(model, "gene_fitted_", None)
    if genes is None:
        n = model.W_.shape[0]
        return (
            np.ones(len(model.var_names_), dtype=bool),
            np.ones(n, dtype=bool),
            np.asarray(model.var_names_).astype(str),
        )
    return genes, model.cell_fitted_, model.var_names_in_


def gene_information(model, block_cells: int = 4096) -> np.ndarray:
    """Per gene, the mean over the training cells of the information a count carries about
    its log mean: ``(1 - pi) mu theta / (mu + theta)`` (the negative binomial's Fisher
    information for ``log mu``, times the probability of not being a structural zero), at the
    fitted parameters (each cell's batch, loading offsets and dispersion included). Computed
    block by block of cells; returns a float64 array of the fitted genes."""
    check_fitted(model)
    design, params = model.training_design(), model.get_params_torch()
    zi = bool(model.zero_inflation)
    n = params.W.shape[0]
    total = torch.zeros(params.alpha_mu.shape[1], dtype=torch.float64)
    for start in range(0, n, max(int(block_cells), 1)):
        rows = slice(start, min(start + block_cells, n))
        a, b = linear_predictors(design, params, rows, zi)
        log_theta = block_zeta(design, params.zeta, rows)
        # mu theta / (mu + theta) = theta * sigmoid(log mu - log theta), stable for large mu
        info = torch.exp(log_theta) * torch.sigmoid(a - log_theta)
        if b is not None:
            info = info * torch.sigmoid(-b)
        total += info.sum(0)
    return (total / max(n, 1)).numpy()


def latent_scores(model, W=None, gene_weights=None) -> np.ndarray:
    """``W`` (default: the training cells' ``W_``) as principal scores of the latent part of
    a fitted ``model``'s log mean (see :meth:`ZINBWaVE.latent_scores`); ``gene_weights``:
    ``None`` (every gene's log mean counts the same), ``"fisher"`` (:func:`gene_information`)
    or one non-negative weight per fitted gene."""
    check_fitted(model)
    K = model.W_.shape[1]
    W = model.W_ if W is None else np.asarray(W, dtype=np.float64)
    if W.ndim != 2 or W.shape[1] != K:
        raise ValueError(f"W must have shape (n_cells, {K}), got {W.shape}")
    alpha = np.asarray(model.alpha_mu_, dtype=np.float64)
    if gene_weights is not None:
        if isinstance(gene_weights, str):
            if gene_weights != "fisher":
                raise ValueError(
                    f"gene_weights must be None, 'fisher' or an array, got {gene_weights!r}"
                )
            w = gene_information(model)
        else:
            w = np.asarray(gene_weights, dtype=np.float64)
            if w.shape != (alpha.shape[1],) or not np.all(np.isfinite(w)) or np.any(w < 0):
                raise ValueError(
                    f"gene_weights must be {alpha.shape[1]} finite non-negative weights (one "
                    f"per fitted gene), got shape {w.shape}"
                )
        alpha = alpha * np.sqrt(w)[None, :]
    mean = model.W_.mean(0)
    Wc = model.W_ - mean
    # L L^T = alpha alpha^T, then the principal axes of Wc L
    lam, U = np.linalg.eigh(alpha @ alpha.T)
    L = U * np.sqrt(np.clip(lam, 0.0, None))
    Y = Wc @ L
    ev, R = np.linalg.eigh(Y.T @ Y)
    R = R[:, np.argsort(ev)[::-1]]
    R = R * np.where(R[np.abs(R).argmax(0), np.arange(K)] < 0, -1.0, 1.0)
    return (W - mean) @ L @ R
