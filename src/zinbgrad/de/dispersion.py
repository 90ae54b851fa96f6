"""NB dispersion estimation: edgeR 3.40's ``estimateDisp`` (GLM branch) with observation weights.

The weighted Cox-Reid adjusted profile log-likelihood on a dispersion grid, the common
dispersion, the abundance trend (locfit) and the tagwise empirical-Bayes shrinkage whose prior
degrees of freedom come from limma's ``squeezeVar`` (``fitFDist``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special

from .irls import glm_fit
from .normalization import ave_log_cpm_gn, resolve_offsets
from .smoothing import locfit_deg0, maximize_interpolant, ns_basis
from .utils import as_design, check_weights, counts_gn


def adjusted_profile_loglik(
    y: np.ndarray, mu: np.ndarray, disp: float, w: np.ndarray, design: np.ndarray
) -> np.ndarray:
    """Cox-Reid adjusted profile log-likelihood per gene (edgeR's ``adjustedProfileLik``).

    Observation weights are interpreted as in edgeR >= 3.22: each count is the average of
    ``w`` counts, so the NB log-probability is evaluated for ``(y w, mu w, phi / w)``; the Cox-Reid
    term is ``0.5 log det(X' W X)`` with working weights ``w mu / (1 + phi mu)``.
    """
    pos = mu > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        uw = mu * w
        r = w / disp
        # zero counts: log NB(0) = -r log(1 + mu w / r) (the lgamma terms cancel)
        ll = np.where(pos, -r * np.log1p(uw / r), 0.0)
        nzr, nzc = np.nonzero(y > 0)
        if nzr.size:
            yw = y[nzr, nzc] * w[nzr, nzc]
            uwp = uw[nzr, nzc]
            rp = r[nzr, nzc]
            ll[nzr, nzc] += (
                special.xlogy(yw, uwp)
                - yw * np.log(uwp + rp)
                + special.gammaln(yw + rp)
                - special.gammaln(rp)
                - special.gammaln(yw + 1.0)
            )
    total = ll.sum(axis=1)
    zw = np.where(pos, w * mu / (1.0 + disp * mu), 0.0)
    if design.shape[1] == 1:
        adj = 0.5 * np.log(np.abs(zw.sum(axis=1)))
    else:
        xtwx = np.einsum("gn,ni,nj->gij", zw, design, design)
        sign, logdet = np.linalg.slogdet(xtwx)
        bad = sign <= 0
        if np.any(bad):
            # edgeR replaces non-positive pivots by 1e-10; approximate with eigenvalues
            ev = np.linalg.eigvalsh(xtwx[bad])
            logdet[bad] = np.sum(np.log(np.maximum(ev, 1e-10)), axis=1)
        adj = 0.5 * logdet
    return total - adj


def r_qr_keep_columns(x: np.ndarray, tol: float = 1e-7) -> np.ndarray:
    """Indices of the columns R's ``qr()`` (LINPACK ``dqrdc2``) keeps, in pivot order.

    A column is dropped (moved to the end) when its norm after removing the previously kept
    columns falls below ``tol`` times its original norm (zero columns are always dropped).
    """
    keep: list[int] = []
    basis: list[np.ndarray] = []
    for j in range(x.shape[1]):
        v = x[:, j].astype(np.float64).copy()
        norm0 = np.linalg.norm(v)
        ref = norm0 if norm0 > 0 else 1.0
        for q in basis:
            v -= q * (q @ v)
        nv = np.linalg.norm(v)
        if nv >= tol * ref and nv > 0:
            keep.append(j)
            basis.append(v / nv)
    return np.asarray(keep, dtype=int)


def trigamma_inverse(x: float) -> float:
    """Solve ``trigamma(y) = x`` (limma's ``trigammaInverse``)."""
    if x > 1e7:
        return 1.0 / np.sqrt(x)
    if x < 1e-6:
        return 1.0 / x
    y = 0.5 + 1.0 / x
    for _ in range(50):
        tri = special.polygamma(1, y)
        dif = tri * (1.0 - tri / x) / special.polygamma(2, y)
        y += dif
        if -dif / y < 1e-8:
            break
    return float(y)


def fit_f_dist(x: np.ndarray, df1: np.ndarray, covariate: np.ndarray | None) -> float:
    """Prior degrees of freedom of a scaled F distribution (limma 3.54 ``fitFDist``).

    Moment estimation on ``log(x)``; with a covariate the mean of ``log(x)`` follows a natural
    cubic spline trend with ``min(4, n-1, #unique)`` degrees of freedom. Returns ``df2``.
    """
    x = np.asarray(x, dtype=np.float64)
    df1 = np.broadcast_to(np.asarray(df1, dtype=np.float64), x.shape)
    ok = np.isfinite(df1) & (df1 > 1e-15) & np.isfinite(x) & (x > -1e-15)
    nok = int(ok.sum())
    if nok <= 1:
        return 0.0 if nok == 1 else np.nan
    x, df1 = x[ok], df1[ok]
    cov = None if covariate is None else np.asarray(covariate, dtype=np.float64)[ok]
    splinedf = 1
    if cov is not None:
        splinedf = min(4, nok - 1, np.unique(cov).size)
        if splinedf < 2:
            cov = None
    x = np.maximum(x, 0.0)
    m = np.median(x)
    if m == 0:
        m = 1.0
    x = np.maximum(x, 1e-5 * m)
    z = np.log(x)
    e = z - special.digamma(df1 / 2.0) + np.log(df1 / 2.0)
    if cov is None:
        evar = np.sum((e - e.mean()) ** 2) / (nok - 1)
    else:
        basis = ns_basis(cov, splinedf)
        coef, _, rank, _ = np.linalg.lstsq(basis, e, rcond=None)
        resid = e - basis @ coef
        evar = float(np.sum(resid**2) / (nok - rank))
    evar -= float(np.mean(special.polygamma(1, df1 / 2.0)))
    if evar > 0:
        return 2.0 * trigamma_inverse(evar)
    return np.inf


def resid_df_zero(zero: np.ndarray, design: np.ndarray) -> np.ndarray:
    """Residual df after removing exactly-zero fitted observations (edgeR's ``.residDF``)."""
    nlib, ncoef = design.shape
    nzero = zero.sum(axis=1)
    df = np.full(zero.shape[0], float(nlib - ncoef))
    df[nzero == nlib] = 0.0
    some = (nzero > 0) & (nzero < nlib)
    if np.any(some):
        pats, inv = np.unique(zero[some], axis=0, return_inverse=True)
        inv = np.asarray(inv).reshape(-1)
        ranks = np.array([np.linalg.matrix_rank(design[~p]) if np.any(~p) else 0 for p in pats])
        df[some] = np.maximum(nlib - nzero[some] - ranks[inv], 0.0)
    return df


@dataclass
class DispersionEstimate:
    """Result of :func:`estimate_disp` (edgeR ``estimateDisp``).

    Attributes
    ----------
    common
        Common dispersion.
    trended
        ``(n_genes,)`` abundance-trended dispersions (``None`` with ``trend_method="none"``).
    tagwise
        ``(n_genes,)`` empirical-Bayes shrunk gene-wise dispersions.
    prior_df
        Prior degrees of freedom of the shrinkage (limma ``squeezeVar`` estimate or given).
    prior_n
        ``prior_df / (n_cells - n_coef)``, the weight of the shared likelihood.
    ave_log_cpm
        ``(n_genes,)`` average log2-CPM with the common dispersion (the trend covariate).
    span
        Smoothing span of the trend.
    apl
        ``(n_selected_genes, grid_length)`` adjusted profile log-likelihoods on the grid.
    grid
        The dispersion grid (``0.1 * 2**seq(-10, 10, length=21)`` by default).
    selected
        ``(n_genes,)`` genes with at least ``min_row_sum`` counts (used for estimation).
    """

    common: float
    trended: np.ndarray | None
    tagwise: np.ndarray
    prior_df: float
    prior_n: float
    ave_log_cpm: np.ndarray
    span: float
    apl: np.ndarray
    grid: np.ndarray
    selected: np.ndarray


def _grid_profiles(
    ys: np.ndarray, design: np.ndarray, offs: np.ndarray, ws: np.ndarray, grid: np.ndarray
) -> np.ndarray:
    """Adjusted profile log-likelihood of every gene at every grid dispersion.

    Observations whose fitted mean is zero (unweighted fit at dispersion 0.05, as edgeR) are
    dropped with the coefficients they determine; genes sharing a zero pattern are fitted
    together, each grid point warm-started from the previous one.
    """
    l0 = np.zeros((ys.shape[0], grid.size))
    mu0 = glm_fit(ys, design, offs, 0.05, np.ones_like(ys), deviance=False).fitted
    zerofit = (ys < 1e-4) & (mu0 < 1e-4)
    pats, inv = np.unique(zerofit, axis=0, return_inverse=True)
    inv = np.asarray(inv).reshape(-1)
    for pi_, pat in enumerate(pats):
        nz = ~pat
        if not np.any(nz):
            continue
        rows = np.flatnonzero(inv == pi_)
        if np.all(nz):
            redesign = design
        else:
            sub = design[nz]
            redesign = sub[:, r_qr_keep_columns(sub)]
            if redesign.shape[0] == redesign.shape[1]:
                continue
        cy, co, cw = ys[np.ix_(rows, nz)], offs[np.ix_(rows, nz)], ws[np.ix_(rows, nz)]
        last = None
        for i in range(grid.size):
            fit = glm_fit(cy, redesign, co, grid[i], cw, start=last, deviance=False)
            l0[rows, i] = adjusted_profile_loglik(cy, fit.fitted, grid[i], cw, redesign)
            last = fit.coefficients
    return l0


def _dispersion_trend(
    l0: np.ndarray,
    pts: np.ndarray,
    a_all: np.ndarray,
    sel: np.ndarray,
    common: float,
    span: float,
    trend_method: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The abundance-trended profiles ``m0``, the trended dispersions of the selected genes,
    and those of all genes (``None`` without a trend; unselected genes get the trend of the
    lowest-abundance selected gene)."""
    nsel = l0.shape[0]
    if trend_method == "locfit":
        a_sel = a_all[sel]
        m0 = locfit_deg0(a_sel, l0, span) if span * nsel >= 2 and nsel > 1 else l0.copy()
        disp_trend = 0.1 * 2.0 ** maximize_interpolant(pts, m0)
        trended = np.full(sel.size, disp_trend[np.argmin(a_sel)])
        trended[sel] = disp_trend
    else:
        m0 = np.broadcast_to(l0.mean(axis=0), l0.shape).copy()
        disp_trend = np.full(nsel, common)
        trended = None
    return m0, disp_trend, trended


def _squeeze_prior_df(
    ys: np.ndarray,
    design: np.ndarray,
    offs: np.ndarray,
    ws: np.ndarray,
    disp_trend: np.ndarray,
    covariate: np.ndarray | None,
) -> float:
    """Prior df of the shrinkage: limma's ``fitFDist`` on the quasi-likelihood deviances of the
    fit at the trended dispersions (residual df less exactly-zero fitted observations)."""
    fit = glm_fit(ys, design, offs, disp_trend, ws)
    zero1 = (ys < 1e-4) & (fit.fitted < 1e-4)
    df_res = resid_df_zero(zero1, design)
    with np.errstate(divide="ignore", invalid="ignore"):
        s2 = fit.deviance / df_res
    s2[df_res == 0] = 0.0
    s2 = np.maximum(s2, 0.0)
    prior_df = fit_f_dist(s2, df_res, covariate)
    if np.isnan(prior_df):
        raise ValueError("could not estimate the prior degrees of freedom")
    return prior_df


def estimate_disp_gn(
    y: np.ndarray,
    design: np.ndarray,
    offset: np.ndarray,
    w: np.ndarray,
    *,
    prior_df: float | None,
    trend_method: str,
    span: float | None,
    min_row_sum: float,
    grid_length: int,
    grid_range: tuple[float, float],
) -> DispersionEstimate:
    """edgeR ``estimateDisp`` (GLM branch) on validated genes x cells data: the work of
    :func:`estimate_disp`, which holds the defaults (every caller goes through it).

    Parameters
    ----------
    y, offset, w
        ``(n_genes, n_cells)`` counts, log offsets and weights.
    design
        ``(n_cells, n_coef)`` design.
    prior_df, trend_method, span, min_row_sum, grid_length, grid_range
        See :func:`estimate_disp`.

    Returns
    -------
    DispersionEstimate
    """
    ng, nlib = y.shape
    ncoef = design.shape[1]
    if ncoef >= nlib:
        raise ValueError("no residual degrees of freedom: the design has as many columns as cells")
    if trend_method not in ("locfit", "none"):
        raise ValueError("trend_method must be 'locfit' or 'none'")
    sel = y.sum(axis=1) >= min_row_sum
    if not np.any(sel):
        raise ValueError(f"no gene has at least {min_row_sum} counts; cannot estimate dispersion")
    ys, offs, ws = y[sel], offset[sel], w[sel]
    pts = np.linspace(grid_range[0], grid_range[1], grid_length)
    grid = 0.1 * 2.0**pts
    l0 = _grid_profiles(ys, design, offs, ws, grid)

    common = float(0.1 * 2.0 ** maximize_interpolant(pts, l0.sum(axis=0)[None, :])[0])
    lib = np.exp(offset)
    a_all = ave_log_cpm_gn(y, np.log(lib), w, dispersion=common)
    nsel = int(sel.sum())
    if span is None:
        span = 1.0 if nsel <= 50 else 0.25 + 0.75 * (50.0 / nsel) ** 0.5
    m0, disp_trend, trended = _dispersion_trend(l0, pts, a_all, sel, common, span, trend_method)

    if prior_df is None:
        cov = a_all[sel] if trend_method != "none" else None
        prior_df = _squeeze_prior_df(ys, design, offs, ws, disp_trend, cov)
    prior_n = prior_df / (nlib - ncoef)
    tagwise = trended.copy() if trended is not None else np.full(ng, common)
    if prior_n <= 1e6:
        l0a = l0 + prior_n * m0
        tagwise[sel] = 0.1 * 2.0 ** maximize_interpolant(pts, l0a)
    return DispersionEstimate(
        common=common,
        trended=trended,
        tagwise=tagwise,
        prior_df=float(prior_df),
        prior_n=float(prior_n),
        ave_log_cpm=a_all,
        span=float(span),
        apl=l0,
        grid=grid,
        selected=sel,
    )


def estimate_disp(
    counts: Any,
    design: Any,
    *,
    offset: Any = None,
    weights: Any = None,
    prior_df: float | None = None,
    trend_method: str = "locfit",
    span: float | None = None,
    min_row_sum: float = 5,
    grid_length: int = 21,
    grid_range: tuple[float, float] = (-10.0, 10.0),
) -> DispersionEstimate:
    """Common, trended and tagwise NB dispersions (edgeR 3.40 ``estimateDisp``, GLM branch).

    For every gene with at least ``min_row_sum`` counts, the weighted Cox-Reid adjusted profile
    log-likelihood is evaluated on the grid ``phi = 0.1 * 2**t``, ``t`` in ``grid_range``
    (observations whose fitted mean is exactly zero are dropped together with the coefficients
    they determine). The common dispersion maximizes the summed (spline-interpolated) profile;
    the trend smooths the profiles along the average log-CPM with locfit (degree 0, span
    ``0.25 + 0.75 sqrt(50 / n_genes)``); the tagwise estimate maximizes
    ``apl_g + prior_n * trend_g`` with ``prior_n = prior_df / (n_cells - n_coef)`` and
    ``prior_df`` estimated by limma's ``squeezeVar`` from the quasi-likelihood deviances.

    Parameters
    ----------
    counts
        ``(n_cells, n_genes)`` counts.
    design
        ``(n_cells, n_coef)`` design matrix.
    offset
        ``(n_cells,)`` or ``(n_cells, n_genes)`` log effective library sizes (default
        ``log(lib.size * TMM factors)``).
    weights
        Optional ``(n_cells, n_genes)`` observation weights in (0, 1].
    prior_df
        Prior degrees of freedom (``None``: estimated as edgeR does).
    trend_method
        ``"locfit"`` (edgeR's default) or ``"none"``.
    span
        Trend span (default as edgeR 3.40).
    min_row_sum
        Genes with fewer total counts get the trended dispersion of the lowest-abundance gene.
    grid_length, grid_range
        The dispersion grid on the ``log2(phi / 0.1)`` scale.

    Returns
    -------
    DispersionEstimate
    """
    y = counts_gn(counts)
    x = as_design(design, y.shape[1])
    w = check_weights(weights, y.shape)
    off, _ = resolve_offsets(y, offset)
    return estimate_disp_gn(
        y,
        x,
        off,
        w,
        prior_df=prior_df,
        trend_method=trend_method,
        span=span,
        min_row_sum=min_row_sum,
        grid_length=grid_length,
        grid_range=grid_range,
    )
