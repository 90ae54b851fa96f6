"""The dispersion step: safeguarded Newton steps on zeta = log(theta), their trust region,
the dispersion-only start of a fit, and the pauses of the dispersion updates once they stop
mattering. :class:`DispersionSteps` is the part of :class:`~zinbgrad.optim.engine.Engine` that
does this (the counters live in :class:`~zinbgrad.optim.state.OptimizerState`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..model.params import linear_predictors

if TYPE_CHECKING:
    from .genes import GeneStats

__all__ = ["DispersionSteps", "ZETA_MIN", "ZETA_MAX", "ZETA_QUIET_GAIN", "ZETA_PAUSE", "ZETA_STATE"]

ZETA_MIN, ZETA_MAX = -15.0, 60.0
#: the dispersion counts as quiet in a sweep whose dispersion step was predicted to gain less
#: than this fraction of ``tol * |objective|``: its derivatives (a kernel evaluation of every
#: block) cost a fifth of a sweep, for gains far below what the stopping rule measures
ZETA_QUIET_GAIN = 0.01
#: sweeps the dispersion pauses for after two quiet ones; each pause that ends in two more
#: quiet sweeps doubles the next one, up to ZETA_PAUSE_MAX (a sweep that is not quiet resets it)
ZETA_PAUSE = 4
ZETA_PAUSE_MAX = 32
#: the dispersion-pause counters (checkpointed; handed from a sketch fit to the full fit)
ZETA_STATE = ("zeta_quiet", "zeta_skip", "zeta_pause")


class DispersionSteps:
    """The dispersion step of :class:`~zinbgrad.optim.engine.Engine` (a mixin)."""

    def _zeta_step(self, stats: GeneStats, data_scale: float = 1.0) -> Tensor:
        """Proposed new zeta (safeguarded Newton; expands geometrically toward theta -> inf)."""
        zeta = self.params.zeta
        lo, hi = self.opt.zeta_bounds
        if self.common:
            G = stats.gz.sum() * data_scale
            C = stats.hz.sum() * data_scale
            cap = self.zeta_cap[0]
        else:
            c = self.pen.zeta / max(zeta.numel() - 1, 1)
            G = stats.gz * data_scale - c * (zeta - zeta.mean())
            C = stats.hz * data_scale - c
            cap = self.zeta_cap
        newton = -G / torch.where(C < 0, C, -torch.ones_like(C))
        step = torch.where(C < 0, newton, torch.sign(G) * cap)
        step = torch.clamp(step, -cap, cap)
        new = torch.clamp(zeta + step, lo, hi)
        d = new - zeta  # the gain the quadratic model predicts for it (see _zeta_moved)
        self.zeta_gain = float((G * d + 0.5 * C * d * d).sum())
        return new

    def _adapt_zeta_cap(self, moved: Tensor | bool, accepted: Tensor | bool) -> None:
        """The dispersion steps' trust region, per gene: doubled (up to 8) after an accepted
        move, quartered (down to 1e-3) after a rejected one, unchanged where zeta did not
        move (bool tensors, or one bool for all genes)."""
        moved = torch.as_tensor(moved, device=self.device)
        accepted = torch.as_tensor(accepted, device=self.device)
        grow = torch.clamp(self.zeta_cap * 2, max=8.0)
        shrink = torch.clamp(self.zeta_cap / 4, min=1e-3)
        self.zeta_cap = torch.where(moved, torch.where(accepted, grow, shrink), self.zeta_cap)

    def _zeta_surrogate(self, zeta: Tensor, center: Tensor) -> Tensor:
        """Separable majorizer of the var(zeta) penalty (exact at zeta = old zeta), per gene
        (summed over the batches of a dispersion per batch)."""
        if self.common or self.J < 2:
            return torch.zeros_like(zeta)
        out = 0.5 * self.pen.zeta / (zeta.numel() - 1) * (zeta - center) ** 2
        return out.sum(0) if zeta.dim() == 2 else out

    def _add_zeta_terms(self, stats: GeneStats, dz, rows: slice) -> None:
        """Add a block's dispersion derivatives (``dz.lz``, ``dz.lzz``, cells x genes) to
        ``stats``: summed over the cells, or per batch for a dispersion per batch."""
        if self.zeta_batch:
            codes = self.design.batch[rows]
            stats.gz.index_add_(0, codes, dz.lz)
            stats.hz.index_add_(0, codes, dz.lzz)
        else:
            stats.gz += dz.lz.sum(0)
            stats.hz += dz.lzz.sum(0)

    # ------------------------------------------------------------------ solvers
    def _zeta_due(self) -> bool:
        """Whether this sweep updates the dispersion: it pauses for a few sweeps once its
        steps stop mattering (:meth:`_zeta_moved`), which saves the dispersion-derivative
        evaluation of every block."""
        if not self.update_dispersion:
            return False
        if self.zeta_skip > 0:
            self.zeta_skip -= 1
            return False
        return True

    def _zeta_moved(
        self, before: Tensor, objective: float, quiet_gain: float = ZETA_QUIET_GAIN
    ) -> None:
        """Count the dispersion as quiet after a sweep in which it did not move (e.g. a common
        dispersion at its bound, theta -> infinity) or in which its step was predicted to gain
        less than :data:`ZETA_QUIET_GAIN` of the change the stopping rule counts as progress
        (``tol * |objective|``); after two quiet sweeps in a row it pauses, for
        :data:`ZETA_PAUSE` sweeps the first time and twice as long after each pause that ends
        quiet again (at most :data:`ZETA_PAUSE_MAX`)."""
        change = float((self.params.zeta - before).abs().max())
        tol = self.opt.tol
        small = tol > 0 and self.zeta_gain <= quiet_gain * tol * abs(objective)
        if change < 1e-6 or small:
            self.zeta_quiet += 1
        else:
            self.zeta_quiet, self.zeta_pause = 0, ZETA_PAUSE
        if self.zeta_quiet >= 2:
            self.zeta_quiet, self.zeta_skip = 0, self.zeta_pause
            self.zeta_pause = min(2 * self.zeta_pause, ZETA_PAUSE_MAX)

    def dispersion_state(self) -> dict[str, int]:
        """The dispersion-pause counters (see :meth:`_zeta_moved`)."""
        return self.state.dispersion_state()

    def set_dispersion_state(self, state: dict) -> None:
        """Set the dispersion-pause counters present in ``state``."""
        for k in ZETA_STATE:
            if k in state:
                setattr(self, k, int(state[k]))

    def optimize_dispersion(
        self, max_iter: int = 12, tol: float = 1e-6, max_entries: int = 2**23
    ) -> None:
        """Dispersion-only updates (the other parameters fixed), as zinbwave's first step.

        On large data it uses blocks of cells spread over the data set, about ``max_entries``
        matrix entries in all, with the data term scaled up to all cells (a starting value:
        the epochs refine the dispersion with every cell).
        """
        step = max(1, -(-len(self.bounds) * self.opt.block_entries // max_entries))
        bounds = self.bounds[::step]
        rows = self.comm.sum(sum(b - a for a, b in bounds))
        scale = self.comm.sum(self.n) / max(rows, 1)
        stats = self._dispersion_stats(bounds, self.params.zeta, scale)
        prev = None
        for _ in range(max_iter):
            cur = float(stats.ll.sum()) - float(self.pen.zeta_value(self.params.zeta))
            if prev is not None and abs(cur - prev) <= tol * abs(prev):
                break
            prev = cur
            zeta_old = self.params.zeta.clone()
            zeta_new = self._zeta_step(stats)
            center = zeta_old.mean()
            # the trial point's derivatives: the next step's, where it is accepted
            new = self._dispersion_stats(bounds, zeta_new, scale)
            if self.common:
                acc = torch.full_like(zeta_old, float(new.ll.sum()) >= float(stats.ll.sum()))
                acc = acc.bool()
            else:
                f_old = stats.ll - self._zeta_surrogate(zeta_old, center)
                acc = new.ll - self._zeta_surrogate(zeta_new, center) >= f_old
            self.params.zeta = torch.where(acc, zeta_new, zeta_old)
            moved = zeta_new != zeta_old
            self._adapt_zeta_cap(moved, acc)
            if not bool(moved.any()):
                break
            for k in ("ll", "gz", "hz"):
                setattr(stats, k, torch.where(acc, getattr(new, k), getattr(stats, k)))

    def _dispersion_stats(self, bounds, zeta: Tensor, scale: float) -> GeneStats:
        """Per-gene log-likelihood and dispersion derivatives at ``zeta`` (the other
        parameters as they are) over the cells ``bounds``, scaled by ``scale``, summed over
        ranks."""
        stats = self._new_stats()
        for start, stop, counts in self.source.iter_blocks(bounds):
            rows = slice(start, stop)
            a, b = linear_predictors(self.design, self.params, rows, self.zi)
            dz = self._derivs(a, b, counts, zeta=zeta, order=0, dispersion=True, rows=rows)
            stats.ll += dz.ll.sum(0)
            self._add_zeta_terms(stats, dz, rows)
        for t in (stats.ll, stats.gz, stats.hz):
            t.mul_(scale)
        self.comm.all_reduce_(stats.ll, stats.gz, stats.hz)
        return stats
