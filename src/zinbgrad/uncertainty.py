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
the cell problem. The ``K x K`` block of ``A_i^{-1}`` belonging to ``W_i`` is the covariance of
``W_i`` with ``gamma_i`` integrated out. Everything is evaluated at the *reported* parameters,
after zinbwave's orthogonalization: the covariance is that of the reported ``W_i`` (the frame of
``obsm["X_zinbwave"]``) given the reported loadings. It is conditional on the gene parameters
(their uncertainty is of order 1/n, the cells' of order 1/J).

The same holds for the genes: ``Cov(beta_mu_j, alpha_mu_j, beta_pi_j, alpha_pi_j)`` is the
inverse of the negative Hessian of gene j's penalized log-likelihood, with the cells' ``W`` and
the dispersion fixed; its diagonal gives the standard errors of the loadings.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .data.source import InMemoryCounts, block_bounds
from .encoding import align_genes
from .fitted import check_fitted
from .model.likelihood import entry_derivatives
from .model.params import Design, Params, block_zeta, linear_predictors
from .projection import likelihood_tensors

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
        (J, q, q) covariance of each gene's vector ``(beta_mu, alpha_mu[, beta_pi, alpha_pi])``.
    var_names
        Names of the genes.
    """

    alpha_mu: np.ndarray
    alpha_pi: np.ndarray
    alpha_mu_se: np.ndarray
    alpha_pi_se: np.ndarray
    cov: np.ndarray
    var_names: np.ndarray


def _outer(F: Tensor, G: Tensor | None = None) -> Tensor:
    """(R, p) x (R, q) -> (R, p*q) row-wise outer products (symmetrized when G is given)."""
    if G is None:
        return (F[:, :, None] * F[:, None, :]).reshape(F.shape[0], -1)
    out = F[:, :, None] * G[:, None, :]
    return (out + out.transpose(1, 2)).reshape(F.shape[0], -1)


def _iter_derivs(design: Design, params: Params, source, zero_inflation: bool):
    """Second-order entry derivatives of every block of cells at ``params``."""
    n, J = design.n, design.J
    for start, stop, counts in source.iter_blocks(
        block_bounds(n, max(1, _BLOCK_ENTRIES // max(J, 1)))
    ):
        rows = slice(start, stop)
        a, b = linear_predictors(design, params, rows, zero_inflation)
        zeta = block_zeta(design, params.zeta, rows)  # a dispersion per batch: expanded
        yield rows, entry_derivatives(a, b, zeta, counts, order=2)


def cell_precisions(
    design: Design,
    params: Params,
    source,
    eps_W: float,
    eps_gamma_mu,
    eps_gamma_pi,
    zero_inflation: bool = True,
) -> Tensor:
    """Negative Hessians ``A_i`` (n, p, p) of the cells' penalized log-likelihoods in
    ``(W_i, gamma_mu_i[, gamma_pi_i])``, ``p = K + L_mu (+ L_pi)``.

    ``source`` hands out the cells' :class:`~zinbgrad.model.likelihood.SparseCounts` blocks
    (``iter_blocks``); the ridge weights are zinbwave's ``eps_W`` and the per-column
    ``eps_gamma``.
    """
    K, J = params.K, design.J
    kw = {"dtype": params.W.dtype, "device": params.W.device}
    Lmu = design.V_mu.shape[1]
    Lpi = design.V_pi.shape[1] if zero_inflation else 0
    z = torch.zeros
    Fa = torch.cat([params.alpha_mu.T, design.V_mu, z(J, Lpi, **kw)], 1)
    eps = [torch.full((K,), float(eps_W), **kw), torch.as_tensor(eps_gamma_mu, **kw).reshape(-1)]
    prods = {"aa": _outer(Fa)}
    Fb = None
    if zero_inflation:
        Fb = torch.cat([params.alpha_pi.T, z(J, Lmu, **kw), design.V_pi], 1)
        prods["bb"] = _outer(Fb)
        prods["ab"] = _outer(Fa, Fb)
        eps.append(torch.as_tensor(eps_gamma_pi, **kw).reshape(-1))
    p = Fa.shape[1]
    out = torch.empty(design.n, p, p, **kw)
    for rows, d in _iter_derivs(design, params, source, zero_inflation):
        H = d.laa @ prods["aa"]
        if zero_inflation:
            H = H + d.lbb @ prods["bb"] + d.lab @ prods["ab"]
        out[rows] = -H.view(-1, p, p)
    out.diagonal(dim1=1, dim2=2).add_(torch.cat(eps))
    return out


def gene_precisions(
    design: Design,
    params: Params,
    source,
    eps_beta_mu,
    eps_beta_pi,
    eps_alpha: float,
    zero_inflation: bool = True,
    eps_alpha_pi: float | None = None,
) -> Tensor:
    """Negative Hessians (J, q, q) of the genes' penalized log-likelihoods in
    ``(beta_mu_j, alpha_mu_j[, beta_pi_j, alpha_pi_j])`` (cells and dispersion fixed);
    ``eps_alpha_pi``: the ridge weight of alpha_pi (None: ``eps_alpha``)."""
    K, J = params.K, design.J
    kw = {"dtype": params.W.dtype, "device": params.W.device}
    qa = design.X_mu.shape[1] + K
    qb = design.X_pi.shape[1] + K if zero_inflation else 0
    haa = torch.zeros(J, qa * qa, **kw)
    hbb = torch.zeros(J, qb * qb, **kw)
    hab = torch.zeros(J, qa * qb, **kw)
    for rows, d in _iter_derivs(design, params, source, zero_inflation):
        Ga = torch.cat([design.X_mu[rows], params.W[rows]], 1)
        haa += d.laa.T @ _outer(Ga)
        if zero_inflation:
            Gb = torch.cat([design.X_pi[rows], params.W[rows]], 1)
            hbb += d.lbb.T @ _outer(Gb)
            hab += d.lab.T @ (Ga[:, :, None] * Gb[:, None, :]).reshape(Ga.shape[0], -1)
    H = haa.view(J, qa, qa)
    eps = [torch.as_tensor(eps_beta_mu, **kw).reshape(-1), torch.full((K,), float(eps_alpha), **kw)]
    if zero_inflation:
        top = torch.cat([H, hab.view(J, qa, qb)], 2)
        bot = torch.cat([hab.view(J, qa, qb).transpose(1, 2), hbb.view(J, qb, qb)], 2)
        H = torch.cat([top, bot], 1)
        e_pi = eps[1] if eps_alpha_pi is None else torch.full((K,), float(eps_alpha_pi), **kw)
        eps += [torch.as_tensor(eps_beta_pi, **kw).reshape(-1), e_pi]
    A = -H
    A.diagonal(dim1=1, dim2=2).add_(torch.cat(eps))
    return A


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
    design, params, src, names = _tensors(model, data, layer, new, project_kw)
    pp = model.penalty_params_
    zi = bool(model.zero_inflation)
    A = cell_precisions(
        design, params, src, pp["epsilon_W"], pp["epsilon_gamma_mu"], pp["epsilon_gamma_pi"], zi
    )
    K = params.K
    cov = _invert(A, "cells")[:, :K, :K]
    cov = 0.5 * (cov + cov.transpose(1, 2))
    sd = cov.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt()
    return LatentUncertainty(params.W.cpu().numpy(), cov.cpu().numpy(), sd.cpu().numpy(), names)


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
    design, params, src, _ = _tensors(model, data, layer, False, {})
    pp = model.penalty_params_
    zi = bool(model.zero_inflation)
    A = gene_precisions(
        design,
        params,
        src,
        pp["epsilon_beta_mu"],
        pp["epsilon_beta_pi"],
        pp["epsilon_alpha"],
        zi,
        pp.get("epsilon_alpha_pi"),
    )
    cov = _invert(A, "genes")
    K, Mmu = params.K, design.X_mu.shape[1]
    var = cov.diagonal(dim1=1, dim2=2).clamp(min=0)
    se_mu = var[:, Mmu : Mmu + K].sqrt().T
    if zi:
        o = Mmu + K + design.X_pi.shape[1]
        se_pi = var[:, o : o + K].sqrt().T
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
