"""The cell step: damped Newton steps on every cell's local parameters, batched over a block.

Each cell ``i`` has the unknowns ``u_i = (W_i, gamma_mu_i, gamma_pi_i)``; with the gene
parameters fixed the cells' problems are independent, so a block of cells takes its steps
together (one evaluation of the block's entry derivatives per step, each cell's step accepted
only if its penalized log-likelihood does not decrease). :class:`CellSteps` is the part of
:class:`~zinbgrad.optim.engine.Engine` that does this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..model.likelihood import EntryDerivatives, SparseCounts
from ..model.params import batch_interaction
from .newton import damped_newton_step, update_damping

__all__ = ["CellSteps"]


def _batch_positions(codes: Tensor, n_batches: int) -> list[Tensor]:
    """Per batch ``b < n_batches``, the positions of the cells whose code is ``b``."""
    return [(codes == b).nonzero().squeeze(1) for b in range(n_batches)]


@dataclass
class _Cells:
    """Working state of a block of cells in :meth:`Engine.cell_newton`: local parameters
    ``u``, the fixed part of the predictors, the predictors ``a``/``b``, the entry derivatives
    ``d`` at ``u``, each cell's penalized objective ``f`` and its damping ``lam``."""

    u: Tensor
    base_a: Tensor
    base_b: Tensor | None
    a: Tensor | None
    b: Tensor | None
    d: EntryDerivatives | None
    f: Tensor | None
    lam: Tensor
    #: with batch-specific loadings: the cells' batch indicators and, per batch, its cells
    groups: tuple[Tensor, list[Tensor]] | None = None

    _FIELDS = ("u", "a", "b", "f", "lam")  # per step; base_a/base_b are fixed in a block

    def take(self, keep: Tensor) -> _Cells:
        """The cells where ``keep`` (bool) is true, as a new state (their copies)."""

        def sub(x):
            return None if x is None else x[keep]

        groups = None
        if self.groups is not None:
            onehot = self.groups[0][keep]
            groups = (onehot, _batch_positions(onehot.argmax(1), onehot.shape[1]))
        d = EntryDerivatives(**{k: sub(v) for k, v in vars(self.d).items()})
        return _Cells(
            self.u[keep],
            self.base_a[keep],
            sub(self.base_b),
            sub(self.a),
            sub(self.b),
            d,
            self.f[keep],
            self.lam[keep],
            groups,
        )

    def restore(self, idx: Tensor, old: _Cells) -> None:
        """Put the cells ``idx`` back to their values in ``old`` (derivatives present in both
        only; the fixed parts of the predictors are the same in both)."""
        for k in self._FIELDS:
            mine = getattr(self, k)
            if mine is not None:
                mine[idx] = getattr(old, k)[idx]
        for k, v in vars(self.d).items():
            w = getattr(old.d, k)
            if v is not None and w is not None:
                v[idx] = w[idx]


