"""Scores of a latent space: k-means clustering against true labels and batch mixing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from sklearn.neighbors import NearestNeighbors

from ._checks import ArrayLike, as_labels, as_latent, check_positive_int

__all__ = ["batch_mixing_entropy", "clustering_scores"]


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
    X = as_latent(latent)
    codes = as_labels(labels, X.shape[0], "labels")
    k = _check_n_clusters(codes, X.shape[0], n_clusters)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must not be empty")
    n_init = check_positive_int(n_init, "n_init")
    ari, nmi = _kmeans_scores(X, codes, k, seeds, n_init, nmi_average_method)
    asw = _silhouette(X, codes, silhouette_sample_size, seeds[0])
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


def _check_n_clusters(codes: np.ndarray, n_cells: int, n_clusters: int | None) -> int:
    """The number of k-means clusters: ``n_clusters`` or the number of label levels."""
    n_levels = int(codes.max()) + 1
    if n_levels < 2:
        raise ValueError("labels must have at least 2 distinct values")
    if n_levels >= n_cells:
        raise ValueError(
            f"labels have {n_levels} levels for {n_cells} cells; the silhouette needs "
            "fewer levels than cells"
        )
    k = n_levels if n_clusters is None else check_positive_int(n_clusters, "n_clusters")
    if k > n_cells:
        raise ValueError(f"n_clusters={k} exceeds the number of cells ({n_cells})")
    return k


def _kmeans_scores(
    X: np.ndarray,
    codes: np.ndarray,
    k: int,
    seeds: list[int],
    n_init: int,
    nmi_average_method: str,
) -> tuple[list[float], list[float]]:
    """ARI and NMI of the true labels against k-means clusters, one of each per seed."""
    ari, nmi = [], []
    for seed in seeds:
        pred = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(X)
        ari.append(float(adjusted_rand_score(codes, pred)))
        nmi.append(
            float(normalized_mutual_info_score(codes, pred, average_method=nmi_average_method))
        )
    return ari, nmi


def _silhouette(X: np.ndarray, codes: np.ndarray, sample_size: int | None, seed: int) -> float:
    """Average silhouette width of the true labels, on ``sample_size`` random cells if given."""
    if sample_size is not None:
        size = check_positive_int(sample_size, "silhouette_sample_size")
        return silhouette_score(X, codes, sample_size=min(size, X.shape[0]), random_state=seed)
    return silhouette_score(X, codes)


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
    X = as_latent(latent)
    n = X.shape[0]
    codes = as_labels(batches, n, "batches")
    k = min(check_positive_int(n_neighbors, "n_neighbors"), n - 1)
    n_pools = check_positive_int(n_pools, "n_pools")
    n_samples_per_pool = check_positive_int(n_samples_per_pool, "n_samples_per_pool")
    n_batches = int(codes.max()) + 1
    if n_batches < 2:
        return 0.0

    rng = np.random.default_rng(random_state)
    picks = rng.integers(0, n, size=(n_pools, n_samples_per_pool))
    query, inverse = np.unique(picks, return_inverse=True)
    neigh = _neighbours_without_self(X, query, k)
    entropies = _regional_entropies(codes[neigh], n_batches)
    per_pick = entropies[inverse.reshape(picks.shape)]
    return float(per_pick.mean(axis=1).mean())


def _neighbours_without_self(X: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """``(query.size, k)`` indices of the k nearest neighbours of the cells ``query``, the cell
    itself excluded."""
    nn = NearestNeighbors(n_neighbors=k + 1).fit(X)
    neigh = nn.kneighbors(X[query], return_distance=False)
    # drop the cell itself; if exact duplicates pushed it out of the k+1 list,
    # drop the farthest neighbour instead so that exactly k remain.
    keep = neigh != query[:, None]
    no_self = keep.all(axis=1)
    keep[no_self, -1] = False
    return neigh[keep].reshape(query.size, k)


def _regional_entropies(nb: np.ndarray, n_batches: int) -> np.ndarray:
    """Shannon entropy (nats) of the batch frequencies in each row of ``nb``, the
    ``(n_query, k)`` batch codes of the neighbours."""
    n_query, k = nb.shape
    counts = np.zeros((n_query, n_batches), dtype=np.float64)
    np.add.at(counts, (np.repeat(np.arange(n_query), k), nb.ravel()), 1.0)
    freqs = counts / k
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(freqs > 0, freqs * np.log(freqs), 0.0)
    return -terms.sum(axis=1)
