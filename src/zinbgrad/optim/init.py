"""Deterministic, data-driven initialization, following zinbwave's ``zinbInitialize``.

1. Non-zero counts are modelled as log-Gaussian: ``L = log(y) - O_mu`` on the positive entries
   only; ridge regressions of L on X (per gene) and on V (per cell), alternated
   ``nb_repeat`` times.
2. The residual (missing at the zeros) is completed by soft-thresholded SVD (softImpute,
   ``lambda = sqrt(eps_W * eps_alpha)``, rank K, its truncated SVDs by subspace iteration from a
   fixed start, warm-started across the softImpute steps) on all cells, or on a fixed
   subsample of them where they exceed ``max_init_entries``; ``W`` and ``alpha_mu`` are its
   balanced factors. Cells outside the subsample get the ridge projection
   of their residual on ``alpha_mu``.
3. Zeros are modelled as dropouts: logistic ridge regressions of ``1[y = 0]`` on ``[X_pi, W]``
   (per gene) and on V_pi (per cell), alternated ``nb_repeat`` times.
4. ``zeta = 0`` (theta = 1), as zinbwave; the engine then optimizes the dispersion first.

Everything works on the nonzero entries or on bounded blocks / a bounded subsample of cells:
the count matrix is never densified.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from ..model.params import Design, Params, Penalty
from .newton import outer_flat
from .state import Problem

__all__ = ["initialize", "init_local_mean", "init_local_zi", "subspace_svd"]


def _coo(rows_csr: sp.csr_matrix, kw: dict) -> tuple[Tensor, Tensor, Tensor]:
    coo = rows_csr.tocoo()
    dev = kw["device"]
    r = torch.as_tensor(coo.row.astype(np.int64), device=dev)
    c = torch.as_tensor(coo.col.astype(np.int64), device=dev)
    v = torch.as_tensor(np.asarray(coo.data, dtype=np.float64), **kw)
    keep = v > 0
    return r[keep], c[keep], v[keep]


def _batched_ridge(gram: Tensor, rhs: Tensor, reg: Tensor) -> Tensor:
    """Solve (G_b + diag(reg)) x_b = r_b for a batch; gram (B, p*p), rhs (B, p)."""
    p = rhs.shape[1]
    G = gram.view(-1, p, p) + torch.diag(reg)
    G = G + torch.eye(p, dtype=G.dtype, device=G.device) * 1e-8 * (1 + G.diagonal(0, 1, 2).abs())[
        :, :, None
    ].mean(1, keepdim=True)
    return torch.linalg.solve(G, rhs.unsqueeze(-1)).squeeze(-1)


def _ridge_on_positives(
    group: Tensor, other: Tensor, F: Tensor, resid: Tensor, n_groups: int, reg: Tensor
) -> Tensor:
    """Per-group least squares of ``resid`` on the rows ``F[other]`` of the positive entries."""
    p = F.shape[1]
    kw = {"dtype": F.dtype, "device": F.device}
    Fo = F[other]
    gram = torch.zeros(n_groups, p * p, **kw).index_add_(0, group, outer_flat(Fo))
    rhs = torch.zeros(n_groups, p, **kw).index_add_(0, group, Fo * resid[:, None])
    return _batched_ridge(gram, rhs, reg)


def _logistic_newton(
    G: Tensor, Z: Tensor, offset: Tensor, coef: Tensor, reg: Tensor, iters: int = 8
) -> Tensor:
    """Ridge logistic regressions of every column of Z (n x J) on G (n x q), batched over J."""
    q = G.shape[1]
    GG = outer_flat(G)
    for _ in range(iters):
        eta = offset + G @ coef
        prob = torch.sigmoid(eta)
        g = (G.T @ (Z - prob)).T - reg * coef.T  # J x q
        H = ((prob * (1 - prob)).T @ GG).view(-1, q, q) + torch.diag(reg)
        step = torch.linalg.solve(H, g.unsqueeze(-1)).squeeze(-1)
        step = step * torch.clamp(5.0 / step.abs().amax(1, keepdim=True).clamp(min=1e-12), max=1)
        coef = coef + step.T
        if float(step.abs().max()) < 1e-6:
            break
    return coef


#: seed of the fixed Gaussian start of the first subspace iteration of the softImpute: the
#: initialization does not depend on a fit's ``random_state``
_START_SEED = 0x5EED

#: subspace iterations per softImpute step. Converging each step's SVD to 1e-7 hit the cap of
#: 50 iterations on a flat spectrum and made the Zeisel init 3.2 of a 4.7 s fit; 4 warm-started
#: iterations per step (the old randomized SVD's power-iteration count) cost about what the old
#: init cost, stay deterministic, and end at the same objective (Zeisel K=10: -1,658,036 vs
#: -1,658,013; PBMC 8k: -706,016 vs -706,653, 2026-12-05)
_SUBSPACE_STEPS = 4


def subspace_svd(
    A: Tensor, V: Tensor, K: int, floor: float = 0.0, tol: float = 1e-7, max_iter: int = 50
) -> tuple[Tensor, Tensor, Tensor]:
    """Top singular triplets of ``A`` by block subspace iteration from the ``q`` columns of
    ``V`` (J x q, q >= K), run until the span of the top ``K`` right singular vectors whose
    singular value exceeds ``floor`` (the others are thresholded away by the caller) moves by
    less than ``tol`` (sine of the largest principal angle) in one iteration.

    Each iteration is a Rayleigh-Ritz step on the range of ``A V`` (Halko, Martinsson & Tropp
    2011, Alg. 4.4, with the previous iterate as the test matrix); the ``q - K`` extra
    vectors make the top ``K`` converge at the rate ``sigma_{q+1} / sigma_K``. Started from
    the previous softImpute iterate, a few iterations suffice (:func:`_soft_impute` takes
    ``_SUBSPACE_STEPS``, capped by ``max_iter``). Converged, the result is the exact
    truncated SVD up to ``tol`` whatever the start: deterministic, and independent of any seed.
    Returns ``(U, S, Vh)`` of all ``q`` directions (the top ``K`` first)."""
    Vk = None
    for _ in range(max_iter):
        Q = torch.linalg.qr(A @ V).Q
        Ub, S, Vh = torch.linalg.svd(Q.T @ A, full_matrices=False)
        V = Vh.T
        new = V[:, : int((S[:K] > floor).sum())]
        if Vk is not None and Vk.shape[1] == new.shape[1]:
            moved = new - Vk @ (Vk.T @ new)
            if float(torch.linalg.matrix_norm(moved, ord=2)) <= tol:
                break
        Vk = new
    return Q @ Ub, S, Vh


def _soft_impute(
    D: Tensor, mask: Tensor, K: int, lam: float, iters: int = 30, tol: float = 1e-4
) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-K soft-thresholded SVD completion of D observed where ``mask``.

    Deterministic: the first truncated SVD starts from a fixed Gaussian matrix, every later one
    from the previous right singular vectors (:func:`subspace_svd`, at most
    ``_SUBSPACE_STEPS`` iterations per softImpute step: warm-started, the subspace keeps
    converging across the steps); small matrices take the exact SVD. The signs are fixed by the
    caller (:func:`_factors`)."""
    Zlow = torch.zeros_like(D)
    U = S = Vh = None
    q = min(K + 8, min(D.shape))
    exact = min(D.shape) <= 3 * K + 20
    if not exact:
        gen = torch.Generator().manual_seed(_START_SEED)
        V = torch.linalg.qr(torch.randn(D.shape[1], q, generator=gen, dtype=D.dtype)).Q
        V = V.to(D.device)
    for _ in range(iters):
        filled = torch.where(mask, D, Zlow)
        if exact:
            U, S, Vh = torch.linalg.svd(filled, full_matrices=False)
        else:
            U, S, Vh = subspace_svd(filled, V, K, floor=lam, max_iter=_SUBSPACE_STEPS)
            V = Vh.T
        U, S, Vh = U[:, :K], S[:K], Vh[:K]
        S = torch.clamp(S - lam, min=0.0)
        new = (U * S) @ Vh
        delta = float((new - Zlow).pow(2).sum() / Zlow.pow(2).sum().clamp(min=1e-300))
        Zlow = new
        if delta < tol:
            break
    return U, S, Vh


