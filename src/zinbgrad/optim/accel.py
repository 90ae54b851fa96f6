"""Anderson acceleration of the gene parameters across sweeps.

The alternating cell/gene sweeps converge linearly along the coupling of W and alpha: each
sweep's gene step is mostly a fraction of the previous one along a few slow directions. Anderson
acceleration (type II, Walker & Ni 2011) treats a sweep as a fixed-point map of the gene
vectors, ``x -> x + f(x)`` with ``f`` the gene Newton step (at the cells the sweep fitted to
``x``), and proposes the point that mixes the last ``m`` steps so that their residuals cancel
best in the least-squares sense. The cells follow the genes in the next sweep.

The proposal is taken only as a lagged gene step (:class:`~zinbgrad.optim.state.Proposal`): it
is checked per gene, in the next sweep's first evaluation, against the gene's penalized
objective before the step at the same cells. A gene whose accelerated step fails goes back, as
with any failed step, and is left out of the mixing until its history is clean again; the exact
penalized objective stays monotone.

The history lives in the basis of the current W: after an orthogonalization ``W <- W T``, the
loadings columns of every stored vector are expressed in the new basis (see
:meth:`AndersonGenes.transform`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import Tensor

__all__ = ["AndersonGenes", "ANDERSON_DEPTH", "ANDERSON_MAX_RATIO"]

#: number of past steps mixed
ANDERSON_DEPTH = 3
#: an accelerated step longer than this multiple of the plain step is not taken (plain instead)
ANDERSON_MAX_RATIO = 20.0


class AndersonGenes:
    """The history of the gene vectors ``x`` (J x q) and their Newton steps ``f``.

    ``clean[j]``: how many of the stored entries gene ``j`` took its plain or accelerated step
    from without a rejection in between; only genes with a full clean history enter the
    least-squares fit and take the accelerated step.
    """

    def __init__(self, depth: int = ANDERSON_DEPTH, max_ratio: float = ANDERSON_MAX_RATIO):
        self.depth, self.max_ratio = depth, max_ratio
        self.xs: list[Tensor] = []
        self.fs: list[Tensor] = []
        self.clean: Tensor | None = None
        self.accelerated = 0  #: sweeps whose step was accelerated (a diagnostic)

    def reset(self) -> None:
        self.xs, self.fs, self.clean = [], [], None

    def transform(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply ``fn`` (a linear change of basis of gene vectors) to the stored history."""
        self.xs = [fn(x) for x in self.xs]
        self.fs = [fn(f) for f in self.fs]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The history as numpy arrays (``x``, ``f``: entries x J x q; ``clean``; for a
        checkpoint)."""
        if self.clean is None:
            return {}
        return {
            "x": torch.stack(self.xs).cpu().numpy(),
            "f": torch.stack(self.fs).cpu().numpy(),
            "clean": self.clean.cpu().numpy(),
        }

    def load_arrays(self, arrays: Mapping[str, np.ndarray], ref: Tensor) -> None:
        """Restore :meth:`to_arrays` (an empty mapping: no history), in the dtype and on the
        device of ``ref``."""
        self.reset()
        if "clean" not in arrays:
            return
        kw = {"dtype": ref.dtype, "device": ref.device}
        self.xs = list(torch.as_tensor(np.asarray(arrays["x"]), **kw).unbind(0))
        self.fs = list(torch.as_tensor(np.asarray(arrays["f"]), **kw).unbind(0))
        self.clean = torch.as_tensor(np.asarray(arrays["clean"]), device=ref.device)

    def rejected(self, genes: Tensor) -> None:
        """The last step of ``genes`` (bool, J) was undone: their history starts again."""
        if self.clean is not None:
            self.clean = torch.where(genes, torch.zeros_like(self.clean), self.clean)

    def step(self, x: Tensor, f: Tensor, active: Tensor | None = None) -> Tensor:
        """The accelerated step from ``x`` given its plain step ``f`` (both J x q); genes not
        ``active`` (bool, J) take ``f`` and restart their history."""
        J = x.shape[0]
        if self.clean is None or self.clean.shape[0] != J:
            self.reset()
            self.clean = torch.zeros(J, dtype=torch.long, device=x.device)
        self.xs.append(x.clone())
        self.fs.append(f.clone())
        if len(self.xs) > self.depth + 1:
            self.xs.pop(0)
            self.fs.pop(0)
        self.clean = torch.clamp(self.clean + 1, max=self.depth + 1)
        if active is not None:
            self.clean = torch.where(active, self.clean, torch.ones_like(self.clean))
        k = len(self.xs) - 1
        if k < 1:
            return f
        use = self.clean >= len(self.xs)
        if int(use.sum()) < 1:
            return f
        dX = torch.stack([self.xs[i + 1] - self.xs[i] for i in range(k)], -1)[use]
        dF = torch.stack([self.fs[i + 1] - self.fs[i] for i in range(k)], -1)[use]
        fu = f[use]
        A = dF.reshape(-1, k).double()
        b = fu.reshape(-1).double()
        G = A.T @ A
        reg = 1e-10 * float(torch.diagonal(G).max().clamp(min=1e-300))
        G = G + reg * torch.eye(k, dtype=G.dtype, device=G.device)
        try:
            gamma = torch.linalg.solve(G, A.T @ b)
        except RuntimeError:
            return f
        if not bool(torch.isfinite(gamma).all()):
            return f
        corr = ((dX + dF).double() @ gamma).to(f.dtype)
        new = fu - corr
        if float(new.norm()) > self.max_ratio * float(fu.norm()):
            return f
        out = f.clone()
        out[use] = new
        self.accelerated += 1
        return out
