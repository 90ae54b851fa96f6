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
molecular_split / mcv_loss / mcv_zinbwave
    Denoising scored by molecular cross-validation (Batson, Royer & Webber 2019; the Open
    Problems denoising task): Poisson loss and MSE of log1p-normalized counts.
"""

from __future__ import annotations

import time
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
    "molecular_split",
    "mcv_loss",
    "mcv_zinbwave",
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


# --------------------------------------------------------------------------- molecular CV


def molecular_split(
    X: ArrayLike, train_frac: float = 0.9, random_state: int | None = 0
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Split every count binomially into a training and a test part (molecular
    cross-validation, Batson, Royer & Webber 2019; the Open Problems denoising split).

    ``train = Binomial(x, train_frac)``, ``test = x - train``: each molecule goes to one part
    independently, so for Poisson counts the two parts are independent given the mean, with
    means ``train_frac * mu`` and ``(1 - train_frac) * mu``.

    Parameters
    ----------
    X
        Cells x genes non-negative integer counts (dense or sparse; not modified).
    train_frac
        Expected fraction of the molecules in the training part, in (0, 1).
    random_state
        Seed (``numpy.random.default_rng``).

    Returns
    -------
    (train, test)
        Two CSR integer matrices of the shape of ``X`` that add up to ``X``.
    """
    if not 0.0 < float(train_frac) < 1.0:
        raise ValueError(f"train_frac must be in (0, 1), got {train_frac}")
    M = sp.csr_matrix(X, copy=True)
    M.sum_duplicates()
    data = np.asarray(M.data)
    if data.size and (
        not np.all(np.isfinite(data)) or np.any(data < 0) or np.any(data != np.round(data))
    ):
        raise ValueError("molecular cross-validation needs non-negative integer counts")
    rng = np.random.default_rng(random_state)
    counts = data.astype(np.int64)
    tr = rng.binomial(counts, float(train_frac))
    train = sp.csr_matrix((tr, M.indices.copy(), M.indptr.copy()), shape=M.shape)
    test = sp.csr_matrix((counts - tr, M.indices.copy(), M.indptr.copy()), shape=M.shape)
    train.eliminate_zeros()
    test.eliminate_zeros()
    return train, test


def _dense(X: ArrayLike) -> np.ndarray:
    if hasattr(X, "detach"):
        X = X.detach().cpu().numpy()
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)


def mcv_loss(
    train: ArrayLike,
    test: ArrayLike,
    denoised: ArrayLike,
    *,
    eps: float = 1e-6,
    per_cell: bool = False,
) -> dict[str, Any]:
    """Score a denoised matrix fitted on ``train`` against the held-out ``test`` counts.

    The two losses of the Open Problems denoising task:

    * ``poisson``: ``mean(d - y log(d + eps))`` over all entries, with ``d`` the denoised
      values rescaled from the training to the test depth (``d = denoised * sum(test) /
      sum(train)``, i.e. by ``(1 - train_frac) / train_frac``) and ``y`` the test counts;
    * ``mse``: mean squared error between ``log1p`` of the test counts and of the denoised
      values, each cell scaled to the median test library size (the ``normalize_total`` +
      ``log1p`` of scanpy; CP10k-like).

    Parameters
    ----------
    train, test
        The two parts from :func:`molecular_split` (cells x genes).
    denoised
        The denoised (expected) counts of the cells at the depth of ``train``, e.g. a model's
        mean fitted to ``train``.
    eps
        Added inside the logarithm of the Poisson loss.
    per_cell
        Also return ``"poisson_per_cell"``: each cell's mean Poisson loss over the genes (for
        paired comparisons of denoisers on the same split).

    Returns
    -------
    dict
        ``{"poisson": ..., "mse": ...}`` (lower is better).
    """
    Y = _dense(test)
    D = _dense(denoised)
    if Y.shape != D.shape:
        raise ValueError(f"test and denoised differ in shape: {Y.shape} vs {D.shape}")
    if not np.all(np.isfinite(D)) or np.any(D < 0):
        raise ValueError("denoised values must be finite and non-negative")
    train_total = float(_dense(train).sum())
    if train_total <= 0:
        raise ValueError("the training counts are all zero")
    d = D * (Y.sum() / train_total)
    cell_loss = np.mean(d - Y * np.log(d + eps), axis=1)
    poisson = float(np.mean(cell_loss))
    target = float(np.median(Y.sum(1)))

    def norm(A: np.ndarray) -> np.ndarray:
        tot = A.sum(1, keepdims=True)
        return np.log1p(A * np.divide(target, tot, out=np.zeros_like(tot), where=tot > 0))

    mse = float(np.mean((norm(Y) - norm(D)) ** 2))
    out: dict[str, Any] = {"poisson": poisson, "mse": mse}
    if per_cell:
        out["poisson_per_cell"] = cell_loss
    return out


