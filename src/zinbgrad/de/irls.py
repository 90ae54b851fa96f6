"""Weighted negative-binomial GLM fitting for every gene at once (edgeR's fitting core).

Stateless numerics on genes x cells arrays: edgeR's unit deviance, the intercept-only fit
(``glm_one_group``), the exact one-way-layout solution (``mglmOneWay``) and Levenberg-damped
Fisher scoring (``mglmLevenberg``), and :func:`glm_fit`, which picks between the last two as
edgeR's ``glmFit`` does. A Python loop runs over iterations or design groups, never over genes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .utils import disp_matrix


def nb_unit_deviance(y: np.ndarray, mu: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """edgeR's unit negative-binomial deviance (``compute_unit_nb_deviance``).

    Both ``y`` and ``mu`` are offset by 1e-8 (edgeR's guard against log(0)); small ``phi`` uses
    a Poisson expansion and huge ``mu * phi`` a gamma limit, exactly as edgeR does.

    Parameters
    ----------
    y, mu
        Counts and means (same shape).
    phi
        Dispersions, broadcastable to ``y``.

    Returns
    -------
    numpy.ndarray
        Non-negative unit deviances, the shape of ``y``.
    """
    y = y + 1e-8
    mu = mu + 1e-8
    phi = np.broadcast_to(phi, y.shape)
    out = np.empty(y.shape)
    small = phi < 1e-4
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ylogy = y * np.log(y / mu)
        if np.any(small):
            r = (y - mu)[small]
            ph = phi[small]
            out[small] = 2.0 * (
                ylogy[small] - r - 0.5 * r * r * ph * (1.0 + ph * (2.0 / 3.0 * r - y[small]))
            )
        big = ~small
        prod = mu * phi
        gam = big & (prod > 1e6)
        if np.any(gam):
            m = mu[gam]
            yy = y[gam]
            out[gam] = 2.0 * ((yy - m) / m - np.log(yy / m)) * m / (1.0 + prod[gam])
        nb = big & ~gam
        if np.any(nb):
            inv = 1.0 / phi[nb]
            yy = y[nb]
            out[nb] = 2.0 * (ylogy[nb] + (yy + inv) * np.log((mu[nb] + inv) / (yy + inv)))
    return np.maximum(out, 0.0)


def nb_deviance(y: np.ndarray, mu: np.ndarray, phi: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted residual deviance per gene: ``sum_j w_gj d(y_gj, mu_gj; phi_g)``."""
    return np.sum(w * nb_unit_deviance(y, mu, phi), axis=1)


class NBData(NamedTuple):
    """What every fitter here is fitted to: ``(n_genes, n_cells)`` counts, log offsets,
    dispersions and weights (edgeR's ``y``, ``offset``, ``dispersion``, ``weights``)."""

    y: np.ndarray
    offset: np.ndarray
    disp: np.ndarray
    w: np.ndarray

    def cells(self, cols: np.ndarray) -> NBData:
        """The data of the cells ``cols`` (a mask or indices), all genes."""
        return NBData(*(a[:, cols] for a in self))


def oneway_layout(design: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Group index per cell and the representative design rows, if the design is one-way.

    Mirrors edgeR's ``designAsFactor``: the design is a one-way layout when it has as many
    distinct rows as columns. Groups are numbered in order of first appearance.

    Parameters
    ----------
    design
        ``(n_cells, n_coef)`` design matrix.

    Returns
    -------
    tuple of numpy.ndarray, or None
        ``(group, unique_rows)``: ``(n_cells,)`` group indices and the ``(n_coef, n_coef)``
        design rows of the groups; ``None`` when the design is not an invertible one-way layout.
    """
    _, first, inverse = np.unique(design, axis=0, return_index=True, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    if first.size != design.shape[1]:
        return None
    # renumber groups by first appearance
    order = np.argsort(first)
    remap = np.empty_like(order)
    remap[order] = np.arange(order.size)
    group = remap[inverse]
    unique_rows = design[np.sort(first)]
    if abs(np.linalg.det(unique_rows)) < 1e-12:
        return None
    return group, unique_rows


def fit_one_group(
    data: NBData, start: np.ndarray | None = None, maxit: int = 50, tol: float = 1e-10
) -> tuple[np.ndarray, np.ndarray]:
    """Intercept-only weighted NB fit for every row at once (edgeR's ``glm_one_group``).

    Fisher scoring on the log-mean; rows with no positive count get ``-inf``.

    Parameters
    ----------
    data
        The genes' counts, offsets, dispersions and weights.
    start
        Optional ``(n_genes,)`` starting log-means (NaN: use the default start).
    maxit, tol
        Iteration limit and step-size tolerance.

    Returns
    -------
    tuple of numpy.ndarray
        ``(n_genes,)`` log-means and convergence flags.
    """
    y, offset, disp, w = data
    ng = y.shape[0]
    allzero = ~np.any(y > 1e-10, axis=1)
    beta = np.full(ng, np.nan)
    if start is None:
        start = np.full(ng, np.nan)
    start = np.asarray(start, dtype=np.float64)
    need = np.isnan(start)
    with np.errstate(divide="ignore", invalid="ignore"):
        init = np.log(
            np.sum(np.where(y > 1e-10, y / np.exp(offset) * w, 0.0), axis=1) / np.sum(w, axis=1)
        )
    beta = np.where(need, init, start)
    conv = np.zeros(ng, dtype=bool)
    beta[allzero] = -np.inf
    conv[allzero] = True
    active = ~allzero
    libs = np.exp(offset)
    for _ in range(maxit):
        if not np.any(active):
            break
        idx = np.flatnonzero(active)
        if idx.size == ng:
            yi, li, di, wi = y, libs, disp, w
        else:
            yi, li, di, wi = y[idx], libs[idx], disp[idx], w[idx]
        mu = np.exp(beta[idx])[:, None] * li
        den = 1.0 + mu * di
        dl = np.sum((yi - mu) / den * wi, axis=1)
        info = np.sum(mu / den * wi, axis=1)
        step = dl / info
        beta[idx] += step
        done = np.abs(step) < tol
        conv[idx[done]] = True
        active[idx[done]] = False
    return beta, conv


def fit_oneway(
    data: NBData,
    group: np.ndarray,
    unique_rows: np.ndarray,
    start: np.ndarray | None = None,
    maxit: int = 50,
    tol: float = 1e-10,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-way-layout fit (edgeR's ``mglmOneWay``): exact group-wise Newton solutions.

    As in edgeR 3.40, group log-means of all-zero groups are floored at -1e8 (fitted means
    exactly 0).

    Parameters
    ----------
    data
        The genes' counts, offsets, dispersions and weights.
    group, unique_rows
        The layout from :func:`oneway_layout`.
    start
        Optional ``(n_genes, n_coef)`` starting coefficients.
    maxit, tol
        Passed to :func:`fit_one_group` for every group.

    Returns
    -------
    tuple of numpy.ndarray
        Coefficients ``(n_genes, n_coef)`` (natural log), fitted means ``(n_genes, n_cells)``
        and ``(n_genes,)`` convergence flags.
    """
    ngroups = unique_rows.shape[0]
    ng = data.y.shape[0]
    gstart = None if start is None else start @ unique_rows.T
    gbeta = np.empty((ng, ngroups))
    conv = np.ones(ng, dtype=bool)
    for k in range(ngroups):
        s = None if gstart is None else gstart[:, k]
        b, c = fit_one_group(data.cells(group == k), s, maxit, tol)
        gbeta[:, k] = b
        conv &= c
    gbeta = np.maximum(gbeta, -1e8)
    mu = np.exp(gbeta[:, group] + data.offset)
    coef = np.linalg.solve(unique_rows, gbeta.T).T
    return coef, mu, conv


@dataclass
class _Levenberg:
    """Data and per-gene state of one :func:`fit_levenberg` run (state arrays change in place)."""

    y: np.ndarray
    design: np.ndarray
    offset: np.ndarray
    disp: np.ndarray
    w: np.ndarray
    ymax: np.ndarray
    beta: np.ndarray
    mu: np.ndarray
    dev: np.ndarray
    lam: np.ndarray
    max_info: np.ndarray
    failed: np.ndarray


def _levenberg_start(data: NBData, design: np.ndarray, start: np.ndarray | None) -> np.ndarray:
    """Starting coefficients: edgeR's weighted mean projected on the design, or ``start``."""
    if start is None:
        y, offset, disp, w = data
        libs = np.exp(offset)
        cw = w * libs / (1.0 + disp * libs)
        with np.errstate(divide="ignore", invalid="ignore"):
            c = np.log(np.sum(y * cw / libs, axis=1) / np.sum(cw, axis=1))
        proj = np.linalg.lstsq(design, np.ones(y.shape[1]), rcond=None)[0]
        beta = c[:, None] * proj[None, :]
        beta[~np.isfinite(beta)] = 0.0
    else:
        beta = np.array(start, dtype=np.float64, copy=True)
        beta[~np.isfinite(beta)] = 0.0
    return beta


def _levenberg_information(s: _Levenberg, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fisher information ``X'WX`` and score ``X'W(y - mu)/(1 + phi mu)`` of genes ``idx``
    (updates the running maximum of the information's diagonal)."""
    m = s.mu[idx]
    den = 1.0 + m * s.disp[idx]
    zw = m / den * s.w[idx]
    dr = (s.y[idx] - m) / den * s.w[idx]
    xtwx = np.einsum("gn,ni,nj->gij", zw, s.design, s.design)
    dl = dr @ s.design
    diag_max = np.max(np.diagonal(xtwx, axis1=1, axis2=2), axis=1)
    s.max_info[idx] = np.maximum(s.max_info[idx], diag_max)
    return xtwx, dl


def _damped_information(
    s: _Levenberg, xtwx: np.ndarray, pi: np.ndarray, gi: np.ndarray, eye: np.ndarray
) -> np.ndarray:
    """``X'WX + lambda I`` for the pending genes, raising their damping ``lambda`` tenfold
    until the damped information is numerically positive definite."""
    lam = s.lam
    a = xtwx[pi] + lam[gi, None, None] * eye
    ev = np.linalg.eigvalsh(a)
    bad = ev[:, 0] <= 1e-12 * np.maximum(np.abs(ev[:, -1]), 1e-300)
    tries = 0
    while np.any(bad) and tries < 100:
        lam[gi[bad]] = np.maximum(lam[gi[bad]] * 10.0, 1e-100)
        a[bad] = xtwx[pi[bad]] + lam[gi[bad], None, None] * eye
        ev = np.linalg.eigvalsh(a[bad])
        still = ev[:, 0] <= 1e-12 * np.maximum(np.abs(ev[:, -1]), 1e-300)
        bad_idx = np.flatnonzero(bad)
        bad = np.zeros_like(bad)
        bad[bad_idx[still]] = True
        tries += 1
    return a


def _levenberg_steps(
    s: _Levenberg, idx: np.ndarray, xtwx: np.ndarray, dl: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Levenberg iteration of genes ``idx``: damped steps, each accepted when the deviance
    does not increase, otherwise retried with doubled damping (or the gene marked failed).

    Returns the accepted steps, the genes whose deviance became negligible, and how many
    damped solves each gene needed.
    """
    p = s.design.shape[1]
    eye = np.eye(p)
    pending = np.ones(idx.size, dtype=bool)
    lev = np.zeros(idx.size, dtype=int)
    db_all = np.zeros((idx.size, p))
    low_dev = np.zeros(idx.size, dtype=bool)
    while np.any(pending):
        pi = np.flatnonzero(pending)
        gi = idx[pi]
        lev[pi] += 1
        a = _damped_information(s, xtwx, pi, gi, eye)
        db = np.linalg.solve(a, dl[pi][..., None])[..., 0]
        nbeta = s.beta[gi] + db
        eta = nbeta @ s.design.T + s.offset[gi]
        nmu = np.exp(np.clip(eta, -745.0, 709.0))
        ndev = nb_deviance(s.y[gi], nmu, s.disp[gi], s.w[gi])
        ld = ndev / s.ymax[gi] < 1e-13
        # allow for rounding in the deviance so that steps near the optimum are not refused
        accept = (ndev <= s.dev[gi] + 1e-12 * (1.0 + np.abs(s.dev[gi]))) | ld
        acc_g = gi[accept]
        s.beta[acc_g] = nbeta[accept]
        s.mu[acc_g] = nmu[accept]
        s.dev[acc_g] = ndev[accept]
        db_all[pi] = db
        low_dev[pi[accept]] = ld[accept]
        pending[pi[accept]] = False
        rej = ~accept
        if np.any(rej):
            rg = gi[rej]
            s.lam[rg] = np.maximum(s.lam[rg] * 2.0, 1e-100)
            fail = s.lam[rg] / s.max_info[rg] > 1e13
            s.failed[rg[fail]] = True
            pending[pi[rej][fail]] = False
    return db_all, low_dev, lev


def fit_levenberg(
    data: NBData,
    design: np.ndarray,
    start: np.ndarray | None = None,
    maxit: int = 250,
    tol: float = 1e-14,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Levenberg-damped Fisher scoring for every gene at once (edgeR's ``mglmLevenberg``).

    Parameters
    ----------
    data
        The genes' counts, offsets, dispersions and weights.
    design
        ``(n_cells, n_coef)`` full-rank design.
    start
        Optional ``(n_genes, n_coef)`` starting coefficients.
    maxit
        Iteration limit.
    tol
        Bound on the Newton decrement ``dl' (X'WX)^-1 dl`` (edgeR uses 1e-6; the default here
        is tighter).

    Returns
    -------
    tuple of numpy.ndarray
        Coefficients ``(n_genes, n_coef)``, fitted means ``(n_genes, n_cells)``, convergence
        flags and iteration counts ``(n_genes,)``. All-zero genes get NaN coefficients and
        zero means.
    """
    y, offset, disp, w = data
    ng = y.shape[0]
    ymax = y.max(axis=1)
    allzero = ymax < 1e-10
    beta = _levenberg_start(data, design, start)
    mu = np.exp(np.clip(beta @ design.T + offset, -745.0, 709.0))
    s = _Levenberg(
        y=y,
        design=design,
        offset=offset,
        disp=disp,
        w=w,
        ymax=ymax,
        beta=beta,
        mu=mu,
        dev=nb_deviance(y, mu, disp, w),
        lam=np.zeros(ng),
        max_info=np.full(ng, -1.0),
        failed=np.zeros(ng, dtype=bool),
    )
    conv = allzero.copy()
    niter = np.zeros(ng, dtype=int)
    active = ~allzero
    first = True
    for _ in range(maxit):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        niter[idx] += 1
        xtwx, dl = _levenberg_information(s, idx)
        if first:
            s.lam[idx] = np.maximum(s.max_info[idx] * 1e-6, 1e-13)
            first = False
        db_all, low_dev, lev = _levenberg_steps(s, idx, xtwx, dl)
        divergence = np.sum(dl * db_all, axis=1)
        done = s.failed[idx] | low_dev | (divergence < tol)
        conv[idx[done & ~s.failed[idx]]] = True
        active[idx[done]] = False
        relax = (~done) & (lev == 1)
        s.lam[idx[relax]] /= 10.0
    beta[allzero] = np.nan
    mu[allzero] = 0.0
    return beta, mu, conv, niter


class GLMFit(NamedTuple):
    """Result of :func:`glm_fit` (genes x cells orientation)."""

    coefficients: np.ndarray
    fitted: np.ndarray
    deviance: np.ndarray | None
    converged: np.ndarray
    method: str
    n_iter: np.ndarray


def glm_fit(
    y: np.ndarray,
    design: np.ndarray,
    offset: np.ndarray,
    disp: Any,
    w: np.ndarray,
    start: np.ndarray | None = None,
    tol: float = 1e-14,
    maxit: int = 250,
    deviance: bool = True,
) -> GLMFit:
    """Fit the weighted NB GLM to genes x cells data (edgeR's ``glmFit`` dispatch).

    One-way layouts (see :func:`oneway_layout`) are solved exactly by :func:`fit_oneway`, any
    other design by :func:`fit_levenberg`.

    Parameters
    ----------
    y, offset, w
        ``(n_genes, n_cells)`` counts, log offsets and weights.
    design
        ``(n_cells, n_coef)`` full-rank design.
    disp
        A number, ``(n_genes,)`` or ``(n_genes, n_cells)`` dispersions.
    start
        Optional ``(n_genes, n_coef)`` starting coefficients.
    tol, maxit
        Levenberg tolerance and iteration limit (the one-way solution uses its own).
    deviance
        Compute the weighted residual deviance (``None`` in the result otherwise).

    Returns
    -------
    GLMFit
        Coefficients, fitted means, deviance, convergence flags, the method (``"oneway"`` or
        ``"levenberg"``) and Levenberg iteration counts (zeros for one-way fits).
    """
    dmat = disp_matrix(disp, y.shape)
    data = NBData(y, offset, dmat, w)
    ow = oneway_layout(design)
    if ow is not None:
        group, unique_rows = ow
        coef, mu, conv = fit_oneway(data, group, unique_rows, start=start)
        method = "oneway"
        niter = np.zeros(y.shape[0], dtype=int)
    else:
        coef, mu, conv, niter = fit_levenberg(data, design, start, maxit, tol)
        method = "levenberg"
    dev = nb_deviance(y, mu, dmat, w) if deviance else None
    return GLMFit(coef, mu, dev, conv, method, niter)
