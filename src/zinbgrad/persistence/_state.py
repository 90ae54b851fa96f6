"""The fitted state of a :class:`~zinbgrad.ZINBWaVE`: the one list of fitted attributes, how
a model gets a whole state (checked) and gives it, and the state of given parameters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..fitted import CELL_ARRAYS, GENE_ARRAYS, check_fitted, fitted_masks
from ..fitting import count_parameters, information_criteria
from ..penalties import default_penalty, penalty_params

if TYPE_CHECKING:
    from ..estimator import ZINBWaVE

#: The parameters (gene-level, then cell-level), each held as the attribute ``name + "_"``.
PARAMETERS = GENE_ARRAYS + CELL_ARRAYS

#: Every fitted attribute of a :class:`~zinbgrad.ZINBWaVE` (see its docstring), in groups:
#: the parameters, the design, the fitted cells and genes, the fit's results.
FITTED_ATTRIBUTES = (
    *(name + "_" for name in PARAMETERS),
    "delta_mu_",
    "zeta_batch_",
    "X_",
    "X_columns_",
    "V_",
    "O_mu_",
    "O_pi_",
    "batch_info_",
    "var_names_",
    "obs_names_",
    "n_features_in_",
    "gene_fitted_",
    "cell_fitted_",
    "var_names_in_",
    "penalty_params_",
    "penalty_",
    "loglik_",
    "objective_",
    "n_params_",
    "aic_",
    "bic_",
    "history_",
    "n_iter_",
    "converged_",
    "fit_time_",
    "fit_path_",
)

#: Fitted attributes that :func:`set_state` derives when a state lacks them (a model file
#: does not hold them: they follow from ``n_params_``, ``loglik_`` and the number of cells).
DERIVED_ATTRIBUTES = ("aic_", "bic_")


# ---------------------------------------------------------------------- the fitted state
def get_state(model) -> dict[str, Any]:
    """The fitted state of ``model``: ``{attribute: value}`` for every :data:`FITTED_ATTRIBUTES`
    (the values themselves, not copies)."""
    check_fitted(model)
    return {name: getattr(model, name) for name in FITTED_ATTRIBUTES}


def set_state(model, state: Mapping[str, Any]) -> None:
    """Give ``model`` the fitted state ``state`` (a mapping of every
    :data:`FITTED_ATTRIBUTES`; ``aic_``/``bic_`` are computed when absent) and check it.

    Raises
    ------
    ValueError
        ``state`` lacks an attribute or has an unknown one, or its arrays disagree
        (:func:`check_state`).
    """
    missing = [k for k in FITTED_ATTRIBUTES if k not in state and k not in DERIVED_ATTRIBUTES]
    unknown = sorted(set(state) - set(FITTED_ATTRIBUTES))
    if missing or unknown:
        raise ValueError(f"fitted state: missing {missing}, unknown {unknown}")
    for name in FITTED_ATTRIBUTES:
        if name in state:
            setattr(model, name, state[name])
    check_state(model)
    if any(k not in state for k in DERIVED_ATTRIBUTES):
        model.aic_, model.bic_ = information_criteria(
            model.n_params_, model.loglik_, model.W_.shape[0]
        )


def fitted_everything(var_names: np.ndarray, n_cells: int) -> dict[str, np.ndarray]:
    """The masks of a model that left out no gene and no cell (``gene_fitted_``,
    ``cell_fitted_``, ``var_names_in_``)."""
    names = np.asarray(var_names).astype(str)
    return {
        "gene_fitted_": np.ones(names.size, dtype=bool),
        "cell_fitted_": np.ones(n_cells, dtype=bool),
        "var_names_in_": names,
    }


# ---------------------------------------------------------------------- consistency
def check_state(model) -> None:
    """Every fitted array of ``model`` has the shape the others imply, and finite values.

    The numbers of cells and genes are those most arrays agree on, so that an edited or
    truncated array is the one named.

    Raises
    ------
    ValueError
        Naming the first array that disagrees.
    """
    _check_dimensions(model)
    n, J = _check_shapes(model)
    _check_masks(model, n, J)
    _check_batch_parts(model, J)
    _check_fit_path(model)
    if len(model.X_columns_) != model.X_.shape[1]:
        raise ValueError(f"{len(model.X_columns_)} X column names for {model.X_.shape[1]} columns")
    for name in ("O_mu", "O_pi"):
        a = getattr(model, name + "_")
        if a is not None and (a.ndim != 2 or a.shape[0] != n or a.shape[1] not in (1, J)):
            raise ValueError(f"{name} has shape {a.shape}, expected ({n}, 1) or ({n}, {J})")
    for name in PARAMETERS + ("X", "V"):
        if not np.isfinite(getattr(model, name + "_")).all():
            raise ValueError(f"{name} has NaN or infinite values")
    history = model.history_
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise ValueError("history must be a list of per-epoch records (mappings)")


def _check_dimensions(model) -> None:
    ndims = {"zeta": 1, "var_names": 1, "obs_names": 1}
    for name in PARAMETERS + ("X", "V", "var_names", "obs_names"):
        a = getattr(model, name + "_")
        if np.ndim(a) != ndims.get(name, 2):
            raise ValueError(
                f"{name} has {np.ndim(a)} dimensions (shape {np.shape(a)}), expected "
                f"{ndims.get(name, 2)}"
            )


def _agreed(sizes: dict[str, int]) -> int:
    """The size most arrays agree on (ties: the first listed)."""
    values = list(sizes.values())
    return max(values, key=values.count)


def _check_shapes(model) -> tuple[int, int]:
    """The shapes of the parameters and designs; returns the numbers of cells and genes."""
    m = model
    n = _agreed(
        {
            "W": m.W_.shape[0],
            "obs_names": len(m.obs_names_),
            "X": m.X_.shape[0],
            "gamma_mu": m.gamma_mu_.shape[1],
            "gamma_pi": m.gamma_pi_.shape[1],
        }
    )
    J = _agreed(
        {
            "zeta": len(m.zeta_),
            "var_names": len(m.var_names_),
            "alpha_mu": m.alpha_mu_.shape[1],
            "alpha_pi": m.alpha_pi_.shape[1],
            "beta_mu": m.beta_mu_.shape[1],
            "beta_pi": m.beta_pi_.shape[1],
            "V": m.V_.shape[0],
        }
    )
    K = m.n_components
    M, L = m.X_.shape[1], m.V_.shape[1]
    expected = {
        "W": (n, K),
        "alpha_mu": (K, J),
        "alpha_pi": (K, J),
        "zeta": (J,),
        "X": (n, M),
        "V": (J, L),
        "obs_names": (n,),
        "var_names": (J,),
    }
    for name, shape in expected.items():
        a = getattr(m, name + "_")
        if a.shape != shape:
            raise ValueError(f"{name} has shape {a.shape}, expected {shape}")
    for name, rows in (("beta_mu", M), ("beta_pi", M), ("gamma_mu", L), ("gamma_pi", L)):
        a = getattr(m, name + "_")
        cols = n if name.startswith("gamma") else J
        if a.shape[1] != cols or a.shape[0] > rows:
            raise ValueError(f"{name} has shape {a.shape}, expected (<= {rows}, {cols})")
    return n, J


def _check_masks(model, n: int, J: int) -> None:
    genes, cells, names_in = fitted_masks(model)
    if genes.sum() != J or cells.sum() != n or len(names_in) != len(genes):
        raise ValueError(
            f"gene_fitted/cell_fitted select {genes.sum()} genes and {cells.sum()} cells, "
            f"not {J} and {n}"
        )
    if not np.array_equal(names_in[genes], model.var_names_):
        raise ValueError("var_names_in[gene_fitted] differ from var_names")


def _check_batch_parts(model, J: int) -> None:
    """The batch-specific parts of the model (``delta_mu_`` with ``batch_loadings``,
    ``zeta_batch_`` with ``batch_dispersion``) are present exactly when their option is on,
    one block per batch level, finite."""
    B = len((model.batch_info_ or {}).get("levels", ()))
    K = model.n_components
    parts = (
        ("delta_mu", "batch_loadings", (B, K, J)),
        ("zeta_batch", "batch_dispersion", (B, J)),
    )
    for name, option, shape in parts:
        value = getattr(model, name + "_", None)
        if getattr(model, option):
            if value is None or value.shape != shape or B < 2:
                raise ValueError(
                    f"{name} has shape {None if value is None else value.shape}, expected "
                    f"{shape} ({option}=True with {B} batch levels)"
                )
            if not np.isfinite(value).all():
                raise ValueError(f"{name} has NaN or infinite values")
        elif value is not None:
            raise ValueError(f"{name} is set but {option} is False")


def _check_fit_path(model) -> None:
    path, K = getattr(model, "fit_path_", None) or {}, model.n_components
    if not path:
        return
    steps = len(np.ravel(path.get("n_newton", [])))
    for name in GENE_ARRAYS:
        if name not in path and not steps:
            continue
        ref = getattr(model, name + "_")
        if name == "zeta" and getattr(model, "zeta_batch_", None) is not None:
            ref = model.zeta_batch_  # the path holds the dispersion per batch
        want = (steps,) + ref.shape
        got = np.shape(path.get(name))
        if got != want:
            raise ValueError(f"the fit path's {name} has shape {got}, expected {want}")
    if steps and np.shape(path.get("T")) != (steps, K, K):
        raise ValueError(
            f"the fit path's T has shape {np.shape(path.get('T'))}, expected {(steps, K, K)}"
        )


# ---------------------------------------------------------------------- hyper-parameters
def _jsonable(v):
    """``v`` with numpy scalars and arrays turned into Python values (for JSON)."""
    if isinstance(v, np.ndarray | np.generic):
        return v.tolist()
    if isinstance(v, np.random.RandomState):  # its seed was drawn at fit time; not saved
        return None
    return v


#: hyper-parameters added after files were written, stored only when set (not None): a model
#: without them saves exactly what it saved before
_STORED_IF_SET = ("epsilon_alpha_pi",)


def hyperparameters(model) -> dict[str, Any]:
    """``model.get_params()`` as JSON values, without ``device``: where a model runs is
    chosen where it is used (load, transform), not stored."""
    return {
        k: _jsonable(v)
        for k, v in model.get_params().items()
        if k != "device" and not (k in _STORED_IF_SET and v is None)
    }


def unfitted_model(cls: type[ZINBWaVE], params: Any) -> ZINBWaVE:
    """An unfitted ``cls`` with the stored hyper-parameters ``params`` (a mapping of
    :func:`hyperparameters`; ``device`` is ignored).

    Raises
    ------
    TypeError
        ``params`` is not a mapping.
    ValueError
        ``params`` names a hyper-parameter ``cls`` does not have.
    """
    if not isinstance(params, dict):
        raise TypeError("hyperparameters must be a mapping")
    unknown = sorted(set(params) - set(cls().get_params()))
    if unknown:
        raise ValueError(f"unknown hyperparameters {unknown}")
    return cls(**{k: v for k, v in params.items() if k != "device"})


# ---------------------------------------------------------------------- given parameters
def from_params(
    cls: type[ZINBWaVE],
    *,
    W,
    alpha_mu,
    beta_mu,
    gamma_mu,
    zeta,
    alpha_pi=None,
    beta_pi=None,
    gamma_pi=None,
    X=None,
    V=None,
    X_columns: list[str] | None = None,
    var_names=None,
    obs_names=None,
    **hyperparameters,
) -> ZINBWaVE:
    """A model with the given parameters (zinbwave's orientation), e.g. an R zinbwave fit.

    Penalties follow the hyper-parameters (zinbwave defaults unless overridden).
    ``loglik_``/``objective_`` (and ``aic_``/``bic_``) are NaN until computed with
    :meth:`~zinbgrad.ZINBWaVE.loglik` on the data.
    """
    W = np.asarray(W, dtype=np.float64)
    n, K = W.shape
    alpha_mu = np.asarray(alpha_mu, dtype=np.float64)
    J = alpha_mu.shape[1]
    hyperparameters.setdefault("n_components", K)
    model = cls(**hyperparameters)
    if model.batch_loadings or model.batch_dispersion:
        raise ValueError(
            "from_params builds zinbwave's model: batch_loadings and batch_dispersion must "
            "be False"
        )
    state: dict[str, Any] = {"W_": W, "alpha_mu_": alpha_mu}
    state["beta_mu_"] = np.asarray(beta_mu, dtype=np.float64)
    state["gamma_mu_"] = np.asarray(gamma_mu, dtype=np.float64)
    state["zeta_"] = np.broadcast_to(np.asarray(zeta, dtype=np.float64).ravel(), (J,)).copy()
    zero_inflation = {
        "alpha_pi_": (alpha_pi, (K, J)),
        "beta_pi_": (beta_pi, state["beta_mu_"].shape),
        "gamma_pi_": (gamma_pi, state["gamma_mu_"].shape),
    }
    for name, (x, shape) in zero_inflation.items():
        x = np.zeros(shape) if x is None else np.asarray(x, dtype=np.float64)
        state[name] = x if model.zero_inflation else np.zeros_like(x)
    state.update(_given_design(n, J, X, V, X_columns, var_names, obs_names))
    state.update(fitted_everything(state["var_names_"], n))
    state.update(
        n_params_=0,  # counted below
        penalty_params_={},  # set below, from the design
        penalty_=float("nan"),
        loglik_=float("nan"),
        objective_=float("nan"),
        history_=[],
        n_iter_=0,
        converged_=False,
        fit_time_=float("nan"),
        fit_path_=None,
    )
    set_state(model, state)
    model.n_params_ = count_parameters(model, n, J)
    pen = default_penalty(model, model.training_design())
    model.penalty_params_ = penalty_params(pen)
    model.penalty_ = pen.value(model.get_params_torch())
    return model


def _given_design(n: int, J: int, X, V, X_columns, var_names, obs_names) -> dict[str, Any]:
    """The design and the names of :func:`from_params`'s state (defaults: intercepts,
    ``x0``/``intercept``, ``x1``, ... columns, ``gene0``, ... and ``0``, ``1``, ... names)."""
    Xm = np.ones((n, 1)) if X is None else np.asarray(X, dtype=np.float64)
    if not X_columns:
        X_columns = (
            ["intercept"] + [f"x{m}" for m in range(1, Xm.shape[1])]
            if np.all(Xm[:, 0] == 1)
            else [f"x{m}" for m in range(Xm.shape[1])]
        )
    return {
        "delta_mu_": None,
        "zeta_batch_": None,
        "X_": Xm,
        "X_columns_": list(X_columns),
        "V_": np.ones((J, 1)) if V is None else np.asarray(V, dtype=np.float64),
        "O_mu_": None,
        "O_pi_": None,
        "batch_info_": {},
        "var_names_": (
            np.asarray(var_names).astype(str)
            if var_names is not None
            else np.array([f"gene{j}" for j in range(J)])
        ),
        "obs_names_": (
            np.asarray(obs_names).astype(str) if obs_names is not None else np.arange(n).astype(str)
        ),
        "n_features_in_": J,
    }
