"""Support of :meth:`ZINBWaVE.fit`: the hyper-parameter check, the empty cells and genes, the
progress bar, the checkpoint tag and the storing of the fitted state.

Functions over an explicit estimator (``model``) and explicit inputs; the optimization itself
is :mod:`zinbgrad.optim`'s.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import time
import warnings
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from .data.validate import empty_counts_message
from .fitted import CELL_ARRAYS, GENE_ARRAYS, check_fitted, fit_path, model_params
from .model.params import Design, Params, Penalty
from .optim.path import FitPath
from .optim.warm import leading_components
from .penalties import EPSILON_NAMES

__all__ = [
    "EPSILONS",
    "check_hyperparameters",
    "checkpoint_tag",
    "count_parameters",
    "fit_seed",
    "information_criteria",
    "is_int",
    "leave_out_empty",
    "progress_bar",
    "set_criteria",
    "store_params",
    "store_result",
    "warm_start",
]

#: The penalty hyper-parameters (each None or a non-negative number).
EPSILONS = (*EPSILON_NAMES, "epsilon_delta")

_CHOICES = {
    "solver": ("auto", "full", "sketch", "stochastic"),
    "empty_genes": ("exclude", "error"),
    "empty_cells": ("error", "exclude"),
}


def is_int(v) -> bool:
    """An integer, numpy's included, but not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_)


# ------------------------------------------------------------------ hyper-parameters
def _check_numbers(model) -> None:
    for name in EPSILONS + ("tol",):
        v = getattr(model, name)
        if name != "tol" and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < math.inf:
            raise ValueError(f"{name} must be a finite non-negative number, got {v!r}")
    for name, optional in (
        ("max_epochs", False),
        ("local_steps", False),
        ("batch_size", True),
        ("sketch_size", True),
        ("block_entries", True),
    ):
        v = getattr(model, name)
        if optional and v is None:
            continue
        if not is_int(v) or v < 1:
            raise ValueError(
                f"{name} must be {'None or ' if optional else ''}a positive integer, got {v!r}"
            )


def _check_choices(model) -> None:
    if model.solver not in _CHOICES["solver"]:
        raise ValueError(
            f"solver must be 'auto', 'full', 'sketch' or 'stochastic', got {model.solver!r}"
        )
    for name in ("empty_genes", "empty_cells"):
        choices = _CHOICES[name]
        if getattr(model, name) not in choices:
            raise ValueError(
                f"{name} must be {choices[0]!r} or {choices[1]!r}, got {getattr(model, name)!r}"
            )
    for name in ("batch_loadings", "batch_dispersion"):
        if not isinstance(getattr(model, name), bool | np.bool_):
            raise ValueError(f"{name} must be True or False, got {getattr(model, name)!r}")
    if model.batch_dispersion and model.common_dispersion:
        raise ValueError(
            "batch_dispersion=True (a dispersion per gene and batch) needs "
            "common_dispersion=False"
        )
    if model.fused not in ("auto", True, False):
        raise ValueError(f"fused must be 'auto', True or False, got {model.fused!r}")
    rs = model.random_state
    if not (rs is None or is_int(rs) or isinstance(rs, np.random.RandomState)):
        raise ValueError(
            f"random_state must be None, an integer or a numpy RandomState, got {rs!r}"
        )
    if is_int(rs) and not 0 <= rs < 2**63:
        raise ValueError(
            f"random_state (--seed on the command line) must be a non-negative integer "
            f"below 2**63, got {rs!r}"
        )


def check_hyperparameters(model, n: int, J: int) -> None:
    """Every hyper-parameter of the estimator ``model`` is valid for a fit to ``n`` cells x
    ``J`` genes; else a ``ValueError`` that names the first bad one."""
    K = model.n_components
    if not is_int(K) or K < 0:
        raise ValueError(f"n_components must be a non-negative integer, got {K!r}")
    if K >= min(n, J):
        raise ValueError(
            f"n_components={K} is too large for {n} cells x {J} genes: it must be smaller "
            f"than min(n_cells, n_genes) = {min(n, J)}"
        )
    _check_numbers(model)
    _check_choices(model)


