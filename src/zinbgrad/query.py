"""Mapping query cells of batches a fit did not see: the linear-model analogue of scArches.

A model fitted with ``batch_key`` holds, per batch level, a column of X (its effect on every
gene's log mean and logit zero-inflation) and, with ``batch_loadings=True``, loading offsets
``delta_b``. Cells of a new level have none of these. :func:`map_query` estimates them from the
query cells: every fitted gene parameter (intercepts, the fitted batches' effects, loadings,
dispersion) stays fixed, and the new levels' coefficients (one X column each, and their
``delta_b``) are fitted together with the query cells' W and gamma by the same alternating
Newton sweeps as a fit (:class:`zinbgrad.optim.engine.Engine`, with every other gene
coordinate held fixed and W not re-balanced, so that W stays in the model's basis). The cells'
W is then comparable with the training cells' ``W_``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .data.open import open_counts
from .encoding import align_genes, make_design, offset_matrix
from .fitted import check_fitted, fit_path, gene_params
from .model.params import Design, Params, Penalty
from .optim.engine import Engine, FitOptions, FitPath
from .optim.fpenv import flush_denormals
from .penalties import DELTA_RATIO, fitted_penalty
from .projection import cell_engine
from .runtime import block_entries, cpu_threads, keep_heap, torch_setup

__all__ = ["QueryMapping", "map_query"]


@dataclass
class QueryMapping:
    """The result of :func:`map_query`.

    Attributes
    ----------
    W
        Latent factors of the query cells (cells x K), in the model's basis.
    loglik
        Each query cell's log-likelihood at its fitted local parameters and the estimated
        batch coefficients (the held-out log-likelihood of :meth:`ZINBWaVE.score_samples`).
    levels
        The new batch levels (in order of appearance in the query).
    beta_mu, beta_pi
        Their estimated X column effects (levels x genes); ``beta_pi`` zero without zero
        inflation.
    delta_mu
        Their estimated loading offsets (levels x K x genes), or ``None`` for a model without
        batch-specific loadings.
    n_iter
        Sweeps taken; ``converged``: whether the objective settled within ``max_epochs``.
    """

    W: np.ndarray
    loglik: np.ndarray
    levels: list[str]
    beta_mu: np.ndarray
    beta_pi: np.ndarray
    delta_mu: np.ndarray | None
    n_iter: int
    converged: bool


def _query_levels(
    model, counts, batch_key: str | None
) -> tuple[str, np.ndarray, list[str], list[str]]:
    """The batch key, the query cells' batch values, the fitted levels and the new ones.

    A model fitted without ``batch_key`` (X an intercept only) counts as one fitted batch,
    unnamed (``[""]``): every level of the query's ``obs[batch_key]`` is then new."""
    info = model.batch_info_ or {}
    key = info.get("batch_key")
    if key is None:
        if batch_key is None or list(model.X_columns_) != ["intercept"]:
            raise ValueError(
                "mapping cells of new batches needs a model fitted with batch_key, or one "
                "fitted on a single batch (X an intercept only) and the query's batch_key"
            )
        key = batch_key
    elif batch_key is not None and batch_key != key:
        raise ValueError(f"batch_key={batch_key!r}, but the model was fitted with {key!r}")
    cols = model.X_columns_
    other = [c for c in cols[1:] if not c.startswith(f"{key}[")]
    if not cols or cols[0] != "intercept" or other:
        raise ValueError(
            "mapping cells of new batches supports designs of an intercept and the batch "
            f"only; the model's X also has {other or 'no intercept'}"
        )
    if model.which_X_mu is not None or model.which_X_pi is not None:
        raise ValueError("mapping cells of new batches needs which_X_mu = which_X_pi = None")
    if counts.obs is None or key not in counts.obs.columns:
        raise ValueError(f"the query cells need their batch in obs[{key!r}]")
    col = counts.obs[key]
    if col.isna().any():
        raise ValueError(f"obs[{key!r}] of the query has {int(col.isna().sum())} missing values")
    values = np.asarray(col.astype(str))
    fitted = [str(v) for v in info.get("levels", [""])]
    new = [str(v) for v in pd.unique(values) if v not in set(fitted)]
    return key, values, fitted, new


