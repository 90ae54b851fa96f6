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
import pandas as pd
import scipy.sparse as sp

__all__ = [
    "DATASETS",
    "UNLABELLED",
    "DatasetSpec",
    "find_data_dir",
    "filter_empty",
    "load_dataset",
    "otsu_threshold",
    "protein_cell_types",
    "subsample",
    "thin_by_cell_type",
    "train_test_split_cells",
]

#: Label of the cells that no rule of :func:`protein_cell_types` claims.
UNLABELLED = "unlabelled"


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
    type_thinning
        ``(n_batches, gene_sd, type_sd)``: split the cells at random into ``n_batches``
        batches and thin each with retention rates that depend on gene and cell type
        (:func:`thin_by_cell_type`; ``None``: no such thinning).
    protein_labels
        Derive ``obs[label_key]`` from ``obsm["protein_counts"]`` with
        :func:`protein_cell_types` (per batch ``batch_key``).
    """

    name: str
    file: str
    title: str
    label_key: str | None = None
    batch_key: str | None = None
    n_top_genes: int | None = None
    thinning: float | None = None
    type_thinning: tuple[int, float, float] | None = None
    protein_labels: bool = False


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
            "synthetic100k",
            # an absolute path: written by `python benchmarks/scaling.py --generate-only
            # --sizes 100k` (counts drawn from a K=10 fit of the 715-gene brain slice)
            os.environ.get("ZINBGRAD_SYNTHETIC_100K", "/tmp/zinbgrad_scaling/synthetic_100k.h5ad"),
            "synthetic 100k x 715 drawn from a K=10 zinbgrad fit of the brain slice",
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
        DatasetSpec(
            "pbmc_pair",
            "pbmc_protein_v3_2batches_400cells.h5ad",
            "10x PBMC 5k + 10k protein v3, two real batches, top-1000-variance genes, "
            "cell types from the 14 antibodies (protein_cell_types)",
            label_key="cell_type",
            batch_key="batch",
            n_top_genes=1000,
            protein_labels=True,
        ),
        DatasetSpec(
            "zeisel_typethin",
            "zeisel2015_descend_subset.h5ad",
            "Zeisel subset split at random into 3 batches, each thinned with gene- and "
            "cell-type-dependent retention rates (gene_sd=0.5, type_sd=0.5), 3 cell types",
            label_key="cell_type",
            batch_key="batch",
            type_thinning=(3, 0.5, 0.5),
        ),
    )
}


# --------------------------------------------------------------------------- protein labels


def otsu_threshold(values: np.ndarray, n_bins: int = 64) -> float:
    """Otsu's threshold of a 1-D sample: the histogram cut maximizing the between-class variance.

    Returns the upper edge of the best bin, so ``values > threshold`` is the upper class.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0 or not np.all(np.isfinite(v)):
        raise ValueError("otsu_threshold needs a non-empty, finite sample")
    if v.min() == v.max():
        return float(v.max())
    hist, edges = np.histogram(v, bins=int(n_bins))
    centers = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1.0)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1.0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


#: The marker rule of :func:`protein_cell_types`: label -> (positive markers, negative markers).
#: The rules are mutually exclusive by construction (each requires a defining marker of every
#: other rule to be absent); a cell that two rules would claim is left unlabelled all the same.
PROTEIN_RULES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "CD4 T": (("CD3", "CD4"), ("CD8a", "CD19", "CD14")),
    "CD8 T": (("CD3", "CD8a"), ("CD4", "CD19", "CD14")),
    "B": (("CD19",), ("CD3", "CD14")),
    "CD14 monocyte": (("CD14",), ("CD3", "CD19")),
    "NK": (("CD56",), ("CD3", "CD14", "CD19")),
}


def protein_cell_types(
    protein_counts: np.ndarray,
    protein_names: list[str] | np.ndarray,
    batches: np.ndarray | None = None,
) -> np.ndarray:
    """Cell types from antibody (ADT) counts by a documented marker rule.

    1. CLR per cell: ``log1p(x_ij) - mean_j log1p(x_ij)`` over the cell's antibodies (removes
       the cell's ADT depth).
    2. Per batch and antibody, a cell is *positive* when its CLR value is above Otsu's
       threshold of that antibody's CLR values in the batch (:func:`otsu_threshold`; the
       background of an antibody differs between 10x runs, so each batch gets its own cut).
    3. :data:`PROTEIN_RULES`: CD4 T = CD3+ CD4+ CD8- CD19- CD14-; CD8 T = CD3+ CD8+ CD4-
       CD19- CD14-; B = CD19+ CD3- CD14-; CD14 monocyte = CD14+ CD3- CD19-; NK = CD56+ CD3-
       CD14- CD19-. A cell that no rule claims, or that two rules claim, is
       :data:`UNLABELLED` (double positives, CD3+ CD4+ CD8+, CD16 monocytes, ...).

    Antibody names are matched on the part before the first ``_`` (``"CD3_TotalSeqB"`` is
    ``CD3``).

    Parameters
    ----------
    protein_counts
        ``(n_cells, n_antibodies)`` non-negative counts.
    protein_names
        The antibody names (must include every marker of :data:`PROTEIN_RULES`).
    batches
        Optional ``(n_cells,)`` batch of each cell (thresholds per batch).

    Returns
    -------
    numpy.ndarray
        ``(n_cells,)`` object array of labels.
    """
    P = np.asarray(protein_counts, dtype=np.float64)
    names = [str(n).split("_")[0] for n in protein_names]
    if P.ndim != 2 or P.shape[1] != len(names):
        raise ValueError(f"protein_counts must be (n_cells, {len(names)}), got {P.shape}")
    if np.any(P < 0) or not np.all(np.isfinite(P)):
        raise ValueError("protein_counts must be finite and non-negative")
    needed = sorted({m for pos, neg in PROTEIN_RULES.values() for m in pos + neg})
    missing = [m for m in needed if m not in names]
    if missing:
        raise ValueError(f"protein_names lacks the markers {missing}")
    b = np.zeros(P.shape[0], dtype=int) if batches is None else np.asarray(batches)
    if b.shape != (P.shape[0],):
        raise ValueError(f"batches must have shape ({P.shape[0]},), got {b.shape}")
    L = np.log1p(P)
    clr = L - L.mean(axis=1, keepdims=True)
    positive = np.zeros_like(clr, dtype=bool)
    for level in np.unique(b):
        rows = b == level
        for j in range(clr.shape[1]):
            positive[rows, j] = clr[rows, j] > otsu_threshold(clr[rows, j])
    col = {n: j for j, n in enumerate(names)}
    labels = np.full(P.shape[0], UNLABELLED, dtype=object)
    n_claims = np.zeros(P.shape[0], dtype=int)
    for label, (pos, neg) in PROTEIN_RULES.items():
        hit = np.ones(P.shape[0], dtype=bool)
        for m in pos:
            hit &= positive[:, col[m]]
        for m in neg:
            hit &= ~positive[:, col[m]]
        labels[hit] = label
        n_claims += hit
    labels[n_claims > 1] = UNLABELLED
    return labels


