"""The solvers: full-batch sweeps, stochastic minibatch epochs, the sketch's extension and
the projection of cells (:meth:`Solvers.optimize_cells`), behind one rule that picks the solver
(:func:`resolve_solver`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from ..data.source import block_bounds
from ..model.likelihood import SparseCounts
from .checkpoint import load_checkpoint, save_checkpoint
from .genes import LAGGED_MAX_REJECTED
from .newton import damped_newton_step
from .path import FitPath
from .state import FitProgress, FitResult, stalled

__all__ = ["Solvers", "resolve_solver", "SOLVERS", "STOCHASTIC_MIN_CELLS"]

#: the solvers a fit may ask for
SOLVERS = ("auto", "full", "stochastic", "sketch")
#: without a sketch, ``"auto"`` takes the stochastic solver above this many cells (all ranks)
STOCHASTIC_MIN_CELLS = 20_000


def resolve_solver(solver: str, n: int, sketch_cells: int | None = None) -> str:
    """The solver a fit of ``n`` cells runs, for the ``solver`` asked for.

    ``sketch_cells``: the size of the sketch the fit could take (see
    :func:`zinbgrad.optim.sketch.sketch_size`, which returns ``n`` when a sketch is not worth
    it), or None where no sketch can be taken (an engine given its starting point).

    - ``"auto"``: the sketch when one smaller than ``n`` is available; otherwise the full-batch
      solver, or, without a sketch to consider, the stochastic one above
      :data:`STOCHASTIC_MIN_CELLS` cells;
    - ``"sketch"``: the full-batch solver when the sketch would hold every cell (with
      ``sketch_cells`` None: the sketch has been fitted already and the sweeps extend it);
    - ``"full"``, ``"stochastic"``: as asked.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; use 'auto', 'full' or 'stochastic'")
    if sketch_cells is None:
        if solver == "auto":
            return "full" if n <= STOCHASTIC_MIN_CELLS else "stochastic"
        return solver
    if solver == "auto":
        return "sketch" if sketch_cells < n else "full"
    if solver == "sketch" and sketch_cells >= n:
        return "full"
    return solver