def cell_runs(rng: np.random.Generator, n_runs: int, count: int, run: int) -> np.ndarray:
    """Sorted indices of ``count`` of the ``n_runs`` runs of ``run`` consecutive cells, drawn
    at random without replacement: a subsample read from disk in few, large pieces."""
    pick = np.sort(rng.choice(n_runs, size=count, replace=False))
    return (pick[:, None] * run + np.arange(run)[None, :]).ravel()


def _subsample(n: int, n0: int) -> np.ndarray:
    """The cells the gene parameters are initialized from: all ``n`` if ``n0 >= n``, else
    about ``n0`` in runs of 32 consecutive cells at places drawn from a fixed seed (few,
    larger reads; the same cells for every ``random_state``)."""
    if n0 >= n:
        return np.arange(n)
    run = 32
    n_runs = -(-n // run)
    idx = cell_runs(np.random.default_rng(_START_SEED), n_runs, min(n_runs, -(-n0 // run)), run)
    return idx[idx < n]


def _positives(rows_csr: sp.csr_matrix, offset: Tensor | None, kw: dict):
    """Rows, columns and ``log y`` (minus the offset O_mu) of the positive entries."""
    r, c, y = _coo(rows_csr, kw)
    logy = torch.log(y)
    if offset is not None:
        logy = logy - (offset[r, c] if offset.shape[1] > 1 else offset[r, 0])
    return r, c, logy


def _mean_regressions(r, c, L, Xs, Vmu, penalty, n0, J, nb_repeat, kw):
    """Step 1: log-Gaussian ridge regressions of ``L`` on X (per gene) and V (per cell),
    alternated ``nb_repeat`` times; returns ``(beta_mu, gamma_mu)`` of the subsample."""
    beta_mu = torch.zeros(Xs.shape[1], J, **kw)
    gamma_s = torch.zeros(Vmu.shape[1], n0, **kw)
    for _ in range(nb_repeat):
        if Vmu.shape[1] > 0:
            xb = (Xs[r] * beta_mu.T[c]).sum(1)
            gamma_s = _ridge_on_positives(r, c, Vmu, L - xb, n0, penalty.gamma_mu).T
        if Xs.shape[1] > 0:
            vg = (Vmu[c] * gamma_s.T[r]).sum(1)
            beta_mu = _ridge_on_positives(c, r, Xs, L - vg, J, penalty.beta_mu).T
    return beta_mu, gamma_s


def _factors(r, c, resid, penalty, K, n0, n, J, kw) -> tuple[Tensor, Tensor]:
    """Step 2: ``(W, alpha_mu)`` of the subsample, the balanced factors of the softImpute of
    the residual ``resid`` at the positive entries (missing at the zeros)."""
    D = torch.zeros(n0, J, **kw)
    mask = torch.zeros(n0, J, dtype=torch.bool, device=kw["device"])
    D[r, c] = resid
    mask[r, c] = True
    lam = (penalty.W * penalty.alpha) ** 0.5 * (n0 / n) ** 0.5
    U, S, Vh = _soft_impute(D, mask, K, lam)
    del D, mask
    ok = penalty.W > 0 and penalty.alpha > 0
    c4 = (penalty.alpha / penalty.W) ** 0.25 if ok else 1.0
    sgn = torch.sign(Vh.gather(1, Vh.abs().argmax(1, keepdim=True))).squeeze(1)
    sgn = torch.where(sgn == 0, torch.ones_like(sgn), sgn)
    return c4 * U * S.sqrt() * sgn, (S.sqrt() * sgn / c4)[:, None] * Vh


def _zero_inflation(r, c, XW, Vpi, Opi_s, penalty, K, n0, J, nb_repeat, kw):
    """Step 3: logistic ridge regressions of ``1[y = 0]`` on ``[X_pi, W]`` (per gene) and
    V_pi (per cell) on the subsample, alternated; returns the genes' coefficients and the
    subsample's gamma_pi."""
    Zs = torch.ones(n0, J, **kw)
    Zs[r, c] = 0.0
    coef = torch.zeros(XW.shape[1], J, **kw)
    reg_gene = torch.cat([penalty.beta_pi, torch.full((K,), penalty.alpha_zi, **kw)])
    gpi_s = torch.zeros(Vpi.shape[1], n0, **kw)
    for _ in range(nb_repeat):
        off_c = XW @ coef + (0 if Opi_s is None else Opi_s)
        if Vpi.shape[1] > 0:
            gpi_s = _logistic_newton(Vpi, Zs.T, off_c.T, gpi_s, penalty.gamma_pi)
        off_g = (Vpi @ gpi_s).T + (0 if Opi_s is None else Opi_s)
        coef = _logistic_newton(XW, Zs, off_g, coef, reg_gene)
    return coef, gpi_s


def initialize(
    problem: Problem,
    *,
    max_init_entries: int = 4_000_000,
    nb_repeat: int = 2,
    block_rows: int = 8192,
    shard: tuple[int, int] | None = None,
    shard_source=None,
) -> Params:
    """Initial parameters for a fit (deterministic: no seed enters); with a penalty on
    batch-specific loading offsets (``penalty.delta``), those offsets start at zero.

    ``problem`` describes all cells. With ``shard=(start, stop)`` (data-parallel fits) only the
    local parameters of those cells are returned (``shard_source`` reads them); the gene
    parameters are the same as in a single-process fit.
    """
    source, design, penalty, K = problem.source, problem.design, problem.penalty, problem.K
    zero_inflation = problem.zero_inflation
    n, J = design.n, design.J
    dt, dev = design.X_mu.dtype, design.X_mu.device
    kw = {"dtype": dt, "device": dev}
    idx = _subsample(n, int(min(n, max(4 * K + 10, max_init_entries // max(J, 1)))))
    n0, idx_t = idx.size, torch.as_tensor(idx, device=dev)
    sub = source.rows_subset(idx)
    Xs, Vmu = design.X_mu[idx_t], design.V_mu
    Os = design.O_mu[idx_t] if design.O_mu is not None else None
    Opi_s = design.O_pi[idx_t] if design.O_pi is not None else None
    r, c, L = _positives(sub, Os, kw)
    beta_mu, gamma_s = _mean_regressions(r, c, L, Xs, Vmu, penalty, n0, J, nb_repeat, kw)
    alpha_mu = torch.zeros(K, J, **kw)
    W_sub = torch.zeros(n0, K, **kw)
    if K > 0:
        resid = L - (Xs[r] * beta_mu.T[c]).sum(1) - (Vmu[c] * gamma_s.T[r]).sum(1)
        W_sub, alpha_mu = _factors(r, c, resid, penalty, K, n0, n, J, kw)
    if n0 < n:  # subsample cells like all others: ridge projection on alpha_mu
        sub_design = Design(Xs, design.X_pi[idx_t], Vmu, design.V_pi, Os, Opi_s)
        W_sub, gamma_s = init_local_mean(
            _CSRSource(sub), sub_design, penalty, beta_mu, alpha_mu, block_rows
        )
    beta_pi = torch.zeros(design.X_pi.shape[1], J, **kw)
    alpha_pi = torch.zeros(K, J, **kw)
    gamma_pi = torch.zeros(design.V_pi.shape[1], n, **kw)
    gpi_s = None
    if zero_inflation:
        XW = torch.cat([design.X_pi[idx_t], W_sub], 1)
        coef, gpi_s = _zero_inflation(
            r, c, XW, design.V_pi, Opi_s, penalty, K, n0, J, nb_repeat, kw
        )
        beta_pi = coef[: design.X_pi.shape[1]].contiguous()
        alpha_pi = coef[design.X_pi.shape[1] :].contiguous()
    lo, hi = shard if shard is not None else (0, n)
    if n0 == n:
        W_loc, gmu_loc = W_sub[lo:hi], gamma_s[:, lo:hi]
        gpi_loc = gpi_s[:, lo:hi] if zero_inflation else gamma_pi[:, lo:hi]
    else:
        src = shard_source if shard_source is not None else source
        des = design.rows(lo, hi)
        W_loc, gmu_loc = init_local_mean(src, des, penalty, beta_mu, alpha_mu, block_rows)
        gpi_loc = gamma_pi[:, lo:hi]
        if zero_inflation:
            gpi_loc = init_local_zi(src, des, penalty, beta_pi, alpha_pi, W_loc, block_rows)
    return Params(
        beta_mu=beta_mu,
        beta_pi=beta_pi,
        alpha_mu=alpha_mu,
        alpha_pi=alpha_pi,
        # zinbwave's zeta = 0; per batch and gene with a dispersion per batch
        zeta=torch.zeros((design.n_batches, J) if penalty.zeta_batch else (J,), **kw),
        W=W_loc.contiguous(),
        gamma_mu=gmu_loc.contiguous(),
        gamma_pi=gpi_loc.contiguous(),
        # batch-specific loading offsets start at zero: the shared loadings' initialization
        delta_mu=(
            None if penalty.delta is None else torch.zeros(max(design.n_batches, 0) * K, J, **kw)
        ),
    )


class _CSRSource:
    """Minimal in-memory source over a CSR matrix (the initialization subsample)."""

    def __init__(self, X: sp.csr_matrix) -> None:
        self.X = X

    def rows_csr(self, start: int, stop: int) -> sp.csr_matrix:
        return self.X[start:stop]


def init_local_mean(
    source, design: Design, penalty: Penalty, beta_mu: Tensor, alpha_mu: Tensor, block_rows: int
) -> tuple[Tensor, Tensor]:
    """W and gamma_mu of every cell given the gene parameters: ridge regressions of
    ``log y`` on the positive entries of each cell (streamed over blocks of cells)."""
    n = design.n
    K = alpha_mu.shape[0]
    kw = {"dtype": beta_mu.dtype, "device": beta_mu.device}
    Xmu, Vmu = design.X_mu, design.V_mu
    W = torch.zeros(n, K, **kw)
    gamma_mu = torch.zeros(Vmu.shape[1], n, **kw)
    regW = torch.full((K,), penalty.W, **kw)
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        rb, cb, y = _coo(source.rows_csr(start, stop), kw)
        Lb = torch.log(y)
        if design.O_mu is not None:
            Ob = design.O_mu[start:stop]
            Lb = Lb - (Ob[rb, cb] if Ob.shape[1] > 1 else Ob[rb, 0])
        nb = stop - start
        res = Lb - (Xmu[start:stop][rb] * beta_mu.T[cb]).sum(1)
        if Vmu.shape[1] > 0:
            g = _ridge_on_positives(rb, cb, Vmu, res, nb, penalty.gamma_mu).T
            gamma_mu[:, start:stop] = g
            res = res - (Vmu[cb] * g.T[rb]).sum(1)
        if K > 0:
            W[start:stop] = _ridge_on_positives(rb, cb, alpha_mu.T, res, nb, regW)
    return W, gamma_mu


def init_local_zi(
    source,
    design: Design,
    penalty: Penalty,
    beta_pi: Tensor,
    alpha_pi: Tensor,
    W: Tensor,
    block_rows: int,
) -> Tensor:
    """gamma_pi of every cell: logistic ridge regressions of ``1[y = 0]`` on V_pi."""
    n, J = design.n, design.J
    kw = {"dtype": beta_pi.dtype, "device": beta_pi.device}
    Vpi = design.V_pi
    gamma_pi = torch.zeros(Vpi.shape[1], n, **kw)
    if Vpi.shape[1] == 0:
        return gamma_pi
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        rb, cb, _ = _coo(source.rows_csr(start, stop), kw)
        Zb = torch.ones(stop - start, J, **kw)
        Zb[rb, cb] = 0.0
        off = design.X_pi[start:stop] @ beta_pi + W[start:stop] @ alpha_pi
        if design.O_pi is not None:
            off = off + design.O_pi[start:stop]
        gamma_pi[:, start:stop] = _logistic_newton(
            Vpi,
            Zb.T,
            off.T,
            torch.zeros(Vpi.shape[1], stop - start, **kw),
            penalty.gamma_pi,
            iters=4,
        )
    return gamma_pi