# --------------------------------------------------------------------------- type-dependent batches


def thin_by_cell_type(
    adata: ad.AnnData,
    labels: np.ndarray,
    n_batches: int = 3,
    gene_sd: float = 0.5,
    type_sd: float = 0.5,
    seed: int = 0,
    *,
    batch_key: str = "batch",
) -> ad.AnnData:
    """Semi-synthetic batches whose effect depends on gene AND cell type.

    The cells are split uniformly at random into ``n_batches`` batches (sizes differ by at
    most one). Every count ``x_ij`` of a cell ``i`` of batch ``b`` and cell type ``t`` becomes
    ``Binomial(x_ij, p[b, t, j])`` with retention rate

    ``p[b, t, j] = exp(-|g[b, j] + u[b, t, j]|)``, ``g ~ N(0, gene_sd^2)``,
    ``u ~ N(0, type_sd^2)``,

    i.e. a per-gene batch shift ``g`` (what a batch column of X can remove) plus a
    cell-type-specific part ``u`` (what it cannot). Every batch is thinned. All randomness
    (split, rates, thinning) comes from ``numpy.random.default_rng(seed)``, in that order.

    Returns
    -------
    anndata.AnnData
        New AnnData (``X`` CSR float64 counts, never larger than the input's) with
        ``obs[batch_key]`` (categorical ``"0"``, ``"1"``, ...), the input's ``obs``
        columns, and ``uns["retention"]`` = ``{"rates": p, "types": [...]}``.
    """
    if int(n_batches) < 2:
        raise ValueError(f"n_batches must be >= 2, got {n_batches}")
    for name, v in (("gene_sd", gene_sd), ("type_sd", type_sd)):
        if not (np.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {v}")
    M = sp.csr_matrix(adata.X, dtype=np.float64, copy=True)
    M.sum_duplicates()
    if M.data.size and (np.any(M.data < 0) or np.any(M.data != np.round(M.data))):
        raise ValueError("thin_by_cell_type needs non-negative integer counts")
    n_cells, n_genes = M.shape
    lab = np.asarray(labels).astype(str)
    if lab.shape != (n_cells,):
        raise ValueError(f"labels must have shape ({n_cells},), got {lab.shape}")
    types, type_of = np.unique(lab, return_inverse=True)
    rng = np.random.default_rng(seed)
    batch_of = rng.permutation(np.arange(n_cells) % int(n_batches))
    g = rng.normal(0.0, float(gene_sd), size=(int(n_batches), 1, n_genes))
    u = rng.normal(0.0, float(type_sd), size=(int(n_batches), types.size, n_genes))
    rates = np.exp(-np.abs(g + u))
    row_of = np.repeat(np.arange(n_cells), np.diff(M.indptr))
    p = rates[batch_of[row_of], type_of[row_of], M.indices]
    M.data = rng.binomial(M.data.astype(np.int64), p).astype(np.float64)
    M.eliminate_zeros()
    obs = adata.obs.copy()
    levels = [str(k) for k in range(int(n_batches))]
    obs[batch_key] = pd.Categorical(batch_of.astype(str), categories=levels)
    out = ad.AnnData(X=M, obs=obs, var=adata.var.copy())
    out.uns["retention"] = {"rates": rates, "types": types.tolist()}
    return out


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
    from zinbgrad.pp import select_top_variance_genes

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
    if spec.protein_labels:
        adata.obs[spec.label_key] = protein_cell_types(
            np.asarray(raw.obsm["protein_counts"]),
            list(raw.uns["protein_names"]),
            raw.obs[spec.batch_key].to_numpy() if spec.batch_key else None,
        )
    if spec.type_thinning is not None:
        n_b, gene_sd, type_sd = spec.type_thinning
        adata = thin_by_cell_type(
            adata,
            adata.obs[spec.label_key].to_numpy(),
            n_batches=n_b,
            gene_sd=gene_sd,
            type_sd=type_sd,
            seed=seed,
            batch_key=spec.batch_key or "batch",
        )
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
