"""Laplace uncertainty of the latent factors and of the gene loadings.

At the optimum, the posterior of one cell's local parameters ``u_i = (W_i, gamma_mu_i,
gamma_pi_i)`` given the gene parameters is approximated by a Gaussian whose precision is the
negative Hessian of the cell's penalized log-likelihood (the ridge penalty is its Gaussian
prior): ``Cov(u_i) = A_i^{-1}`` with

    A_i = diag(eps_cell)
          - sum_j [l_aa Fa_j Fa_j^T + l_bb Fb_j Fb_j^T + l_ab (Fa_j Fb_j^T + Fb_j Fa_j^T)]

where ``l_aa, l_bb, l_ab`` are the second derivatives of the entry log-likelihood in ``a = log
mu`` and ``b = logit pi`` (:func:`zinbgrad.model.entry_derivatives`, the optimizer's own) and
``Fa_j = (alpha_mu_j, V_mu_j, 0)``, ``Fb_j = (alpha_pi_j, 0, V_pi_j)`` the gene-side design of
the cell problem (with batch-specific loadings, a cell of batch b has ``alpha_mu + delta_b``
in place of ``alpha_mu``). These are the matrices of the optimizer's own Newton systems
(:meth:`~zinbgrad.optim.engine.Engine.cell_precisions`). The ``K x K`` block of
``A_i^{-1}`` belonging to ``W_i`` is the covariance of ``W_i`` with ``gamma_i`` integrated
out. Everything is evaluated at the *reported* parameters, after zinbwave's
orthogonalization: the covariance is that of the reported ``W_i`` (the frame of
``obsm["X_zinbwave"]``) given the reported loadings. It is conditional on the gene parameters
(their uncertainty is of order 1/n, the cells' of order 1/J).

The same holds for the genes: ``Cov(beta_mu_j, alpha_mu_j[, delta_mu_j], beta_pi_j,
alpha_pi_j)`` is the inverse of the negative Hessian of gene j's penalized log-likelihood, with
the cells' ``W`` and the dispersion fixed; its diagonal gives the standard errors of the loadings.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .data.source import InMemoryCounts
from .encoding import align_genes
from .fitted import check_fitted
from .optim.state import FitOptions
from .penalties import fitted_penalty
from .projection import cell_engine, likelihood_tensors

__all__ = [
    "LatentUncertainty",
    "LoadingUncertainty",
    "cell_precisions",
    "gene_precisions",
    "latent_uncertainty",
    "loading_uncertainty",
    "predictor_sd",
]

#: matrix entries of the dense per-block arrays (cells x genes)
_BLOCK_ENTRIES = 2**20


@dataclass
class LatentUncertainty:
    """Laplace posterior of the latent factors of a set of cells.

    Attributes
    ----------
    W
        (n, K) the latent factors (the mode), in the reported frame.
    cov
        (n, K, K) covariance of each cell's ``W_i`` (``gamma_i`` integrated out).
    sd
        (n, K) standard deviations, ``sqrt(diag(cov))``.
    obs_names
        Names of the cells.
    """

    W: np.ndarray
    cov: np.ndarray
    sd: np.ndarray
    obs_names: np.ndarray


@dataclass
class LoadingUncertainty:
    """Laplace posterior of the gene parameters (dispersion and cells fixed).

    Attributes
    ----------
    alpha_mu, alpha_pi
        (K, J) loadings of the mean and zero-inflation models.
    alpha_mu_se, alpha_pi_se
        (K, J) their standard errors (NaN where the gene's Hessian is not negative definite;
        ``alpha_pi_se`` is NaN without zero inflation).
    cov
        (J, q, q) covariance of each gene's vector ``(beta_mu, alpha_mu[, delta_mu][, beta_pi,
        alpha_pi])`` (``delta_mu``: the ``n_batches x K`` loading offsets of a fit with
        ``batch_loadings=True``, batch by batch).
    var_names
        Names of the genes.
    """

    alpha_mu: np.ndarray
    alpha_pi: np.ndarray
    alpha_mu_se: np.ndarray
    alpha_pi_se: np.ndarray
    cov: np.ndarray
    var_names: np.ndarray


def _engine(model, data, layer: str | None, new: bool, project_kw: dict):
    """The cells' names and an engine over the training or new cells of ``model`` (CPU,
    float64, the fit's penalty), whose Newton systems give the precisions."""
    design, params, src, names = _tensors(model, data, layer, new, project_kw)
    options = FitOptions(block_entries=_BLOCK_ENTRIES)
    return cell_engine(model, src, design, params, fitted_penalty(model, design), options), names


def cell_precisions(
    model, data, *, layer: str | None = None, new: bool = False, **project_kw
) -> Tensor:
    """Minus the Hessians ``A_i`` (n, p, p) of the cells' penalized log-likelihoods in
    ``(W_i, gamma_mu_i[, gamma_pi_i])``, ``p = K + L_mu (+ L_pi)``, at a fitted ``model``'s
    parameters: the matrices of the optimizer's own cell Newton systems (so batch-specific
    loadings, ``W_i (alpha_mu + delta_b)``, and dispersions per batch are those of the fit).

    ``data``, ``layer``, ``new`` and ``project_kw`` are as in :func:`latent_uncertainty`.
    """
    engine, _ = _engine(model, data, layer, new, project_kw)
    return engine.cell_precisions()


def gene_precisions(model, data, *, layer: str | None = None) -> Tensor:
    """Minus the Hessians (J, q, q) of the genes' penalized log-likelihoods in
    ``(beta_mu_j, alpha_mu_j[, delta_mu_j][, beta_pi_j, alpha_pi_j])`` at a fitted ``model``'s
    parameters, cells and dispersion fixed (``data``: its training counts)."""
    engine, _ = _engine(model, data, layer, False, {})
    return engine.gene_precisions()


