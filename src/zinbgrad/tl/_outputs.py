"""Scanpy-style functions for what a zinbwave user does after the fit.

Each reads the model stored by :func:`zinbgrad.tl.zinbwave` (``key``, default ``"X_zinbwave"``)
or takes an explicit ``model=``, computes one cells x genes output block by block
(:mod:`zinbgrad.model.outputs`) and writes it to ``adata.layers[key_added]``. ``adata.X`` is
never modified; with ``copy=True`` a modified copy is returned instead of ``None``.

Genes left out of the fit for having no counts get the values of a point mass at 0 (mu 0,
residuals 0, imputed 0, weight 1, log mu -inf; :data:`zinbgrad.model.outputs.EXCLUDED_GENE_VALUES`);
cells left out get NaN rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..data.validate import check_anndata, check_key, extract_counts
from ..docstrings import doc_params
from ..encoding import align_genes
from ..estimator import ZINBWaVE
from ..fitted import check_fitted
from ..model import outputs as _out
from ..runtime import resolve_device
from ._zinbwave import model_from_anndata
from ._zinbwave import resolve_model as _resolve_model

#: Parameter docs shared by the functions below (filled in by :func:`doc_params`).
DOCS = {
    "adata": """adata
    The AnnData the model was fitted on.""",
    "layer_key": """layer
    Layer with the raw counts (default ``.X``).
key
    Key of the model stored by :func:`zinbgrad.tl.zinbwave`.""",
    "model": """model
    Use this fitted model instead of the stored one.""",
    "device_copy": """device
    Torch device of the computation.
copy
    Return a modified copy instead of writing into ``adata``.""",
    "returns": """Returns
-------
The AnnData copy if ``copy=True``, else ``None``.""",
}

__all__ = [
    "normalize",
    "residuals",
    "impute",
    "observational_weights",
    "batch_corrected",
    "project",
]


def _out_dtype(dtype) -> np.dtype:
    """The layer's dtype: float32 or float64 (an integer type would truncate the values, and
    float16 round them to 3 digits and overflow above 65504)."""
    try:
        dt = np.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}") from err
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dt.name}")
    return dt


def _check_cells(adata, model: ZINBWaVE) -> None:
    _, cells, _ = model.fitted_masks()
    n = len(cells)
    if adata.n_obs != n:
        raise ValueError(
            f"adata has {adata.n_obs} cells but the model was fitted on {n}; these outputs are "
            "for the training cells (use zinbgrad.tl.project for new cells)"
        )
    names = getattr(model, "obs_names_", None)
    if names is not None and not np.array_equal(
        np.asarray(adata.obs_names).astype(str)[cells], names
    ):
        raise ValueError("adata.obs_names differ from the cells the model was fitted on")


def _counts(adata, layer: str | None, model: ZINBWaVE):
    """Training counts of the fitted cells in the model's gene order (CSR, float64)."""
    _, cells, _ = model.fitted_masks()
    counts = extract_counts(
        adata if cells.all() else adata[cells],
        layer,
        allow_non_integer=bool(model.allow_non_integer),
        check_empty=False,
    )
    align_genes(model, counts)
    return counts.X


def _check_genes(adata, model: ZINBWaVE) -> None:
    """adata's genes are those of the data the model was fitted on (those left out for having
    no counts included), in order."""
    _, _, names_in = model.fitted_masks()
    names = np.asarray(adata.var_names).astype(str)
    if not np.array_equal(names, np.asarray(names_in).astype(str)):
        raise ValueError(
            "adata.var_names differ from the model's genes; subset/reorder adata to the model's "
            "genes (model.var_names_in_) first"
        )


def _spread(model: ZINBWaVE, what: str, values: np.ndarray) -> np.ndarray:
    """Values of the fitted cells x genes over all of adata's (see ``EXCLUDED_GENE_VALUES``)."""
    genes, cells, _ = model.fitted_masks()
    return _out.spread_to_input(values, what, genes, cells)


def _finish(adata, copy: bool, key_added: str, values: np.ndarray, uns_info: dict):
    target = adata.copy() if copy else adata
    target.layers[key_added] = values
    target.uns.setdefault("zinbgrad_outputs", {})[key_added] = uns_info
    return target if copy else None


def _checked(adata, key, key_added, model, dtype, device):
    """The model, the layer's dtype and the device, every argument checked before any work:
    ``key_added``, ``dtype``, ``device``, the model, the cells and the genes."""
    check_key(key_added, "key_added")
    out_dtype = _out_dtype(dtype)
    dev = resolve_device(device)
    m = _resolve_model(adata, key, model)
    _check_cells(adata, m)
    _check_genes(adata, m)
    return m, out_dtype, dev


