"""The penalty of a fit, from an estimator's hyper-parameters or from its fitted record."""

from __future__ import annotations

import torch

from .model.params import EPSILON_NAMES, Design, Penalty

__all__ = [
    "DELTA_RATIO",
    "EPSILON_NAMES",
    "default_penalty",
    "fitted_penalty",
    "penalty_params",
    "zinbwave_penalty",
]

#: default ridge weight of the batch-specific loading offsets (``batch_loadings=True``),
#: relative to ``epsilon_alpha``. Of 0.1, 1 and 10 (x epsilon_alpha), 10 gave the best mean
#: scib-metrics Total over issue 17's data sets (800 cells each); against 10, 30 scored
#: higher in W's batch correction on all 7 sets and seeds and 0.3-1.7 nats per held-out
#: cell higher in likelihood on all 7, with the same cell-type ARI (BENCHMARKS.md section 4,
#: 2026-12-05; 3 was worse, 20-60 within 0.01 of 30). Held-out likelihood alone prefers
#: weights of 1000 and more, i.e. about no offsets, which gives up the integration.
DELTA_RATIO = 30.0


def zinbwave_penalty(model, design: Design) -> Penalty:
    """zinbwave's penalty for ``design`` with the epsilon overrides of the estimator
    ``model`` (its hyper-parameters; nothing fitted is read)."""
    return Penalty.zinbwave_defaults(
        design,
        common_dispersion=model.common_dispersion,
        **{name: getattr(model, name) for name in EPSILON_NAMES},
    )


def default_penalty(model, design: Design) -> Penalty:
    """The penalty a fit of ``model`` uses: :func:`zinbwave_penalty`, and with
    ``batch_loadings`` the weight of the loading offsets (``epsilon_delta``, default
    :data:`DELTA_RATIO` x ``epsilon_alpha``)."""
    pen = zinbwave_penalty(model, design)
    pen.zeta_batch = bool(model.batch_dispersion)
    if model.batch_loadings:
        pen.delta = (
            DELTA_RATIO * pen.alpha if model.epsilon_delta is None else float(model.epsilon_delta)
        )
    return pen


def penalty_params(pen: Penalty) -> dict:
    """Every epsilon of a penalty, as plain Python values: a fitted model's record
    ``penalty_params_`` (``epsilon_delta`` only for a model with batch-specific loadings),
    which :func:`fitted_penalty` turns back into a :class:`~zinbgrad.model.params.Penalty`."""
    extra = {} if pen.delta is None else {"epsilon_delta": pen.delta}
    if pen.alpha_pi is not None:
        extra["epsilon_alpha_pi"] = pen.alpha_pi
    return extra | {
        "epsilon_beta_mu": pen.beta_mu.cpu().numpy().tolist(),
        "epsilon_beta_pi": pen.beta_pi.cpu().numpy().tolist(),
        "epsilon_gamma_mu": pen.gamma_mu.cpu().numpy().tolist(),
        "epsilon_gamma_pi": pen.gamma_pi.cpu().numpy().tolist(),
        "epsilon_W": pen.W,
        "epsilon_alpha": pen.alpha,
        "epsilon_zeta": pen.zeta,
    }


def fitted_penalty(model, design: Design) -> Penalty:
    """The penalty a fitted ``model`` used (its ``penalty_params_``), on the device and in
    the dtype of ``design`` (whose cells it penalizes)."""
    pp = model.penalty_params_
    kw = {"dtype": design.X_mu.dtype, "device": design.X_mu.device}
    return Penalty(
        beta_mu=torch.as_tensor(pp["epsilon_beta_mu"], **kw),
        beta_pi=torch.as_tensor(pp["epsilon_beta_pi"], **kw),
        gamma_mu=torch.as_tensor(pp["epsilon_gamma_mu"], **kw),
        gamma_pi=torch.as_tensor(pp["epsilon_gamma_pi"], **kw),
        W=float(pp["epsilon_W"]),
        alpha=float(pp["epsilon_alpha"]),
        zeta=float(pp["epsilon_zeta"]),
        common_dispersion=model.common_dispersion,
        delta=None if pp.get("epsilon_delta") is None else float(pp["epsilon_delta"]),
        alpha_pi=None if pp.get("epsilon_alpha_pi") is None else float(pp["epsilon_alpha_pi"]),
        zeta_batch=bool(model.batch_dispersion),
    )
