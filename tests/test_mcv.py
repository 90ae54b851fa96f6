"""Denoising scored by molecular cross-validation (issue 18)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from zinbgrad.metrics import mcv_loss, mcv_zinbwave, molecular_split
from zinbgrad.planted import make_planted


def test_molecular_split_adds_up_and_thins():
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(rng.poisson(5.0, size=(200, 50)))
    X_before = X.copy()
    train, test = molecular_split(X, 0.9, random_state=1)
    assert (train + test != X).nnz == 0
    assert (X != X_before).nnz == 0
    assert train.dtype.kind == "i" and train.min() >= 0 and test.min() >= 0
    frac = train.sum() / X.sum()
    assert abs(frac - 0.9) < 4 * np.sqrt(0.09 / X.sum())  # binomial sd of the fraction
    again, _ = molecular_split(X, 0.9, random_state=1)
    assert (again != train).nnz == 0
    with pytest.raises(ValueError, match="integer"):
        molecular_split(np.array([[1.5]]))
    with pytest.raises(ValueError, match="train_frac"):
        molecular_split(X, 1.0)


def test_mcv_loss_oracle_matches_expectation_and_beats_raw():
    """On Poisson counts the true mean's loss equals its expectation
    E[m - y log m] = m - m log m (m the test-part mean), and the true mean beats the raw
    training counts (no denoising) in both losses."""
    rng = np.random.default_rng(3)
    lam = np.exp(rng.normal(1.0, 1.0, size=(300, 80)))
    X = rng.poisson(lam)
    train, test = molecular_split(X, 0.9, random_state=2)
    oracle = 0.9 * lam
    res = mcv_loss(train, test, oracle, eps=0.0)
    m = oracle * test.sum() / train.sum()  # the oracle at the test depth
    expected = np.mean(m - 0.1 * lam * np.log(m))
    assert abs(res["poisson"] - expected) < 0.01 * abs(expected) + 0.005
    raw = mcv_loss(train, test, train.toarray())
    assert res["poisson"] < raw["poisson"] and res["mse"] < raw["mse"]
    cells = mcv_loss(train, test, oracle, per_cell=True)["poisson_per_cell"]
    assert cells.shape == (300,)
    with pytest.raises(ValueError, match="shape"):
        mcv_loss(train, test, oracle[:, :3])
    with pytest.raises(ValueError, match="non-negative"):
        mcv_loss(train, test, -oracle)


def test_mcv_zinbwave_denoises():
    adata = make_planted(300, 100, 2, random_state=5)
    df = mcv_zinbwave(adata, [0, 2])
    assert list(df.n_components) == [0, 2]
    # the planted factors lower both losses
    assert df.poisson.iloc[1] < df.poisson.iloc[0] - 3 * df.poisson_se.iloc[0]
    assert df.mse.iloc[1] < df.mse.iloc[0]
    assert df.attrs["recommended"] == 2
    X = adata.X
    train, test = molecular_split(X, 0.9, random_state=0)
    raw = mcv_loss(train, test, train.toarray())
    # (the log1p MSE can favour the raw counts on sparse data: E[log1p Y] < log1p E[Y])
    assert df.poisson.iloc[1] < raw["poisson"]


def test_pca_baseline_full_rank_returns_the_counts():
    """The benchmark's PCA denoiser at full rank reproduces the training counts (log1p CP10k,
    then back to counts), and at low rank is smoother (lower Poisson loss than the raw counts
    on low-rank Poisson data)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.interpret import pca_denoise

    rng = np.random.default_rng(0)
    lam = np.exp(rng.normal(size=(120, 2)) @ rng.normal(size=(2, 40)) * 0.7 + 1.0)
    X = sp.csr_matrix(rng.poisson(lam))
    train, test = molecular_split(X, 0.9, random_state=1)
    np.testing.assert_allclose(pca_denoise(train, 40), train.toarray(), atol=1e-8)
    low = mcv_loss(train, test, pca_denoise(train, 2))
    raw = mcv_loss(train, test, train.toarray())
    assert low["poisson"] < raw["poisson"]
