"""The AnnData entry point of differential expression (``zinbgrad.tl.differential_expression``).

It reads counts and zinbwave weights from an AnnData, builds the design ``~ groupby +
covariates`` and stores the table of :func:`~zinbgrad.de.glm_weighted_f` in ``.uns``; all the
numerics live in the other ``zinbgrad.de`` modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.validate import check_anndata, check_key
from .testing import glm_weighted_f
from .utils import check_counts, to_dense


def _obs_column(adata: Any, key: str, what: str) -> pd.Series:
    if key not in adata.obs.columns:
        raise KeyError(f"{what} {key!r} is not a column of adata.obs")
    return adata.obs[key]


def _resolve_levels(
    adata: Any, groupby: str, group: str | None, reference: str | None
) -> tuple[np.ndarray, list[str], str, str]:
    """The cells' labels as text, the non-empty levels, and the checked ``group`` and
    ``reference`` levels (defaults: the first level; the only other non-empty level)."""
    labels = _obs_column(adata, groupby, "groupby")
    if labels.isna().any():
        raise ValueError(f"adata.obs[{groupby!r}] contains missing values")
    cat = labels.astype("category")
    levels = [str(lv) for lv in cat.cat.categories]
    if len(set(levels)) < len(levels):
        raise ValueError(
            f"levels of adata.obs[{groupby!r}] coincide as text ({list(cat.cat.categories)}); "
            "give them distinct names"
        )
    lab = cat.astype(str).to_numpy()
    present = [lv for lv in levels if np.any(lab == lv)]
    if reference is None:
        if not present:
            raise ValueError(f"adata.obs[{groupby!r}] has no cells")
        reference = present[0]
    reference = str(reference)
    if reference not in levels:
        raise ValueError(f"reference level {reference!r} is not a level of {groupby!r}: {levels}")
    if group is None:
        others = [lv for lv in present if lv != reference]
        if len(others) != 1:
            raise ValueError(
                f"{groupby!r} has {len(present)} non-empty levels; pass `group` explicitly"
            )
        group = others[0]
    group = str(group)
    if group not in levels:
        raise ValueError(f"group level {group!r} is not a level of {groupby!r}: {levels}")
    if group == reference:
        raise ValueError("group and reference must differ")
    for lv in (group, reference):
        if not np.any(lab == lv):
            raise ValueError(f"level {lv!r} of {groupby!r} has no cells")
    return lab, present, group, reference


def _build_design(
    adata: Any,
    groupby: str,
    lab: np.ndarray,
    present: list[str],
    reference: str,
    covariates: Sequence[str],
) -> tuple[np.ndarray, list[str]]:
    """The design ``~ groupby + covariates`` (R's ``model.matrix``: treatment coding with
    ``reference`` and each covariate's first non-empty level as baselines) and its column
    names."""
    order = [reference] + [lv for lv in present if lv != reference]
    cols = [np.ones(adata.n_obs)]
    names = ["(Intercept)"]
    for lv in order[1:]:
        cols.append((lab == lv).astype(np.float64))
        names.append(f"{groupby}{lv}")
    for cov in covariates:
        s = _obs_column(adata, cov, "covariate")
        if s.isna().any():
            raise ValueError(f"covariate {cov!r} contains missing values")
        if pd.api.types.is_numeric_dtype(s) and not isinstance(s.dtype, pd.CategoricalDtype):
            cols.append(s.to_numpy(dtype=np.float64))
            names.append(cov)
        else:
            c = s.astype("category")
            c_lab = c.astype(str).to_numpy()
            c_levels = [str(v) for v in c.cat.categories if np.any(c_lab == str(v))]
            for lv in c_levels[1:]:
                cols.append((c_lab == lv).astype(np.float64))
                names.append(f"{cov}{lv}")
    design = np.column_stack(cols)
    if np.linalg.matrix_rank(design) < design.shape[1]:
        raise ValueError(f"the design {names} is not of full rank (confounded covariates?)")
    return design, names


def _read_counts(adata: Any, layer: str | None) -> np.ndarray:
    """Validated cells x genes counts of ``X`` or ``layers[layer]`` as float64 (never a view
    that could write to ``adata``); every cell needs a positive total."""
    if layer is None:
        counts = adata.X
    else:
        if layer not in adata.layers:
            raise KeyError(f"layer {layer!r} is not in adata.layers")
        counts = adata.layers[layer]
    if counts is None:
        raise ValueError("no count matrix found (adata.X is None)")
    if not (sp.issparse(counts) or isinstance(counts, np.ndarray)):
        counts = counts[:]  # a backed AnnData's matrix on disk: read it (DE is in memory)
    y = to_dense(counts)  # a copy or a float view; adata is never written to
    check_counts(y)
    lib = y.sum(axis=1)
    if np.any(lib <= 0):
        raise ValueError(f"{int(np.sum(lib <= 0))} cells have zero total counts; remove them")
    return y


def _read_weights(adata: Any, weights_layer: str | None, shape: tuple[int, int]) -> Any:
    """The observational weights of ``layers[weights_layer]`` (``None`` without a layer)."""
    if weights_layer is None:
        return None
    if weights_layer not in adata.layers:
        raise KeyError(f"weights layer {weights_layer!r} is not in adata.layers")
    weights = to_dense(adata.layers[weights_layer], "weights")
    if weights.shape != shape:
        raise ValueError(
            f"weights layer has shape {weights.shape}, expected {shape} (cells x genes)"
        )
    return weights


def _design_from_obs(
    adata: Any,
    groupby: str,
    group: str | None,
    reference: str | None,
    covariates: str | Sequence[str] | None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The design of ``group`` vs ``reference`` (+ covariates) and the settings that define it
    (the first entries of ``uns[f"{key_added}_params"]``)."""
    covariates = [covariates] if isinstance(covariates, str) else list(covariates or [])
    lab, present, group, reference = _resolve_levels(adata, groupby, group, reference)
    design, names = _build_design(adata, groupby, lab, present, reference, covariates)
    coef = names.index(f"{groupby}{group}")
    params = {
        "groupby": groupby,
        "group": group,
        "reference": reference,
        "covariates": covariates,
        "design_columns": names,
        "tested_coefficient": names[coef],
    }
    return design, params


def _settings(
    params: dict[str, Any], weights_layer: str | None, layer: str | None, details: dict[str, Any]
) -> dict[str, Any]:
    """``uns[f"{key_added}_params"]``: the design settings, the layers and the fitted
    normalization (common dispersion, prior df, TMM factors)."""
    disp_est = details["dispersion"]
    return {
        **params,
        "weights_layer": weights_layer if weights_layer is not None else "",
        "layer": layer if layer is not None else "",
        "common_dispersion": float(disp_est.common) if disp_est is not None else np.nan,
        "prior_df": float(details["prior_df"]),
        "norm_factors": details["norm_factors"],
    }


def differential_expression(
    adata: Any,
    groupby: str,
    group: str | None = None,
    reference: str | None = None,
    covariates: Sequence[str] | None = None,
    weights_layer: str | None = None,
    layer: str | None = None,
    dispersion: Any = None,
    key_added: str = "zinbgrad_de",
    copy: bool = False,
    *,
    independent_filtering: bool = True,
    prior_df: float | None = None,
) -> pd.DataFrame | tuple[pd.DataFrame, Any]:
    """Weighted NB-GLM differential expression of ``group`` vs ``reference`` (glmWeightedF).

    Builds the design ``~ groupby + covariates`` on **all** cells (treatment coding with
    ``reference`` as baseline, the other levels of ``groupby`` get their own coefficients, as in
    edgeR's ``model.matrix(~group)``), and tests the coefficient of ``group`` with
    :func:`glm_weighted_f` using the zinbwave observational weights in
    ``adata.layers[weights_layer]``.

    Parameters
    ----------
    adata
        AnnData with raw counts (cells x genes) in ``X`` or ``layers[layer]``.
    groupby
        Categorical column of ``adata.obs`` defining the groups.
    group
        Level tested against ``reference``. Default: the only non-reference level when
        ``groupby`` has exactly two levels.
    reference
        Baseline level (default: the first category).
    covariates
        Extra ``adata.obs`` columns added to the design (numeric as-is, categorical with
        treatment coding).
    weights_layer
        Layer holding observational weights in (0, 1] (e.g. from zinbwave); ``None`` runs the
        unweighted edgeR analysis (with the same F test).
    layer
        Layer holding the counts (default ``adata.X``).
    dispersion
        ``None`` (estimate as edgeR) or a scalar / per-gene dispersion.
    key_added
        Key of ``adata.uns`` receiving the result table (and ``f"{key_added}_params"`` the
        settings).
    copy
        Work on (and return) a copy of ``adata`` instead of modifying it.
    independent_filtering
        Compute the ``padj_filter`` column.
    prior_df
        Prior df override (see :func:`glm_weighted_f`).

    Returns
    -------
    pandas.DataFrame or (pandas.DataFrame, AnnData)
        Per-gene table indexed by ``var_names`` with columns ``log2_fold_change``, ``logCPM``,
        ``statistic``, ``pvalue``, ``padj``, ``padj_filter`` and diagnostics; with
        ``copy=True`` also the annotated copy.

    Raises
    ------
    KeyError
        Unknown ``groupby``, covariate or layer keys.
    ValueError
        Missing levels, empty groups, invalid counts or weights.
    """
    check_anndata(adata)
    check_key(key_added, "key_added")
    if copy:
        adata = adata.to_memory() if adata.isbacked else adata.copy()
    design, params = _design_from_obs(adata, groupby, group, reference, covariates)
    y = _read_counts(adata, layer)
    table, details = glm_weighted_f(
        y,
        design,
        params["design_columns"].index(params["tested_coefficient"]),
        weights=_read_weights(adata, weights_layer, y.shape),
        dispersion=dispersion,
        prior_df=prior_df,
        independent_filtering=independent_filtering,
        gene_names=list(map(str, adata.var_names)),
        return_details=True,
    )
    adata.uns[key_added] = table
    adata.uns[f"{key_added}_params"] = _settings(params, weights_layer, layer, details)
    return (table, adata) if copy else table
