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
   the next sweep's first evaluation, which sees the same cells (:class:`_Proposal`): a
   sweep then reads the data once instead of twice;
4. W and alpha are re-balanced by zinbwave's ``orthogonalizeTraceNorm``.

The stochastic solver (:meth:`Engine.fit_stochastic`) does the same on minibatches of cells, with
the data term of the gene gradient and Hessian scaled by ``n / |B|`` (unbiased), and a decaying
step on the gene parameters; a few full sweeps then polish the optimum.

Memory: the cell parameters (n x (K + L)) plus one block of dense (cells x genes) working
arrays; counts are only touched as sparse blocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..data.source import block_bounds
from ..model.likelihood import (
    EntryDerivatives,
    SparseCounts,
    entry_derivatives,
    nonzero_constant,
)
from ..model.params import (
    Design,
    Params,
    Penalty,
    batch_interaction,
    linear_predictors,
    orthogonalization_transform,
)
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import LocalComm
from .newton import SymmetricPacking, damped_newton_step, outer_flat, update_damping

__all__ = ["Engine", "FitOptions", "FitResult"]

ZETA_MIN, ZETA_MAX = -15.0, 60.0
#: gene steps are checked lagged (see _Proposal) only while at most this fraction of the
#: genes' last steps was rejected: early on, steps that would be rejected are common and
#: costly to have taken for a sweep
LAGGED_MAX_REJECTED = 0.02
#: the dispersion counts as quiet in a sweep whose dispersion step was predicted to gain less
#: than this fraction of ``tol * |objective|``: its derivatives (a kernel evaluation of every
#: block) cost a fifth of a sweep, for gains far below what the stopping rule measures
ZETA_QUIET_GAIN = 0.01
#: sweeps the dispersion pauses for after two quiet ones; each pause that ends in two more
#: quiet sweeps doubles the next one, up to ZETA_PAUSE_MAX (a sweep that is not quiet resets it)
ZETA_PAUSE = 4
ZETA_PAUSE_MAX = 32
#: a lagged gene step is scaled down until it changes no cell's log mu or logit pi by more
#: than this: a step taken for a sweep before its check must not be able to ruin a gene
LAGGED_MAX_CHANGE = 3.0


@dataclass
class FitOptions:
    """Optimizer settings (see :class:`zinbgrad.ZINBWaVE` for their meaning)."""

    max_epochs: int = 100
    tol: float = 1e-4
    local_steps: int = 1
    #: check each gene step in the next sweep's first evaluation (which sees the same cells)
    #: instead of in a pass of its own; see :class:`_Proposal`
    lagged_check: bool = True
    block_entries: int = 2**21
    batch_size: int | None = None
    solver: str = "auto"
    stochastic_epochs: int = 3
    #: epochs at most of the sketch's own fit (solver "sketch"; ``max_epochs`` counts the
    #: sweeps over all cells)
    sketch_max_epochs: int = 100
    #: evaluate the per-entry derivatives with fused (torch.compile) kernels (None: the
    #: module's setting, see zinbgrad.model.likelihood.set_fused)
    fused: bool | None = None
    zeta_bounds: tuple[float, float] = (ZETA_MIN, ZETA_MAX)
    progress: Callable[[dict], None] | None = None
    checkpoint_path: str | None = None
    checkpoint_every: int = 1
    #: what a checkpoint must match to be resumed (the data's fingerprint, the design's
    #: columns, the penalty), beyond the shapes; JSON-serializable
    checkpoint_tag: dict | None = None
    #: ``time.perf_counter()`` at the start of the user's fit call; history "seconds" count
    #: from it (None: from the start of the solver loop)
    t_origin: float | None = None


@dataclass
class FitResult:
    loglik: float
    penalty: float
    history: list[dict] = field(default_factory=list)
    converged: bool = False
    n_epochs: int = 0


def _stalled(prev: float, obj: float, tol: float) -> bool:
    """The stopping rule: the objective changed by at most ``tol`` relative to ``prev``."""
    return abs(obj - prev) <= tol * abs(prev)