def fit_seed(random_state, comm) -> int:
    """The integer seed of ``random_state``; one drawn from numpy's random state for
    ``None`` or a ``RandomState`` (as in scikit-learn), the same on every process of
    ``comm``."""
    if is_int(random_state):
        return int(random_state)
    from sklearn.utils import check_random_state

    seed = int(check_random_state(random_state).randint(2**31 - 1))
    return int(comm.max(float(seed)))  # rank 0's draw need not equal the others'


# ------------------------------------------------------------------ empty cells and genes
def leave_out_empty(model, inp, warn: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply ``model``'s ``empty_cells`` / ``empty_genes`` to the validated input ``inp``
    (restricting it to the cells and genes that are fitted); returns the masks of the fitted
    cells and genes and the input's gene names. ``warn``: warn about those left out."""
    if model.empty_genes not in _CHOICES["empty_genes"] or (
        model.empty_cells not in _CHOICES["empty_cells"]
    ):
        check_hyperparameters(model, *inp.shape)  # names the bad option
    n, J = inp.shape
    cells = np.ones(n, dtype=bool)
    genes = np.ones(J, dtype=bool)
    var_names_in = np.asarray(inp.var_names).astype(str)
    where = f"{inp.path}: " if inp.path else ""
    notes: list[str] = []
    if inp.empty_cells is not None and inp.empty_cells.size:
        msg = empty_counts_message("cells", inp.empty_cells, inp.obs_names)
        if model.empty_cells == "error":
            raise ValueError(where + msg)
        cells[inp.empty_cells] = False
        short = empty_counts_message("cells", inp.empty_cells, inp.obs_names, hint=False)
        notes.append(f"{where}{short}; they are left out of the fit (cell_fitted_)")
    if inp.empty_genes is not None and inp.empty_genes.size:
        if model.empty_genes == "error":
            raise ValueError(where + empty_counts_message("genes", inp.empty_genes, inp.var_names))
        genes[inp.empty_genes] = False
        short = empty_counts_message("genes", inp.empty_genes, inp.var_names, hint=False)
        notes.append(
            f"{where}{short} in these cells; they are left out of the fit "
            "(gene_fitted_; NaN parameters; empty_genes='error' refuses such data)"
        )
    if not genes.any() or not cells.any():
        raise ValueError(f"{where}no counts left to fit after leaving out empty cells/genes")
    if not cells.all() or not genes.all():
        inp.keep(cells, genes)
    for note in notes if warn else []:
        warnings.warn(note, stacklevel=3)
    return cells, genes, var_names_in


# ------------------------------------------------------------------ during the fit
def progress_bar(verbose: bool, stochastic_epochs: int | None = None):
    """A tqdm bar and its per-epoch callback (``(None, None)`` unless ``verbose``). The bar
    names the phase (initialization, sketch, extension, sweeps, minibatch epochs) and restarts
    at each: its total is the phase's known length (the one extension pass, the minibatch
    epochs) or none where the phase stops at ``tol`` (then no ETA, which would be a guess)."""
    if not verbose:
        return None, None
    from tqdm.auto import tqdm

    # appears only for fits that last longer than a moment
    bar = tqdm(
        total=None,
        desc="zinbgrad fit [initialization]",
        unit="epoch",
        leave=False,
        delay=2.0,
    )
    totals = {"extend": 1, "stochastic": stochastic_epochs}
    names = {
        "sketch": "sketch",
        "extend": "extension",
        "full": "sweeps",
        "stochastic": "minibatch epochs",
    }
    state: dict[str, Any] = {"phase": None}

    def cb(rec: dict) -> None:
        phase = rec["phase"]
        if phase != state["phase"]:  # a new phase: its own count, total and clock
            state["phase"] = phase
            bar.total = totals.get(phase)
            bar.n = bar.last_print_n = 0
            bar.start_t = bar.last_print_t = time.time()
            bar.set_description_str(f"zinbgrad fit [{names.get(phase, phase)}]", refresh=False)
        # postfix first without a refresh: a refresh would bypass tqdm's display delay
        bar.set_postfix(objective=f"{rec['objective']:.6g}", refresh=False)
        bar.update(1)

    return cb, bar


def checkpoint_tag(inp, xnames, Vm, O_mu, O_pi, penalty_params: dict) -> dict:
    """What a resumed fit must share with the checkpoint's (see ``FitOptions``): the cells and
    genes (names, in order), the counts (:class:`~zinbgrad.data.source.CountsFingerprint`),
    the design's columns and the penalty (its every epsilon, ``penalty_params``)."""

    def digest(names) -> str:
        return hashlib.sha1("\n".join(map(str, names)).encode()).hexdigest()

    return {
        "cells": digest(inp.obs_names),
        "genes": digest(inp.var_names),
        "counts": inp.fingerprint(),
        "X_columns": list(xnames),
        "V_columns": int(Vm.shape[1]),
        "offsets": [O_mu is not None, O_pi is not None],
        "penalty": penalty_params,
    }


# ------------------------------------------------------------------ the fitted state
def store_params(model, params: Params, design: Design, Xm, xnames, Vm, counts) -> None:
    """Set ``model``'s fitted parameters and design attributes from a fit's result
    (``params``, of the cells and genes of ``counts``)."""
    arrays = params.as_numpy()
    if not model.zero_inflation:
        for name in ("beta_pi", "alpha_pi", "gamma_pi"):
            arrays[name] = np.zeros_like(arrays[name])
    for name in GENE_ARRAYS + CELL_ARRAYS:
        setattr(model, name + "_", np.asarray(arrays[name], dtype=np.float64))
    model.zeta_batch_ = None
    if arrays["zeta"].ndim == 2:  # a dispersion per batch level (rows) and gene
        model.zeta_batch_ = np.asarray(arrays["zeta"], dtype=np.float64)
        model.zeta_ = model.zeta_batch_.mean(0)
    model.delta_mu_ = None
    if "delta_mu" in arrays:  # stored as (B*K, J): one K x J block per batch
        d = np.asarray(arrays["delta_mu"], dtype=np.float64)
        model.delta_mu_ = d.reshape(design.n_batches, params.K, d.shape[1])
    model.X_ = np.asarray(Xm, dtype=np.float64)
    model.X_columns_ = list(xnames)
    model.V_ = np.asarray(Vm, dtype=np.float64)
    model.O_mu_ = None if design.O_mu is None else design.O_mu.cpu().numpy()
    model.O_pi_ = None if design.O_pi is None else design.O_pi.cpu().numpy()
    model.var_names_ = np.asarray(counts.var_names).astype(str)
    model.obs_names_ = np.asarray(counts.obs_names).astype(str)
    model.n_features_in_ = len(model.var_names_)


def count_parameters(model, n: int, J: int) -> int:
    """The number of free parameters of a fitted ``model`` of ``n`` cells x ``J`` genes
    (zinbwave's ``nParams``: its design's coefficients, ``W``, the loadings, one dispersion
    per distinct ``zeta_`` value, and the batch-specific loading offsets)."""
    K = model.n_components
    zb = getattr(model, "zeta_batch_", None)
    n_disp = len(np.unique(model.zeta_)) if zb is None else int(zb.size)
    count = int(
        J * (model.beta_mu_.shape[0] + model.beta_pi_.shape[0])
        + n * (model.gamma_mu_.shape[0] + model.gamma_pi_.shape[0])
        + 2 * K * J
        + n * K
        + n_disp
    )
    if getattr(model, "delta_mu_", None) is not None:
        count += int(model.delta_mu_.size)
    return count


def information_criteria(n_params: int, loglik: float, n_cells: int) -> tuple[float, float]:
    """``(AIC, BIC)`` of a model with ``n_params`` parameters and log-likelihood ``loglik``
    on ``n_cells`` cells (zinbwave's ``zinbAIC``/``zinbBIC``)."""
    return 2.0 * n_params - 2.0 * loglik, math.log(n_cells) * n_params - 2.0 * loglik


def set_criteria(model, n: int, J: int) -> None:
    """Set ``n_params_``, ``aic_`` and ``bic_`` of a fitted ``model`` of ``n`` cells x ``J``
    genes from its ``loglik_``."""
    model.n_params_ = count_parameters(model, n, J)
    model.aic_, model.bic_ = information_criteria(model.n_params_, model.loglik_, n)


def store_result(model, result, trajectory) -> None:
    """Set ``model``'s fit record from the optimizer's ``result`` (log-likelihood, penalty,
    history, epochs, convergence) and its ``fit_path_`` from ``trajectory`` (the engine's
    :class:`~zinbgrad.optim.engine.FitPath`, compacted; ``None`` or empty: no path)."""
    model.fit_path_ = (
        trajectory.compact().to_arrays(np.float32)
        if trajectory is not None and len(trajectory)
        else None
    )
    model.loglik_ = float(result.loglik)
    model.penalty_ = float(result.penalty)
    model.objective_ = model.loglik_ - model.penalty_
    model.history_ = result.history
    model.n_iter_ = int(result.n_epochs)
    model.converged_ = bool(result.converged)
    if not model.converged_:
        warnings.warn(
            f"the fit stopped at max_epochs={model.max_epochs} before the relative change of "
            f"the objective fell below tol={model.tol} (converged_ is False); raise max_epochs",
            ConvergenceWarning,
            stacklevel=3,
        )


def warm_start(
    init, model, counts, design: Design, penalty: Penalty, resume=None
) -> tuple[Params, FitPath | None]:
    """The starting point of ``model``'s fit of ``counts`` from ``init`` (see the ``init``
    parameter of :meth:`ZINBWaVE.fit`): the leading ``model.n_components`` factors of
    ``init`` (:func:`zinbgrad.optim.warm.leading_components`) and its fit path, checked
    against the fit's genes, cells and design."""
    if resume is not None:
        raise ValueError("init and resume exclude each other (a checkpoint holds every value)")
    dev, dt = design.X_mu.device, design.X_mu.dtype
    if isinstance(init, Params):
        params, path = init.to(dev, dt), None
    elif hasattr(init, "get_params_torch"):
        check_fitted(init)
        for what, mine, theirs in (
            ("genes", counts.var_names, init.var_names_),
            ("cells", counts.obs_names, getattr(init, "obs_names_", None)),
        ):
            if theirs is not None and not np.array_equal(
                np.asarray(mine).astype(str), np.asarray(theirs).astype(str)
            ):
                raise ValueError(f"init was fitted on other {what} than these data")
        for flag in ("zero_inflation", "common_dispersion"):
            if getattr(init, flag) != getattr(model, flag):
                raise ValueError(f"init has {flag}={getattr(init, flag)}, this model the other")
        params, path = model_params(init, dev, dt), fit_path(init, dev, dt)
    else:
        raise TypeError(f"init must be a fitted ZINBWaVE or Params, got {type(init).__name__}")
    ref = Params.zeros(design, params.K)
    for name in Params.GENE_FIELDS + Params.CELL_FIELDS:
        want, got = tuple(getattr(ref, name).shape), tuple(getattr(params, name).shape)
        if got != want:
            raise ValueError(f"init's {name} has shape {got}; this fit needs {want}")
    return leading_components(
        params,
        model.n_components,
        penalty.W,
        penalty.alpha,
        zero_inflation=model.zero_inflation,
        path=path,
    )