# Also the method ZINBWaVE.map_query (``model`` is then the estimator itself).
def map_query(
    model,
    data,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    O_mu=None,
    O_pi=None,
    max_epochs: int = 100,
    tol: float = 1e-4,
    device: str | torch.device | None = None,
    batch_loadings: bool | None = None,
) -> QueryMapping:
    """Map cells of batch levels the fit did not see (the linear-model scArches).

    Each new level of the fit's ``batch_key`` gets an X column and, with
    ``batch_loadings``, loading offsets, estimated from its cells with every fitted gene
    parameter fixed, together with the cells' W and gamma (a model fitted on one batch
    without ``batch_key`` maps every level of the query's ``obs[batch_key]`` this way;
    ``batch_loadings``: estimate the new levels' offsets too, default as fitted). Returns a
    :class:`zinbgrad.query.QueryMapping` (``W``, per-cell ``loglik``, the new ``levels``
    and their coefficients). The model is not changed.

    Parameters
    ----------
    data
        Counts of the query cells (AnnData, or anything :meth:`ZINBWaVE.transform` reads, with
        ``.obs``); genes aligned by name. Cells of fitted levels keep those levels' fitted
        coefficients; each new level gets its own, estimated from its cells.
    layer, O_mu, O_pi
        As in :meth:`ZINBWaVE.transform`.
    batch_key
        The ``obs`` column of the batches: the fit's (the default), or any for a model fitted
        on one batch without ``batch_key`` (its cells are then the reference batch).
    device
        The device of this computation (default: the model's ``device`` parameter).
    max_epochs, tol
        Sweeps at most, and the relative change of the query's penalized log-likelihood
        below which they stop (the fit's default rule: later sweeps creep, e.g. 6 nats in
        50 sweeps on 150 simulated cells after 90 % of the gain in the first 6).
    batch_loadings
        Estimate loading offsets ``delta_b`` for the new levels (the fitted batches' are kept,
        zero for a model without them; ridge weight: the model's ``epsilon_delta`` or its
        default). Default: as the model was fitted.
    """
    check_fitted(model)
    counts = open_counts(data, layer, allow_non_integer=model.allow_non_integer, check_empty=False)
    align_genes(model, counts)
    key, values, levels, new = _query_levels(model, counts, batch_key)
    loadings = model.batch_loadings if batch_loadings is None else bool(batch_loadings)
    if model.batch_dispersion and new:
        raise ValueError(
            "map_query cannot map unseen batch levels under batch_dispersion=True (the fit has "
            f"no dispersion for {list(new)}); fit with batch_dispersion=False to map them"
        )
    n, J, K = counts.shape[0], len(model.var_names_), model.n_components
    M, B, Bn = len(model.X_columns_), len(levels), len(new)
    dev, dt = torch_setup(model.device if device is None else device, model.dtype, n * J)
    offsets = offset_matrix(O_mu, n, J, "O_mu"), offset_matrix(O_pi, n, J, "O_pi")
    design = _query_design(model, key, values, levels, new, loadings, offsets, dev, dt)
    pen, genes, path = _query_start(model, design, B, Bn, loadings, dev, dt)
    params = Params.zeros(design, K, genes=genes)
    opts = FitOptions(
        max_epochs=max_epochs, tol=tol, block_entries=block_entries(model.block_entries, dev, dt)
    )
    source = counts.source(0, n, dt, dev)
    engine = cell_engine(model, source, design, params, pen, opts)
    engine.rebalance = False  # the loadings are the model's: W keeps its basis
    engine.update_dispersion = False
    engine.fix_gene_columns(_fixed_columns(engine, M, Bn, B, K, model.zero_inflation))
    try:
        with cpu_threads(dev, n * J), keep_heap(dev), flush_denormals(dev.type == "cpu"):
            # new levels start with zero coefficients (the reference batch), then alternate
            engine.optimize_cells(max_steps=100, path=path)
            result = engine.fit_full([]) if Bn else None
            ll = engine.optimize_cells(max_steps=100, tol=1e-10)
    finally:
        if hasattr(source, "close"):
            source.close()
    return _mapping(model, engine.params, ll, result, new, M, B)


def _query_design(
    model, key: str, values: np.ndarray, levels: list, new: list, loadings: bool, offsets, dev, dt
) -> Design:
    """The query cells' design: the fit's X columns (intercept, fitted batches) and one
    indicator column per new level; with ``loadings``, every cell's batch code (a fitted
    level's position, or B + k for new level k)."""
    n, M, B, Bn = len(values), len(model.X_columns_), len(levels), len(new)
    columns = list(model.X_columns_) + [f"{key}[{lv}]" for lv in new]
    Xm = np.zeros((n, M + Bn))
    Xm[:, 0] = 1.0
    for c, lv in enumerate(levels[1:] + new, start=1):  # X's batch columns, in order
        Xm[:, c] = values == lv
    info = {"batch_key": key, "levels": levels + new}
    design = make_design(model, Xm, model.V_, *offsets, dev, dt, columns=columns, info=info)
    if loadings:
        pos = {lv: i for i, lv in enumerate(levels + new)}
        design.batch = torch.as_tensor([pos[v] for v in values], device=dev)
        design.n_batches = B + Bn
    return design


