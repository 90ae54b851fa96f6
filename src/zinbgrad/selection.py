"""Held-out criteria for choosing the number of latent factors K.

:meth:`ZINBWaVE.score` re-optimizes a held-out cell's local parameters on the same counts it
then scores: every extra factor gives each held-out cell one more free parameter fitted to its
own noise (about +0.5 log-likelihood per cell and factor), so that score keeps rising past the
true K. :func:`bicross_loglik` removes that bias by bi-cross-validation (Owen & Perry, *Ann.
Appl. Stat.* 2009): the genes are split at random into folds; a held-out cell's ``W_i`` and
``gamma_i`` are fitted on the genes of all folds but one (the fit's gene parameters fixed, as
in :meth:`ZINBWaVE.transform`) and the log-likelihood is taken on the genes of the fold left
out. Summed over folds, every held-out count is scored exactly once by parameters that never
saw it.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from .data.validate import extract_counts
from .encoding import align_genes
from .fitted import check_fitted
from .model.outputs import entry_loglik
from .model.params import Design, Params, linear_predictors
from .projection import likelihood_tensors

__all__ = ["bicross_loglik", "gene_submodel"]


def gene_submodel(model, genes: np.ndarray):
    """The fitted ``model`` restricted to the genes ``genes`` (indices), with the fit's cell
    parameters, penalties, batch levels and fit path (new cells projected onto it follow the
    path restricted to those genes)."""
    from .estimator import ZINBWaVE

    check_fitted(model)
    g = np.asarray(genes, dtype=np.int64)
    hyper = model.get_params()
    sub = ZINBWaVE.from_params(
        W=model.W_,
        alpha_mu=model.alpha_mu_[:, g],
        alpha_pi=model.alpha_pi_[:, g],
        beta_mu=model.beta_mu_[:, g],
        beta_pi=model.beta_pi_[:, g],
        gamma_mu=model.gamma_mu_,
        gamma_pi=model.gamma_pi_,
        zeta=np.asarray(model.zeta_)[g],
        X=model.X_,
        V=model.V_[g],
        X_columns=list(model.X_columns_),
        var_names=np.asarray(model.var_names_)[g],
        obs_names=getattr(model, "obs_names_", None),
        **hyper,
    )
    sub.penalty_params_ = dict(model.penalty_params_)  # the full model's, not J-rescaled ones
    sub.batch_info_ = model.batch_info_
    path = getattr(model, "fit_path_", None)
    if path:
        sub.fit_path_ = {
            k: (np.asarray(v)[..., g] if k in Params.GENE_FIELDS else np.asarray(v))
            for k, v in path.items()
        }
    return sub


def bicross_loglik(
    model,
    data,
    *,
    layer: str | None = None,
    n_folds: int = 2,
    random_state: int | None = 0,
    block_entries: int = 2**22,
    **project_kw,
) -> np.ndarray:
    """Bi-cross-validated log-likelihood of each cell of ``data`` (new cells), see the module.

    Parameters
    ----------
    model
        A fitted :class:`zinbgrad.ZINBWaVE` (fitted without these cells).
    data
        Counts of held-out cells (AnnData, array, sparse matrix, DataFrame); genes aligned with
        the model by name as in :meth:`ZINBWaVE.transform`.
    layer
        AnnData layer with the counts.
    n_folds
        Number of gene folds (>= 2).
    random_state
        Seed of the gene split.
    block_entries
        Cells x genes entries evaluated at a time.
    **project_kw
        ``batch_key``, ``covariate_keys``, ``X`` for the held-out cells, as in
        :meth:`ZINBWaVE.transform` (offsets are not supported here).

    Returns
    -------
    ndarray (n_cells,)
        Log-likelihood of each cell's counts, every gene scored by a fit that did not see it.
    """
    check_fitted(model)
    if int(n_folds) != n_folds or n_folds < 2:
        raise ValueError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    if {"O_mu", "O_pi"} & set(project_kw):
        raise TypeError("bicross_loglik does not support offsets")
    counts = extract_counts(
        data, layer, allow_non_integer=bool(model.allow_non_integer), check_empty=False
    )
    align_genes(model, counts)
    Y = sp.csr_matrix(counts.X)
    n, J = Y.shape
    if J < 2 * n_folds:
        raise ValueError(f"{J} genes are too few for {n_folds} gene folds")
    rng = np.random.default_rng(random_state)
    fold = rng.permutation(np.arange(J) % n_folds)
    out = np.zeros(n)
    for f in range(n_folds):
        keep, held = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        sub = gene_submodel(model, keep)
        part = ad.AnnData(Y[:, keep], obs=counts.obs.copy() if counts.obs is not None else None)
        part.var_names = np.asarray(model.var_names_)[keep]
        design_k, cells = likelihood_tensors(sub, part, dict(project_kw))
        out += _held_out_loglik(model, Y[:, held], held, design_k, cells, block_entries)
    return out


def _held_out_loglik(
    model, Yh: sp.csr_matrix, held: np.ndarray, design_k: Design, cells, block_entries: int
) -> np.ndarray:
    """Per-cell log-likelihood of the held-out genes ``held`` (counts ``Yh``), from the cells'
    parameters ``cells`` fitted on the other genes and the full model's gene parameters."""
    dt = torch.float64
    zi = bool(model.zero_inflation)

    def t(x):
        return torch.as_tensor(np.asarray(x), dtype=dt)

    design = Design(design_k.X_mu, design_k.X_pi, t(model.V_[held]), t(model.V_[held]))
    params = Params(
        beta_mu=t(model.beta_mu_[:, held]),
        beta_pi=t(model.beta_pi_[:, held]),
        alpha_mu=t(model.alpha_mu_[:, held]),
        alpha_pi=t(model.alpha_pi_[:, held]),
        zeta=t(np.asarray(model.zeta_)[held]),
        W=cells.W,
        gamma_mu=cells.gamma_mu,
        gamma_pi=cells.gamma_pi,
    )
    n = Yh.shape[0]
    out = np.zeros(n)
    step = max(1, block_entries // max(len(held), 1))
    for s in range(0, n, step):
        rows = slice(s, min(s + step, n))
        a, b = linear_predictors(design, params, rows, zi)
        y = t(Yh[rows].toarray())
        out[rows] += entry_loglik(y, a, b, params.zeta).sum(1).numpy()
    return out
