"""The model file: a ``.npz`` archive of the fitted state (format ``"zinbgrad-model"``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..fitting import is_int
from ..io_utils import atomic_write, npz_file, read_npz_metadata
from ._state import (
    PARAMETERS,
    fitted_everything,
    get_state,
    hyperparameters,
    set_state,
    unfitted_model,
)

if TYPE_CHECKING:
    from ..estimator import ZINBWaVE

FORMAT_NAME = "zinbgrad-model"
FORMAT_VERSION = 1


def model_file(path: str | os.PathLike) -> Path:
    """Where :func:`save` writes ``path`` and :func:`load` reads it: ``path`` itself when it
    ends in ``.npz``, with ``.npz`` appended when it has no extension; a folder or another
    extension is an error."""
    return npz_file(path, "model file")


def metadata(model) -> dict[str, Any]:
    """The JSON metadata of ``model``'s file: format, version, hyper-parameters and the
    fitted attributes that are not arrays."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "zinbgrad_version": __import__("zinbgrad").__version__,
        "hyperparameters": hyperparameters(model),
        "X_columns": model.X_columns_,
        "batch_info": model.batch_info_,
        "penalty_params": model.penalty_params_,
        "loglik": model.loglik_,
        "penalty": model.penalty_,
        "objective": model.objective_,
        "history": model.history_,
        "n_iter": model.n_iter_,
        "converged": model.converged_,
        "fit_time": model.fit_time_,
        "n_params": model.n_params_,
    }


def save(model: ZINBWaVE, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save to a ``.npz`` archive (arrays + a JSON metadata string; no pickle).

    The file is written to a temporary name and renamed, so an interrupted save never
    leaves a half-written model.

    Parameters
    ----------
    path
        The file; ``.npz`` is appended to a name without extension (:func:`model_file`).
    overwrite
        Replace an existing file.

    Returns
    -------
    The path written.
    """
    state = get_state(model)
    path = model_file(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    arrays = {k: state[k + "_"] for k in PARAMETERS}
    arrays.update({k: state[k + "_"] for k in ("X", "V", "var_names", "obs_names")})
    arrays.update({k: state[k + "_"] for k in ("gene_fitted", "cell_fitted", "var_names_in")})
    for k in ("O_mu", "O_pi", "delta_mu", "zeta_batch"):
        if state[k + "_"] is not None:
            arrays[k] = state[k + "_"]
    for k, v in (state["fit_path_"] or {}).items():
        arrays["path_" + k] = v
    arrays["metadata"] = np.array(json.dumps(metadata(model)))
    with atomic_write(path, overwrite=overwrite, what="model file") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    return path


def load(cls: type[ZINBWaVE], path: str | os.PathLike) -> ZINBWaVE:
    """A ``cls`` model read from a file written by :func:`save` (never unpickles:
    ``allow_pickle=False``). Its ``device`` is ``"auto"``: the caller sets it.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        The file is not a zinbgrad model file, a newer format, or an incomplete or
        inconsistent one (the message names what is wrong).
    """
    given = Path(path)
    path = model_file(path) if not given.exists() and not given.suffix else given
    if not path.exists():
        raise FileNotFoundError(f"no such model file: {given}")
    z, meta = read_npz_metadata(path, "model file")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a zinbgrad model file")
    version = meta.get("format_version", 0)
    if not is_int(version):
        raise ValueError(f"{path} is not a valid zinbgrad model file (format_version)")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer zinbgrad (format {version}); "
            "upgrade zinbgrad to read it"
        )
    try:
        model = unfitted_model(cls, meta["hyperparameters"])
        set_state(model, _archive_state(z, meta))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise ValueError(f"{path} is not a valid zinbgrad model file: {msg}") from err
    return model


def _archive_state(z, meta: dict) -> dict[str, Any]:
    """The fitted state held by an opened model file (``aic_``/``bic_`` are derived)."""
    files = set(z.files)
    missing = sorted({*PARAMETERS, "X", "V", "var_names", "obs_names"} - files)
    if missing:
        raise KeyError(f"missing arrays {missing}")

    def array(name: str) -> np.ndarray | None:
        return np.asarray(z[name], dtype=np.float64) if name in files else None

    optional = ("delta_mu", "zeta_batch")
    state: dict[str, Any] = {k + "_": array(k) for k in (*PARAMETERS, "X", "V", *optional)}
    state.update(O_mu_=array("O_mu"), O_pi_=array("O_pi"))
    state["fit_path_"] = {k[5:]: z[k] for k in z.files if k.startswith("path_")} or None
    state["var_names_"] = z["var_names"].astype(str)
    state["obs_names_"] = z["obs_names"].astype(str)
    state["n_features_in_"] = len(state["var_names_"])
    if "gene_fitted" in files:
        state["gene_fitted_"] = np.asarray(z["gene_fitted"], dtype=bool)
        state["cell_fitted_"] = np.asarray(z["cell_fitted"], dtype=bool)
        state["var_names_in_"] = z["var_names_in"].astype(str)
    else:  # older files: every gene and cell was fitted
        state.update(fitted_everything(state["var_names_"], np.size(state["obs_names_"])))
    state["X_columns_"] = [str(c) for c in meta["X_columns"]]
    state["batch_info_"] = dict(meta.get("batch_info") or {})
    state["penalty_params_"] = dict(meta["penalty_params"])
    state["loglik_"], state["penalty_"] = float(meta["loglik"]), float(meta["penalty"])
    state["objective_"] = float(meta["objective"])
    state["history_"] = meta["history"]
    state["n_iter_"], state["converged_"] = int(meta["n_iter"]), bool(meta["converged"])
    state["fit_time_"] = float(meta.get("fit_time", float("nan")))
    state["n_params_"] = int(meta["n_params"])
    return state
