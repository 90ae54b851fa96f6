"""Model math: the stable ZINB likelihood, parameters, linear predictors and penalties."""

from .likelihood import entry_derivatives, log_nb, log_zinb
from .params import Design, Params, Penalty, linear_predictors, orthogonalize_trace_norm

__all__ = [
    "Design",
    "Params",
    "Penalty",
    "entry_derivatives",
    "linear_predictors",
    "log_nb",
    "log_zinb",
    "orthogonalize_trace_norm",
]
