"""``zinbgrad.tl.zinbwave``: fit ZINB-WaVE and store the model inside the AnnData.

The model's layout in the AnnData, and its reading and writing, are
:mod:`zinbgrad.persistence`'s (:func:`~zinbgrad.persistence.store_model`).
"""

from __future__ import annotations

from ..data.validate import check_anndata, check_key
from ..estimator import ZINBWaVE, resolve_device
from ..fitted import check_fitted
from ..persistence import from_anndata, model_elements, store_model

__all__ = ["zinbwave", "store_model", "model_elements", "model_from_anndata", "resolve_model"]


def model_from_anndata(adata, key: str = "X_zinbwave", *, device="auto") -> ZINBWaVE:
    """Rebuild the fitted :class:`ZINBWaVE` stored by :func:`zinbwave` / :func:`store_model`.

    The stored model is checked as :meth:`ZINBWaVE.load` checks a file (every array present,
    with the shape the others imply and finite values). ``device`` is where the model
    computes; it is not stored (see :meth:`ZINBWaVE.load`).

    Raises
    ------
    KeyError
        No model under ``key``.
    ValueError
        The stored model is incomplete, edited into an inconsistent state or unreadable.
    """
    model = from_anndata(ZINBWaVE, adata, key)
    resolve_device(device)  # a device this machine lacks is an error now, not later
    model.device = device
    return model


def resolve_model(adata, key: str = "X_zinbwave", model: ZINBWaVE | None = None) -> ZINBWaVE:
    """``model`` (checked to be a fitted :class:`ZINBWaVE`), or the one stored in ``adata``
    under ``key`` when ``model`` is None."""
    check_anndata(adata)
    if model is None:
        return model_from_anndata(adata, key)
    if not isinstance(model, ZINBWaVE):
        raise TypeError(f"model must be a fitted zinbgrad.ZINBWaVE, got {type(model).__name__}")
    check_fitted(model)
    return model


def zinbwave(
    adata,
    n_components: int = 10,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    covariate_keys: list[str] | None = None,
    key_added: str = "X_zinbwave",
    copy: bool = False,
    **kwargs,
):
    """Fit ZINB-WaVE to the raw counts of ``adata`` and store the result in it.

    Parameters
    ----------
    adata
        AnnData with raw counts (cells x genes) in ``.X`` or ``layer``. ``.X`` is never changed.
    n_components
        Number of latent factors K.
    layer
        Layer holding the counts.
    batch_key
        ``obs`` column modelled as batch indicators in X (batch correction).
    covariate_keys
        Further ``obs`` columns for X.
    key_added
        ``obsm[key_added]`` receives the latent factors W; see :func:`store_model` for the
        other fields.
    copy
        Work on and return a copy of ``adata``.
    **kwargs
        Hyper-parameters of :class:`zinbgrad.ZINBWaVE` (``epsilon``, ``max_epochs``, ``device``,
        ``random_state``, ...).

    Returns
    -------
    The AnnData copy if ``copy=True``, else the fitted :class:`zinbgrad.ZINBWaVE` model.
    """
    check_anndata(adata)
    check_key(key_added, "key_added")
    target = adata.copy() if copy else adata
    model = ZINBWaVE(n_components, **kwargs)
    model.fit(target, layer=layer, batch_key=batch_key, covariate_keys=covariate_keys)
    store_model(target, model, key_added)
    return target if copy else model