class CellSteps:
    """The cell step of :class:`~zinbgrad.optim.engine.Engine` (a mixin: it works on the
    engine's problem, ``self.design``/``self.pen``, and its state, ``self.params`` and
    ``self.lam_cells``)."""

    def _cell_features(self) -> tuple[Tensor, Tensor | None, dict]:
        """Gene-side design of the cell problems: Fa, Fb (J x p) and their packed outer
        products (``"ab"``: the symmetric cross term ``Fa Fb^T + Fb Fa^T``)."""
        p = self.params
        Lmu = self.design.V_mu.shape[1]
        Lpi = self.design.V_pi.shape[1] if self.zi else 0
        J = self.J
        z = torch.zeros
        kw = {"dtype": self.dtype, "device": self.device}
        Fa = torch.cat([p.alpha_mu.T, self.design.V_mu, z(J, Lpi, **kw)], 1)
        pack = self.pack_cell
        prods = {"aa": pack.outer(Fa)}
        Fb = None
        if self.zi:
            Fb = torch.cat([p.alpha_pi.T, z(J, Lmu, **kw), self.design.V_pi], 1)
            prods["bb"] = pack.outer(Fb)
            prods["ab"] = pack.outer(Fa, Fb)
        if self.bl:  # per batch b: the products of its loadings alpha_mu + delta_b
            K = self.K
            delta = p.delta_mu.view(self.B, K, J)
            prods["delta"] = p.delta_mu
            prods["aa_b"], prods["ab_b"] = [], []
            for b in range(self.B):
                Fab = Fa.clone()
                Fab[:, :K] += delta[b].T
                prods["aa_b"].append(pack.outer(Fab))
                if self.zi:
                    prods["ab_b"].append(pack.outer(Fab, Fb))
        return Fa, Fb, prods

    def _batch_groups(self, rows: slice) -> tuple[Tensor, list[Tensor]] | None:
        """The batch indicators of the cells ``rows`` and, per batch, the positions of its
        cells in the block (None without batch-specific loadings)."""
        if not self.bl:
            return None
        return self.design.batch_onehot(rows), _batch_positions(self.design.batch[rows], self.B)

    def _get_cell_vec(self, rows: slice) -> Tensor:
        p = self.params
        parts = [p.W[rows], p.gamma_mu[:, rows].T]
        if self.zi:
            parts.append(p.gamma_pi[:, rows].T)
        return torch.cat(parts, 1)

    def _set_cell_vec(self, rows: slice, u: Tensor) -> None:
        p, K = self.params, self.K
        Lmu = p.gamma_mu.shape[0]
        p.W[rows] = u[:, :K]
        p.gamma_mu[:, rows] = u[:, K : K + Lmu].T
        if self.zi:
            p.gamma_pi[:, rows] = u[:, K + Lmu :].T

    def _cell_base(self, rows: slice) -> tuple[Tensor, Tensor | None]:
        d, p = self.design, self.params
        a = d.X_mu[rows] @ p.beta_mu
        if d.O_mu is not None:
            a = a + d.O_mu[rows]
        if not self.zi:
            return a, None
        b = d.X_pi[rows] @ p.beta_pi
        if d.O_pi is not None:
            b = b + d.O_pi[rows]
        return a, b

    def _start_cells(
        self, rows: slice, counts: SparseCounts, feats
    ) -> tuple[_Cells, Tensor, Tensor]:
        """The working state of the cells ``rows`` at their current values (derivatives of
        order 2 and objective evaluated), with the block's ``nonzero_constant`` and its
        dispersion (per batch: expanded to the cells), which the later steps reuse."""
        nzc = self._nz_const(counts, self.params.zeta, rows)
        zeta = self._block_zeta(self.params.zeta, rows)
        st = _Cells(
            self._get_cell_vec(rows),
            *self._cell_base(rows),
            None,
            None,
            None,
            None,
            self.lam_cells[rows],
            self._batch_groups(rows),
        )
        self._predict(st, feats)
        st.d = self._derivs(st.a, st.b, counts, zeta=zeta, order=2, nz_const=nzc)
        st.f = self._cell_objective(st)
        return st, nzc, zeta

    def cell_newton(
        self,
        rows: slice,
        counts: SparseCounts,
        n_steps: int,
        feats=None,
        derivs: bool = True,
        ll_start: Tensor | None = None,
    ) -> tuple[EntryDerivatives, Tensor, Tensor | None]:
        """``n_steps`` damped Newton steps on the local parameters of cells ``rows``; updates
        in place.

        Returns the per-entry derivatives at the final cell values (order 2; with
        ``derivs=False`` possibly only ``ll``: the last trial point is then evaluated without
        derivatives, which saves a third of a step) and the final predictors.
        ``ll_start``: the per-gene log-likelihood at the starting values is added into it.
        """
        feats = feats if feats is not None else self._cell_features()
        st, nzc, zeta = self._start_cells(rows, counts, feats)
        if ll_start is not None:
            ll_start += st.d.ll.sum(0)
        for step in range(n_steps):
            order = 0 if step == n_steps - 1 and not derivs else 2
            self._cell_step(st, counts, nzc, feats, order=order, zeta=zeta)
        self.lam_cells[rows] = st.lam
        self._set_cell_vec(rows, st.u)
        return st.d, st.a, st.b

    def converge_cells(
        self, rows: slice, counts: SparseCounts, max_steps: int, tol: float, feats=None
    ) -> Tensor:
        """Damped Newton steps on the local parameters of cells ``rows`` (updated in place)
        until the block's penalized log-likelihood improves by at most ``tol`` (relative) in
        a step, or ``max_steps``; returns each cell's log-likelihood (summed over genes).

        A cell whose accepted step gained at most ``tol`` of its own objective has converged
        and takes no further steps (its later gains would be below that, Newton converging
        quadratically): the last steps cost only the few slow cells (of PBMC 8k's 1,496
        held-out cells at K = 15, fewer than 100 still moved after the 10th of 42 steps).
        """
        feats = feats if feats is not None else self._cell_features()
        st, nzc, zeta = self._start_cells(rows, counts, feats)
        u, lam, ll = st.u.clone(), st.lam.clone(), st.d.ll.sum(1)
        active = torch.arange(u.shape[0], device=u.device)
        total = float(st.f.sum())  # the block's objective (converged cells at their last)
        for step in range(max_steps):
            f_before = st.f
            last = step == max_steps - 1
            self._cell_step(st, counts, nzc, feats, order=0 if last else 2, zeta=zeta)
            gain = st.f - f_before
            u[active], lam[active], ll[active] = st.u, st.lam, st.d.ll.sum(1)
            gained = float(gain.sum())
            if gained <= tol * abs(total):
                break
            total += gained
            done = (gain > 0) & (gain <= tol * st.f.abs())
            if bool(done.all()):
                break
            if bool(done.any()):
                keep = ~done
                active, st = active[keep], st.take(keep)
                counts, entries = counts.take_rows(keep)
                nzc = nzc[entries]
                zeta = zeta[keep] if zeta.dim() == 2 else zeta
        self.lam_cells[rows] = lam
        self._set_cell_vec(rows, u)
        return ll

    def cell_precisions(self) -> Tensor:
        """Minus the Hessians ``A_i`` (n, p, p) of every cell's penalized log-likelihood in its
        local parameters ``(W_i, gamma_mu_i[, gamma_pi_i])`` at the current parameters: the
        matrices of the cells' Newton systems (batch-specific loadings and dispersions
        included), whose inverses are the Laplace covariances."""
        feats = self._cell_features()
        out = []
        for start, stop, counts in self.source.iter_blocks(self.bounds):
            st, _, _ = self._start_cells(slice(start, stop), counts, feats)
            out.append(self._cell_system(st.d, st.u, feats, st.groups)[0])
        return torch.cat(out)

    def _predict(self, st: _Cells, feats) -> None:
        Fa, Fb, prods = feats
        st.a = torch.addmm(st.base_a, st.u, Fa.T)
        if self.bl:
            Z = batch_interaction(st.u[:, : self.K], st.groups[0])
            st.a.addmm_(Z, prods["delta"])
        st.b = torch.addmm(st.base_b, st.u, Fb.T) if self.zi else None

    def _cell_objective(self, st: _Cells) -> Tensor:
        return st.d.ll.sum(1) - 0.5 * (self.eps_cell * st.u * st.u).sum(1)

    def _cell_system(
        self, d: EntryDerivatives, u: Tensor, feats, groups=None
    ) -> tuple[Tensor, Tensor]:
        """The cells' Newton systems ``(A, g)``: minus the Hessian and the gradient of each
        cell's penalized objective in its local parameters ``u`` (B x p x p, B x p);
        ``groups``: the cells' batches (:meth:`_batch_groups`), with batch-specific loadings."""
        Fa, Fb, prods = feats
        eps = self.eps_cell
        g = torch.addmm(eps * u, d.la, Fa, beta=-1)
        if self.bl:
            return self._cell_system_batches(d, g, feats, groups)
        H = d.laa @ prods["aa"]
        if self.zi:
            g.addmm_(d.lb, Fb)
            H.addmm_(d.lbb, prods["bb"]).addmm_(d.lab, prods["ab"])
        return torch.diag(eps) - self.pack_cell.unpack(H), g

    def _cell_system_batches(
        self, d: EntryDerivatives, g: Tensor, feats, groups
    ) -> tuple[Tensor, Tensor]:
        """:meth:`_cell_system` with batch-specific loadings: the W part of a cell's gradient
        gains ``la delta_b^T``, its Hessian uses its batch's loadings."""
        _, Fb, prods = feats
        onehot, idx = groups
        r, K = g.shape[0], self.K
        gd = (d.la @ prods["delta"].T).view(r, self.B, K)
        g[:, :K] += (gd * onehot[:, :, None]).sum(1)
        H = g.new_empty(r, self.pack_cell.width)
        for b, rows in enumerate(idx):
            if rows.numel():
                H[rows] = d.laa[rows] @ prods["aa_b"][b]
                if self.zi:
                    H[rows] += d.lab[rows] @ prods["ab_b"][b]
        if self.zi:
            g.addmm_(d.lb, Fb)
            H.addmm_(d.lbb, prods["bb"])
        return torch.diag(self.eps_cell) - self.pack_cell.unpack(H), g

    def _cell_step(
        self,
        st: _Cells,
        counts: SparseCounts,
        nzc: Tensor,
        feats,
        order: int,
        zeta: Tensor | None = None,
    ) -> None:
        """One damped Newton step of the cells in ``st`` (updated in place, per cell only where
        it does not lower the cell's objective); the new point is evaluated at ``order``
        (``zeta``: the block's dispersion, default the model's)."""
        A, g = self._cell_system(st.d, st.u, feats, st.groups)
        delta, lam = damped_newton_step(A, g, st.lam)
        if self.relax != 1.0:  # over-relaxed sweeps (see Solvers._sweep)
            delta = delta * self.relax
        new = _Cells(st.u + delta, st.base_a, st.base_b, None, None, None, None, lam, st.groups)
        self._predict(new, feats)
        new.d = self._derivs(new.a, new.b, counts, zeta=zeta, order=order, nz_const=nzc)
        new.f = self._cell_objective(new)
        acc = (new.f >= st.f) & torch.isfinite(new.f)
        rej = (~acc).nonzero().squeeze(1)
        if rej.numel():  # keep the old values of the rejected cells (usually few)
            new.restore(rej, st)
        new.lam = update_damping(lam, acc)
        st.u, st.a, st.b, st.d, st.f, st.lam = new.u, new.a, new.b, new.d, new.f, new.lam