def _layer_output(
    adata, what: str, info: dict, layer, key, key_added, model, dtype, device, copy, ignore_W=False
):
    """Compute ``what`` for the training cells into ``layers[key_added]`` (see
    :func:`_finish`), everything checked first (:func:`_checked`)."""
    m, out_dtype, dev = _checked(adata, key, key_added, model, dtype, device)
    counts = _counts(adata, layer, m) if what in _out.COUNT_OUTPUTS else None
    vals = _out.model_output(m, what, counts, ignore_W=ignore_W, device=dev, out_dtype=out_dtype)
    vals = _spread(m, what, vals)
    if what == "impute_zeros":
        vals = _cap_imputed(adata, layer, m, vals)
    return _finish(adata, copy, key_added, vals, info)


@doc_params(**DOCS)
def normalize(
    adata,
    *,
    layer: str | None = None,
    key: str = "X_zinbwave",
    key_added: str = "zinbwave_normalized",
    model: ZINBWaVE | None = None,
    dtype: Any = np.float32,
    device: str = "cpu",
    copy: bool = False,
):
    """zinbwave's normalized values: deviance residuals of the model with ``W`` set to 0.

    They keep the biology captured by ``W`` and remove the effects of the covariates in X
    (e.g. the batch) and of the cell and gene intercepts (library size); use them for heatmaps
    and other visualizations.

    Parameters
    ----------
    adata
        The AnnData the model was fitted on (same cells; genes in the model's order).
    {layer_key}
    key_added
        ``adata.layers[key_added]`` receives the values (cells x genes, dense).
    {model}
    dtype
        dtype of the layer.
    {device_copy}

    {returns}
    """
    info = {"output": "normalized_values", "key": key, "ignore_W": True}
    return _layer_output(
        adata, "deviance", info, layer, key, key_added, model, dtype, device, copy, True
    )


@doc_params(**DOCS)
def residuals(
    adata,
    kind: str = "deviance",
    ignore_W: bool = False,
    *,
    layer: str | None = None,
    key: str = "X_zinbwave",
    key_added: str | None = None,
    model: ZINBWaVE | None = None,
    dtype: Any = np.float32,
    device: str = "cpu",
    copy: bool = False,
):
    """Residuals of the fitted ZINB model.

    Parameters
    ----------
    {adata}
    kind
        ``"deviance"`` (zinbwave's ``computeDevianceResiduals``:
        ``sign(y - E[y]) sqrt(-2 log ZINB(y))``) or ``"pearson"``
        (``(y - E[y]) / sqrt(Var[y])``).
    ignore_W
        Set the latent factors to 0 (``kind="deviance", ignore_W=True`` are the normalized
        values).
    {layer_key}
    key_added
        Layer name (default ``f"zinbwave_{kind}_residuals"``).
    {model}
    dtype
        dtype of the layer.
    {device_copy}

    {returns}
    """
    if kind not in ("deviance", "pearson"):
        raise ValueError(f"kind must be 'deviance' or 'pearson', got {kind!r}")
    key_added = key_added or f"zinbwave_{kind}_residuals"
    info = {"output": f"{kind}_residuals", "key": key, "ignore_W": bool(ignore_W)}
    return _layer_output(
        adata, kind, info, layer, key, key_added, model, dtype, device, copy, ignore_W
    )


@doc_params(**DOCS)
def impute(
    adata,
    method: str = "zeros",
    *,
    layer: str | None = None,
    key: str = "X_zinbwave",
    key_added: str = "zinbwave_imputed",
    model: ZINBWaVE | None = None,
    dtype: Any = np.float32,
    device: str = "cpu",
    copy: bool = False,
):
    """Imputed counts.

    Parameters
    ----------
    {adata}
    method
        ``"zeros"``: zinbwave's ``imputeZeros`` - every zero replaced by its expected value
        given that it is zero under the ZINB, ``mu pi / (pi + (1 - pi) NB(0))``, counts > 0
        kept. Degenerate genes, with an imputed zero over 100x the largest count of the whole
        matrix (where pi ~ 1 the data cannot identify the NB mean, which then reaches e.g.
        9e18, and zinbwave's formula gives ~mu), are named in one warning and their imputed
        zeros capped at the gene's largest observed count. ``"mean"``: the denoised mean
        ``(1 - pi) mu`` for every entry.
    {layer_key}
    key_added
        ``adata.layers[key_added]`` receives the imputed counts.
    {model}
    dtype
        dtype of the layer.
    {device_copy}

    {returns}
    """
    what = {"zeros": "impute_zeros", "mean": "mean"}.get(method)
    if what is None:
        raise ValueError(f"method must be 'zeros' or 'mean', got {method!r}")
    info = {"output": f"imputed_{method}", "key": key}
    return _layer_output(adata, what, info, layer, key, key_added, model, dtype, device, copy)


