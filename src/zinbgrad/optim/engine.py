"""The fitting engine: alternating batched second-order updates of cell and gene parameters.

One *sweep* (an epoch of the full-batch solver) streams the cells in blocks:

1. per block, ``local_steps`` damped Newton steps on every cell's local parameters
   ``(W_i, gamma_mu_i, gamma_pi_i)`` with the gene parameters fixed (each step one evaluation of
   the block's entry derivatives, accepted per cell only if the cell's penalized
   log-likelihood does not decrease);
2. the per-entry derivatives at the accepted cell values are contracted into per-gene gradients
   and Hessians (and dispersion derivatives) and accumulated over blocks;
3. one damped Newton step for every gene's ``(beta_mu, alpha_mu, beta_pi, alpha_pi)`` (and its
   dispersion), accepted per gene only if it does not lower the gene's penalized
   log-likelihood at the new cells. Early on the step is checked in a second streaming pass;
   once few steps fail (``LAGGED_MAX_REJECTED``), it is taken at once (scaled so that it
   changes no cell's log mu or logit pi by more than ``LAGGED_MAX_CHANGE``) and checked in
   the next sweep's first evaluation, which sees the same cells
   (:class:`~zinbgrad.optim.state.Proposal`): a sweep then reads the data once instead of twice;
4. W and alpha are re-balanced by zinbwave's ``orthogonalizeTraceNorm``.

The stochastic solver (:meth:`Engine.fit_stochastic`) does the same on minibatches of cells, with
the data term of the gene gradient and Hessian scaled by ``n / |B|`` (unbiased), and a decaying
step on the gene parameters; a few full sweeps then polish the optimum.

The engine composes the steps, each in its own module: the cell step (:mod:`.cells`), the
gene step with its proposal and check (:mod:`.genes`), the dispersion (:mod:`.dispersion`) and
the solver loops (:mod:`.solvers`). What is fitted is a :class:`~zinbgrad.optim.state.Problem`
(``engine.problem``); everything a fit changes is one
:class:`~zinbgrad.optim.state.OptimizerState` (``engine.state``; its attributes are also
reachable as the engine's, e.g. ``engine.lam_genes``), which a checkpoint saves.

Memory: the cell parameters (n x (K + L)) plus one block of dense (cells x genes) working
arrays; counts are only touched as sparse blocks.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..data.source import block_bounds
from ..model.likelihood import EntryDerivatives, SparseCounts, entry_derivatives, nonzero_constant
from ..model.params import Params, block_zeta
from .cells import CellSteps
from .dispersion import (
    ZETA_MAX,
    ZETA_MIN,
    ZETA_PAUSE,
    ZETA_PAUSE_MAX,
    ZETA_QUIET_GAIN,
    DispersionSteps,
)
from .distributed import LocalComm
from .genes import LAGGED_MAX_CHANGE, LAGGED_MAX_REJECTED, GeneSteps
from .newton import SymmetricPacking
from .path import FitPath
from .solvers import Solvers
from .state import FitOptions, FitResult, OptimizerState, Problem

__all__ = [
    "Engine",
    "FitOptions",
    "FitPath",
    "FitResult",
    "LAGGED_MAX_CHANGE",
    "LAGGED_MAX_REJECTED",
    "ZETA_MAX",
    "ZETA_MIN",
    "ZETA_PAUSE",
    "ZETA_PAUSE_MAX",
    "ZETA_QUIET_GAIN",
]


def _state_attribute(name: str) -> property:
    """The engine's attribute ``name``, held by its :class:`OptimizerState`."""

    def get(self) -> Any:
        return getattr(self.state, name)

    def set_(self, value: Any) -> None:
        setattr(self.state, name, value)

    return property(get, set_, doc=f"``state.{name}`` (see OptimizerState)")