def _invert(A: Tensor, what: str) -> Tensor:
    """Inverses of a batch of (hopefully) positive definite matrices; NaN where not (warned)."""
    L, info = torch.linalg.cholesky_ex(A)
    bad = info != 0
    out = torch.cholesky_inverse(L)
    if bool(bad.any()):
        out[bad] = float("nan")
        warnings.warn(
            f"{int(bad.sum())} of {A.shape[0]} {what} have a Hessian that is not negative "
            "definite (not at a local optimum); their covariances are NaN",
            RuntimeWarning,
            stacklevel=3,
        )
    return out


def _training_source(model, data, layer):
    """The training counts of ``model`` as a block source (genes in the model's order)."""
    from .data.validate import extract_counts

    counts = extract_counts(
        data, layer, allow_non_integer=bool(model.allow_non_integer), check_empty=False
    )
    align_genes(model, counts)
    if counts.X.shape[0] != model.W_.shape[0]:
        raise ValueError(
            f"data has {counts.X.shape[0]} cells but the model was fitted on "
            f"{model.W_.shape[0]}; pass new=True to project new cells first"
        )
    return InMemoryCounts(counts.X.tocsr(), dtype=torch.float64), counts.obs_names


def _tensors(model, data, layer: str | None, new: bool, project_kw: dict):
    """Design, parameters, block source and cell names for the training or new cells."""
    check_fitted(model)
    if new:
        from .data.validate import extract_counts

        design, params = likelihood_tensors(model, data, dict(project_kw, layer=layer))
        counts = extract_counts(
            data, layer, allow_non_integer=bool(model.allow_non_integer), check_empty=False
        )
        align_genes(model, counts)
        src = InMemoryCounts(counts.X.tocsr(), dtype=torch.float64)
        return design, params, src, np.asarray(counts.obs_names).astype(str)
    if project_kw:
        raise TypeError(f"unexpected arguments for the training cells: {sorted(project_kw)}")
    design, params = likelihood_tensors(model, None, {})
    src, names = _training_source(model, data, layer)
    return design, params, src, np.asarray(names).astype(str)


def latent_uncertainty(
    model, data, *, layer: str | None = None, new: bool = False, **project_kw
) -> LatentUncertainty:
    """Laplace covariance of every cell's latent factors ``W_i`` (see the module docstring).

    Parameters
    ----------
    model
        A fitted :class:`zinbgrad.ZINBWaVE`.
    data
        The counts (AnnData, array, sparse matrix, DataFrame): the training cells, or with
        ``new=True`` new cells, which are first projected (:meth:`ZINBWaVE.transform`).
    layer
        AnnData layer with the counts.
    new
        ``data`` holds new cells (projected with the gene parameters fixed).
    **project_kw
        For new cells: ``X``, ``batch_key``, ``covariate_keys``, ``O_mu``, ``O_pi`` as in
        :meth:`ZINBWaVE.transform`.

    Returns
    -------
    LatentUncertainty
        ``W``, ``cov`` (n, K, K), ``sd`` (n, K) and the cell names.
    """
    engine, names = _engine(model, data, layer, new, project_kw)
    K = engine.K
    cov = _invert(engine.cell_precisions(), "cells")[:, :K, :K]
    cov = 0.5 * (cov + cov.transpose(1, 2))
    sd = cov.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt()
    W = engine.params.W.cpu().numpy()
    return LatentUncertainty(W, cov.cpu().numpy(), sd.cpu().numpy(), names)


def loading_uncertainty(model, data, *, layer: str | None = None) -> LoadingUncertainty:
    """Standard errors of the gene loadings from the genes' Hessians (training cells).

    Parameters
    ----------
    model
        A fitted :class:`zinbgrad.ZINBWaVE`.
    data
        Its training counts (AnnData, array, sparse matrix or DataFrame).
    layer
        AnnData layer with the counts.

    Returns
    -------
    LoadingUncertainty
    """
    engine, _ = _engine(model, data, layer, False, {})
    cov = _invert(engine.gene_precisions(), "genes")
    var = cov.diagonal(dim1=1, dim2=2).clamp(min=0)
    cols = engine.gene_slices()
    se_mu = var[:, cols["alpha_mu"]].sqrt().T
    if "alpha_pi" in cols:
        se_pi = var[:, cols["alpha_pi"]].sqrt().T
    else:
        se_pi = torch.full_like(se_mu, float("nan"))
    return LoadingUncertainty(
        np.asarray(model.alpha_mu_),
        np.asarray(model.alpha_pi_),
        se_mu.cpu().numpy(),
        se_pi.cpu().numpy(),
        cov.cpu().numpy(),
        np.asarray(model.var_names_).astype(str),
    )


def predictor_sd(
    latent: LatentUncertainty,
    alpha: np.ndarray,
    loadings_cov: np.ndarray | None = None,
) -> np.ndarray:
    """Standard deviation of the latent part ``W_i . alpha_j`` of ``log mu`` (cells x genes).

    ``Var = alpha_j^T Cov(W_i) alpha_j`` (+ ``W_i^T Cov(alpha_j) W_i`` when ``loadings_cov``,
    the (J, K, K) covariance of the loadings, is given; cells and genes independent).
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    var = np.einsum("kj,ikl,lj->ij", alpha, latent.cov, alpha, optimize=True)
    if loadings_cov is not None:
        var = var + np.einsum("ik,jkl,il->ij", latent.W, loadings_cov, latent.W, optimize=True)
    return np.sqrt(np.clip(var, 0, None))