def _query_start(
    model, design: Design, B: int, Bn: int, loadings: bool, dev, dt
) -> tuple[Penalty, dict, FitPath | None]:
    """The query's penalty, its starting gene parameters (the fitted ones, zero for the new
    levels) and the fit's path in the query's shapes."""
    J, K = len(model.var_names_), model.n_components
    pen = fitted_penalty(model, design)
    # the new columns are penalized as zinbwave penalizes any non-intercept column
    e_beta = _epsilon_beta(model, J)
    pen.beta_mu = torch.cat([pen.beta_mu, pen.beta_mu.new_full((Bn,), e_beta)])
    pen.beta_pi = torch.cat([pen.beta_pi, pen.beta_pi.new_full((Bn,), e_beta)])
    genes = gene_params(model, dev, dt)
    if loadings and pen.delta is None:  # a model without offsets: the fitted ones are zero
        pen.delta = DELTA_RATIO * pen.alpha
        genes["delta_mu"] = torch.zeros(B * K, J, dtype=dt, device=dev)
    elif not loadings:
        genes.pop("delta_mu", None)
        pen.delta = None
    genes = _padded(genes, Bn, K)
    path = fit_path(model, dev, dt)
    if path is not None:  # the query cells follow the fit's path, as in transform
        path.steps = [(_path_genes(g, genes, Bn, K), T, s) for g, T, s in path.steps]
    return pen, genes, path


def _mapping(model, p: Params, ll: torch.Tensor, result, new: list, M: int, B: int):
    """The :class:`QueryMapping` of the solved query parameters ``p``."""
    J, K, Bn = len(model.var_names_), model.n_components, len(new)
    delta = None
    if p.delta_mu is not None:
        delta = p.delta_mu[B * K :].reshape(Bn, K, J).cpu().numpy()
    return QueryMapping(
        W=p.W.cpu().numpy(),
        loglik=ll.cpu().numpy(),
        levels=new,
        beta_mu=p.beta_mu[M:].cpu().numpy(),
        beta_pi=p.beta_pi[M:].cpu().numpy() if model.zero_inflation else np.zeros((Bn, J)),
        delta_mu=delta,
        n_iter=0 if result is None else int(result.n_epochs),
        converged=True if result is None else bool(result.converged),
    )


def _epsilon_beta(model, J: int) -> float:
    """zinbwave's ridge weight of a non-intercept column of X for this model's settings."""
    if model.epsilon_beta is not None:
        return float(model.epsilon_beta)
    return float(J if model.epsilon is None else model.epsilon) / J


def _path_genes(step: dict, final: dict, Bn: int, K: int) -> dict:
    """A fit-path step's gene parameters in the query's shapes: new levels' coefficients
    zero; loading offsets the path lacks (a model fitted without them) zero too."""
    out = _padded(step, Bn, K)
    if "delta_mu" in final and "delta_mu" not in out:
        out["delta_mu"] = torch.zeros_like(final["delta_mu"])
    elif "delta_mu" not in final:
        out.pop("delta_mu", None)
    return out


def _padded(genes: dict, Bn: int, K: int) -> dict:
    """Gene parameters with zero coefficients for ``Bn`` new batch levels appended."""
    out = dict(genes)
    for name in ("beta_mu", "beta_pi"):
        v = genes[name]
        out[name] = torch.cat([v, v.new_zeros(Bn, v.shape[1])])
    if genes.get("delta_mu") is not None:
        v = genes["delta_mu"]
        out["delta_mu"] = torch.cat([v, v.new_zeros(Bn * K, v.shape[1])])
    return out


def _fixed_columns(engine: Engine, M: int, Bn: int, B: int, K: int, zi: bool) -> torch.Tensor:
    """Every gene-vector column but the new levels' X columns and loading offsets."""
    at = engine.gene_slices()
    q = max(s.stop for s in at.values())
    fixed = torch.ones(q, dtype=torch.bool, device=engine.device)
    fixed[at["beta_mu"].start + M : at["beta_mu"].stop] = False
    if zi:
        fixed[at["beta_pi"].start + M : at["beta_pi"].stop] = False
    if "delta_mu" in at:
        fixed[at["delta_mu"].start + B * K : at["delta_mu"].stop] = False
    return fixed
