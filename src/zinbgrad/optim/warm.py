"""Warm starts: a fit of K factors started from a fit of more factors on the same cells.

zinbwave's orthogonalization (:func:`~zinbgrad.model.params.orthogonalization_transform`)
writes ``W alpha`` as an SVD whose factors are ordered by decreasing singular value, split
evenly between W and alpha. The leading ``K' < K`` components of a fitted K-factor model are
then the best rank-``K'`` approximation of its ``W alpha`` (in the penalty's balance), a
sound starting point for a K'-factor fit: only the dropped components' share has to be
re-fitted (by the intercepts, the other factors and the dispersion), not the whole latent
space. Growing instead (K to K + dK, new components padded with zeros) starts at a saddle
point of the objective (a zero column of W has zero gradient while its loadings are zero),
so only shrinking is offered.
"""

from __future__ import annotations

import torch

from ..model.params import Params, orthogonalization_transform
from .path import FitPath

__all__ = ["leading_components"]


def leading_components(
    params: Params,
    K: int,
    eps_W: float,
    eps_alpha: float,
    *,
    zero_inflation: bool = True,
    path: FitPath | None = None,
) -> tuple[Params, FitPath | None]:
    """The first ``K`` latent factors of ``params`` after zinbwave's orthogonalization, and
    the fit path truncated to them.

    Parameters
    ----------
    params
        Parameters of a fit with at least ``K`` factors (not changed).
    K
        Factors kept.
    eps_W, eps_alpha
        The penalty weights of W and alpha that balance the orthogonalization.
    zero_inflation
        Whether the zero-inflation loadings take part (as in the fit).
    path
        The fit path of ``params`` (:class:`FitPath`, not changed), or None.

    Returns
    -------
    (Params, FitPath or None)
        The truncated parameters (intercepts, dispersion and cells' gamma as given) and the
        path whose steps keep the leading ``K x K`` block of every orthogonalization (exact
        for cells whose dropped factors are zero), its last step followed by this
        re-orthogonalization so that it ends in the frame of the returned parameters; the
        path's next sweep starts at the returned gene parameters.
    """
    if params.delta_mu is not None:
        raise ValueError("a warm start from a fit with batch-specific loadings is not supported")
    K0 = params.K
    if not 0 <= K <= K0:
        raise ValueError(f"a warm start keeps 0 to {K0} factors of the fit, not {K}")
    out = params.clone()
    T = None
    if K0 > 0:
        alpha = torch.cat([out.alpha_mu, out.alpha_pi], 1) if zero_inflation else out.alpha_mu
        T, alpha_new = orthogonalization_transform(out.W.T @ out.W, alpha, eps_W, eps_alpha)
        J = out.alpha_mu.shape[1]
        out.W = (out.W @ T)[:, :K].contiguous()
        out.alpha_mu = alpha_new[:K, :J].contiguous()
        out.alpha_pi = (alpha_new[:K, J:] if zero_inflation else out.alpha_pi[:K]).contiguous()
    if path is None or not len(path):
        return out, None
    new = FitPath(path.dense, path.stride)
    last = len(path.steps) - 1
    for t, (genes, Tt, steps) in enumerate(path.steps):
        if t == last and T is not None:
            Tt = T if Tt is None else Tt @ T
        g = dict(genes)
        g["alpha_mu"] = genes["alpha_mu"][:K].clone()
        g["alpha_pi"] = genes["alpha_pi"][:K].clone()
        new.steps.append((g, None if Tt is None else Tt[:K, :K].clone(), steps))
    new.start(out)
    return out, new
