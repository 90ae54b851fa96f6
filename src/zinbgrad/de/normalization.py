"""Library-size normalization and abundance: edgeR's TMM factors, offsets and ``aveLogCPM``."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

from .irls import NBData, fit_one_group
from .utils import LOG2, LOG_1E6, check_weights, disp_matrix, expand_offset, to_dense


def tmm_factor(
    obs: np.ndarray,
    ref: np.ndarray,
    n_obs: float,
    n_ref: float,
    logratio_trim: float = 0.3,
    sum_trim: float = 0.05,
    do_weighting: bool = True,
    a_cutoff: float = -1e10,
) -> float:
    """edgeR's ``.calcFactorTMM`` between one library and the reference library.

    Parameters
    ----------
    obs, ref
        Counts of the library and of the reference library (genes with a positive count
        somewhere).
    n_obs, n_ref
        Their library sizes.
    logratio_trim, sum_trim, do_weighting, a_cutoff
        See :func:`calc_norm_factors`.

    Returns
    -------
    float
        The (unscaled) TMM factor.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        log_r = np.log2((obs / n_obs) / (ref / n_ref))
        abs_e = (np.log2(obs / n_obs) + np.log2(ref / n_ref)) / 2.0
        v = (n_obs - obs) / n_obs / obs + (n_ref - ref) / n_ref / ref
    fin = np.isfinite(log_r) & np.isfinite(abs_e) & (abs_e > a_cutoff)
    log_r, abs_e, v = log_r[fin], abs_e[fin], v[fin]
    if log_r.size == 0 or np.max(np.abs(log_r)) < 1e-6:
        return 1.0
    n = log_r.size
    lo_l = np.floor(n * logratio_trim) + 1
    hi_l = n + 1 - lo_l
    lo_s = np.floor(n * sum_trim) + 1
    hi_s = n + 1 - lo_s
    rk_r = stats.rankdata(log_r)
    rk_e = stats.rankdata(abs_e)
    keep = (rk_r >= lo_l) & (rk_r <= hi_l) & (rk_e >= lo_s) & (rk_e <= hi_s)
    if do_weighting:
        f = np.nansum(log_r[keep] / v[keep]) / np.nansum(1.0 / v[keep])
    else:
        f = np.nanmean(log_r[keep])
    if not np.isfinite(f):
        f = 0.0
    return float(2.0**f)


def calc_norm_factors(
    counts: Any,
    lib_size: Any = None,
    *,
    ref_column: int | None = None,
    logratio_trim: float = 0.3,
    sum_trim: float = 0.05,
    do_weighting: bool = True,
    a_cutoff: float = -1e10,
) -> np.ndarray:
    """TMM normalization factors (edgeR 3.40 ``calcNormFactors(method="TMM")``).

    The reference library is the one whose upper-quartile ratio is closest to the mean, or, when
    the median upper quartile is zero (typical of sparse single-cell data), the library with the
    largest ``sum(sqrt(counts))``. Factors are rescaled to have geometric mean one; the effective
    library sizes are ``lib_size * factors``.

    Parameters
    ----------
    counts
        ``(n_cells, n_genes)`` counts, dense or sparse.
    lib_size
        Library sizes (default: cell totals).
    ref_column
        Index of the reference cell (default chosen as edgeR does).
    logratio_trim, sum_trim, do_weighting, a_cutoff
        TMM trimming fractions, precision weighting and abundance cutoff (edgeR's defaults).

    Returns
    -------
    numpy.ndarray
        ``(n_cells,)`` normalization factors.
    """
    x = to_dense(counts).T  # genes x samples
    nsamples = x.shape[1]
    lib = x.sum(axis=0) if lib_size is None else np.asarray(lib_size, dtype=np.float64)
    if lib.shape != (nsamples,):
        raise ValueError(f"lib_size must have length {nsamples}")
    x = x[np.any(x > 0, axis=1)]
    if x.shape[0] == 0 or nsamples == 1:
        return np.ones(nsamples)
    if ref_column is None:
        f75 = np.quantile(x, 0.75, axis=0) / lib
        if np.median(f75) < 1e-20:
            ref_column = int(np.argmax(np.sqrt(x).sum(axis=0)))
        else:
            ref_column = int(np.argmin(np.abs(f75 - f75.mean())))
    f = np.array(
        [
            tmm_factor(
                x[:, i],
                x[:, ref_column],
                lib[i],
                lib[ref_column],
                logratio_trim,
                sum_trim,
                do_weighting,
                a_cutoff,
            )
            for i in range(nsamples)
        ]
    )
    return f / np.exp(np.mean(np.log(f)))


