"""One call that fits a problem: the starting point, the solver, the gathered result.

:func:`solve` is what :meth:`zinbgrad.ZINBWaVE.fit` calls between building the design and
storing the fitted attributes: zinbwave's initialization (or, with the sketch solver, a fit
of the sketch, :func:`~zinbgrad.optim.sketch.fit_sketch`), then the
:class:`~zinbgrad.optim.engine.Engine` on this process's cells (resumed from a checkpoint when
asked), then, under torch.distributed, the cells' parameters of every rank gathered.
"""

from __future__ import annotations

import dataclasses
import os

from ..model.params import Params
from .distributed import LocalComm
from .engine import Engine
from .init import initialize
from .path import FitPath
from .sketch import fit_sketch
from .state import FitOptions, FitResult, Problem

__all__ = ["FitOutcome", "solve", "starting_point"]


@dataclasses.dataclass
class FitOutcome:
    """What :func:`solve` returns: the parameters of every cell (gathered over the ranks),
    the solver's result (log-likelihood, penalty, history, convergence) and the fit's path
    (None for none recorded)."""

    params: Params
    result: FitResult
    trajectory: FitPath | None


def starting_point(
    problem: Problem,
    local: Problem,
    options: FitOptions,
    *,
    shard: tuple[int, int],
    sketch_cells: int,
    seed: int,
    comm: LocalComm,
    resume: str | os.PathLike | None = None,
    start: tuple[Params, FitPath | None] | None = None,
) -> tuple[Params, list[dict], FitPath | None, dict | None]:
    """The parameters the engine starts from on the cells ``shard`` of ``problem`` (read from
    ``local.source``), with the sketch's history, path and dispersion-pause length for the
    solver ``"sketch"`` (see :func:`~zinbgrad.optim.sketch.fit_sketch`; nothing else: empty,
    None, None).

    ``start``: given parameters of every cell and the path that led to them (e.g.
    :func:`~zinbgrad.optim.warm.leading_components` of a larger fit), used instead of
    zinbwave's initialization or the sketch; the fit's path continues that path.
    """
    if start is not None:
        params, path = start
        lo, hi = shard
        params = params.clone()
        params.W = params.W[lo:hi].contiguous()
        params.gamma_mu = params.gamma_mu[:, lo:hi].contiguous()
        params.gamma_pi = params.gamma_pi[:, lo:hi].contiguous()
        return params, [], path, None
    if resume is not None and options.solver == "sketch":
        # shapes only: the checkpoint holds every value
        return Params.zeros(local.design, problem.K), [], None, None
    if options.solver == "sketch":
        return fit_sketch(
            problem, m=sketch_cells, options=options, seed=seed, shard=shard, comm=comm
        )
    # every rank derives the same gene initialization from the same subsample
    params = initialize(problem, shard=shard, shard_source=local.source)
    return params, [], None, None


def solve(
    problem: Problem,
    options: FitOptions,
    *,
    local: Problem | None = None,
    shard: tuple[int, int] | None = None,
    sketch_cells: int | None = None,
    seed: int = 0,
    comm: LocalComm | None = None,
    resume: str | os.PathLike | None = None,
    start: tuple[Params, FitPath | None] | None = None,
) -> FitOutcome:
    """Fit ``problem`` (all cells) with the solver ``options.solver`` (already resolved, see
    :func:`~zinbgrad.optim.solvers.resolve_solver`).

    ``local``: this process's part of the problem, the cells ``shard = (start, stop)`` (default:
    all of them; the same penalty, K and model); ``sketch_cells``: the size of the sketch
    (solver ``"sketch"``); ``resume``: a checkpoint to continue from; ``start``: the starting
    point instead of zinbwave's initialization (see :func:`starting_point`). Both sources are closed
    when done (``problem.source`` as soon as the starting point is found, when it is not
    ``local.source``).
    """
    comm = comm or LocalComm()
    local = problem if local is None else local
    shard = (0, problem.design.n) if shard is None else shard
    try:
        params, history, path, zeta_state = starting_point(
            problem,
            local,
            options,
            shard=shard,
            sketch_cells=sketch_cells,
            seed=seed,
            comm=comm,
            resume=resume,
            start=start,
        )
        if problem.source is not local.source and hasattr(problem.source, "close"):
            problem.source.close()
        engine = Engine(local, params, options=options, seed=seed, comm=comm)
        if path is not None:  # the full sweeps continue the sketch's path
            engine.trajectory = path
        if zeta_state is not None:  # ... and its dispersion-pause length
            engine.set_dispersion_state(zeta_state)
        result = engine.fit(history, resume=None if resume is None else str(resume), path=path)
    finally:
        if hasattr(local.source, "close"):
            local.source.close()
    final = engine.params
    if comm.world_size > 1:
        n = problem.design.n
        final = final.clone()
        final.W = comm.all_gather_rows(final.W, n)
        final.gamma_mu = comm.all_gather_rows(final.gamma_mu.T, n).T
        final.gamma_pi = comm.all_gather_rows(final.gamma_pi.T, n).T
    return FitOutcome(final, result, engine.trajectory)
