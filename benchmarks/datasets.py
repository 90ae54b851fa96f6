"""Datasets of the benchmark: loading, filtering and subsampling (all seeded).

Every dataset comes from ``shared/data`` (see its README.md). The preparation of each is
deterministic given the seed, so every method of a run sees exactly the same cells, genes and
splits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "find_data_dir",
    "filter_empty",
    "load_dataset",
    "subsample",
    "train_test_split_cells",
]


@dataclass(frozen=True)
class DatasetSpec:
    """How to build one benchmark dataset.

    Attributes
    ----------
    name
        Short name used in tables and file names.
    file
        ``.h5ad`` file in the data directory.
    title
        Human readable description for the report.
    label_key, batch_key
        ``obs`` columns with cell types / batches (``None`` when absent).
    n_top_genes
        Keep this many highest-variance genes (raw-count variance, the scVI rule) after dropping
        all-zero genes; ``None`` keeps all.
    thinning
        Build a semi-synthetic two-batch set with :func:`zinbgrad.metrics.binomial_thinning_batch`
        using this ``effect_sd`` (``None``: no thinning).
    """

    name: str
    file: str
    title: str
    label_key: str | None = None
    batch_key: str | None = None
    n_top_genes: int | None = None
    thinning: float | None = None


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "zeisel",
            "zeisel2015_descend_subset.h5ad",
            "Zeisel 2015 subset (CORTEX stand-in), 3 cell types",
            label_key="cell_type",
        ),
        DatasetSpec(
            "pbmc8k",
            "pbmc8k_scvijl_200genes.h5ad",
            "10x PBMC 8k, 200 genes, 8 cell types",
            label_key="cell_type",
        ),
        DatasetSpec(
            "camp",
            "camp2015_fetal_cortex_soup.h5ad",
            "Camp 2015 fetal cortex (C1 read counts), top-1000-variance genes, 7 types",
            label_key="cell_type",
            n_top_genes=1000,
        ),
        DatasetSpec(
            "pbmc_protein",
            "pbmc_protein_v3_2batches_400cells.h5ad",
            "10x PBMC 5k + 10k protein v3, two real batches, top-1000-variance genes",
            batch_key="batch",
            n_top_genes=1000,
        ),
        DatasetSpec(
            "brain10k",
            "brain1m_10x_first10k_cells_first1000_genes.h5ad",
            "10x 1.3M brain, first 10k cells x first 1000 genes, all-zero genes/cells removed",
        ),
        DatasetSpec(
            "zeisel_thinned",
            "zeisel2015_descend_subset.h5ad",
            "Zeisel subset + semi-synthetic batch (binomial thinning of a random half, "
            "effect_sd=1.0), 3 cell types",
            label_key="cell_type",
            batch_key="batch",
            thinning=1.0,
        ),
    )
}


def find_data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """Locate ``shared/data``.

    Order: ``explicit``; ``$ZINBGRAD_SHARED/data`` (or ``$ZINBGRAD_SHARED`` itself when it
    holds the files); ``<repo>/../shared/data``; ``<repo>/shared/data``. Returns ``None`` when
    none exists.
    """
    candidates: list[Path] = []
    if explicit is not None:
        candidates.append(Path(explicit))
    env = os.environ.get("ZINBGRAD_SHARED")
    if env:
        candidates += [Path(env) / "data", Path(env)]
    repo = Path(__file__).resolve().parents[1]
    candidates += [repo.parent / "shared" / "data", repo / "shared" / "data"]
    for c in candidates:
        if (c / DATASETS["zeisel"].file).is_file():
            return c
    return None


def _row_sums(X) -> np.ndarray:
    return np.asarray(X.sum(axis=1)).ravel()


def _col_sums(X) -> np.ndarray:
    return np.asarray(X.sum(axis=0)).ravel()


def filter_empty(adata: ad.AnnData) -> ad.AnnData:
    """Drop all-zero genes, then all-zero cells, then genes left all-zero (a copy)."""
    out = adata[:, _col_sums(adata.X) > 0]
    out = out[_row_sums(out.X) > 0]
    out = out[:, _col_sums(out.X) > 0]
    return out.copy()


def subsample(adata: ad.AnnData, n_cells: int | None, seed: int) -> ad.AnnData:
    """Uniform random subsample of ``n_cells`` cells (seeded; order kept); a copy."""
    if n_cells is None or n_cells >= adata.n_obs:
        return adata.copy()
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(adata.n_obs, size=int(n_cells), replace=False))
    return adata[idx].copy()


def _top_variance(adata: ad.AnnData, n_top: int) -> ad.AnnData:
    from zinbgrad.data.readers import select_top_variance_genes

    if n_top >= adata.n_vars:
        return adata
    return select_top_variance_genes(adata, int(n_top))


def load_dataset(
    name: str,
    data_dir: str | os.PathLike,
    *,
    max_cells: int | None = None,
    max_genes: int | None = None,
    seed: int = 0,
) -> ad.AnnData:
    """Load and prepare one benchmark dataset.

    Steps: read the ``.h5ad`` (``X`` as float64 CSR counts); thin one half of the cells when
    the spec asks for it; subsample ``max_cells`` cells uniformly (seeded); drop all-zero
    genes and cells; keep the spec's ``n_top_genes`` (capped by ``max_genes``)
    highest-variance genes; drop cells left with zero counts.

    Returns
    -------
    anndata.AnnData
        With ``obs["label"]`` / ``obs["batch"]`` (categorical) where the data provides them
        and ``uns["benchmark"]`` describing the preparation.
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    spec = DATASETS[name]
    path = Path(data_dir) / spec.file
    raw = ad.read_h5ad(path)
    X = sp.csr_matrix(raw.X, dtype=np.float64)
    adata = ad.AnnData(X=X, obs=raw.obs.copy(), var=raw.var[[]].copy())
    if spec.thinning is not None:
        from zinbgrad.metrics import binomial_thinning_batch

        adata = binomial_thinning_batch(
            adata, frac=0.5, effect_sd=spec.thinning, random_state=seed, batch_key="batch"
        )
        adata.X = sp.csr_matrix(adata.X, dtype=np.float64)
    adata = subsample(adata, max_cells, seed)
    adata = filter_empty(adata)
    n_top = spec.n_top_genes
    if max_genes is not None:
        n_top = max_genes if n_top is None else min(n_top, max_genes)
    if n_top is not None:
        adata = _top_variance(adata, n_top)
        adata = filter_empty(adata)
    obs = adata.obs
    keep_cols = {}
    if spec.label_key is not None:
        keep_cols["label"] = obs[spec.label_key].astype(str).astype("category")
    if spec.batch_key is not None:
        keep_cols["batch"] = obs[spec.batch_key].astype(str).astype("category")
    adata.obs = obs[[]].assign(**keep_cols)
    adata.var = adata.var[[]]
    adata.uns["benchmark"] = {
        "dataset": name,
        "file": spec.file,
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "seed": int(seed),
    }
    return adata


def train_test_split_cells(
    n_cells: int, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of cell indices into (train, test), each sorted."""
    rng = np.random.default_rng(seed + 1)
    perm = rng.permutation(n_cells)
    n_test = max(1, int(round(test_fraction * n_cells)))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])
