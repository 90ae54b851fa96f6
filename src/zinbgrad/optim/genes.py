"""The gene step: one damped Newton step for every gene, its check, and the re-balancing.

Per-entry derivatives at the new cells are contracted into per-gene gradients and Hessians
(:class:`GeneStats`, accumulated over blocks); one damped Newton step is taken for every gene's
``(beta_mu, alpha_mu, [delta_mu], beta_pi, alpha_pi)`` and accepted per gene only if it does not
lower the gene's penalized log-likelihood at the new cells: checked in a pass of its own
(:meth:`GeneSteps.gene_update`), or lagged, in the next sweep's first evaluation
(:meth:`GeneSteps.propose_genes` / :meth:`GeneSteps.check_proposal`,
:class:`~zinbgrad.optim.state.Proposal`). W and alpha are then re-balanced by zinbwave's
``orthogonalizeTraceNorm`` (:meth:`GeneSteps.orthogonalize`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model.likelihood import EntryDerivatives, SparseCounts
from ..model.params import batch_interaction, linear_predictors, orthogonalization_transform
from .newton import SymmetricPacking, damped_newton_step, outer_flat, update_damping
from .state import Proposal

__all__ = ["GeneStats", "GeneSteps", "LAGGED_MAX_REJECTED", "LAGGED_MAX_CHANGE"]

#: genes' last steps was rejected: early on, steps that would be rejected are common and
#: costly to have taken for a sweep
LAGGED_MAX_REJECTED = 0.02
#: the dispersion counts as quiet in a sweep whose dispersion step was predicted to gain less
#: than this fraction of ``tol * |objective|``: its derivatives (a kernel evaluation of every
#: a lagged gene step is scaled down until it changes no cell's log mu or logit pi by more
#: than this: a step taken for a sweep before its check must not be able to ruin a gene
LAGGED_MAX_CHANGE = 3.0


class GeneStats:
    """Per-gene gradient, Hessian, log-likelihood and dispersion derivatives, accumulated.

    The symmetric Hessian blocks ``haa``/``hbb`` are packed (:class:`SymmetricPacking`
    ``pa``/``pb``); the cross block ``hab`` is a full ``qa x qb`` matrix per gene. The
    gradients are held transposed, ``ga_t`` (qa, J) and ``gb_t`` (qb, J): accumulated as
    ``G^T la`` (features x genes), a product the CPU's matrix kernels run 3-5x faster than
    ``la^T G`` at these narrow, odd widths (e.g. 11 columns, BENCHMARKS.md section 2).
    """

    def __init__(
        self,
        J: int,
        pa: SymmetricPacking,
        pb: SymmetricPacking | None,
        ref,
        zeta_shape: tuple[int, ...] | None = None,
    ) -> None:
        kw = {"dtype": ref.dtype, "device": ref.device}
        qa, qb = pa.p, 0 if pb is None else pb.p
        self.ga_t = torch.zeros(qa, J, **kw)
        self.gb_t = torch.zeros(qb, J, **kw)
        self.haa = torch.zeros(J, pa.width, **kw)
        self.hbb = torch.zeros(J, 0 if pb is None else pb.width, **kw)
        self.hab = torch.zeros(J, qa * qb, **kw)
        self.ll = torch.zeros(J, **kw)
        # dispersion derivatives: per gene, or per batch and gene (zeta_shape (B, J))
        self.gz = torch.zeros(zeta_shape or (J,), **kw)
        self.hz = torch.zeros(zeta_shape or (J,), **kw)
        self.qa, self.qb = qa, qb

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.ga_t, self.gb_t, self.haa, self.hbb, self.hab, self.ll, self.gz, self.hz)


class GeneSteps:
    """The gene step of :class:`~zinbgrad.optim.engine.Engine` (a mixin: it works on the
    engine's problem and on its state: ``params``, ``lam_genes``, ``proposal``,
    ``gene_rejected``)."""

    def _gene_features(self, rows: slice) -> tuple[Tensor, Tensor | None]:
        d, p = self.design, self.params
        if self.bl:
            Z = batch_interaction(p.W[rows], d.batch_onehot(rows))
            Ga = torch.cat([d.X_mu[rows], p.W[rows], Z], 1)
        else:
            Ga = torch.cat([d.X_mu[rows], p.W[rows]], 1)
        Gb = torch.cat([d.X_pi[rows], p.W[rows]], 1) if self.zi else None
        return Ga, Gb

    def _new_stats(self) -> GeneStats:
        shape = tuple(self.params.zeta.shape) if self.zeta_batch else None
        return GeneStats(self.J, self.pack_ga, self.pack_gb, self.params.beta_mu, shape)

    def accumulate(
        self,
        stats: GeneStats,
        rows: slice,
        d: EntryDerivatives,
        a: Tensor,
        b: Tensor | None,
        counts: SparseCounts,
        dispersion: bool,
    ) -> None:
        Ga, Gb = self._gene_features(rows)
        stats.ga_t.addmm_(Ga.T, d.la)
        stats.haa.addmm_(d.laa.T, self.pack_ga.outer(Ga))
        if self.zi:
            stats.gb_t.addmm_(Gb.T, d.lb)
            stats.hbb.addmm_(d.lbb.T, self.pack_gb.outer(Gb))
            stats.hab.addmm_(d.lab.T, outer_flat(Ga, Gb))
        stats.ll += d.ll.sum(0)
        if dispersion:
            dz = self._derivs(a, b, counts, order=0, dispersion=True, rows=rows)
            self._add_zeta_terms(stats, dz, rows)

    def gene_precisions(self) -> Tensor:
        """Minus the Hessians (J, q, q) of every gene's penalized log-likelihood in its vector
        (:meth:`gene_slices`: ``beta_mu, alpha_mu[, delta_mu][, beta_pi, alpha_pi]``) at the
        current parameters, cells and dispersion fixed: the matrices of the genes' Newton
        systems, whose inverses are the Laplace covariances."""
        stats = self._new_stats()
        for start, stop, counts in self.source.iter_blocks(self.bounds):
            rows = slice(start, stop)
            a, b = linear_predictors(self.design, self.params, rows, self.zi)
            d = self._derivs(a, b, counts, order=2, rows=rows)
            self.accumulate(stats, rows, d, a, b, counts, dispersion=False)
        self.comm.all_reduce_(*stats.tensors())
        return self._gene_system(stats, self._get_gene_vec())[0]

    def _get_gene_vec(self) -> Tensor:
        p = self.params
        parts = [p.beta_mu.T, p.alpha_mu.T]
        if self.bl:
            parts.append(p.delta_mu.T)
        if self.zi:
            parts += [p.beta_pi.T, p.alpha_pi.T]
        return torch.cat(parts, 1)

    def _gene_slices(self) -> dict[str, slice]:
        """Where each gene field lies in the columns of :meth:`_get_gene_vec`."""
        p, K = self.params, self.K
        Mmu = p.beta_mu.shape[0]
        out = {"beta_mu": slice(0, Mmu), "alpha_mu": slice(Mmu, Mmu + K)}
        o = Mmu + K
        if self.bl:
            out["delta_mu"] = slice(o, o + self.B * K)
            o += self.B * K
        if self.zi:
            Mpi = p.beta_pi.shape[0]
            out["beta_pi"] = slice(o, o + Mpi)
            out["alpha_pi"] = slice(o + Mpi, o + Mpi + K)
        return out

    def gene_slices(self) -> dict[str, slice]:
        """Where each gene field lies in a gene's vector of unknowns (see
        :meth:`fix_gene_columns`)."""
        return self._gene_slices()

    def fix_gene_columns(self, fixed: Tensor | None) -> None:
        """Hold the gene-vector columns ``fixed`` (bool, one per column of
        :meth:`_get_gene_vec`) at their values in every gene step (e.g. all but a new batch's
        coefficients, when mapping cells of a batch the fit did not see)."""
        self.fixed_cols = fixed

    def _set_gene_vec(self, v: Tensor) -> None:
        for name, cols in self._gene_slices().items():
            setattr(self.params, name, v[:, cols].T.contiguous())

    def _gene_system(self, stats: GeneStats, v: Tensor, data_scale: float = 1.0):
        J, qa, qb = self.J, stats.qa, stats.qb
        eps = self.eps_gene
        haa = self.pack_ga.unpack(stats.haa)
        if self.zi:
            g = torch.cat([stats.ga_t.T, stats.gb_t.T], 1) * data_scale - eps * v
            hab = stats.hab.view(J, qa, qb)
            top = torch.cat([haa, hab], 2)
            bot = torch.cat([hab.transpose(1, 2), self.pack_gb.unpack(stats.hbb)], 2)
            H = torch.cat([top, bot], 1) * data_scale
        else:
            g = stats.ga_t.T * data_scale - eps * v
            H = haa * data_scale
        A = -H + torch.diag(eps)
        return A, g

    def _eval_ll(self, zetas: list[Tensor], bounds=None) -> list[Tensor]:
        """Per-gene log-likelihood at the current parameters, for each zeta in ``zetas``."""
        out = [torch.zeros(self.J, dtype=self.dtype, device=self.device) for _ in zetas]
        for start, stop, counts in self.source.iter_blocks(
            self.bounds if bounds is None else bounds
        ):
            rows = slice(start, stop)
            a, b = linear_predictors(self.design, self.params, rows, self.zi)
            for k, z in enumerate(zetas):
                out[k] += self._derivs(a, b, counts, zeta=z, order=0, rows=rows).ll.sum(0)
        self.comm.all_reduce_(*out)
        return out

    def _gene_proposal(
        self,
        stats: GeneStats,
        frozen: Tensor | None,
        max_change: float | None = None,
        relax: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(v_old, v_new, lam)``: one damped Newton step for every gene not ``frozen``;
        with ``max_change``, each gene's step is scaled so that no cell's log mu or logit pi
        changes by more than that; with ``relax``, the step is over-relaxed (times
        ``self.relax``, see :meth:`~zinbgrad.optim.solvers.Solvers._sweep`)."""
        v_old = self._get_gene_vec()
        A, g = self._gene_system(stats, v_old)
        if self.fixed_cols is not None:  # Newton step in the free coordinates only
            fx = self.fixed_cols
            A[:, fx, :] = 0.0
            A[:, :, fx] = 0.0
            A[:, fx, fx] = 1.0
            g[:, fx] = 0.0
        delta, lam = damped_newton_step(A, g, self.lam_genes)
        if relax and self.relax != 1.0:
            delta = delta * self.relax
        if frozen is not None:
            delta[frozen] = 0.0
        if max_change is not None:
            delta = delta * self._step_scale(delta, max_change)[:, None]
        return v_old, v_old + delta, lam

    def _step_scale(self, delta: Tensor, max_change: float) -> Tensor:
        """Per gene, the factor (<= 1) that keeps the change of every cell's log mu and logit
        pi below ``max_change``: the change at cell i is ``(X_i, W_i)`` times the gene's step,
        its largest size over the cells is found block by block (no data is read)."""
        qa = self.pack_ga.p
        change = torch.zeros(self.J, dtype=self.dtype, device=self.device)
        for start, stop in self.bounds:
            Ga, Gb = self._gene_features(slice(start, stop))
            for G, step in ((Ga, delta[:, :qa]), (Gb, delta[:, qa:])):
                if G is None:
                    continue
                c = G @ step.T
                change = torch.maximum(change, c.abs().amax(0))
        self.comm.all_reduce_max_(change)
        return torch.clamp(max_change / change.clamp(min=1e-300), max=1.0)

    def gene_update(
        self, stats: GeneStats, update_zeta: bool, frozen: Tensor | None = None
    ) -> Tensor:
        """One damped Newton step for all genes (and dispersion), verified by a data pass.

        ``frozen``: genes whose statistics are not at their current values (see
        :class:`~zinbgrad.optim.state.Proposal`); they keep their values. Returns the per-gene
        log-likelihood at the accepted parameters.
        """
        p = self.params
        v_old, v_new, lam = self._gene_proposal(stats, frozen)
        zeta_old = p.zeta.clone()
        zeta_new = self._zeta_step(stats) if update_zeta else zeta_old
        if frozen is not None and not self.common:
            zeta_new = torch.where(frozen, zeta_old, zeta_new)
        center = zeta_old.mean()
        f_old = self._gene_objective(stats.ll, center)

        self._set_gene_vec(v_new)
        pen_new = self.pen.gene_values(p)
        if self.common:
            if update_zeta:
                ll_keep, ll_z = self._eval_ll([zeta_old, zeta_new])
            else:
                (ll_keep,) = self._eval_ll([zeta_old])
        else:
            p.zeta = zeta_new
            (ll_keep,) = self._eval_ll([zeta_new])
        f_new = self._gene_objective(ll_keep, center)
        acc = (f_new >= f_old) & torch.isfinite(f_new)
        if frozen is not None:  # unchanged; ll_keep is their log-likelihood
            acc = acc | frozen
        self.gene_rejected = float((~acc).float().mean())
        self.lam_genes = update_damping(lam, acc)
        v = torch.where(acc[:, None], v_new, v_old)
        self._set_gene_vec(v)
        ll = torch.where(acc, ll_keep, stats.ll)
        if not self.common:
            p.zeta = torch.where(acc, zeta_new, zeta_old)
            if update_zeta:
                moved = zeta_new != zeta_old
                self._adapt_zeta_cap(moved, acc)
        elif update_zeta and not torch.equal(zeta_new, zeta_old):
            # two fully evaluated states: per-gene choice under the old zeta (ll, v) versus all
            # genes moved together with the new zeta; keep the better one
            f_a = float(ll.sum() - self.pen.gene_values(p).sum())
            f_b = float(ll_z.sum() - pen_new.sum())
            if f_b >= f_a:
                self._set_gene_vec(v_new)
                p.zeta = zeta_new
                ll = ll_z
            self._adapt_zeta_cap(True, f_b >= f_a)
        return ll

    def _gene_objective(self, ll: Tensor, center: Tensor) -> Tensor:
        """Per-gene penalized log-likelihood at the current gene parameters (the dispersion
        penalty by its separable surrogate around ``center``)."""
        p = self.params
        return ll - self.pen.gene_values(p) - self._zeta_surrogate(p.zeta, center)

    def propose_genes(self, stats: GeneStats, update_zeta: bool, frozen: Tensor | None) -> None:
        """Take a gene step (and a gene-wise dispersion step) now and leave its check to the
        next sweep (:class:`~zinbgrad.optim.state.Proposal`); call :meth:`check_proposal` or
        the final pass then."""
        p = self.params
        v_old, v_new, lam = self._gene_proposal(stats, frozen, LAGGED_MAX_CHANGE, relax=True)
        zeta_old = p.zeta.clone()
        center = zeta_old.mean()
        f_old = self._gene_objective(stats.ll, center)
        if frozen is not None:
            f_old = torch.where(frozen, float("-inf"), f_old)
        if self.common and frozen is not None and bool(frozen.any()):
            update_zeta = False  # the sums over genes include statistics at rejected values
        if update_zeta:
            zeta_new = self._zeta_step(stats)
            if frozen is not None and not self.common:
                zeta_new = torch.where(frozen, zeta_old, zeta_new)
            p.zeta = zeta_new
        self._set_gene_vec(v_new)
        self.proposal = Proposal(v_old, zeta_old, f_old, stats.ll.clone(), lam, center)

    def check_proposal(self, ll_new: Tensor) -> tuple[Tensor, Tensor]:
        """Accept or undo the pending gene step per gene, given each gene's log-likelihood
        ``ll_new`` at the proposed values (and the cells the step came from).

        Returns ``(rejected, ll)``: the genes put back, and the per-gene log-likelihood at the
        resulting parameters.
        """
        prop, p = self.proposal, self.params
        self.proposal = None
        f_new = self._gene_objective(ll_new, prop.center)
        better = (f_new >= prop.f_old) & torch.isfinite(f_new)
        self.lam_genes = update_damping(prop.lam, better)
        acc = better
        if self.common and not torch.equal(p.zeta, prop.zeta_old):
            # the genes moved with a new common dispersion: a gene cannot go back alone (its
            # log-likelihood at the new dispersion and old values is unknown), so all stay or
            # all go back, by the total objective
            keep = torch.isfinite(prop.f_old)
            gain = float((f_new[keep] - prop.f_old[keep]).sum())
            ok = bool(torch.isfinite(f_new).all()) and gain >= 0
            acc = torch.full_like(better, ok)
            if not ok:
                p.zeta = prop.zeta_old
            self._adapt_zeta_cap(True, ok)
        rejected = ~acc
        self.gene_rejected = float((~better).float().mean())
        self._set_gene_vec(torch.where(acc[:, None], self._get_gene_vec(), prop.v_old))
        if not self.common:
            zeta_new = p.zeta
            p.zeta = torch.where(acc, zeta_new, prop.zeta_old)
            moved = (zeta_new != prop.zeta_old) & torch.isfinite(prop.f_old)
            self._adapt_zeta_cap(moved, acc)
        return rejected, torch.where(acc, ll_new, prop.ll_old)

    def _rotate_proposal(self, T: Tensor | None) -> None:
        """Express the pending step's old gene values in the basis of W after ``W <- W T``
        (``alpha <- T^-1 alpha`` keeps W alpha), and their objective with it."""
        prop = self.proposal
        if prop is None or T is None:
            return
        v = self._rotate_gene_vec(T, prop.v_old)
        keep = torch.isfinite(prop.f_old)
        with self._genes_restored():
            self._set_gene_vec(v)
            self.params.zeta = prop.zeta_old
            f_old = self._gene_objective(prop.ll_old, prop.center)
        prop.v_old = v
        prop.f_old = torch.where(keep, f_old, prop.f_old)

    def _rotate_gene_vec(self, T: Tensor, v: Tensor) -> Tensor:
        """Gene vectors ``v`` (J x q) expressed in the basis of ``W T``: their loadings (and
        batch offsets) columns times ``T^-1``, the rest as they are."""
        v = v.clone()
        at = self._gene_slices()
        for name in ("alpha_mu", "alpha_pi") if self.zi else ("alpha_mu",):
            c = at[name]
            v[:, c] = self._inverse_rotate(T, v[:, c].T).T
        if self.bl:  # each batch's offsets, K columns apiece
            c = at["delta_mu"]
            blocks = v[:, c].T.reshape(self.B, self.K, self.J)
            v[:, c] = self._inverse_rotate(T, blocks).reshape(-1, self.J).T
        return v

    # ------------------------------------------------------------------ orthogonalization
    def orthogonalize(self) -> Tensor | None:
        """zinbwave's orthogonalizeTraceNorm on (W, [alpha_mu, alpha_pi]); keeps W alpha.

        Returns the K x K matrix T applied to W (``None`` for K = 0)."""
        if self.K == 0 or not self.rebalance:
            return None
        p = self.params
        gram = p.W.T @ p.W
        self.comm.all_reduce_(gram)
        # a separate weight of alpha_pi enters the balance as alpha_pi scaled by
        # sqrt(eps_alpha_pi / eps_alpha) (so eps_alpha |scaled|^2 is its penalty)
        e_a, e_pi = self.pen.alpha, self.pen.alpha_zi
        s = (e_pi / e_a) ** 0.5 if e_a > 0 and e_pi > 0 else 1.0
        alpha = torch.cat([p.alpha_mu, p.alpha_pi * s], 1) if self.zi else p.alpha_mu
        if self.bl:
            return self._orthogonalize_batches(gram, alpha, s)
        T, alpha_new = orthogonalization_transform(gram, alpha, self.pen.W, self.pen.alpha)
        p.W = p.W @ T
        p.alpha_mu = alpha_new[:, : self.J].contiguous()
        if self.zi:
            p.alpha_pi = (alpha_new[:, self.J :] / s).contiguous()
        return T

    def _orthogonalize_batches(self, gram: Tensor, alpha: Tensor, s_pi: float) -> Tensor:
        """:meth:`orthogonalize` with batch-specific loadings: W delta_b is kept too, and the
        balance minimizes the whole penalty ``eps_W |W|^2 + eps_alpha |alpha|^2 + eps_delta
        |delta|^2`` (the offsets enter the trace-norm balancing scaled by
        ``sqrt(eps_delta / eps_alpha)``; unscaled, and rotated along, when a weight is 0)."""
        p, K, J = self.params, self.K, self.J
        blocks = list(p.delta_mu.view(self.B, K, J))
        e_a, e_d = self.pen.alpha, self.pen.delta
        s = (e_d / e_a) ** 0.5 if e_a > 0 and e_d > 0 else 0.0
        aug = torch.cat([alpha] + [s * d for d in blocks], 1) if s > 0 else alpha
        T, new = orthogonalization_transform(gram, aug, self.pen.W, e_a)
        p.W = p.W @ T
        m = alpha.shape[1]
        p.alpha_mu = new[:, :J].contiguous()
        if self.zi:
            p.alpha_pi = (new[:, J:m] / s_pi).contiguous()
        if s > 0:
            p.delta_mu = (new[:, m:] / s).reshape(K, self.B, J).transpose(0, 1).reshape(-1, J)
        else:
            p.delta_mu = self._inverse_rotate(T, p.delta_mu.view(self.B, K, J)).reshape(-1, J)
        p.delta_mu = p.delta_mu.contiguous()
        return T

    @staticmethod
    def _inverse_rotate(T: Tensor, loadings: Tensor) -> Tensor:
        """``T^-1 loadings`` (K x m, or a stack of them): loadings in the basis of ``W T``."""
        Td = T.double()
        try:
            out = torch.linalg.solve(Td, loadings.double())
        except RuntimeError:  # singular T (a factor without signal)
            out = torch.linalg.pinv(Td) @ loadings.double()
        return out.to(loadings.dtype)
