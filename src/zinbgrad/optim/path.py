"""The fit path: the gene parameters a fit passed through, sweep by sweep (:class:`FitPath`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..model.params import Params

__all__ = ["FitPath"]


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
