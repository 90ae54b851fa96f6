"""Sketch, then extend: fit a subsample of cells to convergence, then bring in every cell.

Alternating block updates of ZINB-WaVE converge linearly: the coupling of the cell factors W
and the gene loadings alpha needs tens of sweeps however good each block update is (the
10x brain slice at K = 10 needs about 30). On a million cells each sweep reads every matrix
entry a few times, so those tens of sweeps are what a large fit cannot afford. But the gene
parameters are estimated from all n cells, and a few tens of thousands of cells already pin them
down to well below their sampling error. So for large n:

1. **sketch**: draw ``m`` cells (runs of consecutive cells at random places, so a file on disk
   is read in a few large pieces), and fit the full model to them with the full-batch solver
   until it converges (initialization, dispersion search and all). The per-cell ridge weights
   (``eps_W``, ``eps_gamma``) are scaled by ``n / m`` so that the sketch's W has the per-cell
   scale of the final fit (zinbwave's defaults are ``epsilon / n``).
2. **extend** (the first sweep over all cells, :meth:`Engine.fit_full`): the local problems
   are not concave (the zero-inflation mixture), and solved cold from any starting point they
   end in poorer local optima than the sketch's cells reached while W and alpha moved
   together (about 4 nats per cell worse on the brain data). So the sketch fit is recorded
   (:class:`~zinbgrad.optim.engine.FitPath`: the gene parameters of every sweep and its
   orthogonalization) and every cell, starting from zero, takes the same damped Newton steps
   against the same gene parameters as the sketch's cells did: each block of cells is read
   once and follows the whole path in memory. That sweep ends like any other (one Newton
   step against the final gene parameters, then a gene update from all cells).
3. the ordinary full-batch sweeps continue until the relative change is below ``tol``; they
   only have to remove the sketch's sampling error.

Under torch.distributed every rank fits the same sketch (same cells, same seed) and rank 0's
gene parameters are broadcast, so all ranks start the extension from identical values.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from ..data.source import InMemoryCounts
from ..model.params import Params, Penalty
from .distributed import LocalComm
from .engine import Engine
from .init import cell_runs, initialize
from .path import FitPath
from .state import FitOptions, Problem

__all__ = ["sketch_indices", "sketch_penalty", "sketch_problem", "sketch_size", "fit_sketch"]

#: default size of the sketch, in matrix entries (about 47,000 cells of 715 genes)
SKETCH_ENTRIES = 2**25
#: the sketch is used only when it is at most this fraction of the cells
MAX_SKETCH_FRACTION = 0.5


def sketch_size(
    n: int, J: int, K: int, sketch_cells: int | None = None, max_fraction: float | None = None
) -> int:
    """Number of cells in the sketch; ``n`` means no sketch (it would be more than
    ``max_fraction`` of the cells, default :data:`MAX_SKETCH_FRACTION`)."""
    if sketch_cells is None:
        sketch_cells = max(20_000, SKETCH_ENTRIES // max(J, 1))
    frac = MAX_SKETCH_FRACTION if max_fraction is None else max_fraction
    m = max(int(sketch_cells), 4 * K + 10)
    return n if m > frac * n else m


def sketch_indices(n: int, m: int, seed: int, run: int = 256) -> np.ndarray:
    """Sorted indices of ``m`` cells: runs of up to ``run`` consecutive cells (at least 32
    runs), at random places."""
    if m >= n:
        return np.arange(n)
    run = max(1, min(run, m // 32))
    rng = np.random.default_rng([seed, 0x5EC7])
    n_runs = n // run  # whole runs only
    return cell_runs(rng, n_runs, min(n_runs, -(-m // run)), run)[:m]


def sketch_penalty(pen: Penalty, n: int, m: int) -> Penalty:
    """The penalty for a fit of ``m`` of the ``n`` cells: per-cell weights scaled by n/m."""
    f = n / m
    return dataclasses.replace(
        pen,
        W=pen.W * f,
        gamma_mu=pen.gamma_mu * f,
        gamma_pi=pen.gamma_pi * f,
        extra=dict(pen.extra),
    )


def sketch_problem(problem: Problem, m: int, seed: int) -> Problem:
    """The problem of a sketch of about ``m`` of the cells of ``problem`` (:func:`sketch_indices`;
    in memory, with the per-cell penalty weights scaled, :func:`sketch_penalty`)."""
    n = problem.design.n
    idx = sketch_indices(n, m, seed)
    full = problem.source
    sub_source = InMemoryCounts(full.rows_subset(idx), dtype=full.dtype, device=full.device)
    sub_design = problem.design.take(torch.as_tensor(idx, device=problem.design.X_mu.device))
    sub_pen = sketch_penalty(problem.penalty, n, int(idx.size))
    return dataclasses.replace(problem, source=sub_source, design=sub_design, penalty=sub_pen)


def fit_sketch(
    problem: Problem,
    *,
    m: int,
    options: FitOptions,
    seed: int,
    shard: tuple[int, int],
    comm: LocalComm,
) -> tuple[Params, list[dict], FitPath, dict]:
    """Fit the model to a sketch of ``m`` of the cells of ``problem``; return the starting
    point of ``shard``.

    Returns the gene parameters of the sketch fit with zero local parameters for the cells
    ``shard = (start, stop)``, the sketch's history records (``phase = "sketch"``; their
    objective is the sketch's own penalized log-likelihood), its recorded path, which
    :meth:`Engine.fit` takes every cell along in its first sweep, and the length of its next
    dispersion pause (:meth:`Engine.dispersion_state`). The full fit starts with that length:
    it still updates the dispersion from all cells in the extension and the sweep after it,
    and if those steps are quiet too, a dispersion that had settled in the sketch pauses as
    long as it would have there, instead of being derived over every cell again after 4
    sweeps.
    """
    sub = sketch_problem(problem, m, seed)
    m = sub.design.n
    params = initialize(sub)
    t0 = options.t_origin if options.t_origin is not None else time.perf_counter()
    history: list[dict] = []

    def record(rec: dict) -> None:
        rec = dict(rec, phase="sketch", cells=m)
        history.append(rec)
        if options.progress is not None and comm.rank == 0:
            options.progress(rec)

    sub_opts = dataclasses.replace(
        options,
        solver="full",
        max_epochs=options.sketch_max_epochs,
        checkpoint_path=None,
        progress=None,
        t_origin=t0,
    )
    engine = Engine(sub, params, options=sub_opts, seed=seed)
    engine.opt.progress = record
    engine.optimize_dispersion()
    path = FitPath()
    path.start(engine.params)
    engine.trajectory = path
    engine.fit_full([])
    p = engine.params
    # ranks fitted the same sketch; make the path bitwise identical anyway
    comm.broadcast_(*[getattr(p, k) for k in p.gene_fields()], *path.tensors())
    lo, hi = shard
    genes = {name: getattr(p, name) for name in p.gene_fields()}
    zeros = Params.zeros(problem.design, problem.K, hi - lo, genes=genes)
    return zeros, history, path, {"zeta_pause": engine.dispersion_state()["zeta_pause"]}