class Solvers:
    """The solver loops of :class:`~zinbgrad.optim.engine.Engine` (a mixin)."""

    # ------------------------------------------------------------------ objective
    def penalty_value(self) -> float:
        """zinbwave's penalty; the per-cell part is summed over all ranks."""
        p = self.params
        genes = float(self.pen.gene_values(p).sum() + self.pen.zeta_value(p.zeta))
        return genes + self.comm.sum(float(self.pen.cell_values(p).sum()))

    def penalized(self, loglik: float) -> float:
        return loglik - self.penalty_value()

    def _progress_of(self, history: list[dict]) -> FitProgress:
        """The epochs done per phase (``state.progress``), rebuilt from ``history`` when it
        does not account for it (a solver called with a history of its own)."""
        if self.progress.total != len(history):
            self.progress = FitProgress.from_history(history)
        return self.progress

    @contextmanager
    def _genes_restored(self) -> Iterator[None]:
        """Gene parameters set inside the block are put back to the current ones on exit."""
        p = self.params
        saved = {k: getattr(p, k) for k in p.gene_fields()}
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(p, k, v)

    def _set_genes(self, genes: dict) -> None:
        for k, v in genes.items():
            setattr(self.params, k, v)

    def _path_features(self, path: FitPath) -> list:
        """Per step of a sketch path: its gene parameters, their cell features, T, steps."""
        out = []
        with self._genes_restored():
            for genes, T, steps in path.schedule():
                self._set_genes(genes)
                out.append((genes, self._cell_features(), T, steps))
        return out

    def _follow(self, rows: slice, counts: SparseCounts, path_feats: list) -> None:
        """Take the cells ``rows`` along a sketch path: at each step the Newton steps the
        sketch's own cells took with the same gene parameters, then its orthogonalization."""
        p = self.params
        with self._genes_restored():
            for genes, feats, T, steps in path_feats:
                self._set_genes(genes)
                self.cell_newton(rows, counts, steps, feats, derivs=False)
                if T is not None:
                    p.W[rows] = p.W[rows] @ T

    def _sweep(self, local_steps: int, path: FitPath | None = None) -> tuple[float, float]:
        """One pass of cell steps and one gene step; returns the log-likelihood and the
        penalized objective of one parameter state the sweep passed through (with a lagged
        check: the new cells with the genes they were fitted to)."""
        stats = self._new_stats()
        feats = self._cell_features()
        path_feats = self._path_features(path) if path is not None else None
        disp = self._zeta_due()
        lagged = self.proposal is not None
        if lagged and path is not None:
            raise RuntimeError("a pending gene step cannot be checked in a sweep along a path")
        ll_start = torch.zeros_like(stats.ll) if lagged else None
        # over-relaxed steps (FitOptions.relaxation) only in the lagged sweeps, where few
        # gene steps fail; the early sweeps take plain steps
        self.relax = self.opt.relaxation if lagged else 1.0
        for start, stop, counts in self.source.iter_blocks(self.bounds):
            rows = slice(start, stop)
            if path_feats is not None:
                self._follow(rows, counts, path_feats)
            d, a, b = self.cell_newton(rows, counts, local_steps, feats, ll_start=ll_start)
            self.accumulate(stats, rows, d, a, b, counts, dispersion=disp)
        self.comm.all_reduce_(*stats.tensors(), *(() if ll_start is None else (ll_start,)))
        # the state the statistics were gathered at: the new cells, the genes they were fitted to
        ll = float(stats.ll.sum())
        obj = ll - self.penalty_value()
        frozen = None
        if lagged:
            frozen, _ = self.check_proposal(ll_start)
        zeta_before = self.params.zeta.clone()
        if self.opt.lagged_check and self.gene_rejected <= LAGGED_MAX_REJECTED:
            self.propose_genes(stats, update_zeta=disp, frozen=frozen)
        else:
            ll_genes = self.gene_update(stats, update_zeta=disp, frozen=frozen)
        if disp:
            self._zeta_moved(zeta_before, obj)
        self.relax = 1.0
        T = self.orthogonalize()
        self._rotate_proposal(T)
        if self.trajectory is not None:
            self.trajectory.record(self.params, T, local_steps)
        if self.proposal is None:  # checked: the state after the gene step
            ll = float(ll_genes.sum())
            obj = ll - self.penalty_value()
        return ll, obj

    def _record(self, history: list[dict], rec: dict) -> None:
        progress = self._progress_of(history)
        history.append(rec)
        progress.add(rec)
        if self.opt.progress is not None and self.comm.rank == 0:
            self.opt.progress(rec)
        path = self.opt.checkpoint_path
        if path and (len(history) % max(1, self.opt.checkpoint_every) == 0):
            save_checkpoint(self, history, path)

    def fit_full(
        self, history: list[dict], start_epoch: int = 0, path: FitPath | None = None
    ) -> FitResult:
        """Full-batch block Newton sweeps until the relative change is below ``tol``.

        ``path``: the recorded sketch the first sweep takes every cell along, when ``history``
        holds only the sketch's epochs (solver ``"sketch"``).
        """
        opt = self.opt
        if self.trajectory is None:  # the path of this fit (kept by the model, see FitPath)
            self.trajectory = FitPath()
            self.trajectory.start(self.params)
        done = self._progress_of(history)
        prev = done.recent[-1] if done.own else None
        extend = done.total > 0 and not done.own
        # resumed from the checkpoint of a fit's last sweep: it has converged already
        converged = done.converged(opt.tol)
        epoch = start_epoch
        t0 = opt.t_origin if opt.t_origin is not None else time.perf_counter()
        while not converged and epoch < opt.max_epochs:
            phase = "extend" if extend else "full"
            if extend:  # after a sketch: every cell follows the sketch's path (see sketch.py)
                ll, obj = self._sweep(opt.local_steps, path=path)
                extend = False
            else:  # the first epoch adapts every cell to the initialization with more steps
                ll, obj = self._sweep(opt.local_steps if epoch > 0 else max(opt.local_steps, 3))
            epoch += 1
            rec = {
                "epoch": epoch,
                "loglik": ll,
                "objective": obj,
                "seconds": time.perf_counter() - t0,
                "phase": phase,
            }
            self._record(history, rec)
            if prev is not None and stalled(prev, obj, opt.tol):
                converged = True
                break
            prev = obj
        ll = self.loglik()
        return FitResult(ll, self.penalty_value(), history, converged, epoch)

    def loglik(self) -> float:
        """Log-likelihood at the current parameters (one pass); a pending gene step
        (:class:`~zinbgrad.optim.state.Proposal`) is checked in the same pass first."""
        (ll,) = self._eval_ll([self.params.zeta])
        if self.proposal is not None:
            _, ll = self.check_proposal(ll)
        return float(ll.sum())

    def fit_stochastic(self, history: list[dict], batch_size: int, epochs: int) -> None:
        """Minibatch epochs over blocks of cells visited in a random order.

        Per minibatch B: damped Newton steps on the local parameters of its cells, then one
        stochastic Newton step on the gene parameters whose gradient is the minibatch's, with
        the data term scaled by ``n/|B|`` (unbiased), preconditioned by a running average of the
        minibatch Hessians (also scaled by ``n/|B|``). The step size is 1 in the first epoch and
        decays as 1/epoch afterwards; the full-batch sweeps that follow remove the remaining
        noise. Under torch.distributed every rank processes one minibatch of its shard per step
        and the minibatch statistics are summed over ranks.
        """
        comm = self.comm
        n_global = comm.sum(self.n)
        bounds = block_bounds(self.n, batch_size)
        n_steps = int(comm.max(len(bounds)))
        t0 = self.opt.t_origin if self.opt.t_origin is not None else time.perf_counter()
        if self.sto_H is None:
            self.sto_lam = torch.full_like(self.lam_genes, 1e-3)
        done = self._progress_of(history).count("stochastic")
        for ep in range(done, done + epochs):
            order = self.rng.permutation(len(bounds))
            ll_epoch = 0.0
            rho = 1.0 / (ep + 1)
            for step in range(n_steps):
                stats = self._new_stats()
                size = 0
                if step < len(order):
                    start, stop = bounds[order[step]]
                    rows = slice(start, stop)
                    counts = self.source.block(start, stop)
                    feats = self._cell_features()
                    d, a, b = self.cell_newton(rows, counts, self.opt.local_steps, feats)
                    self.accumulate(stats, rows, d, a, b, counts, dispersion=True)
                    size = stop - start
                comm.all_reduce_(*stats.tensors())
                scale = n_global / comm.sum(size)
                ll_epoch += float(stats.ll.sum())
                self.sto_t += 1
                v = self._get_gene_vec()
                A, g = self._gene_system(stats, v, data_scale=scale)
                w = max(1.0 / self.sto_t, 0.2)
                self.sto_H = A if self.sto_H is None else (1.0 - w) * self.sto_H + w * A
                delta, lam = damped_newton_step(self.sto_H, g, self.sto_lam)
                self.sto_lam = torch.clamp(lam / 3.0, min=1e-6)
                self._set_gene_vec(v + rho * delta)
                zeta_new = self._zeta_step(stats, data_scale=scale)
                self.params.zeta = self.params.zeta + rho * (zeta_new - self.params.zeta)
                if self.common:
                    self._adapt_zeta_cap(True, True)
            self.orthogonalize()
            rec = {
                "epoch": len(history) + 1,
                "loglik": ll_epoch,
                "objective": self.penalized(ll_epoch),
                "seconds": time.perf_counter() - t0,
                "phase": "stochastic",
            }
            self._record(history, rec)

    def fit(
        self,
        history: list[dict] | None = None,
        resume: str | None = None,
        path: FitPath | None = None,
    ) -> FitResult:
        """Run the solver; with ``resume``, continue from a checkpoint written by this engine.

        ``path``: with solver ``"sketch"``, the recorded sketch fit the first sweep follows.
        """
        history = [] if history is None else history
        opt = self.opt
        if resume is not None:
            history[:] = load_checkpoint(self, resume)
        done = self.progress = FitProgress.from_history(history)
        if not history:
            self.optimize_dispersion()
        # the cells of all ranks decide (a collective call, so only when they do)
        n = self.comm.sum(self.n) if opt.solver == "auto" else self.n
        solver = resolve_solver(opt.solver, n)
        if solver == "sketch":  # the sketch (zinbgrad.optim.sketch) has been fitted already
            return self.fit_full(history, start_epoch=done.own, path=path)
        if solver == "stochastic":
            bs = opt.batch_size or max(256, min(self.n // 8, 8192))
            todo = min(opt.stochastic_epochs, opt.max_epochs) - done.count("stochastic")
            if todo > 0 and not done.count("full"):
                self.fit_stochastic(history, bs, todo)
        return self.fit_full(history, start_epoch=len(history))

    # ------------------------------------------------------------------ projection
    def optimize_cells(
        self, max_steps: int = 100, tol: float = 1e-10, path: FitPath | None = None
    ) -> Tensor:
        """Optimize only the local parameters (gene parameters fixed); returns per-cell loglik.

        This is zinbwave's projection of new cells and the inner problem of the held-out
        likelihood. With ``path`` (a fitted model's :class:`FitPath`), each block of cells
        first follows the path from its current values (zero for new cells), as the fit's own
        cells did, then is solved at the final gene parameters.
        """
        feats = self._cell_features()
        path_feats = self._path_features(path) if path is not None and len(path) else None
        ll_cells = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        for start, stop, counts in self.source.iter_blocks(self.bounds):
            rows = slice(start, stop)
            if path_feats is not None:
                self._follow(rows, counts, path_feats)
            ll_cells[rows] = self.converge_cells(rows, counts, max_steps, tol, feats)
        return ll_cells