#: An imputed zero this many times the largest count of the whole matrix marks a degenerate
#: gene (measured: at most 14x on pbmc_small, a regular fit; 1e5-1e15x for the 12 genes of
#: PBMC 8k whose NB mean the data cannot identify).
DEGENERATE_FACTOR = 100.0


def _cap_imputed(adata, layer, m: ZINBWaVE, vals: np.ndarray) -> np.ndarray:
    """Imputed zeros of degenerate genes capped at the gene's largest observed count, with one
    warning naming them. Degenerate: an imputed zero 100 times beyond the largest count of
    the whole matrix, which happens where pi ~ 1 leaves the NB mean unidentified (log mu
    43.7 on PBMC 8k, R zinbwave 41.6: ``mu pi / ZINB(0)`` ~ mu gave 9.4e18 for a gene of
    observed mean 0.05); no count in the data supports such a value."""
    genes, cells, _ = m.fitted_masks()
    cols = np.flatnonzero(genes)
    Y = _counts(adata, layer, m)
    top = np.asarray(Y.max(0).todense()).ravel().astype(vals.dtype)
    fitted = vals[np.ix_(cells, cols)]
    # degenerate: an imputed value 100 times beyond the largest count of the whole matrix
    over = (fitted > DEGENERATE_FACTOR * Y.max()).any(0)
    top = np.where(over, top, np.inf).astype(vals.dtype)
    if over.any():
        import warnings

        names = np.asarray(m.var_names_).astype(str)[over]
        shown = ", ".join(names[:10]) + (", ..." if over.sum() > 10 else "")
        warnings.warn(
            f"{int(over.sum())} genes have imputed zeros over 100x the largest count in the data "
            f"({shown}): where their zero inflation is ~1 the data cannot identify their NB "
            "mean; their imputed zeros are capped at the gene's largest observed count",
            stacklevel=3,
        )
        vals[np.ix_(cells, cols)] = np.minimum(fitted, top)
    return vals


@doc_params(**DOCS)
def observational_weights(
    adata,
    *,
    layer: str | None = None,
    key: str = "X_zinbwave",
    key_added: str = "zinbwave_weights",
    model: ZINBWaVE | None = None,
    dtype: Any = np.float64,
    device: str = "cpu",
    copy: bool = False,
):
    """zinbwave's observational weights (``computeObservationalWeights``).

    The posterior probability that each zero comes from the negative binomial rather than the
    zero inflation, 1 for positive counts, floored at 1e-15 - the weights for
    :func:`zinbgrad.tl.differential_expression` (``weights_layer=key_added``), edgeR or DESeq2.
    zinbwave's vignette fits the model for these weights with ``epsilon=1e12``.

    Parameters
    ----------
    {adata}
    {layer_key}
    key_added
        ``adata.layers[key_added]`` receives the weights.
    {model}
    dtype
        dtype of the layer (float64 by default: the weights reach 1e-15).
    {device_copy}

    {returns}
    """
    info = {"output": "observational_weights", "key": key}
    return _layer_output(adata, "weights", info, layer, key, key_added, model, dtype, device, copy)


@doc_params(**DOCS)
def batch_corrected(
    adata,
    reference: str | None = None,
    *,
    kind: str = "mu",
    ignore_W: bool = False,
    key: str = "X_zinbwave",
    key_added: str = "zinbwave_batch_corrected",
    model: ZINBWaVE | None = None,
    dtype: Any = np.float32,
    device: str = "cpu",
    copy: bool = False,
):
    """Fitted expression of every cell as if measured in one batch (or averaged over batches).

    Parameters
    ----------
    adata
        The AnnData the model was fitted on with ``batch_key``.
    reference
        Batch level to move every cell to (default: the model's reference level) or
        ``"average"`` (mean over all batches, as scVI's ``transform_batch``).
    kind
        ``"mu"`` (NB mean), ``"mean"`` (``(1 - pi) mu``) or ``"log_mu"``.
    ignore_W
        Drop the latent factors too.
    key
        Key of the model stored by :func:`zinbgrad.tl.zinbwave`.
    key_added
        ``adata.layers[key_added]`` receives the values.
    {model}
    dtype
        dtype of the layer.
    {device_copy}

    {returns}

    Notes
    -----
    zinbwave's normalized values (:func:`normalize`) are residuals against a model that
    includes the batch columns of X, so they are already batch-corrected.
    """
    m, out_dtype, dev = _checked(adata, key, key_added, model, dtype, device)
    vals = _out.batch_corrected(
        m, reference, kind=kind, ignore_W=ignore_W, device=dev, out_dtype=out_dtype
    )
    vals = _spread(m, kind, vals)
    info = {
        "output": f"batch_corrected_{kind}",
        "key": key,
        "reference": str(reference if reference is not None else m.batch_info_["reference"]),
        "ignore_W": bool(ignore_W),
    }
    return _finish(adata, copy, key_added, vals, info)


