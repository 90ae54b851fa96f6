"""Tests of zinbgrad.metrics on small synthetic latents and count matrices."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from zinbgrad.metrics import (
    CorruptedCounts,
    batch_mixing_entropy,
    binomial_thinning_batch,
    clustering_scores,
    corrupt_counts,
    imputation_error,
)

LOG2 = float(np.log(2.0))


def _blobs(n_per: int, centers: np.ndarray, sd: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = np.concatenate(
        [c + sd * rng.standard_normal((n_per, centers.shape[1])) for c in centers]
    )
    labels = np.repeat(np.arange(len(centers)), n_per)
    return latent, labels


# --------------------------------------------------------------------------- clustering


def test_clustering_scores_perfect() -> None:
    centers = np.array([[0.0, 0.0, 0.0], [20.0, 0.0, 0.0], [0.0, 20.0, 0.0], [0.0, 0.0, 20.0]])
    latent, codes = _blobs(40, centers, 0.5, seed=0)
    names = np.array(["astro", "oligo", "micro", "neuron"])[codes]  # string labels
    res = clustering_scores(latent, names, seeds=(0, 1, 2), n_init=3)
    assert res["n_clusters"] == 4
    assert res["ari"] == pytest.approx(1.0)
    assert res["nmi"] == pytest.approx(1.0)
    assert res["ari_per_seed"] == pytest.approx([1.0, 1.0, 1.0])
    assert len(res["nmi_per_seed"]) == 3 and res["seeds"] == [0, 1, 2]
    assert 0.9 < res["asw"] <= 1.0


def test_clustering_scores_uninformative_latent() -> None:
    rng = np.random.default_rng(1)
    latent = rng.standard_normal((300, 2))
    labels = rng.integers(0, 3, size=300)  # labels independent of the latent
    res = clustering_scores(latent, labels, seeds=(0, 1), n_init=2, silhouette_sample_size=200)
    assert abs(res["ari"]) < 0.05
    assert res["nmi"] < 0.05
    assert res["asw"] < 0.05
    # the silhouette uses the TRUE labels: permuting the labels' names changes nothing
    res2 = clustering_scores(latent, (labels + 1) % 3, seeds=(0, 1), n_init=2)
    assert res2["ari"] == pytest.approx(res["ari"])


def test_clustering_scores_validation() -> None:
    latent = np.zeros((10, 2))
    with pytest.raises(ValueError, match="labels has 9 entries"):
        clustering_scores(latent, np.zeros(9))
    with pytest.raises(ValueError, match="at least 2 distinct"):
        clustering_scores(latent, np.zeros(10))
    with pytest.raises(ValueError, match="2-D"):
        clustering_scores(np.zeros(10), np.arange(10) % 2)
    with pytest.raises(ValueError, match="seeds must not be empty"):
        clustering_scores(np.random.default_rng(0).random((10, 2)), np.arange(10) % 2, seeds=())
    with pytest.raises(ValueError, match="NaN"):
        clustering_scores(np.full((10, 2), np.nan), np.arange(10) % 2)


# --------------------------------------------------------------------------- batch mixing


def test_entropy_perfectly_mixed_two_batches_is_near_log2() -> None:
    rng = np.random.default_rng(2)
    latent = rng.standard_normal((1000, 5))
    batches = np.array(["a", "b"])[rng.permutation(np.arange(1000) % 2)]
    e = batch_mixing_entropy(latent, batches, n_pools=20)
    # sampling noise of 50 neighbours lowers the expectation a little below log 2
    assert 0.95 * LOG2 < e <= LOG2


def test_entropy_separated_batches_is_zero() -> None:
    centers = np.array([[0.0, 0.0], [100.0, 100.0]])
    latent, batches = _blobs(120, centers, 1.0, seed=3)
    assert batch_mixing_entropy(latent, batches) == 0.0


def test_entropy_three_batches_and_reproducibility() -> None:
    rng = np.random.default_rng(4)
    latent = rng.standard_normal((900, 3))
    batches = rng.permutation(np.arange(900) % 3)
    e = batch_mixing_entropy(latent, batches, n_pools=20, random_state=7)
    assert 0.95 * np.log(3) < e <= np.log(3)
    assert e == batch_mixing_entropy(latent, batches, n_pools=20, random_state=7)


def test_entropy_excludes_the_cell_itself() -> None:
    # 50 far-apart triplets (A, B, B). With 2 neighbours and the cell excluded, an A
    # cell sees {B, B} (entropy 0) and a B cell sees {A, B} (entropy log 2): mean
    # 2/3 log 2. Counting the cell itself would give a different value.
    offsets = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1]])
    latent = np.concatenate([np.array([100.0 * i, 0.0]) + offsets for i in range(50)])
    batches = np.tile(np.array(["A", "B", "B"]), 50)
    e = batch_mixing_entropy(latent, batches, n_neighbors=2, n_pools=100)
    assert e == pytest.approx(2.0 / 3.0 * LOG2, abs=0.02)


def test_entropy_validation() -> None:
    latent = np.random.default_rng(0).random((20, 2))
    with pytest.raises(ValueError, match="batches has 19 entries"):
        batch_mixing_entropy(latent, np.zeros(19))
    with pytest.raises(ValueError, match="n_neighbors must be a positive integer"):
        batch_mixing_entropy(latent, np.arange(20) % 2, n_neighbors=0)
    assert batch_mixing_entropy(latent, np.zeros(20)) == 0.0
    # n_neighbors is clipped to n_cells - 1, as in the reference
    assert 0.0 < batch_mixing_entropy(latent, np.arange(20) % 2, n_neighbors=500) <= LOG2


# --------------------------------------------------------------------------- imputation


def _counts(seed: int = 6) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.poisson(2.0, size=(60, 40)) * (rng.random((60, 40)) < 0.4)
    return sp.csr_matrix(dense.astype(np.float32))


@pytest.mark.parametrize("rate", [0.1, 0.25])
def test_corrupt_counts_changes_exactly_the_chosen_fraction(rate: float) -> None:
    X = _counts()
    before = X.copy()
    res = corrupt_counts(X, rate=rate, random_state=0)
    assert isinstance(res, CorruptedCounts)
    Xc, rows, cols, values = res
    n_expected = int(np.floor(rate * X.nnz))
    assert rows.size == cols.size == values.size == n_expected
    assert sp.isspmatrix_csr(Xc) and Xc.nnz == X.nnz - n_expected
    # the input is intact
    assert (X != before).nnz == 0 and X.nnz == before.nnz
    # the corrupted entries were non-zero, are now zero, and nothing else changed
    dense, dense_c = X.toarray(), Xc.toarray()
    np.testing.assert_array_equal(dense[rows, cols], values)
    assert np.all(values > 0) and np.all(dense_c[rows, cols] == 0)
    changed = np.argwhere(dense != dense_c)
    assert sorted(map(tuple, changed)) == sorted(zip(rows.tolist(), cols.tolist(), strict=True))
    # reproducible with the seed, different with another one
    again = corrupt_counts(X, rate=rate, random_state=0)
    np.testing.assert_array_equal(again.rows, rows)
    np.testing.assert_array_equal(again.cols, cols)
    other = corrupt_counts(X, rate=rate, random_state=1)
    assert not (np.array_equal(other.rows, rows) and np.array_equal(other.cols, cols))


def test_corrupt_counts_dense_input_and_scvi_bernoulli() -> None:
    X = _counts().toarray()
    copy = X.copy()
    res = corrupt_counts(X, rate=0.1)
    np.testing.assert_array_equal(X, copy)
    assert res.values.size == int(np.floor(0.1 * np.count_nonzero(X)))
    # zero_prob < 1: only part of the chosen entries are zeroed (scVI's Bernoulli(0.9) code)
    lit = corrupt_counts(X, rate=1.0, zero_prob=0.1, random_state=3)
    assert 0 < lit.values.size < 0.2 * np.count_nonzero(X)
    assert lit.X.nnz == np.count_nonzero(X) - lit.values.size
    with pytest.raises(ValueError, match="rate must be in"):
        corrupt_counts(X, rate=1.5)
    with pytest.raises(ValueError, match="2-D"):
        corrupt_counts(np.zeros(5))


def test_imputation_error() -> None:
    res = corrupt_counts(_counts(), rate=0.2)
    assert imputation_error(res.values, res.values) == 0.0
    assert imputation_error([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]) == 2.0
    assert imputation_error([5, 1, 2, 8], [4.5, 1, 3, 8]) == 0.25  # |d| = .5, 0, 1, 0
    with pytest.raises(ValueError, match="differ in shape"):
        imputation_error([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="no corrupted entries"):
        imputation_error([], [])


# --------------------------------------------------------------------------- thinning


def _adata(n_cells: int = 2000, n_genes: int = 6, seed: int = 7) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    X = sp.csr_matrix(rng.poisson(30.0, size=(n_cells, n_genes)).astype(np.float32))
    obs = pd.DataFrame(
        {"cell_type": rng.integers(0, 3, n_cells)}, index=[f"c{i}" for i in range(n_cells)]
    )
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))


def test_binomial_thinning_batch_properties() -> None:
    adata = _adata()
    before = adata.X.copy()
    out = binomial_thinning_batch(adata, frac=0.5, effect_sd=0.7, random_state=11)
    assert (adata.X != before).nnz == 0  # input untouched
    assert sp.isspmatrix_csr(out.X)
    assert list(out.obs["batch"].cat.categories) == ["0", "1"]
    in1 = (out.obs["batch"] == "1").to_numpy()
    assert in1.sum() == 1000
    p = out.var["keep_prob"].to_numpy()
    assert np.all((p > 0) & (p <= 1))
    assert "cell_type" in out.obs

    orig, thin = before.toarray(), out.X.toarray()
    assert np.all(thin <= orig)  # never increases
    np.testing.assert_array_equal(thin[~in1], orig[~in1])  # batch 0 untouched
    assert np.all(thin == np.round(thin))
    # expected per-gene ratio equals the keep probability
    ratio = thin[in1].sum(axis=0) / orig[in1].sum(axis=0)
    np.testing.assert_allclose(ratio, p, atol=0.01)

    again = binomial_thinning_batch(adata, frac=0.5, effect_sd=0.7, random_state=11)
    assert (again.X != out.X).nnz == 0
    np.testing.assert_array_equal(again.var["keep_prob"], p)
    np.testing.assert_array_equal(again.obs["batch"], out.obs["batch"])
    other = binomial_thinning_batch(adata, frac=0.5, effect_sd=0.7, random_state=12)
    assert not np.array_equal(other.var["keep_prob"], p)


def test_binomial_thinning_explicit_keep_prob_and_validation() -> None:
    adata = _adata(n_cells=400, n_genes=3)
    keep = np.array([1.0, 0.5, 0.2])
    out = binomial_thinning_batch(adata, frac=0.25, keep_prob=keep, random_state=0)
    in1 = (out.obs["batch"] == "1").to_numpy()
    assert in1.sum() == 100
    np.testing.assert_array_equal(out.X.toarray()[:, 0], adata.X.toarray()[:, 0])  # p = 1
    assert binomial_thinning_batch(adata, effect_sd=0.0).X.nnz == adata.X.nnz  # no effect
    with pytest.raises(ValueError, match="frac must be in"):
        binomial_thinning_batch(adata, frac=1.0)
    with pytest.raises(ValueError, match="keep_prob must lie"):
        binomial_thinning_batch(adata, keep_prob=np.array([1.0, 0.0, 0.5]))
    with pytest.raises(ValueError, match="keep_prob must have shape"):
        binomial_thinning_batch(adata, keep_prob=np.ones(2))
    bad = adata.copy()
    bad.X = bad.X * 0.5
    with pytest.raises(ValueError, match="non-negative integer counts"):
        binomial_thinning_batch(bad)
