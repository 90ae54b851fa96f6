"""zinbwave's ``glmWeightedF``: the weighted likelihood-ratio F test of a design coefficient,
Benjamini-Hochberg adjustment and DESeq2-style independent filtering (``pvalueAdjustment``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from .dispersion import DispersionEstimate, estimate_disp
from .irls import GLMFit, glm_fit
from .normalization import ave_log_cpm_gn, resolve_offsets
from .smoothing import lowess
from .utils import (
    LOG2,
    as_design,
    check_full_rank,
    check_weights,
    counts_gn,
    gene_dispersion,
    r_quantile,
)


def p_adjust_bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (R's ``p.adjust(p, "BH")``; NaN kept as NaN).

    Parameters
    ----------
    p
        P-values (NaN allowed).

    Returns
    -------
    numpy.ndarray
        Adjusted p-values, the shape of ``p``.
    """
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    q = p[ok]
    n = q.size
    if n == 0:
        return out
    order = np.argsort(q)[::-1]  # decreasing
    ranks = np.arange(n, 0, -1)
    adj = np.minimum.accumulate(q[order] * n / ranks)
    res = np.empty(n)
    res[order] = np.minimum(adj, 1.0)
    out[ok] = res
    return out


def _independent_filtering(
    filt: np.ndarray, pvalue: np.ndarray, alpha: float = 0.05
) -> tuple[np.ndarray, float]:
    """zinbwave's ``pvalueAdjustment`` (DESeq2-style independent filtering with BH).

    Returns the filtered BH-adjusted p-values (NaN for filtered-out genes) and the chosen
    filtering quantile ``theta``.
    """
    lower = float(np.mean(filt == 0))
    upper = 0.95 if lower < 0.95 else 1.0
    theta = np.linspace(lower, upper, 50)
    cutoffs = r_quantile(filt, theta)
    padj = np.full((filt.size, theta.size), np.nan)
    for i, cut in enumerate(cutoffs):
        use = filt >= cut
        if np.any(use):
            padj[use, i] = p_adjust_bh(pvalue[use])
    num_rej = np.sum(padj < alpha, axis=0)
    if num_rej.max() <= 10:
        j = 0
    else:
        lo = lowess(theta, num_rej.astype(np.float64), f=1.0 / 5.0)
        resid = num_rej[num_rej > 0] - lo[num_rej > 0] if np.any(num_rej > 0) else np.zeros(1)
        thresh = lo.max() - np.sqrt(np.mean(resid**2))
        above = np.flatnonzero(num_rej > thresh)
        j = int(above[0]) if above.size else 0
    return padj[:, j], float(theta[j])


def _pred_fc(
    y: np.ndarray,
    design: np.ndarray,
    offset: np.ndarray,
    disp: Any,
    w: np.ndarray,
    prior_count: float = 0.125,
) -> np.ndarray:
    """edgeR's ``predFC``: coefficients (natural log) of the fit to prior-augmented counts."""
    lib = np.exp(offset)
    prior = prior_count * lib / lib.mean(axis=1, keepdims=True)
    off2 = np.log(lib + 2.0 * prior)
    return glm_fit(y + prior, design, off2, disp, w, deviance=False).coefficients