def project(
    adata_query,
    model,
    key_added: str = "X_zinbwave",
    *,
    layer: str | None = None,
    key: str = "X_zinbwave",
    reference_batch: bool = False,
    batch_key: str | None = None,
    covariate_keys: list[str] | None = None,
    new_batches: bool = False,
    copy: bool = False,
):
    """Map new cells into a fitted model's latent space (zinbwave's projection).

    The gene parameters stay fixed; each query cell's ``W`` and ``gamma`` are fitted to its
    counts (:meth:`zinbgrad.ZINBWaVE.transform`). The query cells are encoded with the fit's
    own ``batch_key`` and ``covariate_keys``, read from ``adata_query.obs`` (fitted levels,
    the fit's reference; a missing column or an unseen level is an error).

    Parameters
    ----------
    adata_query
        Raw counts of the new cells. Genes are aligned by name with the model (extra genes are
        ignored; a missing gene is an error).
    model
        A fitted :class:`~zinbgrad.ZINBWaVE`, the reference AnnData holding one under
        ``key``, or the path of a model saved with :meth:`~zinbgrad.ZINBWaVE.save` (``.npz``)
        or of an ``.h5ad`` holding one.
    key_added
        ``adata_query.obsm[key_added]`` receives the latent factors (cells x K).
    layer
        Layer of ``adata_query`` with the counts.
    key
        Model key when ``model`` is an AnnData or an ``.h5ad`` path.
    reference_batch
        Encode every query cell as the fit's reference batch instead of reading its batch
        from ``adata_query.obs``.
    batch_key, covariate_keys
        Not needed (the fit's are used); when given they must be the fit's.
    new_batches
        Query cells of levels of the fit's ``batch_key`` that the fit did not see: estimate
        those levels' coefficients from their cells first, every fitted gene parameter
        fixed (:meth:`zinbgrad.ZINBWaVE.map_query`, a linear-model scArches); without it such
        a level is an error.
    copy
        Return a modified copy instead of writing into ``adata_query``.
    """
    check_anndata(adata_query, "adata_query")
    check_key(key_added, "key_added")
    model = _model_argument(model, key)
    query_genes = set(np.asarray(adata_query.var_names).astype(str))
    missing = [g for g in np.asarray(model.var_names_).astype(str) if g not in query_genes]
    if missing:
        raise ValueError(
            f"{len(missing)} genes of the model are missing from the query "
            f"(e.g. {', '.join(missing[:5])}); the query needs every model gene"
        )
    W = model.transform(
        adata_query,
        layer=layer,
        reference_batch=reference_batch,
        batch_key=batch_key,
        covariate_keys=covariate_keys,
        new_batches=new_batches,
    )
    target = adata_query.copy() if copy else adata_query
    target.obsm[key_added] = W
    target.uns.setdefault("zinbgrad_outputs", {})[key_added] = {
        "output": "projection",
        "n_components": int(W.shape[1]),
        "reference_batch": bool(reference_batch),
    }
    return target if copy else None


def _model_argument(model, key: str) -> ZINBWaVE:
    """A fitted model from a ZINBWaVE, an AnnData holding one, or a path (.npz / .h5ad)."""
    import os
    from pathlib import Path

    if isinstance(model, str | os.PathLike):
        path = Path(model)
        if not path.exists():
            raise FileNotFoundError(f"no such model file: {path}")
        if path.suffix == ".npz":
            return ZINBWaVE.load(path)
        import anndata as ad

        return model_from_anndata(ad.read_h5ad(path), key)
    if not isinstance(model, ZINBWaVE):
        check_anndata(model, "model (a fitted ZINBWaVE, the reference AnnData or a path)")
        model = model_from_anndata(model, key)
    check_fitted(model)
    return model
