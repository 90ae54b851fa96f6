"""Counts drawn from a ZINB-WaVE model with planted parameters (for validation and tests).

Unlike :func:`zinbgrad.simulate.make_synthetic`, which resamples a fitted model, this draws
every parameter from simple distributions, so the truth is known exactly and the number of
latent factors is under control (choosing K, coverage of the uncertainty, loadings' standard
errors).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from .model.params import orthogonalize_trace_norm
from .simulate import sample_zinb

__all__ = ["make_planted"]


def make_planted(
    n_cells: int = 500,
    n_genes: int = 200,
    n_components: int = 3,
    *,
    factor_scales: float | tuple[float, ...] = (1.5, 1.2, 1.0, 0.8, 0.7, 0.6, 0.5, 0.45),
    loading_sd: float = 0.5,
    mean_log_mu: float = 1.0,
    sd_log_mu: float = 1.0,
    library_sd: float = 0.3,
    theta: float = 5.0,
    logit_pi: float | None = -2.0,
    random_state: int = 0,
):
    """An AnnData of counts drawn from ZINB-WaVE with known parameters.

    ``log mu_ij = beta_j + gamma_i + W_i . alpha_j`` and ``logit pi_ij = beta_pi_j`` (no latent
    effect on the zero inflation), ``theta`` common. W has centered columns with standard
    deviations ``factor_scales``, alpha centered rows; the planted
    ``(W, alpha)`` are put in zinbwave's orthogonalized frame (orthogonal columns of W ordered by
    singular value, with zinbwave's default penalties ``eps_W = J / n``, ``eps_alpha = 1``), so
    a fit is comparable with them up to the signs of the factors.

    Parameters
    ----------
    n_cells, n_genes, n_components
        Shape and the planted K.
    factor_scales
        Standard deviation of each factor's column of W (the first ``n_components`` are used;
        one number: the same for all).
    loading_sd
        Standard deviation of the loadings.
    mean_log_mu, sd_log_mu
        Gene intercepts of log mu are ``N(mean_log_mu, sd_log_mu^2)``.
    library_sd
        Standard deviation of the cell intercepts ``gamma_i`` (library size).
    theta
        NB inverse dispersion (common).
    logit_pi
        Mean of the genes' zero-inflation logits (``N(logit_pi, 0.5^2)``); ``None``: no zero
        inflation.
    random_state
        Seed.

    Returns
    -------
    anndata.AnnData
        CSR integer counts; the truth in ``obsm["W_true"]``, ``varm["alpha_mu_true"]``
        (genes x K), ``var["beta_mu_true"]``, ``var["beta_pi_true"]``, ``obs["gamma_mu_true"]``,
        ``uns["planted"]``.
    """
    import anndata as ad

    n, J, K, scales = _check_planted_args(n_cells, n_genes, n_components, factor_scales, theta)
    rng = np.random.default_rng(random_state)
    W, alpha = _planted_factors(rng, n, J, scales, loading_sd)
    beta = rng.normal(mean_log_mu, sd_log_mu, size=J)
    gamma = rng.normal(scale=library_sd, size=n)
    gamma -= gamma.mean()
    a = beta[None, :] + gamma[:, None] + W @ alpha
    zeta = np.full(J, np.log(theta))
    beta_pi, b = _planted_logits(rng, logit_pi, n, J)
    nb, drop = sample_zinb(rng, a, b, zeta)
    Y = sp.csr_matrix(np.where(drop, 0, nb).astype(np.int32))
    out = ad.AnnData(Y)
    out.obs_names = [f"cell{i}" for i in range(n)]
    out.var_names = [f"gene{j}" for j in range(J)]
    out.obsm["W_true"] = W
    out.varm["alpha_mu_true"] = alpha.T.copy()
    out.var["beta_mu_true"] = beta
    out.var["beta_pi_true"] = beta_pi
    out.obs["gamma_mu_true"] = gamma
    out.uns["planted"] = {
        "n_components": K,
        "theta": float(theta),
        "logit_pi": "none" if logit_pi is None else float(logit_pi),
        "random_state": int(random_state),
    }
    return out


def _check_planted_args(
    n_cells, n_genes, n_components, factor_scales, theta
) -> tuple[int, int, int, np.ndarray]:
    """``(n, J, K, scales)`` checked: the shape, the planted K and the K factors' scales."""
    for v, name in ((n_cells, "n_cells"), (n_genes, "n_genes")):
        if int(v) != v or v < 2:
            raise ValueError(f"{name} must be an integer >= 2, got {v!r}")
    K = int(n_components)
    if K != n_components or K < 0:
        raise ValueError(f"n_components must be an integer >= 0, got {n_components!r}")
    if not theta > 0:
        raise ValueError(f"theta must be > 0, got {theta!r}")
    scales = np.atleast_1d(np.asarray(factor_scales, dtype=np.float64))
    if scales.size == 1:
        scales = np.full(K, scales[0])
    elif scales.size < K:
        raise ValueError(f"factor_scales has {scales.size} entries for {K} factors")
    return int(n_cells), int(n_genes), K, scales[:K]


def _planted_factors(
    rng: np.random.Generator, n: int, J: int, scales: np.ndarray, loading_sd: float
) -> tuple[np.ndarray, np.ndarray]:
    """Centered ``W`` (n x K, column sds ``scales``) and loadings ``alpha`` (K x J, centered
    rows), put in zinbwave's orthogonalized frame (``eps_W = J / n``, ``eps_alpha = 1``)."""
    K = scales.size
    W = rng.normal(size=(n, K)) * scales
    W -= W.mean(0)
    alpha = rng.normal(scale=loading_sd, size=(K, J))
    alpha -= alpha.mean(1, keepdims=True)
    if K:
        Wt, at = orthogonalize_trace_norm(torch.from_numpy(W), torch.from_numpy(alpha), J / n, 1.0)
        W, alpha = Wt.numpy(), at.numpy()
    return W, alpha


def _planted_logits(
    rng: np.random.Generator, logit_pi: float | None, n: int, J: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """The genes' zero-inflation logits ``N(logit_pi, 0.5^2)`` and their ``(n, J)`` broadcast
    (``-inf`` and ``None`` without zero inflation: nothing drawn)."""
    if logit_pi is None:
        return np.full(J, -np.inf), None
    beta_pi = rng.normal(logit_pi, 0.5, size=J)
    return beta_pi, np.broadcast_to(beta_pi, (n, J))
