"""A fitted :class:`~zinbgrad.ZINBWaVE`'s state, to and from a ``.npz`` file or an AnnData
(the one public module; its parts live in ``_state``, ``_npz`` and ``_anndata``).

The fitted state is the attributes named in :data:`FITTED_ATTRIBUTES` (scikit-learn's
trailing underscore). Every way in (:func:`load`, :func:`from_anndata`, :func:`from_params`)
builds the whole state as a mapping and hands it to :func:`set_state`, which refuses a state
that lacks any of them and checks that the arrays agree (:func:`check_state`); the ways out
(:func:`save`, :func:`model_elements` / :func:`store_model`) read the same attributes.

The model file (format ``"zinbgrad-model"``, version :data:`FORMAT_VERSION`) is a ``.npz``
archive without pickles: one array per parameter (``W``, ``alpha_mu``, ...), the designs
``X``/``V`` and offsets ``O_mu``/``O_pi`` (when set), ``var_names``/``obs_names``, the masks
``gene_fitted``/``cell_fitted`` with ``var_names_in``, the fit path as ``path_<name>`` and a
JSON string ``metadata`` (hyper-parameters, X column names, batch levels, penalties,
log-likelihood, history, ...). The AnnData layout is described in :func:`store_model`.

This package never imports the estimator: the functions that build a model take its class
(:meth:`ZINBWaVE.load <zinbgrad.ZINBWaVE.load>`, :meth:`ZINBWaVE.from_params
<zinbgrad.ZINBWaVE.from_params>` and :func:`zinbgrad.tl.model_from_anndata` pass it).
"""

from ._anndata import HISTORY_COLUMNS, from_anndata, model_elements, store_model
from ._npz import FORMAT_NAME, FORMAT_VERSION, load, metadata, model_file, save
from ._state import (
    DERIVED_ATTRIBUTES,
    FITTED_ATTRIBUTES,
    PARAMETERS,
    check_state,
    fitted_everything,
    from_params,
    get_state,
    hyperparameters,
    set_state,
    unfitted_model,
)

__all__ = [
    "DERIVED_ATTRIBUTES",
    "FITTED_ATTRIBUTES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HISTORY_COLUMNS",
    "PARAMETERS",
    "check_state",
    "fitted_everything",
    "from_anndata",
    "from_params",
    "get_state",
    "hyperparameters",
    "load",
    "metadata",
    "model_elements",
    "model_file",
    "save",
    "set_state",
    "store_model",
    "unfitted_model",
]