class FitPath:
    """The gene parameters a fit passed through, recorded after every sweep.

    ``steps[t] = (gene parameters used in sweep t, orthogonalization T of sweep t, Newton
    steps per cell in sweep t)``: replaying it takes new cells along the same path as the
    fit's own cells (:meth:`Engine._follow`). The sketch solver's extension replays the
    sketch's path for every cell; projections of new cells (``transform``, ``score``) replay
    the fitted model's path before solving each cell's problem at the final genes, since the
    cells' local problems are not concave and a cold solve ends in poorer local optima.
    """

    def __init__(self, dense: int = 10, stride: int = 3) -> None:
        self.steps: list[tuple[dict, Tensor | None, int]] = []
        self._genes: dict | None = None
        self.dense, self.stride = dense, stride

    def __len__(self) -> int:
        return len(self.steps)

    def start(self, params: Params) -> None:
        """The gene parameters the first recorded sweep starts from."""
        self._genes = {k: getattr(params, k).clone() for k in params.gene_fields()}

    def record(self, params: Params, T: Tensor | None, local_steps: int) -> None:
        if self._genes is None:
            raise RuntimeError("FitPath.start must be called before the first sweep")
        self.steps.append((self._genes, None if T is None else T.clone(), local_steps))
        self._genes = {k: getattr(params, k).clone() for k in params.gene_fields()}

    def schedule(
        self, dense: int | None = None, stride: int | None = None
    ) -> list[tuple[dict, Tensor | None, int]]:
        """The steps to replay: every sweep of the first ``dense``, then every ``stride``-th.

        The first sweeps move the cells most; later ones creep, and skipping some of them
        costs little (on the brain data: all 33 sweeps -175.88 nats per cell, this
        schedule's 20 -176.25, the first 15 alone -178.16). The orthogonalizations of skipped
        sweeps are composed into the preceding kept step's ``T``.
        """
        dense = self.dense if dense is None else dense
        stride = self.stride if stride is None else stride
        keep = [t for t in range(len(self.steps)) if t < dense or (t - dense) % stride == 0]
        out = []
        for i, t in enumerate(keep):
            genes, T, steps = self.steps[t]
            end = keep[i + 1] if i + 1 < len(keep) else len(self.steps)
            for s in range(t + 1, end):
                Ts = self.steps[s][1]
                if Ts is not None:
                    T = Ts if T is None else T @ Ts
            out.append((genes, T, steps))
        return out

    def compact(self, max_steps: int = 24) -> FitPath:
        """The replayed steps only, at most ``max_steps`` of them (what a saved model keeps):
        the first ``dense`` sweeps, then a stride that fits the rest into the budget."""
        n = len(self.steps)
        stride = max(self.stride, -(-(n - self.dense) // max(max_steps - self.dense, 1)))
        out = FitPath(dense=n, stride=1)
        out.steps = self.schedule(self.dense, stride)
        return out

    def tensors(self) -> list[Tensor]:
        """Every tensor of the path (for a broadcast from rank 0)."""
        out = []
        for genes, T, _ in self.steps:
            out += list(genes.values())
            if T is not None:
                out.append(T)
        return out

    def to_arrays(self, dtype=None, with_start: bool = False) -> dict[str, np.ndarray]:
        """The path as numpy arrays: per gene field the values of every step stacked
        (``steps`` x ...), ``T`` (identity where a sweep had none), ``n_newton`` and
        ``schedule`` (``dense``, ``stride``). ``with_start``: also ``start_<field>``, the
        gene values the next recorded sweep starts from (a checkpoint needs them)."""
        out: dict[str, np.ndarray] = {}
        if self.steps:
            for k in self.steps[0][0]:
                out[k] = torch.stack([g[k] for g, _, _ in self.steps]).cpu().numpy()
            K = self.steps[0][0]["alpha_mu"].shape[0]
            eye = torch.eye(K, dtype=self.steps[0][0]["zeta"].dtype)
            Ts = [eye if T is None else T.cpu() for _, T, _ in self.steps]
            out["T"] = torch.stack(Ts).numpy()
        if with_start and self._genes is not None:
            for k, v in self._genes.items():
                out["start_" + k] = v.detach().cpu().numpy()
        if dtype is not None:
            out = {k: v.astype(dtype) for k, v in out.items()}
        out["n_newton"] = np.array([s for _, _, s in self.steps], dtype=np.int64)
        out["schedule"] = np.array([self.dense, self.stride], dtype=np.int64)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict, dtype: torch.dtype, device) -> FitPath:
        """Inverse of :meth:`to_arrays` (validated shapes; no pickled objects)."""
        try:
            dense, stride = (int(v) for v in np.asarray(arrays["schedule"]).ravel()[:2])
            n_newton = np.asarray(arrays["n_newton"]).ravel()
        except (KeyError, ValueError) as err:
            raise ValueError(f"incomplete fit path arrays ({err})") from err
        path = cls(dense, stride)
        S = len(n_newton)
        kw = {"dtype": dtype, "device": device}
        if S:
            names = Params.GENE_FIELDS + tuple(
                k for k in Params.OPTIONAL_GENE_FIELDS if k in arrays
            )
            fields = {k: torch.as_tensor(np.asarray(arrays[k]), **kw) for k in names}
            T = torch.as_tensor(np.asarray(arrays["T"]), **kw)
            if any(v.shape[0] != S for v in fields.values()) or T.shape[0] != S:
                raise ValueError("inconsistent fit path arrays")
            for t in range(S):
                genes = {k: v[t].contiguous() for k, v in fields.items()}
                path.steps.append((genes, T[t].contiguous(), int(n_newton[t])))
        if "start_zeta" in arrays:
            names = Params.GENE_FIELDS + tuple(
                k for k in Params.OPTIONAL_GENE_FIELDS if "start_" + k in arrays
            )
            path._genes = {k: torch.as_tensor(arrays["start_" + k], **kw) for k in names}
        return path


class _GeneStats:
    """Per-gene gradient, Hessian, log-likelihood and dispersion derivatives, accumulated.

    The symmetric Hessian blocks ``haa``/``hbb`` are packed (:class:`SymmetricPacking`
    ``pa``/``pb``); the cross block ``hab`` is a full ``qa x qb`` matrix per gene.
    """

    def __init__(self, J: int, pa: SymmetricPacking, pb: SymmetricPacking | None, ref) -> None:
        kw = {"dtype": ref.dtype, "device": ref.device}
        qa, qb = pa.p, 0 if pb is None else pb.p
        self.ga = torch.zeros(J, qa, **kw)
        self.gb = torch.zeros(J, qb, **kw)
        self.haa = torch.zeros(J, pa.width, **kw)
        self.hbb = torch.zeros(J, 0 if pb is None else pb.width, **kw)
        self.hab = torch.zeros(J, qa * qb, **kw)
        self.ll = torch.zeros(J, **kw)
        self.gz = torch.zeros(J, **kw)
        self.hz = torch.zeros(J, **kw)
        self.qa, self.qb = qa, qb

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.ga, self.gb, self.haa, self.hbb, self.hab, self.ll, self.gz, self.hz)


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