def mcv_zinbwave(
    adata: ad.AnnData,
    n_components: Sequence[int] = (2, 5, 10, 20),
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    train_frac: float = 0.9,
    random_state: int = 0,
    **kwargs: Any,
) -> pd.DataFrame:
    """Molecular cross-validation of ZINB-WaVE's denoised mean for several K.

    The counts are split binomially (:func:`molecular_split`); for each K a model is fitted to
    the training part and its expected counts ``E[Y] = (1 - pi) mu`` are scored against the
    test part (:func:`mcv_loss`). The ridge penalty shrinks superfluous factors, so the loss
    flattens past the right K rather than rising: the recommended K is the smallest whose
    Poisson loss is within one standard error (paired over cells) of the lowest.

    Parameters
    ----------
    adata
        Raw counts (never modified).
    n_components
        The values of K.
    layer, batch_key
        As in :func:`zinbgrad.tl.zinbwave`.
    train_frac
        Fraction of the molecules in the training part.
    random_state
        Seed of the split and of the fits (unless ``kwargs`` sets one).
    **kwargs
        Hyper-parameters of :class:`zinbgrad.ZINBWaVE`.

    Returns
    -------
    pandas.DataFrame
        ``n_components``, ``poisson``, ``poisson_se`` (standard error of the paired per-cell
        difference to the lowest), ``mse``, ``seconds``; ``attrs["recommended"]`` (the
        one-standard-error rule above), ``attrs["lowest"]`` (the K of the lowest Poisson loss)
        and ``attrs["lowest_mse"]`` (of the lowest MSE).
    """
    from .estimator import ZINBWaVE

    X = adata.X if layer is None else adata.layers[layer]
    if X is None:
        raise ValueError("adata.X is empty; pass layer= with the raw counts")
    train, test = molecular_split(X, train_frac, random_state)
    keep = np.flatnonzero(np.asarray(train.sum(0)).ravel() > 0)  # fittable genes
    tr = ad.AnnData(train[:, keep], obs=adata.obs[[batch_key]] if batch_key else None)
    tr.var_names = np.asarray(adata.var_names)[keep]
    kwargs.setdefault("random_state", random_state)
    kwargs.setdefault("verbose", False)
    rows, cells = [], []
    for K in sorted({int(k) for k in n_components}):
        t0 = time.perf_counter()
        m = ZINBWaVE(K, **kwargs).fit(tr, batch_key=batch_key)
        denoised = np.zeros(X.shape)
        denoised[:, keep] = m.get_mu() * (1.0 - m.get_pi())
        scores = mcv_loss(train, test, denoised, per_cell=True)
        cells.append(scores.pop("poisson_per_cell"))
        rows.append({"n_components": K, **scores, "seconds": time.perf_counter() - t0})
    df = pd.DataFrame(rows)
    best = int(df["poisson"].idxmin())
    df.insert(
        2,
        "poisson_se",
        [float(np.std(c - cells[best], ddof=1) / np.sqrt(len(c))) for c in cells],
    )
    ok = df["poisson"] <= df["poisson"].iloc[best] + df["poisson_se"]
    df.attrs["recommended"] = int(df["n_components"][ok].min())
    df.attrs["lowest"] = int(df["n_components"].iloc[best])
    df.attrs["lowest_mse"] = int(df["n_components"].iloc[df["mse"].idxmin()])
    df.attrs["n_genes_fitted"] = int(len(keep))
    return df
