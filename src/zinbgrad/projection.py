"""New cells under a fitted :class:`~zinbgrad.ZINBWaVE`: their local parameters (W, gamma)
solved with every gene parameter fixed (zinbwave's projection), and the design and parameters
of the training or new cells that the per-entry outputs are computed from."""

from __future__ import annotations

import numpy as np
import torch

from .data.open import open_counts
from .encoding import align_genes, encode_cells, make_design, offset_matrix, training_design
from .fitted import check_fitted, fit_path, gene_params, model_params
from .model.params import Design, Params, Penalty
from .optim.engine import Engine, FitOptions, FitPath
from .optim.fpenv import flush_denormals
from .optim.init import init_local_mean, init_local_zi
from .optim.state import Problem
from .penalties import fitted_penalty
from .runtime import block_entries, cpu_threads, keep_heap, torch_setup

__all__ = ["PROJECT_KEYWORDS", "cell_engine", "likelihood_tensors", "project", "training_loglik"]

#: the keywords that describe new cells (as in :meth:`ZINBWaVE.transform`)
PROJECT_KEYWORDS = ("layer", "X", "reference_batch", "batch_key", "covariate_keys", "O_mu", "O_pi")


def cell_engine(
    model, source, design: Design, params: Params, pen: Penalty, options: FitOptions | None = None
) -> Engine:
    """An :class:`~zinbgrad.optim.engine.Engine` over the cells of ``source`` with the
    likelihood settings of ``model`` (``zero_inflation``, ``common_dispersion``)."""
    problem = Problem(source, design, pen, params.K, model.zero_inflation, model.common_dispersion)
    return Engine(problem, params, options=options)


def _start(
    model, source, design: Design, pen: Penalty, genes: dict, path: FitPath | None, n: int
) -> Params:
    """The new cells' starting point: zero (they then follow the fit's path), or without a
    recorded path (e.g. ``from_params``) zinbwave's initialization at the fitted genes."""
    if path is not None:
        return Params.zeros(design, model.n_components, genes=genes)
    W, gmu = init_local_mean(source, design, pen, genes["beta_mu"], genes["alpha_mu"], 8192)
    if model.zero_inflation:
        gpi = init_local_zi(source, design, pen, genes["beta_pi"], genes["alpha_pi"], W, 8192)
    else:
        gpi = torch.zeros(design.V_pi.shape[1], n, dtype=design.X_mu.dtype, device=W.device)
    return Params(**genes, W=W, gamma_mu=gmu, gamma_pi=gpi)


def project(
    model,
    data,
    layer=None,
    X=None,
    batch_key=None,
    covariate_keys=None,
    O_mu=None,
    O_pi=None,
    reference_batch: bool = False,
    max_steps: int = 100,
    device=None,
) -> tuple[Params, np.ndarray, Engine]:
    """Solve the local parameters of the new cells ``data`` under a fitted ``model``.

    Parameters
    ----------
    model
        A fitted :class:`~zinbgrad.ZINBWaVE`.
    data, layer, X, batch_key, covariate_keys, O_mu, O_pi, reference_batch
        The new cells, as in :meth:`ZINBWaVE.transform`.
    max_steps
        Newton steps on the cells at most.
    device
        Where to compute (default: the model's ``device`` parameter).

    Returns
    -------
    params, loglik, engine
        All parameters (fitted genes, the new cells' W and gamma), each new cell's
        log-likelihood and the engine that solved them (its ``design``: the new cells').
    """
    check_fitted(model)
    counts = open_counts(data, layer, allow_non_integer=model.allow_non_integer, check_empty=False)
    align_genes(model, counts)
    n, J = counts.shape[0], len(model.var_names_)
    dev, dt = torch_setup(model.device if device is None else device, model.dtype, n * J)
    Xm = encode_cells(
        model,
        counts.obs,
        n,
        X=X,
        reference_batch=reference_batch,
        batch_key=batch_key,
        covariate_keys=covariate_keys,
    )
    Om, Op = offset_matrix(O_mu, n, J, "O_mu"), offset_matrix(O_pi, n, J, "O_pi")
    design = make_design(model, Xm, model.V_, Om, Op, dev, dt)
    pen = fitted_penalty(model, design)
    source = counts.source(0, n, dt, dev)  # in memory, or streamed from an .h5ad on disk
    path = fit_path(model, dev, dt)  # new cells start at zero and follow the fit's path
    params = _start(model, source, design, pen, gene_params(model, dev, dt), path, n)
    opts = FitOptions(block_entries=block_entries(model.block_entries, dev, dt))
    engine = cell_engine(model, source, design, params, pen, opts)
    with cpu_threads(dev, n * J), keep_heap(dev), flush_denormals(dev.type == "cpu"):
        ll_cells = engine.optimize_cells(max_steps=max_steps, path=path)
    if hasattr(source, "close"):
        source.close()
    return engine.params, ll_cells.cpu().numpy(), engine


def likelihood_tensors(model, data, project_kw: dict) -> tuple[Design, Params]:
    """Design and parameters (CPU, float64) of a fitted ``model``'s training cells
    (``data=None``, no keywords) or of the new cells ``data``, projected first
    (:func:`project`; ``project_kw``: the :data:`PROJECT_KEYWORDS`)."""
    check_fitted(model)
    dev, dt = torch.device("cpu"), torch.float64
    if data is None:
        if project_kw:
            raise TypeError(f"unexpected arguments without data: {sorted(project_kw)}")
        return training_design(model, dev, dt), model_params(model, dev, dt)
    unknown = set(project_kw) - set(PROJECT_KEYWORDS)
    if unknown:
        raise TypeError(f"unexpected arguments: {sorted(unknown)}")
    params, _, engine = project(
        model,
        data,
        project_kw.get("layer"),
        project_kw.get("X"),
        project_kw.get("batch_key"),
        project_kw.get("covariate_keys"),
        project_kw.get("O_mu"),
        project_kw.get("O_pi"),
        bool(project_kw.get("reference_batch", False)),
    )
    return engine.design.to(dev, dt), params.to(dev, dt)


def training_loglik(model, data, layer: str | None = None) -> float:
    """Log-likelihood of a fitted ``model``'s training counts ``data`` at its fitted
    parameters (CPU, float64; see :meth:`ZINBWaVE.loglik`)."""
    check_fitted(model)
    counts = open_counts(data, layer, allow_non_integer=True, check_empty=False)
    align_genes(model, counts)
    if counts.shape[0] != model.W_.shape[0]:
        raise ValueError("loglik() needs the training cells; use score() for new cells")
    dev, dt = torch.device("cpu"), torch.float64
    source = counts.source(0, counts.shape[0], dt, dev)
    design = training_design(model, dev, dt)
    pen = fitted_penalty(model, training_design(model, dev, dt))
    return cell_engine(model, source, design, model_params(model, dev, dt), pen).loglik()