@dataclass
class _Proposal:
    """A gene step taken before it is checked (``FitOptions.lagged_check``).

    The check of a gene step needs each gene's log-likelihood at the new gene parameters and
    the cells that produced the step. The next sweep's first evaluation of every block is at
    exactly that point, so instead of a pass of its own the step is taken at once and checked
    there, per gene, against its objective before the step: a rejected gene returns to
    ``v_old`` (its statistics of that sweep were gathered at the rejected values, so it takes
    no step in that sweep). Everything is kept in the basis of the current W (the
    orthogonalization after the step rotates ``v_old`` too).
    """

    v_old: Tensor  #: gene vectors before the step (J x q)
    zeta_old: Tensor
    f_old: Tensor  #: per-gene objective at ``v_old``; -inf where there is nothing to check
    ll_old: Tensor  #: per-gene log-likelihood at ``v_old`` (the same cells)
    lam: Tensor  #: the gene damping the step was taken with
    center: Tensor  #: center of the dispersion surrogate (gene-wise dispersion)

    FIELDS = ("v_old", "zeta_old", "f_old", "ll_old", "lam", "center")


class Engine:
    """Holds data, design, parameters and penalty; runs the solvers in place on ``params``."""

    def __init__(
        self,
        source,
        design: Design,
        params: Params,
        penalty: Penalty,
        *,
        zero_inflation: bool = True,
        common_dispersion: bool = True,
        options: FitOptions | None = None,
        seed: int = 0,
        comm: LocalComm | None = None,
    ) -> None:
        self.source = source
        self.comm = comm or LocalComm()
        self.design = design
        self.params = params
        self.pen = penalty
        self.zi = zero_inflation
        self.common = common_dispersion
        self.opt = options or FitOptions()
        self.n, self.J = design.n, design.J
        self.K = params.K
        ref = params.beta_mu
        self.dtype, self.device = ref.dtype, ref.device
        self.rng = np.random.default_rng(seed)
        rows = max(1, self.opt.block_entries // max(self.J, 1))
        self.bounds = block_bounds(self.n, rows)
        self.lam_cells = torch.full((self.n,), 1e-3, dtype=self.dtype, device=self.device)
        self.lam_genes = torch.full((self.J,), 1e-3, dtype=self.dtype, device=self.device)
        self.zeta_cap = torch.full((self.J,), 1.0, dtype=self.dtype, device=self.device)
        #: batch-specific loadings (``params.delta_mu``; see zinbgrad.model.params)
        self.bl = params.delta_mu is not None
        if self.bl and (design.batch is None or penalty.delta is None):
            raise ValueError("batch-specific loadings need the cells' batches and a penalty")
        self.B = design.n_batches if self.bl else 0
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
        # stochastic solver state (checkpointed): averaged gene Hessians, damping, step count
        self.sto_H: Tensor | None = None
        self.sto_lam: Tensor | None = None
        self.sto_t = 0
        # dispersion updates pause once their steps stop mattering (_zeta_moved; the counters
        # are checkpointed; zeta_gain only matters in the sweep that set it)
        self.zeta_quiet = 0
        self.zeta_skip = 0
        self.zeta_pause = ZETA_PAUSE
        self.zeta_gain = float("inf")  # predicted gain of the last dispersion step
        #: when set, every sweep is recorded into it (the sketch of zinbgrad.optim.sketch)
        self.trajectory: FitPath | None = None
        #: the last gene step, when it awaits its check (checkpointed)
        self.proposal: _Proposal | None = None
        #: fraction of the genes whose last step was rejected (checkpointed)
        self.gene_rejected = 1.0

    # ------------------------------------------------------------------ cell-level pieces
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
        onehot = self.design.batch_onehot(rows)
        codes = self.design.batch[rows]
        return onehot, [(codes == b).nonzero().squeeze(1) for b in range(self.B)]

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

    def _nz_const(self, counts: SparseCounts, zeta: Tensor) -> Tensor:
        """``nonzero_constant`` of a block, cached while the dispersion tensor is unchanged.

        Sources that keep their blocks get an entry per block; streamed blocks only a few
        (the evaluations of one block in a row). The entry holds ``counts`` itself, so its
        ``id`` cannot be reused while cached.
        """
        key = (id(counts), id(zeta))
        hit = self._nzc.get(key)
        if hit is not None and hit[0] is zeta and hit[2] is counts:
            return hit[1]
        val = nonzero_constant(counts, zeta)
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
        **kw,
    ) -> EntryDerivatives:
        zeta = self.params.zeta if zeta is None else zeta
        nzc = self._nz_const(counts, zeta) if nz_const is None else nz_const
        return entry_derivatives(a, b, zeta, counts, nz_const=nzc, fused=self.opt.fused, **kw)

    def cell_newton(
        self,
        rows: slice,
        counts: SparseCounts,
        n_steps: int,
        feats=None,
        tol: float = 0.0,
        derivs: bool = True,
        ll_start: Tensor | None = None,
    ) -> tuple[EntryDerivatives, Tensor, Tensor | None]:
        """Damped Newton steps on the local parameters of cells ``rows``; updates in place.

        Stops early when the block's penalized log-likelihood improves by less than
        ``tol`` (relative). Returns the per-entry derivatives at the final cell values (order 2;
        with ``derivs=False`` possibly only ``ll``: the last trial point is then evaluated
        without derivatives, which saves a third of a step) and the final predictors.
        ``ll_start``: the per-gene log-likelihood at the starting values is added into it.
        """
        feats = feats if feats is not None else self._cell_features()
        nzc = self._nz_const(counts, self.params.zeta)
        u = self._get_cell_vec(rows)
        base_a, base_b = self._cell_base(rows)
        st = _Cells(
            u,
            base_a,
            base_b,
            None,
            None,
            None,
            None,
            self.lam_cells[rows],
            self._batch_groups(rows),
        )
        self._predict(st, feats)
        st.d = self._derivs(st.a, st.b, counts, order=2, nz_const=nzc)
        st.f = self._cell_objective(st)
        if ll_start is not None:
            ll_start += st.d.ll.sum(0)
        for step in range(n_steps):
            f_sum = float(st.f.sum()) if tol > 0 else 0.0
            last = step == n_steps - 1
            self._cell_step(st, counts, nzc, feats, order=0 if last and not derivs else 2)
            if tol > 0 and float(st.f.sum()) - f_sum <= tol * abs(f_sum):
                break
        self.lam_cells[rows] = st.lam
        self._set_cell_vec(rows, st.u)
        return st.d, st.a, st.b

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

    def _cell_step(self, st: _Cells, counts: SparseCounts, nzc: Tensor, feats, order: int) -> None:
        """One damped Newton step of the cells in ``st`` (updated in place, per cell only where
        it does not lower the cell's objective); the new point is evaluated at ``order``."""
        A, g = self._cell_system(st.d, st.u, feats, st.groups)
        delta, lam = damped_newton_step(A, g, st.lam)
        new = _Cells(st.u + delta, st.base_a, st.base_b, None, None, None, None, lam, st.groups)
        self._predict(new, feats)
        new.d = self._derivs(new.a, new.b, counts, order=order, nz_const=nzc)
        new.f = self._cell_objective(new)
        acc = (new.f >= st.f) & torch.isfinite(new.f)
        rej = (~acc).nonzero().squeeze(1)
        if rej.numel():  # keep the old values of the rejected cells (usually few)
            new.restore(rej, st)
        new.lam = update_damping(lam, acc)
        st.u, st.a, st.b, st.d, st.f, st.lam = new.u, new.a, new.b, new.d, new.f, new.lam

    # ------------------------------------------------------------------ gene-level pieces
    def _gene_features(self, rows: slice) -> tuple[Tensor, Tensor | None]:
        d, p = self.design, self.params
        if self.bl:
            Z = batch_interaction(p.W[rows], d.batch_onehot(rows))
            Ga = torch.cat([d.X_mu[rows], p.W[rows], Z], 1)
        else:
            Ga = torch.cat([d.X_mu[rows], p.W[rows]], 1)
        Gb = torch.cat([d.X_pi[rows], p.W[rows]], 1) if self.zi else None
        return Ga, Gb

    def _new_stats(self) -> _GeneStats:
        return _GeneStats(self.J, self.pack_ga, self.pack_gb, self.params.beta_mu)

    def accumulate(
        self,
        stats: _GeneStats,
        rows: slice,
        d: EntryDerivatives,
        a: Tensor,
        b: Tensor | None,
        counts: SparseCounts,
        dispersion: bool,
    ) -> None:
        Ga, Gb = self._gene_features(rows)
        stats.ga.addmm_(d.la.T, Ga)
        stats.haa.addmm_(d.laa.T, self.pack_ga.outer(Ga))
        if self.zi:
            stats.gb.addmm_(d.lb.T, Gb)
            stats.hbb.addmm_(d.lbb.T, self.pack_gb.outer(Gb))
            stats.hab.addmm_(d.lab.T, outer_flat(Ga, Gb))
        stats.ll += d.ll.sum(0)
        if dispersion:
            dz = self._derivs(a, b, counts, order=0, dispersion=True)
            stats.gz += dz.lz.sum(0)
            stats.hz += dz.lzz.sum(0)

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

    def _gene_system(self, stats: _GeneStats, v: Tensor, data_scale: float = 1.0):
        J, qa, qb = self.J, stats.qa, stats.qb
        eps = self.eps_gene
        haa = self.pack_ga.unpack(stats.haa)
        if self.zi:
            g = torch.cat([stats.ga, stats.gb], 1) * data_scale - eps * v
            hab = stats.hab.view(J, qa, qb)
            top = torch.cat([haa, hab], 2)
            bot = torch.cat([hab.transpose(1, 2), self.pack_gb.unpack(stats.hbb)], 2)
            H = torch.cat([top, bot], 1) * data_scale
        else:
            g = stats.ga * data_scale - eps * v
            H = haa * data_scale
        A = -H + torch.diag(eps)
        return A, g

    def _zeta_step(self, stats: _GeneStats, data_scale: float = 1.0) -> Tensor:
        """Proposed new zeta (safeguarded Newton; expands geometrically toward theta -> inf)."""
        zeta = self.params.zeta
        lo, hi = self.opt.zeta_bounds
        if self.common:
            G = stats.gz.sum() * data_scale
            C = stats.hz.sum() * data_scale
            cap = self.zeta_cap[0]
        else:
            c = self.pen.zeta / max(self.J - 1, 1)
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
        """Separable majorizer of the var(zeta) penalty (exact at zeta = old zeta)."""
        if self.common or self.J < 2:
            return torch.zeros_like(zeta)
        return 0.5 * self.pen.zeta / (self.J - 1) * (zeta - center) ** 2

    def _eval_ll(self, zetas: list[Tensor], bounds=None) -> list[Tensor]:
        """Per-gene log-likelihood at the current parameters, for each zeta in ``zetas``."""
        out = [torch.zeros(self.J, dtype=self.dtype, device=self.device) for _ in zetas]
        for start, stop, counts in self.source.iter_blocks(
            self.bounds if bounds is None else bounds
        ):
            rows = slice(start, stop)
            a, b = linear_predictors(self.design, self.params, rows, self.zi)
            for k, z in enumerate(zetas):
                out[k] += self._derivs(a, b, counts, zeta=z, order=0).ll.sum(0)
        self.comm.all_reduce_(*out)
        return out

    def _gene_proposal(
        self, stats: _GeneStats, frozen: Tensor | None, max_change: float | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(v_old, v_new, lam)``: one damped Newton step for every gene not ``frozen``;
        with ``max_change``, each gene's step is scaled so that no cell's log mu or logit pi
        changes by more than that."""
        v_old = self._get_gene_vec()
        A, g = self._gene_system(stats, v_old)
        if self.fixed_cols is not None:  # Newton step in the free coordinates only
            fx = self.fixed_cols
            A[:, fx, :] = 0.0
            A[:, :, fx] = 0.0
            A[:, fx, fx] = 1.0
            g[:, fx] = 0.0
        delta, lam = damped_newton_step(A, g, self.lam_genes)
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
        self, stats: _GeneStats, update_zeta: bool, frozen: Tensor | None = None
    ) -> Tensor:
        """One damped Newton step for all genes (and dispersion), verified by a data pass.

        ``frozen``: genes whose statistics are not at their current values (see
        :class:`_Proposal`); they keep their values. Returns the per-gene log-likelihood at the
        accepted parameters.
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

    def propose_genes(self, stats: _GeneStats, update_zeta: bool, frozen: Tensor | None) -> None:
        """Take a gene step (and a gene-wise dispersion step) now and leave its check to the
        next sweep (:class:`_Proposal`); call :meth:`check_proposal` or the final pass then."""
        p = self.params
        v_old, v_new, lam = self._gene_proposal(stats, frozen, LAGGED_MAX_CHANGE)
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
        self.proposal = _Proposal(v_old, zeta_old, f_old, stats.ll.clone(), lam, center)

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
        v = prop.v_old.clone()
        at = self._gene_slices()
        for name in ("alpha_mu", "alpha_pi") if self.zi else ("alpha_mu",):
            c = at[name]
            v[:, c] = self._inverse_rotate(T, v[:, c].T).T
        if self.bl:  # each batch's offsets, K columns apiece
            c = at["delta_mu"]
            blocks = v[:, c].T.reshape(self.B, self.K, self.J)
            v[:, c] = self._inverse_rotate(T, blocks).reshape(-1, self.J).T
        keep = torch.isfinite(prop.f_old)
        with self._genes_restored():
            self._set_gene_vec(v)
            self.params.zeta = prop.zeta_old
            f_old = self._gene_objective(prop.ll_old, prop.center)
        prop.v_old = v
        prop.f_old = torch.where(keep, f_old, prop.f_old)

    # ------------------------------------------------------------------ orthogonalization
    def orthogonalize(self) -> Tensor | None:
        """zinbwave's orthogonalizeTraceNorm on (W, [alpha_mu, alpha_pi]); keeps W alpha.

        Returns the K x K matrix T applied to W (``None`` for K = 0)."""
        if self.K == 0 or not self.rebalance:
            return None
        p = self.params
        gram = p.W.T @ p.W
        self.comm.all_reduce_(gram)
        alpha = torch.cat([p.alpha_mu, p.alpha_pi], 1) if self.zi else p.alpha_mu
        if self.bl:
            return self._orthogonalize_batches(gram, alpha)
        T, alpha_new = orthogonalization_transform(gram, alpha, self.pen.W, self.pen.alpha)
        p.W = p.W @ T
        p.alpha_mu = alpha_new[:, : self.J].contiguous()
        if self.zi:
            p.alpha_pi = alpha_new[:, self.J :].contiguous()
        return T

    def _orthogonalize_batches(self, gram: Tensor, alpha: Tensor) -> Tensor:
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
            p.alpha_pi = new[:, J:m].contiguous()
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

    # ------------------------------------------------------------------ objective
    def penalty_value(self) -> float:
        """zinbwave's penalty; the per-cell part is summed over all ranks."""
        p = self.params
        genes = float(self.pen.gene_values(p).sum() + self.pen.zeta_value(p.zeta))
        return genes + self.comm.sum(float(self.pen.cell_values(p).sum()))

    def penalized(self, loglik: float) -> float:
        return loglik - self.penalty_value()

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

    def _zeta_moved(self, before: Tensor, objective: float) -> None:
        """Count the dispersion as quiet after a sweep in which it did not move (e.g. a common
        dispersion at its bound, theta -> infinity) or in which its step was predicted to gain
        less than :data:`ZETA_QUIET_GAIN` of the change the stopping rule counts as progress
        (``tol * |objective|``); after two quiet sweeps in a row it pauses, for
        :data:`ZETA_PAUSE` sweeps the first time and twice as long after each pause that ends
        quiet again (at most :data:`ZETA_PAUSE_MAX`)."""
        change = float((self.params.zeta - before).abs().max())
        tol = self.opt.tol
        small = tol > 0 and self.zeta_gain <= ZETA_QUIET_GAIN * tol * abs(objective)
        if change < 1e-6 or small:
            self.zeta_quiet += 1
        else:
            self.zeta_quiet, self.zeta_pause = 0, ZETA_PAUSE
        if self.zeta_quiet >= 2:
            self.zeta_quiet, self.zeta_skip = 0, self.zeta_pause
            self.zeta_pause = min(2 * self.zeta_pause, ZETA_PAUSE_MAX)

    #: the dispersion-pause counters (checkpointed; handed from a sketch fit to the full fit)
    ZETA_STATE = ("zeta_quiet", "zeta_skip", "zeta_pause")

    def dispersion_state(self) -> dict[str, int]:
        """The dispersion-pause counters (see :meth:`_zeta_moved`)."""
        return {k: int(getattr(self, k)) for k in self.ZETA_STATE}

    def set_dispersion_state(self, state: dict) -> None:
        for k in self.ZETA_STATE:
            if k in state:
                setattr(self, k, int(state[k]))

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
        T = self.orthogonalize()
        self._rotate_proposal(T)
        if self.trajectory is not None:
            self.trajectory.record(self.params, T, local_steps)
        if self.proposal is None:  # checked: the state after the gene step
            ll = float(ll_genes.sum())
            obj = ll - self.penalty_value()
        return ll, obj

    def _record(self, history: list[dict], rec: dict) -> None:
        history.append(rec)
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
        own = [h for h in history if h["phase"] != "sketch"]
        prev = own[-1]["objective"] if own else None
        extend = bool(history) and not own
        # resumed from the checkpoint of a fit's last sweep: it has converged already
        converged = (
            len(own) >= 2
            and own[-1]["phase"] == "full"
            and _stalled(own[-2]["objective"], own[-1]["objective"], opt.tol)
        )
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
            if prev is not None and _stalled(prev, obj, opt.tol):
                converged = True
                break
            prev = obj
        ll = self.loglik()
        return FitResult(ll, self.penalty_value(), history, converged, epoch)

    def loglik(self) -> float:
        """Log-likelihood at the current parameters (one pass); a pending gene step
        (:class:`_Proposal`) is checked in the same pass first."""
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
        done = sum(1 for h in history if h["phase"] == "stochastic")
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
        prev = None
        for _ in range(max_iter):
            stats = self._new_stats()
            for start, stop, counts in self.source.iter_blocks(bounds):
                a, b = linear_predictors(self.design, self.params, slice(start, stop), self.zi)
                dz = self._derivs(a, b, counts, order=0, dispersion=True)
                stats.ll += dz.ll.sum(0)
                stats.gz += dz.lz.sum(0)
                stats.hz += dz.lzz.sum(0)
            for t in (stats.ll, stats.gz, stats.hz):
                t.mul_(scale)
            self.comm.all_reduce_(stats.ll, stats.gz, stats.hz)
            cur = float(stats.ll.sum()) - float(self.pen.zeta_value(self.params.zeta))
            if prev is not None and abs(cur - prev) <= tol * abs(prev):
                break
            prev = cur
            zeta_old = self.params.zeta.clone()
            zeta_new = self._zeta_step(stats)
            center = zeta_old.mean()
            (ll_new,) = self._eval_ll([zeta_new], bounds)
            ll_new.mul_(scale)
            if self.common:
                acc = torch.full_like(zeta_old, float(ll_new.sum()) >= float(stats.ll.sum()))
                acc = acc.bool()
            else:
                f_old = stats.ll - self._zeta_surrogate(zeta_old, center)
                acc = ll_new - self._zeta_surrogate(zeta_new, center) >= f_old
            self.params.zeta = torch.where(acc, zeta_new, zeta_old)
            moved = zeta_new != zeta_old
            self._adapt_zeta_cap(moved, acc)
            if not bool(moved.any()):
                break

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
        if not history:
            self.optimize_dispersion()
        solver = opt.solver
        if solver == "sketch":  # the sketch (zinbgrad.optim.sketch) has been fitted already
            done = sum(1 for h in history if h["phase"] != "sketch")
            return self.fit_full(history, start_epoch=done, path=path)
        if solver == "auto":
            solver = "full" if self.comm.sum(self.n) <= 20000 else "stochastic"
        if solver == "stochastic":
            bs = opt.batch_size or max(256, min(self.n // 8, 8192))
            todo = min(opt.stochastic_epochs, opt.max_epochs)
            todo -= sum(1 for h in history if h["phase"] == "stochastic")
            if todo > 0 and not any(h["phase"] == "full" for h in history):
                self.fit_stochastic(history, bs, todo)
        elif solver != "full":
            raise ValueError(f"unknown solver {solver!r}; use 'auto', 'full' or 'stochastic'")
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
            d, _, _ = self.cell_newton(rows, counts, max_steps, feats, tol=tol, derivs=False)
            ll_cells[rows] = d.ll.sum(1)
        return ll_cells
