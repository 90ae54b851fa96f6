"""Batched damped Newton (Levenberg-Marquardt) solves for many small independent problems.

ZINB-WaVE decomposes into many small problems: one per cell (its W_i and gamma_i, given the gene
parameters) and one per gene (its beta_j, alpha_j, given the cell parameters). Their Hessians
are assembled for all problems at once and solved with a batched Cholesky factorization. The
ZINB log-likelihood is not concave, so each problem carries its own Levenberg-Marquardt damping
``lam``: raised until the damped matrix is positive definite and after a rejected step, lowered
after an accepted one.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SymmetricPacking", "damped_newton_step", "outer_flat", "update_damping"]

LAM_MIN = 1e-9
LAM_MAX = 1e8


def outer_flat(F: Tensor, G: Tensor | None = None) -> Tensor:
    """Row-wise outer products ``F[r] G[r]^T`` flattened: (R, p) x (R, q) -> (R, p*q)."""
    G = F if G is None else G
    return (F[:, :, None] * G[:, None, :]).reshape(F.shape[0], -1)


class SymmetricPacking:
    """Symmetric ``p x p`` matrices stored by their upper triangle, one row per matrix.

    The Hessians of the cell and gene problems are sums over entries of weights times outer
    products, ``H = sum_j w_j F_j F_j^T``: one matrix product ``w @ outer(F)`` for a whole block.
    Contracting with the ``p (p + 1) / 2`` packed outer products instead of all ``p^2`` halves
    the work of those products (the largest matrix products of a sweep). The packed width is
    rounded up to a multiple of 16 with zero columns, the shapes the CPU matrix kernels run at
    full speed (78 columns ran 30 % slower than 80 on AVX-512).
    """

    def __init__(self, p: int, device: torch.device | str | None = None) -> None:
        rows, cols = torch.triu_indices(p, p, device=device)
        m = rows.numel()
        self.p, self.rows, self.cols, self.m = p, rows, cols, m
        self.width = -(-m // 16) * 16
        pos = torch.arange(m, device=device)
        full = torch.empty(p, p, dtype=torch.long, device=device)
        full[rows, cols] = pos
        full[cols, rows] = pos
        self._unpack = full.reshape(-1)

    def outer(self, F: Tensor, G: Tensor | None = None) -> Tensor:
        """Packed ``F[r] F[r]^T`` (or the symmetric ``F[r] G[r]^T + G[r] F[r]^T``): (R, width)."""
        out = F.new_zeros(F.shape[0], self.width)
        if G is None:
            out[:, : self.m] = F[:, self.rows] * F[:, self.cols]
        else:
            out[:, : self.m] = F[:, self.rows] * G[:, self.cols] + G[:, self.rows] * F[:, self.cols]
        return out

    def unpack(self, H: Tensor) -> Tensor:
        """(..., width) packed matrices -> (..., p, p)."""
        return H[..., self._unpack].view(*H.shape[:-1], self.p, self.p)


def damped_newton_step(
    A: Tensor, g: Tensor, lam: Tensor, max_step: float = 10.0
) -> tuple[Tensor, Tensor]:
    """Solve ``(A + lam * D) x = g`` for a batch of problems.

    Parameters
    ----------
    A
        (B, p, p) negative Hessians of the objective to maximize (symmetric, maybe indefinite).
    g
        (B, p) gradients.
    lam
        (B,) current damping; raised per problem until the Cholesky factorization succeeds.
    max_step
        The step of a problem is scaled down so that its largest entry is at most this.

    Returns
    -------
    (x, lam)
        Steps (B, p) and the damping actually used.
    """
    B, p, _ = A.shape
    diag = A.diagonal(dim1=1, dim2=2)
    scale = diag.abs().mean(1, keepdim=True).clamp(min=1e-12)
    D = diag.abs() + 1e-6 * scale
    x = torch.zeros_like(g)
    done = torch.zeros(B, dtype=torch.bool, device=A.device)
    lam = lam.clone()
    for _ in range(16):
        todo = ~done
        idx = todo.nonzero().squeeze(1)
        M = A[idx] + torch.diag_embed(lam[idx, None] * D[idx])
        L, info = torch.linalg.cholesky_ex(M)
        ok = info == 0
        if ok.any():
            sol = torch.cholesky_solve(g[idx[ok]].unsqueeze(-1), L[ok]).squeeze(-1)
            good = torch.isfinite(sol).all(1)
            sel = idx[ok][good]
            x[sel] = sol[good]
            done[sel] = True
        if bool(done.all()):
            break
        lam = torch.where(done, lam, torch.clamp(lam * 10.0, min=1e-4, max=LAM_MAX))
    if not bool(done.all()):  # fall back to a small scaled gradient step
        rest = ~done
        x[rest] = g[rest] / (D[rest] * (1.0 + lam[rest, None]))
    big = x.abs().amax(1, keepdim=True)
    x = x * torch.clamp(max_step / big.clamp(min=1e-300), max=1.0)
    return x, lam


def update_damping(lam: Tensor, accepted: Tensor) -> Tensor:
    """Lower the damping of accepted problems, raise it for rejected ones."""
    return torch.where(
        accepted,
        torch.clamp(lam / 3.0, min=LAM_MIN),
        torch.clamp(torch.maximum(lam * 4.0, torch.full_like(lam, 1e-3)), max=LAM_MAX),
    )