def resolve_offsets(
    y: np.ndarray, offset: Any = None, lib_size: Any = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The GLM offsets of genes x cells counts ``y``: given, or edgeR's default
    ``log(lib.size * TMM factors)``.

    Parameters
    ----------
    y
        ``(n_genes, n_cells)`` counts.
    offset
        ``None``, or log offsets: a number, ``(n_cells,)`` or ``(n_cells, n_genes)``.
    lib_size
        Library sizes used with the TMM factors when ``offset`` is ``None`` (default: totals).

    Returns
    -------
    tuple
        ``(n_genes, n_cells)`` offsets and the TMM factors (``None`` when ``offset`` is given).
    """
    if offset is not None:
        return expand_offset(offset, y.shape), None
    lib = y.sum(axis=0) if lib_size is None else np.asarray(lib_size, dtype=np.float64)
    if np.any(lib <= 0):
        raise ValueError("every cell needs a positive library size to compute offsets")
    norm_factors = calc_norm_factors(y.T, lib)
    off = np.broadcast_to(np.log(lib * norm_factors)[None, :], y.shape).copy()
    return off, norm_factors


def ave_log_cpm_gn(
    y: np.ndarray,
    offset: np.ndarray,
    w: np.ndarray,
    dispersion: Any = 0.05,
    prior_count: float = 2.0,
) -> np.ndarray:
    """:func:`ave_log_cpm` on genes x cells counts ``y``, log library sizes ``offset`` and
    weights ``w`` (all ``(n_genes, n_cells)``); returns the ``(n_genes,)`` average log2-CPM."""
    lib = np.exp(offset)
    prior = prior_count * lib / lib.mean(axis=1, keepdims=True)
    off2 = np.log(lib + 2.0 * prior)
    dmat = disp_matrix(dispersion, y.shape)
    beta, _ = fit_one_group(NBData(y + prior, off2, dmat, w))
    return (beta + LOG_1E6) / LOG2


def ave_log_cpm(
    counts: Any,
    lib_size: Any = None,
    *,
    weights: Any = None,
    dispersion: Any = 0.05,
    prior_count: float = 2.0,
) -> np.ndarray:
    """Average log2 counts-per-million of each gene (edgeR's ``aveLogCPM``).

    The weighted NB maximum-likelihood abundance of each gene after adding ``prior_count``
    (scaled by relative library size) to every count and twice that to the library sizes.

    Parameters
    ----------
    counts
        ``(n_cells, n_genes)`` counts.
    lib_size
        Effective library sizes (default: cell totals), e.g. ``lib_size * norm_factors``.
    weights
        Optional ``(n_cells, n_genes)`` observation weights.
    dispersion
        NB dispersion(s) used in the fit (edgeR passes the common dispersion).
    prior_count
        Average prior count added to each observation.

    Returns
    -------
    numpy.ndarray
        ``(n_genes,)`` average log2-CPM.
    """
    y = to_dense(counts).T
    lib = y.sum(axis=0) if lib_size is None else np.asarray(lib_size, dtype=np.float64)
    off = np.broadcast_to(np.log(lib)[None, :], y.shape)
    w = check_weights(weights, y.shape)
    return ave_log_cpm_gn(y, off, w, dispersion, prior_count)