def _check_test_design(
    design: Any, coef: int | Sequence[int], nlib: int, prior_df: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``prior_df``, the design (full rank, an intercept and an effect) and ``coef``;
    return the design and the sorted distinct tested columns."""
    if prior_df is not None and not (np.isfinite(prior_df) and prior_df >= 0):
        raise ValueError(f"prior_df must be None or a finite number >= 0, got {prior_df!r}")
    x = as_design(design, nlib)
    if x.shape[1] < 2:
        raise ValueError("need at least two design columns (an intercept and a tested effect)")
    check_full_rank(x)
    coefs = np.atleast_1d(np.asarray(coef, dtype=int))
    if np.any(coefs < 0) or np.any(coefs >= x.shape[1]):
        raise ValueError(f"coef must index the {x.shape[1]} design columns")
    return x, np.unique(coefs)


def _dispersion_for_test(
    y: np.ndarray,
    x: np.ndarray,
    off: np.ndarray,
    w: np.ndarray,
    dispersion: Any,
    prior_df: float | None,
) -> tuple[np.ndarray, float, np.ndarray, DispersionEstimate | None]:
    """Tagwise dispersions (estimated unless given), the prior df of the F denominator, the
    average log-CPM and the dispersion estimate (``None`` when given)."""
    if dispersion is None:
        est = estimate_disp(y.T, x, offset=off.T, weights=w.T, prior_df=prior_df)
        # est.ave_log_cpm: aveLogCPM with the common dispersion and the weights
        return est.tagwise, est.prior_df, est.ave_log_cpm, est
    disp = gene_dispersion(dispersion, y.shape[0])
    pdf = 20.0 if prior_df is None else float(prior_df)
    d0 = np.asarray(dispersion, dtype=np.float64)
    a_cpm = ave_log_cpm_gn(y, off, w, dispersion=float(d0) if d0.ndim == 0 else 0.05)
    return disp, pdf, a_cpm, None


@dataclass
class _FTest:
    """The fits and statistics of :func:`glm_weighted_f` (genes x cells orientation)."""

    full: GLMFit
    null: GLMFit
    shrunk: np.ndarray
    lr: np.ndarray
    fstat: np.ndarray
    df_test: float
    df_total: np.ndarray
    pval: np.ndarray
    padj: np.ndarray
    padj_filter: np.ndarray
    filter_theta: float
    gamma: float


def _weighted_f_test(
    y: np.ndarray,
    x: np.ndarray,
    off: np.ndarray,
    w: np.ndarray,
    disp: np.ndarray,
    pdf: float,
    coefs: np.ndarray,
    zi_adjust: bool,
    independent_filtering: bool,
) -> _FTest:
    """Full and reduced fits, the LR statistic and its weighted F test (``glmWeightedF``)."""
    ng, nlib = y.shape
    full = glm_fit(y, x, off, disp, w)
    keep = np.setdiff1d(np.arange(x.shape[1]), coefs)
    null = glm_fit(y, x[:, keep], off, disp, w)
    shrunk = _pred_fc(y, x, off, disp, w, prior_count=0.125)

    lr = null.deviance - full.deviance
    ncoef = x.shape[1]
    df_resid = w.sum(axis=1) - ncoef if zi_adjust else np.full(ng, float(nlib - ncoef))
    df_test = float(coefs.size)
    phi_med = float(np.median(disp))
    mu_med = float(np.median(full.fitted))
    gamma = (phi_med * mu_med / (1.0 + phi_med * mu_med)) ** 2
    with np.errstate(divide="ignore"):
        df_total = df_resid + pdf / gamma
    fstat = lr / df_test
    pval = np.where(
        np.isfinite(df_total),
        stats.f.sf(fstat, df_test, df_total),
        stats.chi2.sf(lr, df_test),
    )
    padj = p_adjust_bh(pval)
    if independent_filtering:
        padj_filter, filter_theta = _independent_filtering(full.fitted.mean(axis=1), pval)
    else:
        padj_filter, filter_theta = np.full(ng, np.nan), np.nan
    return _FTest(
        full=full,
        null=null,
        shrunk=shrunk,
        lr=lr,
        fstat=fstat,
        df_test=df_test,
        df_total=df_total,
        pval=pval,
        padj=padj,
        padj_filter=padj_filter,
        filter_theta=filter_theta,
        gamma=gamma,
    )


def _result_table(
    t: _FTest,
    coefs: np.ndarray,
    a_cpm: np.ndarray,
    disp: np.ndarray,
    w: np.ndarray,
    gene_names: Sequence[str] | None,
) -> pd.DataFrame:
    """The per-gene result table of :func:`glm_weighted_f`."""
    # with several tested coefficients the test is joint; the first one's fold change is reported
    lfc = t.shrunk[:, coefs[0]] / LOG2
    lfc_mle = t.full.coefficients[:, coefs[0]] / LOG2
    index = pd.Index(gene_names) if gene_names is not None else pd.RangeIndex(w.shape[0])
    return pd.DataFrame(
        {
            "log2_fold_change": lfc,
            "log2_fold_change_mle": lfc_mle,
            "logCPM": a_cpm,
            "statistic": t.lr,
            "F": t.fstat,
            "df_test": t.df_test,
            "df_total": t.df_total,
            "pvalue": t.pval,
            "padj": t.padj,
            "padj_filter": t.padj_filter,
            "dispersion": disp,
            "mean_weight": w.mean(axis=1),
        },
        index=index,
    )


def _result_details(
    t: _FTest,
    norm_factors: np.ndarray | None,
    off: np.ndarray,
    disp_est: DispersionEstimate | None,
    pdf: float,
) -> dict[str, Any]:
    """The ``return_details`` dictionary of :func:`glm_weighted_f` (cells x genes matrices)."""
    return {
        "norm_factors": norm_factors,
        "offset": off.T,
        "dispersion": disp_est,
        "prior_df": pdf,
        "gamma": t.gamma,
        "coefficients": t.full.coefficients,
        "coefficients_shrunk": t.shrunk,
        "fitted": t.full.fitted.T,
        "fitted_null": t.null.fitted.T,
        "deviance": t.full.deviance,
        "deviance_null": t.null.deviance,
        "converged": t.full.converged & t.null.converged,
        "method": t.full.method,
        "filter_theta": t.filter_theta,
    }


def glm_weighted_f(
    counts: Any,
    design: Any,
    coef: int | Sequence[int],
    *,
    weights: Any = None,
    offset: Any = None,
    lib_size: Any = None,
    dispersion: Any = None,
    prior_df: float | None = None,
    independent_filtering: bool = True,
    zi_adjust: bool = True,
    gene_names: Sequence[str] | None = None,
    return_details: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, dict[str, Any]]:
    """zinbwave/edgeR weighted likelihood-ratio F test of ``coef`` for every gene.

    Runs edgeR's pipeline (TMM offsets, ``estimateDisp`` with the weights, ``glmFit``) and
    zinbwave's ``glmWeightedF``: the LR statistic ``LR = D_0 - D_1`` between the weighted
    deviances of the reduced (``coef`` removed) and full fits is referred to an F distribution,
    ``F = LR / df_test`` with ``df_test = len(coef)`` and denominator
    ``df_total = (sum_i w_ig - n_coef) + prior_df / gamma``, where
    ``gamma = (phi_med mu_med / (1 + phi_med mu_med))^2`` from the medians of the tagwise
    dispersions and of all fitted means. With ``zi_adjust=False`` the residual df is the
    unweighted ``n_cells - n_coef`` (edgeR's ``glmLRT``-style df).

    Parameters
    ----------
    counts
        ``(n_cells, n_genes)`` counts, dense or sparse.
    design
        ``(n_cells, n_coef)`` full-rank design.
    coef
        Column index (or indices) of ``design`` to test (0-based).
    weights
        ``(n_cells, n_genes)`` zinbwave observational weights in (0, 1] (``None``: all ones,
        i.e. an ordinary edgeR analysis with an F test).
    offset
        Log effective library sizes ``(n_cells,)`` / ``(n_cells, n_genes)``; default
        ``log(lib_size * TMM factors)``.
    lib_size
        Library sizes used with the TMM factors when ``offset`` is ``None`` (default totals).
    dispersion
        ``None`` to estimate (edgeR ``estimateDisp``) or a scalar / ``(n_genes,)`` dispersion.
    prior_df
        Prior df for ``estimateDisp`` and the F denominator (``None``: estimated; 20 when
        ``dispersion`` is given, as ``glmWeightedF`` does without a stored value).
    independent_filtering
        Add the ``padj_filter`` column (independent filtering on the mean fitted value).
    zi_adjust
        Use the weight-adjusted residual df (``glmWeightedF``'s ``ZI=TRUE``).
    gene_names
        Index of the returned table.
    return_details
        Also return a dict with the fits, dispersions and norm factors.

    Returns
    -------
    pandas.DataFrame
        Columns ``log2_fold_change`` (edgeR's prior-count shrunk coefficient / log 2),
        ``log2_fold_change_mle``, ``logCPM``, ``statistic`` (LR), ``F``, ``df_test``,
        ``df_total``, ``pvalue``, ``padj`` (BH), ``padj_filter``, ``dispersion``,
        ``mean_weight``.
    """
    y = counts_gn(counts)
    x, coefs = _check_test_design(design, coef, y.shape[1], prior_df)
    w = check_weights(weights, y.shape)
    off, norm_factors = resolve_offsets(y, offset, lib_size)
    if not np.all(np.isfinite(off)):
        raise ValueError("offsets must be finite")
    disp, pdf, a_cpm, disp_est = _dispersion_for_test(y, x, off, w, dispersion, prior_df)
    t = _weighted_f_test(y, x, off, w, disp, pdf, coefs, zi_adjust, independent_filtering)
    table = _result_table(t, coefs, a_cpm, disp, w, gene_names)
    if not return_details:
        return table
    return table, _result_details(t, norm_factors, off, disp_est, pdf)
