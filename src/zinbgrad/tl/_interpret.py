"""Uncertainty of the latent space, loadings with standard errors, top genes, choosing K."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..data.validate import check_anndata, check_key
from ..estimator import ZINBWaVE
from ..selection import bicross_loglik
from ..uncertainty import latent_uncertainty as _latent
from ..uncertainty import loading_uncertainty
from ._zinbwave import resolve_model

__all__ = ["latent_uncertainty", "loadings", "top_genes", "select_n_components"]


def _is_training(adata, model) -> bool:
    names = getattr(model, "obs_names_", None)
    return (
        adata.n_obs == model.W_.shape[0]
        and names is not None
        and np.array_equal(np.asarray(adata.obs_names).astype(str), np.asarray(names))
    )


def latent_uncertainty(
    adata,
    *,
    model: ZINBWaVE | None = None,
    key: str = "X_zinbwave",
    layer: str | None = None,
    key_added: str | None = None,
    store_cov: bool = False,
    batch_key: str | None = None,
    covariate_keys: list[str] | None = None,
    copy: bool = False,
):
    """Laplace standard deviations (and covariances) of every cell's latent factors.

    The covariance of ``W_i`` is the ``K x K`` block of the inverse negative Hessian of the
    cell's penalized log-likelihood at the fit (``gamma_i`` integrated out, gene parameters
    fixed), in the frame of ``obsm[key]`` (after zinbwave's orthogonalization); see
    :mod:`zinbgrad.uncertainty`. For the full covariances as arrays use
    :func:`zinbgrad.uncertainty.latent_uncertainty`.

    Parameters
    ----------
    adata
        The training AnnData of the model, or new cells (then projected first, as
        :func:`zinbgrad.tl.project`; pass ``model``).
    model
        A fitted model; default: the one stored in ``adata`` under ``key``.
    key
        Key of the stored model.
    layer
        Layer with the raw counts.
    key_added
        Prefix of the outputs (default ``key``): ``obsm[key_added + "_sd"]`` (cells x K);
        with ``store_cov``, ``obsm[key_added + "_cov"]`` (cells x K x K); for new cells also
        ``obsm[key_added]`` (the projected W).
    store_cov
        Also store the full covariances.
    batch_key, covariate_keys
        For new cells, as in :func:`zinbgrad.tl.project`.
    copy
        Return a modified copy instead of writing into ``adata``.
    """
    check_anndata(adata)
    prefix = key if key_added is None else key_added
    check_key(prefix, "key_added")
    m = resolve_model(adata, key, model)
    new = not _is_training(adata, m)
    kw = {}
    if new:
        kw = {"batch_key": batch_key, "covariate_keys": covariate_keys}
    elif batch_key is not None or covariate_keys:
        raise ValueError("batch_key/covariate_keys are for new cells; these are the training cells")
    res = _latent(m, adata, layer=layer, new=new, **kw)
    target = adata.copy() if copy else adata
    if new:
        target.obsm[prefix] = res.W
    target.obsm[prefix + "_sd"] = res.sd
    if store_cov:
        target.obsm[prefix + "_cov"] = res.cov
    return target if copy else None


def loadings(
    adata,
    *,
    model: ZINBWaVE | None = None,
    key: str = "X_zinbwave",
    layer: str | None = None,
    copy: bool = False,
):
    """Standard errors of the gene loadings from the genes' Hessians.

    Writes ``varm[key + "_alpha_mu_se"]`` and ``varm[key + "_alpha_pi_se"]`` (genes x K),
    next to the loadings ``varm[key + "_alpha_mu"]`` that :func:`zinbgrad.tl.zinbwave` stores.
    The standard errors are conditional on the cells' W and the dispersion (see
    :mod:`zinbgrad.uncertainty`).

    Parameters
    ----------
    adata
        The training AnnData of the model.
    model, key, layer, copy
        As in :func:`latent_uncertainty`.
    """
    check_anndata(adata)
    m = resolve_model(adata, key, model)
    if not _is_training(adata, m):
        raise ValueError("loadings need the training cells of the model")
    res = loading_uncertainty(m, adata, layer=layer)
    target = adata.copy() if copy else adata
    # genes the model left out (no counts) get NaN rows
    pos = {g: j for j, g in enumerate(res.var_names)}
    idx = np.array([pos.get(g, -1) for g in np.asarray(adata.var_names).astype(str)])

    def rows(M: np.ndarray) -> np.ndarray:
        out = np.full((len(idx), M.shape[0]), np.nan)
        out[idx >= 0] = M.T[idx[idx >= 0]]
        return out

    target.varm[key + "_alpha_mu_se"] = rows(res.alpha_mu_se)
    target.varm[key + "_alpha_pi_se"] = rows(res.alpha_pi_se)
    if model is not None:  # keep the loadings next to their standard errors
        target.varm[key + "_alpha_mu"] = rows(res.alpha_mu)
        target.varm[key + "_alpha_pi"] = rows(res.alpha_pi)
    return target if copy else None


def top_genes(
    adata,
    n_genes: int = 10,
    *,
    component: str = "mu",
    model: ZINBWaVE | None = None,
    key: str = "X_zinbwave",
    layer: str | None = None,
    key_added: str | None = None,
) -> pd.DataFrame:
    """The genes that drive each latent factor: largest positive and negative loadings.

    Parameters
    ----------
    adata
        The training AnnData of the model.
    n_genes
        Genes per factor and direction.
    component
        ``"mu"`` (loadings of the mean, the default) or ``"pi"`` (zero inflation).
    model, key, layer
        As in :func:`latent_uncertainty`. Standard errors are computed with :func:`loadings`
        if ``varm`` does not hold them yet.
    key_added
        ``uns`` key of the table (default ``key + "_top_genes"``).

    Returns
    -------
    pandas.DataFrame
        One row per (factor, direction, rank): ``factor`` (0-based), ``direction`` (``"+"`` /
        ``"-"``), ``rank``, ``gene``, ``loading``, ``se``, ``z`` (loading / se). Also stored in
        ``uns[key_added]``.
    """
    check_anndata(adata)
    if key_added is not None:
        check_key(key_added, "key_added")
    if component not in ("mu", "pi"):
        raise ValueError(f"component must be 'mu' or 'pi', got {component!r}")
    if int(n_genes) != n_genes or n_genes < 1:
        raise ValueError(f"n_genes must be a positive integer, got {n_genes!r}")
    name = f"{key}_alpha_{component}"
    if model is not None or name + "_se" not in adata.varm or name not in adata.varm:
        loadings(adata, model=model, key=key, layer=layer)
    alpha = np.asarray(adata.varm[name])  # genes x K
    se = np.asarray(adata.varm[name + "_se"])
    genes = np.asarray(adata.var_names).astype(str)
    k_top = min(int(n_genes), alpha.shape[0])
    rows = []
    for k in range(alpha.shape[1]):
        up, down = np.argsort(-alpha[:, k]), np.argsort(alpha[:, k])  # NaN (no fit) last
        for direction, idx in (("+", up[:k_top]), ("-", down[:k_top])):
            for r, j in enumerate(idx):
                rows.append((k, direction, r, genes[j], alpha[j, k], se[j, k]))
    df = pd.DataFrame(rows, columns=["factor", "direction", "rank", "gene", "loading", "se"])
    with np.errstate(divide="ignore", invalid="ignore"):
        df["z"] = df["loading"] / df["se"]
    adata.uns[key + "_top_genes" if key_added is None else key_added] = df
    return df


def select_n_components(
    adata,
    n_components: Sequence[int] = (2, 4, 6, 8, 10),
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    covariate_keys: list[str] | None = None,
    holdout: float = 0.2,
    n_folds: int = 2,
    criterion: str = "bicross",
    random_state: int = 0,
    warm_start: bool = False,
    key_added: str = "zinbwave_n_components",
    **kwargs,
) -> pd.DataFrame:
    """Fit ZINB-WaVE for several K and compare them on held-out cells and by AIC/BIC.

    A random ``holdout`` fraction of the cells is held out; for each K a model is fitted on
    the other cells (genes without a count there are left out) and scored on the held-out
    ones:

    * ``heldout_loglik``: mean log-likelihood per held-out cell with its local parameters
      re-optimized on its counts (:meth:`ZINBWaVE.score`). Each factor adds a free parameter
      per held-out cell fitted to its own counts, so this keeps rising slowly past the true K;
      reported, not used by default;
    * ``bicross_loglik``: the same, bi-cross-validated over ``n_folds`` gene folds
      (:func:`zinbgrad.selection.bicross_loglik`): every held-out count is scored by
      parameters fitted without it (``bicross_se``: the standard error over the held-out
      cells of its difference to the best K's, cell by cell);
    * ``aic``, ``bic``: zinbwave's criteria of the fit on the training cells.

    Each K is fitted from zinbwave's initialization, so the scan costs the sum of its fits
    (on the training cells) plus their scoring, 28-37 % more: for K = 2, 5, 10, 15, 20 about
    4.3 (Zeisel) and 2.9 (PBMC 8k) plain fits at K = 20 on one thread (BENCHMARKS.md, section
    5). That is its floor: a sweep's cost is per-entry work that does not depend on K, each K
    needs its own sweeps (the scan's sweeps alone cost 1.8 and 2.1 plain fits there), and no
    start shared across K reaches that K's optimum in fewer sweeps: a truncated rank-K_max
    initialization, a smaller fit grown by new factors, or (``warm_start``) the leading
    factors of a larger fit each land in other, mostly poorer, local optima, which moves the
    recommended K. With ``warm_start`` the largest K is fitted first and each smaller K
    starts from the previous fit (``ZINBWaVE.fit(init=...)``); off by default: it is not
    cheaper (more sweeps, and its held-out cells replay a longer path).

    Parameters
    ----------
    adata
        AnnData with raw counts (never modified, except ``uns[key_added]``).
    n_components
        The values of K to compare.
    layer, batch_key, covariate_keys
        As in :func:`zinbgrad.tl.zinbwave`.
    holdout
        Fraction of the cells held out, in (0, 0.5].
    n_folds
        Gene folds of the bi-cross-validation.
    criterion
        The rule of ``recommended``: ``"bicross"`` (highest), ``"heldout"`` (highest), ``"aic"``
        or ``"bic"`` (lowest).
    random_state
        Seed of the cell and gene splits, and of the fits unless ``kwargs`` sets one.
    warm_start
        Fit the K in decreasing order, each started from the previous fit (see
        :meth:`zinbgrad.ZINBWaVE.fit`'s ``init``); ``False`` (the default): every K from
        zinbwave's initialization.
    key_added
        ``uns`` key: ``{"table": {column: values}, "recommended": K, "criterion": ...,
        "recommended_by": {criterion: K}}``.
    **kwargs
        Hyper-parameters of :class:`zinbgrad.ZINBWaVE` (``max_epochs``, ``tol``, ...).

    Returns
    -------
    pandas.DataFrame
        One row per K (sorted), the columns above plus ``train_loglik``, ``n_params``,
        ``n_iter``, ``converged``, ``seconds`` (fit and scoring), ``fit_seconds`` (the fit on
        the training cells) and ``score_seconds`` (the held-out and bi-cross-validated scores).
    """
    check_anndata(adata)
    check_key(key_added, "key_added")
    given = list(np.atleast_1d(n_components))
    if not given or any(isinstance(k, bool) or int(k) != k or k < 0 for k in given):
        raise ValueError(f"n_components must be non-negative integers, got {n_components!r}")
    ks = sorted({int(k) for k in given})
    if not 0.0 < float(holdout) <= 0.5:
        raise ValueError(f"holdout must be in (0, 0.5], got {holdout!r}")
    crits = {"bicross": "max", "heldout": "max", "aic": "min", "bic": "min"}
    extended = [k for k in ("batch_loadings", "batch_dispersion") if kwargs.get(k)]
    if extended:  # before any fit: its bi-cross-validation scores zinbwave's model only
        raise ValueError(
            f"select_n_components compares fits of zinbwave's model; {' and '.join(extended)}"
            " is not supported by its bi-cross-validation: choose K with the batch in X "
            "(batch_key=...) and fit the batch option at that K"
        )
    if criterion not in crits:
        raise ValueError(f"criterion must be one of {sorted(crits)}, got {criterion!r}")
    test_idx, train_idx = _split_cells(adata.n_obs, holdout, random_state)
    n_test = len(test_idx)
    counts = adata.X if layer is None else adata.layers[layer]
    if counts is None:
        raise ValueError("adata.X is empty; pass layer= with the raw counts")
    # genes without a count in the training cells cannot be fitted: left out of every K
    genes = np.flatnonzero(np.asarray(abs(counts[train_idx]).sum(0)).ravel() > 0)
    train, test = adata[train_idx, genes], adata[test_idx, genes]
    kwargs.setdefault("random_state", random_state)
    kwargs.setdefault("verbose", False)
    proj = {"batch_key": batch_key, "covariate_keys": covariate_keys}
    rows, per_cell, prev = [], [], None
    for K in sorted(ks, reverse=bool(warm_start)):
        row, bc, m = _score_k(K, train, test, layer, proj, n_folds, random_state, kwargs, prev)
        rows.append(row)
        per_cell.append(bc)
        prev = m if warm_start else None
    if warm_start:
        rows, per_cell = rows[::-1], per_cell[::-1]
    df = pd.DataFrame(rows)
    # standard error of each K's paired (same cells) difference to the best K
    ref = per_cell[int(df["bicross_loglik"].idxmax())]
    df.insert(
        3,
        "bicross_se",
        [float(np.std(bc - ref, ddof=1) / np.sqrt(len(bc))) for bc in per_cell],
    )
    best = {}
    for c, how in crits.items():
        col = df["bicross_loglik" if c == "bicross" else "heldout_loglik" if c == "heldout" else c]
        best[c] = int(df["n_components"].iloc[col.idxmax() if how == "max" else col.idxmin()])
    adata.uns[key_added] = {
        "table": {c: df[c].to_numpy() for c in df.columns},
        "recommended": best[criterion],
        "criterion": criterion,
        "recommended_by": best,
        "holdout": float(holdout),
        "n_test": int(n_test),
        "n_genes": int(len(genes)),
    }
    return df


def _split_cells(n: int, holdout: float, random_state: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices of the held-out and the training cells (one random permutation)."""
    n_test = int(round(float(holdout) * n))
    if n_test < 2 or n - n_test < 2:
        raise ValueError(f"holdout={holdout} leaves too few cells on one side ({n} cells)")
    rng = np.random.default_rng(random_state)
    perm = rng.permutation(n)
    return np.sort(perm[:n_test]), np.sort(perm[n_test:])


def _score_k(
    K: int,
    train,
    test,
    layer,
    proj: dict,
    n_folds: int,
    random_state: int,
    kwargs: dict,
    init: ZINBWaVE | None = None,
) -> tuple[dict, np.ndarray, ZINBWaVE]:
    """Fit K factors on ``train`` (from ``init``, a fit of more factors, when given); its row
    of :func:`select_n_components`' table, the held-out cells' bi-cross-validated
    log-likelihoods and the fitted model."""
    t0 = time.perf_counter()
    m = ZINBWaVE(K, **kwargs).fit(train, layer=layer, init=init, **proj)
    t_fit = time.perf_counter() - t0
    ho = m.score_samples(test, layer=layer, **proj)
    bc = bicross_loglik(m, test, layer=layer, n_folds=n_folds, random_state=random_state, **proj)
    row = {
        "n_components": K,
        "heldout_loglik": float(np.mean(ho)),
        "bicross_loglik": float(np.mean(bc)),
        "aic": float(m.aic_),
        "bic": float(m.bic_),
        "train_loglik": float(m.loglik_),
        "n_params": int(m.n_params_),
        "n_iter": int(m.n_iter_),
        "converged": bool(m.converged_),
        "seconds": time.perf_counter() - t0,
        "fit_seconds": t_fit,
    }
    row["score_seconds"] = row["seconds"] - t_fit
    return row, bc, m
