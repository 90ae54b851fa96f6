"""The explicit data of a fit: the problem, the settings, and the optimizer's state.

- :class:`Problem`: what is fitted (the counts, the design, the penalty, ``K``, zero inflation,
  the dispersion's kind), fixed for a fit;
- :class:`FitOptions`: the solver's settings; :class:`FitResult`: what a solver returns;
- :class:`OptimizerState`: everything a fit changes as it runs (the parameters, the dampings,
  the dispersion's trust region and pause counters, the stochastic solver's averaged Hessians,
  the pending gene step, the fit path, the random generator, the epochs done per phase), with
  :meth:`OptimizerState.state_dict` / :meth:`OptimizerState.load_state_dict`: what a checkpoint
  (:mod:`zinbgrad.optim.checkpoint`) saves and restores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..model.params import Design, Params, Penalty
from .dispersion import ZETA_MAX, ZETA_MIN, ZETA_PAUSE, ZETA_STATE
from .path import FitPath

__all__ = [
    "FitOptions",
    "FitProgress",
    "FitResult",
    "OptimizerState",
    "Problem",
    "Proposal",
    "stalled",
]


@dataclass
class Problem:
    """What a fit solves: the counts of its cells (a source of blocks, see
    :mod:`zinbgrad.data.source`), their design, the penalty, the number of factors ``K``,
    whether the model has zero inflation and whether the dispersion is common to all genes."""

    source: Any
    design: Design
    penalty: Penalty
    K: int
    zero_inflation: bool = True
    common_dispersion: bool = True


@dataclass
class FitOptions:
    """Optimizer settings (see :class:`zinbgrad.ZINBWaVE` for their meaning)."""

    max_epochs: int = 100
    tol: float = 1e-4
    local_steps: int = 1
    #: check each gene step in the next sweep's first evaluation (which sees the same cells)
    #: instead of in a pass of its own; see :class:`Proposal`
    lagged_check: bool = True
    block_entries: int = 2**21
    batch_size: int | None = None
    solver: str = "auto"
    stochastic_epochs: int = 3
    #: epochs at most of the sketch's own fit (solver "sketch"; ``max_epochs`` counts the
    #: sweeps over all cells)
    sketch_max_epochs: int = 100
    #: evaluate the per-entry derivatives with fused kernels (None: the module's setting, see
    #: zinbgrad.model.likelihood.set_fused; "cached": only those of the machine's kernel cache)
    fused: bool | str | None = None
    zeta_bounds: tuple[float, float] = (ZETA_MIN, ZETA_MAX)
    progress: Callable[[dict], None] | None = None
    checkpoint_path: str | None = None
    checkpoint_every: int = 1
    #: what a checkpoint must match to be resumed (the data's fingerprint, the design's
    #: columns, the penalty), beyond the shapes; JSON-serializable
    checkpoint_tag: dict | None = None
    #: over-relaxation: the factor (in (0, 2); 1 = plain steps) on the cells' and genes'
    #: Newton steps in the sweeps whose gene step is checked in the next sweep (see
    #: Solvers._sweep and BENCHMARKS.md, "Fewer sweeps")
    relaxation: float = 1.0
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


def stalled(prev: float, obj: float, tol: float) -> bool:
    """The stopping rule: the objective changed by at most ``tol`` relative to ``prev``."""
    return abs(obj - prev) <= tol * abs(prev)


@dataclass
class FitProgress:
    """The epochs a fit has done, per phase (``"sketch"``, ``"stochastic"``, ``"extend"``,
    ``"full"``), the phase of its last epoch outside the sketch and the objectives of its last
    two such epochs: what decides which phase comes next and whether a resumed fit has
    converged already. Kept up to date by every recorded epoch (:meth:`add`); built from a
    history once (:meth:`from_history`) when a fit starts from one (a resumed checkpoint, or
    the sketch's records)."""

    epochs: dict[str, int] = field(default_factory=dict)
    #: the phase of the last epoch outside the sketch (None: none yet)
    last_phase: str | None = None
    #: objectives of the last two epochs outside the sketch, oldest first
    recent: list[float] = field(default_factory=list)

    @classmethod
    def from_history(cls, history: list[dict]) -> FitProgress:
        out = cls()
        for rec in history:
            out.add(rec)
        return out

    def add(self, rec: dict) -> None:
        """Count one recorded epoch (a history record: ``phase``, ``objective``)."""
        phase = rec["phase"]
        self.epochs[phase] = self.epochs.get(phase, 0) + 1
        if phase != "sketch":
            self.last_phase = phase
            self.recent = [*self.recent[-1:], rec["objective"]]

    def count(self, phase: str) -> int:
        """Epochs done in ``phase``."""
        return self.epochs.get(phase, 0)

    @property
    def total(self) -> int:
        return sum(self.epochs.values())

    @property
    def own(self) -> int:
        """Epochs outside the sketch (over all cells)."""
        return self.total - self.count("sketch")

    def converged(self, tol: float) -> bool:
        """The last two epochs over all cells were full sweeps that met the stopping rule
        (a fit resumed from the checkpoint of its last sweep)."""
        return (
            self.own >= 2
            and self.last_phase == "full"
            and stalled(self.recent[0], self.recent[1], tol)
        )


@dataclass
class Proposal:
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


#: the optimizer arrays a checkpoint saves as ``state_<name>``
STATE_ARRAYS = ("lam_cells", "lam_genes", "zeta_cap")


@dataclass
class OptimizerState:
    """Everything a fit changes as it runs; the solvers update it in place."""

    params: Params
    #: per-cell and per-gene damping of the Newton steps
    lam_cells: Tensor
    lam_genes: Tensor
    #: per-gene trust region of the dispersion steps
    zeta_cap: Tensor
    rng: np.random.Generator
    #: stochastic solver: averaged gene Hessians, their damping, the step count
    sto_H: Tensor | None = None
    sto_lam: Tensor | None = None
    sto_t: int = 0
    #: dispersion pauses (see DispersionSteps._zeta_moved); zeta_gain only matters in the
    #: sweep that set it (the predicted gain of the last dispersion step)
    zeta_quiet: int = 0
    zeta_skip: int = 0
    zeta_pause: int = ZETA_PAUSE
    zeta_gain: float = float("inf")
    #: when set, every sweep is recorded into it (the fit path, see FitPath)
    trajectory: FitPath | None = None
    #: the last gene step, when it awaits its check
    proposal: Proposal | None = None
    #: fraction of the genes whose last step was rejected
    gene_rejected: float = 1.0
    #: the epochs done per phase
    progress: FitProgress = field(default_factory=FitProgress)

    @classmethod
    def initial(cls, params: Params, n: int, J: int, seed: int = 0) -> OptimizerState:
        """The state a fit of ``n`` cells and ``J`` genes starts from at ``params`` (dampings
        1e-3, trust region 1, a generator seeded with ``seed``)."""
        ref = params.beta_mu
        kw = {"dtype": ref.dtype, "device": ref.device}
        return cls(
            params=params,
            lam_cells=torch.full((n,), 1e-3, **kw),
            lam_genes=torch.full((J,), 1e-3, **kw),
            # per gene, or per batch and gene for a dispersion per batch
            zeta_cap=torch.full((J,) if params.zeta.dim() < 2 else params.zeta.shape, 1.0, **kw),
            rng=np.random.default_rng(seed),
        )

    def dispersion_state(self) -> dict[str, int]:
        """The dispersion-pause counters."""
        return {k: int(getattr(self, k)) for k in ZETA_STATE}

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(arrays, meta)``: the state as numpy arrays (the parameters ``param_<name>``, the
        optimizer arrays ``state_<name>``, a pending gene step ``proposal_<field>``, the fit
        path ``path_<name>``) and JSON-serializable values (the random generator's state, the
        counters)."""
        arrays = {f"param_{k}": v for k, v in self.params.as_numpy().items()}
        for k in STATE_ARRAYS:
            arrays[f"state_{k}"] = getattr(self, k).detach().cpu().numpy()
        if self.sto_H is not None:
            arrays["state_sto_H"] = self.sto_H.detach().cpu().numpy()
            arrays["state_sto_lam"] = self.sto_lam.detach().cpu().numpy()
        if self.proposal is not None:  # a gene step awaiting its check
            for k in self.proposal.FIELDS:
                arrays[f"proposal_{k}"] = getattr(self.proposal, k).detach().cpu().numpy()
        if self.trajectory is not None:  # the fit's path (kept by the model), in full precision
            for k, v in self.trajectory.to_arrays(with_start=True).items():
                arrays[f"path_{k}"] = v
        meta = {
            "rng": self.rng.bit_generator.state,
            "sto_t": self.sto_t,
            **self.dispersion_state(),
            "gene_rejected": self.gene_rejected,
        }
        return arrays, meta

    def load_state_dict(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave (the parameters in place, in the dtype and on
        the device of the current ones); ``meta["history"]``, when present, sets the progress."""
        ref = self.params.beta_mu
        kw = {"dtype": ref.dtype, "device": ref.device}
        for name in self.params.__dataclass_fields__:
            if getattr(self.params, name) is None:  # an optional parameter this model lacks
                continue
            setattr(self.params, name, torch.as_tensor(arrays[f"param_{name}"], **kw))
        for k in STATE_ARRAYS:
            setattr(self, k, torch.as_tensor(arrays[f"state_{k}"], **kw))
        self.rng.bit_generator.state = meta["rng"]
        self.sto_t = int(meta.get("sto_t", 0))
        for k in ZETA_STATE:
            if k in meta:
                setattr(self, k, int(meta[k]))
        self.gene_rejected = float(meta.get("gene_rejected", 1.0))
        if "path_n_newton" in arrays:
            arr = {k[5:]: arrays[k] for k in arrays if k.startswith("path_")}
            self.trajectory = FitPath.from_arrays(arr, ref.dtype, ref.device)
        self.proposal = None
        if "proposal_v_old" in arrays:
            self.proposal = Proposal(
                **{k: torch.as_tensor(arrays[f"proposal_{k}"], **kw) for k in Proposal.FIELDS}
            )
        if "state_sto_H" in arrays:
            self.sto_H = torch.as_tensor(arrays["state_sto_H"], **kw)
            self.sto_lam = torch.as_tensor(arrays["state_sto_lam"], **kw)
        if "history" in meta:
            self.progress = FitProgress.from_history(meta["history"])
