"""Evaluation metrics of the scVI benchmark (Lopez et al., Nature Methods 2018).

The definitions follow the scVI reference code (``scvi/inference/posterior.py``
and ``scvi/dataset/dataset.py`` of the scVI / scvi-tools repository, 2018-2019):

clustering_scores
    K-means on the latent space with k = number of true labels; ARI, NMI
    (``sqrt(H(P) H(T))`` normalisation, as stated in the paper) and the
    average silhouette width of the latent space on the true labels.
batch_mixing_entropy
    Entropy of batch mixing: regional Shannon entropies (natural log) of the
    batch frequencies among the 50 nearest neighbours (the cell itself
    excluded) of random cells, averaged within and then across pools.
corrupt_counts / imputation_error
    The imputation benchmark: zero out a uniformly chosen fraction of the
    non-zero entries and report the median absolute error on them.
binomial_thinning_batch
    A semi-synthetic two-batch data set made by binomial thinning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from sklearn.neighbors import NearestNeighbors

__all__ = [
    "clustering_scores",
    "batch_mixing_entropy",
    "CorruptedCounts",
    "corrupt_counts",
    "imputation_error",
    "binomial_thinning_batch",
]

ArrayLike = Any


# --------------------------------------------------------------------------- validation


def _as_latent(latent: ArrayLike, name: str = "latent") -> np.ndarray:
    if hasattr(latent, "detach"):  # torch tensor
        latent = latent.detach().cpu().numpy()
    if sp.issparse(latent):
        raise ValueError(f"{name} must be a dense (n_cells, n_dims) array, got a sparse matrix")
    arr = np.asarray(latent, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_cells, n_dims), got shape {arr.shape}")
    if arr.shape[0] < 2 or arr.shape[1] < 1:
        raise ValueError(f"{name} needs at least 2 cells and 1 dimension, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _as_labels(labels: ArrayLike, n: int, name: str) -> np.ndarray:
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.ravel()
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries but latent has {n} cells")
    codes, _ = pd.factorize(arr, use_na_sentinel=True)
    if np.any(codes < 0):
        raise ValueError(f"{name} contains missing values")
    return codes


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- clustering


def clustering_scores(
    latent: ArrayLike,
    labels: ArrayLike,
    n_clusters: int | None = None,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    *,
    n_init: int = 200,
    nmi_average_method: str = "geometric",
    silhouette_sample_size: int | None = None,
) -> dict[str, Any]:
    """K-means clustering scores (ARI, NMI) and silhouette width of a latent space.

    Definitions (scVI ``Posterior.clustering_scores`` and Lopez et al. 2018):

    * For each seed, ``KMeans(n_clusters=k, n_init=n_init, random_state=seed)``
      (scikit-learn) is fitted on ``latent``; k defaults to the number of
      distinct true labels. scVI used ``n_init=200``.
    * ARI: :func:`sklearn.metrics.adjusted_rand_score` of true vs. predicted
      clusters.
    * NMI: ``I(P; T) / sqrt(H(P) H(T))`` (the paper's definition; scikit-learn's
      ``average_method="geometric"``, its default when scVI was published;
      today's default is ``"arithmetic"``).
    * ASW: :func:`sklearn.metrics.silhouette_score` (Euclidean) of ``latent``
      with the TRUE labels; it does not depend on the clustering.

    Parameters
    ----------
    latent
        ``(n_cells, n_dims)`` latent coordinates.
    labels
        ``(n_cells,)`` true labels (any hashable values).
    n_clusters
        Number of K-means clusters; ``None`` uses the number of label levels.
    seeds
        K-means random states; ARI and NMI are reported per seed and averaged.
    n_init
        K-means restarts per seed (the best inertia is kept).
    nmi_average_method
        Normaliser of the NMI, passed to
        :func:`sklearn.metrics.normalized_mutual_info_score`.
    silhouette_sample_size
        Compute the silhouette on this many random cells (seeded by
        ``seeds[0]``); ``None`` uses all cells (O(n^2) distances).

    Returns
    -------
    dict
        ``ari``, ``nmi`` (means over seeds), ``ari_std``, ``nmi_std``,
        ``ari_per_seed``, ``nmi_per_seed`` (lists), ``asw`` (float),
        ``n_clusters`` and ``seeds``.

    Raises
    ------
    ValueError
        On shape mismatches, fewer than 2 label levels, an invalid
        ``n_clusters`` or empty ``seeds``.
    """
    X = _as_latent(latent)
    codes = _as_labels(labels, X.shape[0], "labels")
    n_levels = int(codes.max()) + 1
    if n_levels < 2:
        raise ValueError("labels must have at least 2 distinct values")
    if n_levels >= X.shape[0]:
        raise ValueError(
            f"labels have {n_levels} levels for {X.shape[0]} cells; the silhouette needs "
            "fewer levels than cells"
        )
    k = n_levels if n_clusters is None else _check_positive_int(n_clusters, "n_clusters")
    if k > X.shape[0]:
        raise ValueError(f"n_clusters={k} exceeds the number of cells ({X.shape[0]})")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must not be empty")
    n_init = _check_positive_int(n_init, "n_init")

    ari, nmi = [], []
    for seed in seeds:
        pred = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(X)
        ari.append(float(adjusted_rand_score(codes, pred)))
        nmi.append(
            float(normalized_mutual_info_score(codes, pred, average_method=nmi_average_method))
        )

    if silhouette_sample_size is not None:
        size = _check_positive_int(silhouette_sample_size, "silhouette_sample_size")
        asw = silhouette_score(X, codes, sample_size=min(size, X.shape[0]), random_state=seeds[0])
    else:
        asw = silhouette_score(X, codes)

    return {
        "ari": float(np.mean(ari)),
        "nmi": float(np.mean(nmi)),
        "ari_std": float(np.std(ari)),
        "nmi_std": float(np.std(nmi)),
        "ari_per_seed": ari,
        "nmi_per_seed": nmi,
        "asw": float(asw),
        "n_clusters": k,
        "seeds": seeds,
    }


# --------------------------------------------------------------------------- batch mixing


def batch_mixing_entropy(
    latent: ArrayLike,
    batches: ArrayLike,
    n_neighbors: int = 50,
    n_pools: int = 100,
    n_samples_per_pool: int = 100,
    random_state: int | None = 0,
) -> float:
    """Entropy of batch mixing of a latent space (scVI / Haghverdi et al. 2018).

    Definition (scVI ``entropy_batch_mixing``): repeat ``n_pools`` times: draw
    ``n_samples_per_pool`` cells uniformly at random (with replacement, as
    ``np.random.choice`` in the reference); for each, take its
    ``n_neighbors`` nearest neighbours in ``latent`` (Euclidean), **excluding
    the cell itself** (the reference builds the ``n_neighbors + 1``-NN graph
    and subtracts the identity); compute the regional Shannon entropy
    ``-sum_b p_b log(p_b)`` of the batch frequencies ``p_b`` among those
    neighbours, with the **natural logarithm**; average over the pool's cells,
    then over pools.

    With two batches the value lies in ``[0, log 2 ~ 0.693]``: about
    ``log 2`` for perfectly mixed balanced batches (slightly less, by
    sampling noise of the neighbour counts) and 0 for fully separated ones.
    More than two batches are allowed (maximum ``log(n_batches)``); the 2018
    reference rejected them.

    Parameters
    ----------
    latent
        ``(n_cells, n_dims)`` latent coordinates.
    batches
        ``(n_cells,)`` batch labels (any hashable values).
    n_neighbors
        Neighbours per cell, the cell excluded; clipped to ``n_cells - 1``
        as in the reference.
    n_pools
        Number of repetitions averaged.
    n_samples_per_pool
        Random cells per repetition.
    random_state
        Seed of the cell sampling (``numpy.random.default_rng``).

    Returns
    -------
    float
        The mean regional entropy, in nats.

    Raises
    ------
    ValueError
        On shape mismatches or non-positive parameters.
    """
    X = _as_latent(latent)
    n = X.shape[0]
    codes = _as_labels(batches, n, "batches")
    k = min(_check_positive_int(n_neighbors, "n_neighbors"), n - 1)
    n_pools = _check_positive_int(n_pools, "n_pools")
    n_samples_per_pool = _check_positive_int(n_samples_per_pool, "n_samples_per_pool")
    n_batches = int(codes.max()) + 1
    if n_batches < 2:
        return 0.0

    rng = np.random.default_rng(random_state)
    picks = rng.integers(0, n, size=(n_pools, n_samples_per_pool))
    query, inverse = np.unique(picks, return_inverse=True)

    nn = NearestNeighbors(n_neighbors=k + 1).fit(X)
    neigh = nn.kneighbors(X[query], return_distance=False)
    # drop the cell itself; if exact duplicates pushed it out of the k+1 list,
    # drop the farthest neighbour instead so that exactly k remain.
    keep = neigh != query[:, None]
    no_self = keep.all(axis=1)
    keep[no_self, -1] = False
    neigh = neigh[keep].reshape(query.size, k)

    nb = codes[neigh]  # (n_query, k) batch codes
    counts = np.zeros((query.size, n_batches), dtype=np.float64)
    np.add.at(counts, (np.repeat(np.arange(query.size), k), nb.ravel()), 1.0)
    freqs = counts / k
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(freqs > 0, freqs * np.log(freqs), 0.0)
    entropies = -terms.sum(axis=1)

    per_pick = entropies[inverse.reshape(picks.shape)]
    return float(per_pick.mean(axis=1).mean())


# --------------------------------------------------------------------------- imputation


class CorruptedCounts(NamedTuple):
    """Result of :func:`corrupt_counts`.

    Attributes
    ----------
    X
        Corrupted copy of the counts (CSR, explicit zeros removed).
    rows, cols
        Coordinates of the corrupted entries (``int64``, row-major order).
    values
        Their original (non-zero) values.
    """

    X: sp.csr_matrix
    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray


def corrupt_counts(
    X: ArrayLike,
    rate: float = 0.1,
    random_state: int | None = 0,
    *,
    zero_prob: float = 1.0,
) -> CorruptedCounts:
    """Zero out a uniformly chosen fraction of the non-zero counts (imputation benchmark).

    The scVI "uniform" corruption: choose ``floor(rate * nnz)`` of the ``nnz``
    non-zero entries uniformly without replacement and set them to zero. The
    input is not modified.

    Note on the reference code: scVI's ``GeneExpressionDataset.corrupt``
    multiplies each chosen entry by a ``Bernoulli(0.9)`` draw, so only about
    10% of the chosen entries become zero, and its imputation score uses only
    the entries that actually changed. ``zero_prob=0.1`` reproduces that
    literally; the default ``zero_prob=1.0`` zeroes every chosen entry, as
    the paper's text describes.

    Parameters
    ----------
    X
        ``(n_cells, n_genes)`` counts, dense or sparse.
    rate
        Fraction of the non-zero entries chosen, in ``[0, 1]``.
    random_state
        Seed (``numpy.random.default_rng``).
    zero_prob
        Probability that a chosen entry is actually zeroed, in ``(0, 1]``.

    Returns
    -------
    CorruptedCounts
        ``(X, rows, cols, values)``: the corrupted CSR copy and the
        coordinates and original values of the zeroed entries.
    """
    if not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    if not 0.0 < float(zero_prob) <= 1.0:
        raise ValueError(f"zero_prob must be in (0, 1], got {zero_prob}")
    if hasattr(X, "detach"):
        X = X.detach().cpu().numpy()
    if sp.issparse(X):
        M = sp.csr_matrix(X, copy=True)
    else:
        arr = np.asarray(X)
        if arr.ndim != 2:
            raise ValueError(f"X must be 2-D (n_cells, n_genes), got shape {arr.shape}")
        M = sp.csr_matrix(arr)
    if M.ndim != 2:
        raise ValueError(f"X must be 2-D, got shape {M.shape}")
    M.sum_duplicates()
    M.eliminate_zeros()
    M.sort_indices()

    nnz = M.nnz
    n_chosen = int(np.floor(float(rate) * nnz))
    rng = np.random.default_rng(random_state)
    chosen = np.sort(rng.choice(nnz, size=n_chosen, replace=False))
    if zero_prob < 1.0:
        chosen = chosen[rng.random(chosen.size) < zero_prob]

    rows_all = np.repeat(np.arange(M.shape[0], dtype=np.int64), np.diff(M.indptr))
    rows = rows_all[chosen]
    cols = M.indices[chosen].astype(np.int64)
    values = M.data[chosen].copy()
    M.data[chosen] = 0
    M.eliminate_zeros()
    return CorruptedCounts(M, rows, cols, values)


def imputation_error(original_values: ArrayLike, imputed_values: ArrayLike) -> float:
    """Median L1 distance between original and imputed values of the corrupted entries.

    ``median_i |original_i - imputed_i|`` over the corrupted entries (scVI
    ``Posterior.imputation_score``: the median of the absolute differences,
    all cells pooled).

    Parameters
    ----------
    original_values
        Original counts of the corrupted entries (``CorruptedCounts.values``).
    imputed_values
        The model's imputed values (e.g. the mean ``mu``) at the same entries,
        in the same order and shape.

    Returns
    -------
    float
        The median absolute error.
    """
    orig = np.asarray(original_values, dtype=np.float64)
    imp = np.asarray(imputed_values, dtype=np.float64)
    if orig.shape != imp.shape:
        raise ValueError(
            f"original_values and imputed_values differ in shape: {orig.shape} vs {imp.shape}"
        )
    if orig.size == 0:
        raise ValueError("no corrupted entries to score")
    if not (np.all(np.isfinite(orig)) and np.all(np.isfinite(imp))):
        raise ValueError("original_values and imputed_values must be finite")
    return float(np.median(np.abs(orig - imp)))


# --------------------------------------------------------------------------- semi-synthetic batch


def binomial_thinning_batch(
    adata: ad.AnnData,
    frac: float = 0.5,
    effect_sd: float = 0.5,
    random_state: int | None = 0,
    *,
    layer: str | None = None,
    keep_prob: ArrayLike | None = None,
    batch_key: str = "batch",
) -> ad.AnnData:
    """Make a two-batch data set by binomially thinning the counts of one random half.

    The cells are split uniformly at random into batch ``"0"`` (untouched) and
    batch ``"1"`` (``round(frac * n_cells)`` cells). Every count ``x_ij`` of a
    batch-1 cell is replaced by ``Binomial(x_ij, p_j)``, with a gene-specific
    keep probability ``p_j = exp(-|z_j|)``, ``z_j ~ N(0, effect_sd^2)``, i.e.
    a multiplicative technical effect on the expected counts
    (``E[thinned] = p_j x_ij``) of log-scale size ``|z_j|``. Thinning never
    increases a count and keeps integer counts integer.

    Parameters
    ----------
    adata
        Cells x genes AnnData with raw integer counts.
    frac
        Fraction of the cells put in the thinned batch ``"1"``, in ``(0, 1)``.
    effect_sd
        Standard deviation of the log keep probabilities' half-normal
        (``>= 0``; 0 means no effect).
    random_state
        Seed (``numpy.random.default_rng``) of the split, the effects and the
        thinning.
    layer
        Layer holding the counts (``None``: ``X``).
    keep_prob
        Optional explicit ``(n_genes,)`` keep probabilities in ``(0, 1]``,
        used instead of drawing them.
    batch_key
        ``obs`` column receiving the batch (overwritten if present).

    Returns
    -------
    anndata.AnnData
        New AnnData (``X`` CSR) with ``obs[batch_key]`` (categorical ``"0"``,
        ``"1"``) and ``var["keep_prob"]``; ``obs`` and ``var`` columns of the
        input are kept, its layers are not.
    """
    if not 0.0 < float(frac) < 1.0:
        raise ValueError(f"frac must be in (0, 1), got {frac}")
    if not (np.isfinite(effect_sd) and effect_sd >= 0):
        raise ValueError(f"effect_sd must be finite and >= 0, got {effect_sd}")
    counts = adata.X if layer is None else adata.layers[layer]
    if counts is None:
        raise ValueError("adata.X is empty")
    M = sp.csr_matrix(counts, dtype=None, copy=True)
    M.sum_duplicates()
    data = np.asarray(M.data)
    if data.size and (np.any(data < 0) or np.any(data != np.round(data))):
        raise ValueError("binomial thinning needs non-negative integer counts")
    n_cells, n_genes = M.shape

    rng = np.random.default_rng(random_state)
    n_thin = int(round(float(frac) * n_cells))
    if n_thin in (0, n_cells):
        raise ValueError(f"frac={frac} leaves one batch empty with {n_cells} cells")
    in_batch1 = np.zeros(n_cells, dtype=bool)
    in_batch1[rng.permutation(n_cells)[:n_thin]] = True

    if keep_prob is None:
        p = np.exp(-np.abs(rng.normal(0.0, float(effect_sd), size=n_genes)))
    else:
        p = np.asarray(keep_prob, dtype=np.float64)
        if p.shape != (n_genes,):
            raise ValueError(f"keep_prob must have shape ({n_genes},), got {p.shape}")
        if not np.all((p > 0) & (p <= 1)):
            raise ValueError("keep_prob must lie in (0, 1]")

    row_of = np.repeat(np.arange(n_cells), np.diff(M.indptr))
    sel = in_batch1[row_of]
    thinned = rng.binomial(data[sel].astype(np.int64), p[M.indices[sel]])
    new_data = data.copy()
    new_data[sel] = thinned.astype(new_data.dtype)
    M.data = new_data
    M.eliminate_zeros()

    obs = adata.obs.copy()
    obs[batch_key] = pd.Categorical(np.where(in_batch1, "1", "0"), categories=["0", "1"])
    var = adata.var.copy()
    var["keep_prob"] = p
    return ad.AnnData(X=M, obs=obs, var=var)