class Engine(CellSteps, GeneSteps, DispersionSteps, Solvers):
    """Holds a problem (data, design, penalty) and an optimizer state; runs the solvers in
    place on ``state.params``."""

    # the problem's fields under the names the steps use (read-only: one copy, in problem)
    source = property(lambda self: self.problem.source)
    design = property(lambda self: self.problem.design)
    pen = property(lambda self: self.problem.penalty)
    zi = property(lambda self: self.problem.zero_inflation)
    common = property(lambda self: self.problem.common_dispersion)

    def __init__(
        self,
        problem: Problem,
        params: Params,
        *,
        options: FitOptions | None = None,
        seed: int = 0,
        comm: LocalComm | None = None,
    ) -> None:
        if problem.K != params.K:
            raise ValueError(f"the problem has K={problem.K} but the parameters {params.K}")
        self.problem = problem
        design, penalty = problem.design, problem.penalty
        self.comm = comm or LocalComm()
        self.opt = options or FitOptions()
        self.n, self.J = design.n, design.J
        self.K = params.K
        ref = params.beta_mu
        self.dtype, self.device = ref.dtype, ref.device
        self.state = OptimizerState.initial(params, self.n, self.J, seed)
        #: factor on the Newton steps of cells and genes in an over-relaxed sweep
        self.relax = 1.0
        if not 0.0 < self.opt.relaxation < 2.0:
            raise ValueError(f"relaxation must be in (0, 2), got {self.opt.relaxation!r}")
        rows = max(1, self.opt.block_entries // max(self.J, 1))
        self.bounds = block_bounds(self.n, rows)
        #: batch-specific loadings (``params.delta_mu``; see zinbgrad.model.params)
        self.bl = params.delta_mu is not None
        if self.bl and (design.batch is None or penalty.delta is None):
            raise ValueError("batch-specific loadings need the cells' batches and a penalty")
        self.B = design.n_batches if self.bl else 0
        #: a dispersion per batch level and gene (``params.zeta``: B x J)
        self.zeta_batch = params.zeta.dim() == 2
        if self.zeta_batch and design.batch is None:
            raise ValueError("a dispersion per batch needs the cells' batches")
        #: gene-vector columns held fixed by gene steps (see :meth:`fix_gene_columns`)
        self.fixed_cols: Tensor | None = None
        #: whether a sweep re-balances W and alpha (off when the loadings are fixed)
        self.rebalance = True
        #: whether sweeps update the dispersion (off when it is fixed)
        self.update_dispersion = True
        self.eps_cell = penalty.cell_vector(self.K, self.zi)
        self.eps_gene = penalty.gene_vector(self.K, self.zi, self.B)
        self._nzc: dict = {}
        # packed symmetric Hessians: of the cells' problems and of the genes' two blocks
        Lmu, Lpi = design.V_mu.shape[1], design.V_pi.shape[1] if self.zi else 0
        self.pack_cell = SymmetricPacking(self.K + Lmu + Lpi, self.device)
        self.pack_ga = SymmetricPacking(design.X_mu.shape[1] + self.K * (1 + self.B), self.device)
        self.pack_gb = (
            SymmetricPacking(design.X_pi.shape[1] + self.K, self.device) if self.zi else None
        )

    # the optimizer state, reachable as the engine's attributes
    params = _state_attribute("params")
    rng = _state_attribute("rng")
    lam_cells = _state_attribute("lam_cells")
    lam_genes = _state_attribute("lam_genes")
    zeta_cap = _state_attribute("zeta_cap")
    sto_H = _state_attribute("sto_H")
    sto_lam = _state_attribute("sto_lam")
    sto_t = _state_attribute("sto_t")
    zeta_quiet = _state_attribute("zeta_quiet")
    zeta_skip = _state_attribute("zeta_skip")
    zeta_pause = _state_attribute("zeta_pause")
    zeta_gain = _state_attribute("zeta_gain")
    trajectory = _state_attribute("trajectory")
    proposal = _state_attribute("proposal")
    gene_rejected = _state_attribute("gene_rejected")
    progress = _state_attribute("progress")

    # ------------------------------------------------------------------ the kernel
    def _nz_const(self, counts: SparseCounts, zeta: Tensor, rows: slice | None = None) -> Tensor:
        """``nonzero_constant`` of a block, cached while the dispersion tensor is unchanged
        (``rows``: the block's cells, for a dispersion per batch).

        Sources that keep their blocks get an entry per block; streamed blocks only a few
        (the evaluations of one block in a row). The entry holds ``counts`` itself, so its
        ``id`` cannot be reused while cached.
        """
        key = (id(counts), id(zeta))
        hit = self._nzc.get(key)
        if hit is not None and hit[0] is zeta and hit[2] is counts:
            return hit[1]
        val = nonzero_constant(counts, self._block_zeta(zeta, rows))
        cap = 2 * len(self.bounds) + 8 if getattr(self.source, "cache", False) else 8
        if len(self._nzc) >= cap:
            self._nzc.clear()
        self._nzc[key] = (zeta, val, counts)
        return val

    def _derivs(
        self,
        a: Tensor,
        b: Tensor | None,
        counts: SparseCounts,
        zeta: Tensor | None = None,
        nz_const: Tensor | None = None,
        rows: slice | None = None,
        **kw,
    ) -> EntryDerivatives:
        """Entry derivatives of the block of cells ``rows`` (needed only for a dispersion per
        batch, B x J, which is expanded to the block's cells; a (cells x genes) ``zeta``
        given is used as it is)."""
        zeta = self.params.zeta if zeta is None else zeta
        nzc = self._nz_const(counts, zeta, rows) if nz_const is None else nz_const
        zeta = self._block_zeta(zeta, rows)
        return entry_derivatives(a, b, zeta, counts, nz_const=nzc, fused=self.opt.fused, **kw)

    def _block_zeta(self, zeta: Tensor, rows: slice | None) -> Tensor:
        """``zeta`` for the cells ``rows``: with a dispersion per batch (B x J) and ``rows``
        given, expanded to the cells' batches; without ``rows``, ``zeta`` is taken as the
        block's already (e.g. expanded before), except the model's own B x J dispersion."""
        if not self.zeta_batch or zeta.dim() != 2:
            return zeta
        if rows is None:
            if zeta is self.params.zeta:
                raise ValueError("a dispersion per batch needs the block's rows")
            return zeta
        return block_zeta(self.design, zeta, rows)

    def _zeta_moved(self, before: Tensor, objective: float) -> None:
        """:meth:`DispersionSteps._zeta_moved` with this module's :data:`ZETA_QUIET_GAIN`
        (which tests and experiments may set)."""
        super()._zeta_moved(before, objective, ZETA_QUIET_GAIN)
