"""The weighted negative-binomial GLM of every gene (edgeR's ``glmFit`` with weights)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .dispersion import estimate_disp
from .irls import glm_fit
from .normalization import resolve_offsets
from .utils import as_design, check_full_rank, check_weights, counts_gn, gene_dispersion


@dataclass
class NBGLMFit:
    """Result of :func:`weighted_nb_glm` (arrays are per gene unless noted).

    Attributes
    ----------
    coefficients
        ``(n_genes, n_coef)`` coefficients on the natural-log scale (one-way layouts: an
        all-zero group has log-mean -1e8, as in edgeR).
    deviance
        ``(n_genes,)`` weighted residual deviance ``sum_i w_ig d(y_ig, mu_ig)``.
    fitted
        ``(n_cells, n_genes)`` fitted means.
    converged
        ``(n_genes,)`` convergence flags. A gene whose maximum-likelihood estimate does not
        exist (all counts zero in a subset of cells that some coefficient isolates, in a
        non-one-way design) keeps drifting towards ``-inf`` until ``max_iter`` and is flagged
        ``False``; its fitted means there are then below 1e-8 and its deviance is accurate.
    dispersion
        ``(n_genes,)`` NB dispersions used (variance ``mu + phi mu^2``).
    df_residual
        ``(n_genes,)`` weight-adjusted residual degrees of freedom ``sum_i w_ig - n_coef``.
    method
        ``"oneway"`` (exact group-wise solution) or ``"levenberg"`` (damped Fisher scoring).
    n_iter
        ``(n_genes,)`` Fisher-scoring iterations (Levenberg fits; zeros for one-way fits).
    """

    coefficients: np.ndarray
    deviance: np.ndarray
    fitted: np.ndarray
    converged: np.ndarray
    dispersion: np.ndarray
    df_residual: np.ndarray
    method: str
    n_iter: np.ndarray


def weighted_nb_glm(
    counts: Any,
    design: Any,
    weights: Any = None,
    offset: Any = None,
    dispersion: Any = None,
    *,
    tol: float = 1e-14,
    max_iter: int = 250,
    start: np.ndarray | None = None,
) -> NBGLMFit:
    """Fit a weighted negative-binomial GLM (log link) to every gene at once.

    The model is ``y_ig ~ NB(mu_ig, phi_g)`` with ``log mu_ig = offset_ig + x_i' beta_g`` and
    the log-likelihood of observation ``(i, g)`` multiplied by ``w_ig`` (edgeR's ``glmFit`` with
    ``weights``). One-way layouts (a design with as many distinct rows as columns, e.g.
    ``~group``) are solved exactly group by group; any other full-rank design uses
    Levenberg-damped Fisher scoring (IRLS) vectorized across genes.

    Parameters
    ----------
    counts
        ``(n_cells, n_genes)`` non-negative integer counts, dense or ``scipy.sparse``.
    design
        ``(n_cells, n_coef)`` full-rank design matrix.
    weights
        ``(n_cells, n_genes)`` observation weights in (0, 1]; ``None`` means all ones.
    offset
        Log-scale offsets: ``(n_cells,)`` or ``(n_cells, n_genes)``. ``None`` uses edgeR's
        default ``log(lib.size * norm.factors)`` with TMM factors from
        :func:`calc_norm_factors`.
    dispersion
        NB dispersion ``phi`` (scalar or ``(n_genes,)``). ``None`` estimates it with
        :func:`estimate_disp` (tagwise, empirical-Bayes shrunk).
    tol
        Convergence tolerance of the Levenberg iterations (Newton decrement).
    max_iter
        Maximum number of Levenberg iterations.
    start
        Optional ``(n_genes, n_coef)`` starting coefficients.

    Returns
    -------
    NBGLMFit
        Coefficients (natural log scale), deviances, fitted means, convergence flags, ...

    Raises
    ------
    ValueError
        On invalid counts, weights, shapes or a rank-deficient design.
    """
    y = counts_gn(counts)
    ng = y.shape[0]
    x = as_design(design, y.shape[1])
    check_full_rank(x)
    w = check_weights(weights, y.shape)
    off, _ = resolve_offsets(y, offset)
    if not np.all(np.isfinite(off)):
        raise ValueError("offsets must be finite")
    if dispersion is None:
        disp = estimate_disp(y.T, x, offset=off.T, weights=w.T).tagwise
    else:
        disp = gene_dispersion(dispersion, ng)
    fit = glm_fit(y, x, off, disp, w, start=start, tol=tol, maxit=max_iter)
    return NBGLMFit(
        coefficients=fit.coefficients,
        deviance=fit.deviance,
        fitted=fit.fitted.T.copy(),
        converged=fit.converged,
        dispersion=np.asarray(disp, dtype=np.float64),
        df_residual=w.sum(axis=1) - x.shape[1],
        method=fit.method,
        n_iter=fit.n_iter,
    )
