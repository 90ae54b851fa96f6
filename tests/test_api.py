"""User-facing API: scikit-learn conventions, AnnData integration, persistence, validation."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.base import clone

import zinbgrad
from zinbgrad import ZINBWaVE
from zinbgrad.tl._zinbwave import model_from_anndata


@pytest.fixture(scope="module")
def pbmc():
    return zinbgrad.datasets.pbmc_small()


@pytest.fixture(scope="module")
def fitted(pbmc):
    return ZINBWaVE(n_components=2, random_state=0).fit(pbmc)


def test_sklearn_conventions(fitted):
    m = ZINBWaVE(n_components=3, tol=1e-5)
    assert m.get_params()["n_components"] == 3
    m.set_params(n_components=4, epsilon=100.0)
    assert m.n_components == 4 and m.epsilon == 100.0
    c = clone(fitted)
    assert not hasattr(c, "W_") and c.get_params() == fitted.get_params()
    assert fitted.W_.shape == (80, 2) and fitted.alpha_mu_.shape == (2, 230)
    assert fitted.beta_mu_.shape == (1, 230) and fitted.zeta_.shape == (230,)
    assert fitted.n_features_in_ == 230 and fitted.converged_
    with pytest.raises(Exception, match="not fitted"):
        ZINBWaVE().transform(np.ones((3, 3)))


def test_tl_zinbwave_writes_anndata_and_keeps_x(pbmc):
    adata = pbmc.copy()
    X_before = adata.X.copy()
    model = zinbgrad.tl.zinbwave(adata, n_components=2, key_added="X_zw")
    assert (adata.X != X_before).nnz == 0
    np.testing.assert_array_equal(adata.obsm["X_zw"], model.W_)
    assert adata.varm["X_zw_alpha_mu"].shape == (230, 2)
    assert adata.uns["X_zw"]["loglik"] == pytest.approx(model.loglik_)
    back = model_from_anndata(adata, "X_zw")
    np.testing.assert_allclose(back.transform(pbmc), model.transform(pbmc))
    out = zinbgrad.tl.zinbwave(pbmc, n_components=2, copy=True)
    assert isinstance(out, ad.AnnData) and "X_zinbwave" in out.obsm
    assert "X_zinbwave" not in pbmc.obsm


def test_h5ad_round_trip_of_stored_model(tmp_path, pbmc):
    adata = pbmc.copy()
    zinbgrad.tl.zinbwave(adata, n_components=2)
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    m = model_from_anndata(back)
    assert m.W_.shape == (80, 2) and len(m.history_) == m.n_iter_


def test_save_load_transform_and_score_identically(tmp_path, fitted, pbmc):
    path = fitted.save(tmp_path / "model.npz")
    loaded = ZINBWaVE.load(path)
    np.testing.assert_array_equal(loaded.W_, fitted.W_)
    np.testing.assert_array_equal(loaded.transform(pbmc[:20]), fitted.transform(pbmc[:20]))
    assert loaded.score(pbmc[:20]) == fitted.score(pbmc[:20])
    assert loaded.get_params() == fitted.get_params()
    with pytest.raises(FileExistsError):
        fitted.save(path)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.arange(3))
    with pytest.raises(ValueError, match="not a zinbgrad model"):
        ZINBWaVE.load(bad)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a zinbgrad model"):
        ZINBWaVE.load(tmp_path / "junk.npz")


def test_transform_projects_training_cells_back(fitted, pbmc):
    W = fitted.transform(pbmc)
    # the projection optimises the same local problem to convergence: close to the fit's W
    rel = np.linalg.norm(W - fitted.W_) / np.linalg.norm(fitted.W_)
    assert rel < 0.1
    per_cell = fitted.score_samples(pbmc)
    assert per_cell.shape == (80,) and np.all(per_cell < 0)
    # re-optimised local parameters cannot do worse than the fitted ones on the same cells
    assert per_cell.sum() >= fitted.loglik_ - 1e-6 * abs(fitted.loglik_)


def test_transform_aligns_genes_by_name(fitted, pbmc):
    perm = np.random.default_rng(0).permutation(pbmc.n_vars)
    shuffled = pbmc[:, perm].copy()
    np.testing.assert_allclose(fitted.transform(shuffled), fitted.transform(pbmc), atol=1e-10)
    with pytest.raises(ValueError, match="missing"):
        fitted.transform(pbmc[:, :200].copy())


def _with(adata, X):
    out = adata.copy()
    out.X = X
    return out


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda X: X - 5 * (X > 3), "negative"),
        (lambda X: X * 0.5, "non-integer"),
        (lambda X: np.where(X > 5, np.nan, X), "NaN"),
        (lambda X: np.where(X > 5, np.inf, X), "infinite"),
    ],
)
def test_bad_counts_are_rejected(pbmc, mutate, match):
    dense = pbmc.X.toarray().astype(float)
    bad = mutate(dense)
    for data in (bad, sp.csr_matrix(bad), _with(pbmc, bad)):

        def snapshot(d):
            M = d.X if isinstance(d, ad.AnnData) else d
            return M.toarray() if sp.issparse(M) else np.array(M)

        before = snapshot(data)
        with pytest.raises(ValueError, match=match):
            ZINBWaVE(n_components=2).fit(data)
        np.testing.assert_array_equal(before, snapshot(data))


def test_non_integer_counts_opt_out_warns(pbmc):
    X = pbmc.X.toarray() * 1.5
    with pytest.warns(UserWarning, match="non-integer"):
        m = ZINBWaVE(n_components=2, allow_non_integer=True, max_epochs=3).fit(X)
    assert np.isfinite(m.objective_)


def test_empty_cells_and_genes_are_rejected(pbmc):
    X = pbmc.X.toarray()
    X[5] = 0
    with pytest.raises(ValueError, match="cells have only zero counts"):
        ZINBWaVE(n_components=2).fit(X)
    X = pbmc.X.toarray()
    X[:, 7] = 0
    # genes without counts are left out by default (issue 21); the strict refusal on request
    with pytest.raises(ValueError, match="genes have only zero counts"):
        ZINBWaVE(n_components=2, empty_genes="error").fit(X)


def test_bad_designs_and_keys_are_rejected(pbmc):
    m = ZINBWaVE(n_components=2)
    with pytest.raises(ValueError, match="rows"):
        m.fit(pbmc, X=np.ones((79, 1)))
    with pytest.raises(ValueError, match="rank deficient"):
        b = (pbmc.obs["batch"] == "g1").to_numpy(float)
        m.fit(pbmc, X=np.column_stack([np.ones(80), b, 1 - b]))
    with pytest.raises(ValueError, match="V has"):
        m.fit(pbmc, V=np.ones((10, 1)))
    with pytest.raises(ValueError, match="too large"):
        ZINBWaVE(n_components=80).fit(pbmc)
    with pytest.raises(KeyError, match="layer"):
        m.fit(pbmc, layer="counts")
    with pytest.raises(KeyError, match="nope"):
        m.fit(pbmc, batch_key="nope")
    one = pbmc.copy()
    one.obs["b1"] = pd.Categorical(["x"] * 79 + ["y"])
    with pytest.raises(ValueError, match="fewer than 2 cells"):
        m.fit(one, batch_key="b1")
    with pytest.raises(ValueError, match="O_mu"):
        m.fit(pbmc, O_mu=np.zeros(5))


@pytest.mark.parametrize("bad", [0, -5, 2.5, "big", True])
def test_bad_block_entries_are_rejected(pbmc, bad):
    with pytest.raises(ValueError, match="block_entries must be None or a positive integer"):
        ZINBWaVE(n_components=2, block_entries=bad).fit(pbmc)


@pytest.mark.parametrize(
    ("free_gb", "dtype", "expected"),
    [
        (139.0, "float32", 2**27),  # H200 / H100 80 GB: capped
        (16.0, "float32", 2**25),
        (16.0, "float64", 2**24),  # twice the bytes per entry
        (0.1, "float32", 2**21),  # floor
    ],
)
def test_gpu_default_block_follows_free_memory(monkeypatch, free_gb, dtype, expected):
    """On a GPU the default block is the largest power of two whose working arrays
    (GPU_FLOATS_PER_ENTRY floats per entry) take at most a quarter of the free memory."""
    import torch

    from zinbgrad import estimator

    free = int(free_gb * 1e9)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    got = ZINBWaVE()._block_entries(torch.device("cuda"), getattr(torch, dtype))
    assert got == expected
    itemsize = 4 if dtype == "float32" else 8
    used = got * estimator.GPU_FLOATS_PER_ENTRY * itemsize
    assert used <= 0.25 * free or got == estimator.GPU_BLOCK_ENTRIES[0]
    assert got == estimator.GPU_BLOCK_ENTRIES[1] or 2 * used > 0.25 * free
    # an explicit block_entries wins, and the CPU default is fixed
    assert ZINBWaVE(block_entries=1000)._block_entries(torch.device("cuda")) == 1000
    assert ZINBWaVE()._block_entries(torch.device("cpu")) == estimator.CPU_BLOCK_ENTRIES


def test_batch_key_and_offsets(pbmc):
    m = ZINBWaVE(n_components=2).fit(pbmc, batch_key="batch")
    assert m.X_columns_ == ["intercept", "batch[g2]"]
    assert m.batch_info_["reference"] == "g1"
    lib = np.log(np.asarray(pbmc.X.sum(1)).ravel())
    mo = ZINBWaVE(n_components=2, max_epochs=5).fit(pbmc, O_mu=lib)
    assert np.isfinite(mo.objective_)
    assert mo.transform(pbmc[:5], O_mu=lib[:5]).shape == (5, 2)


def test_per_cell_offsets_equal_their_full_matrix(pbmc):
    """A per-cell offset (n,) enters the cells' predictors as a design column; the same offsets
    given as a full (n x J) matrix go the other way (added to the predictors). Both fits,
    and their projections of new cells, agree to rounding (float64)."""
    n, J = pbmc.shape
    lib = np.log(np.asarray(pbmc.X.sum(1)).ravel())
    lib -= lib.mean()
    logit = np.linspace(-0.5, 0.5, n)
    kw = {"n_components": 2, "max_epochs": 8, "tol": 0.0, "dtype": "float64"}
    a = ZINBWaVE(**kw).fit(pbmc, batch_key="batch", O_mu=lib, O_pi=logit)
    full = ZINBWaVE(**kw).fit(
        pbmc,
        batch_key="batch",
        O_mu=np.repeat(lib[:, None], J, 1),
        O_pi=np.repeat(logit[:, None], J, 1),
    )
    assert a.objective_ == pytest.approx(full.objective_, rel=1e-10)
    np.testing.assert_allclose(a.W_, full.W_, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(a.get_mu(), full.get_mu(), rtol=1e-8)
    Wa = a.transform(pbmc[:6], O_mu=lib[:6], O_pi=logit[:6])
    Wf = full.transform(
        pbmc[:6], O_mu=np.repeat(lib[:6, None], J, 1), O_pi=np.repeat(logit[:6, None], J, 1)
    )
    np.testing.assert_allclose(Wa, Wf, rtol=1e-6, atol=1e-8)


def test_which_columns_select_the_design(pbmc):
    m = ZINBWaVE(n_components=2, which_X_pi=[0], max_epochs=5).fit(pbmc, batch_key="batch")
    assert m.beta_mu_.shape == (2, 230) and m.beta_pi_.shape == (1, 230)
    params = m.get_likelihood_params()
    assert params["pi"].shape == (80, 230) and np.isfinite(params["pi"]).all()
    assert m.transform(pbmc[:4]).shape == (4, 2)
    with pytest.raises(ValueError, match="which_X_mu"):
        ZINBWaVE(n_components=2, which_X_mu=[3]).fit(pbmc)


def test_non_canonical_csr_input_is_never_modified(fitted, pbmc):
    """Unsorted column indices and explicit zeros are canonicalized on copies: the caller's
    arrays stay as they were (validation used to sort the shared index array in place, which
    scrambled a column-subset AnnData passed to fit/score)."""
    X = pbmc.X.tocsr().astype(np.int32)
    rng = np.random.default_rng(0)
    indices, data = X.indices.copy(), X.data.copy()
    for i in range(X.shape[0]):  # reverse each row's entries: valid CSR, unsorted indices
        lo, hi = X.indptr[i], X.indptr[i + 1]
        indices[lo:hi], data[lo:hi] = indices[lo:hi][::-1], data[lo:hi][::-1]
    data[rng.choice(data.size, 25, replace=False)] = 0  # explicit zeros
    import scipy.sparse as sp

    messy = sp.csr_matrix((data, indices, X.indptr.copy()), shape=X.shape)
    messy.has_sorted_indices = False
    a = ad.AnnData(messy, obs=pbmc.obs.copy(), var=pbmc.var.copy())
    before = (messy.data.copy(), messy.indices.copy(), messy.indptr.copy())
    clean = ad.AnnData(sp.csr_matrix(messy.toarray()), obs=pbmc.obs.copy(), var=pbmc.var.copy())
    assert (np.asarray(clean.X.sum(0)).ravel() > 0).all()  # no gene emptied by the zeros
    scores = fitted.score_samples(a)
    m1 = ZINBWaVE(n_components=2, max_epochs=3).fit(a)
    for arr, ref in zip((messy.data, messy.indices, messy.indptr), before, strict=True):
        np.testing.assert_array_equal(arr, ref)
    np.testing.assert_allclose(scores, fitted.score_samples(clean), rtol=1e-12)
    m2 = ZINBWaVE(n_components=2, max_epochs=3).fit(clean)
    np.testing.assert_allclose(m1.W_, m2.W_, rtol=1e-12, atol=1e-12)


def test_fit_path_is_kept_and_bounded(fitted, pbmc, tmp_path):
    path = fitted.fit_path_
    S = len(path["n_newton"])
    assert 1 <= S <= 24 and path["alpha_mu"].shape == (S, 2, pbmc.n_vars)
    assert path["T"].shape == (S, 2, 2) and path["zeta"].shape == (S, pbmc.n_vars)
    assert np.isfinite(path["beta_mu"]).all()
    loaded = ZINBWaVE.load(fitted.save(tmp_path / "m.npz"))
    assert loaded.fit_path_.keys() == path.keys()
    from_p = ZINBWaVE.from_params(
        W=fitted.W_,
        alpha_mu=fitted.alpha_mu_,
        beta_mu=fitted.beta_mu_,
        gamma_mu=fitted.gamma_mu_,
        zeta=fitted.zeta_,
        alpha_pi=fitted.alpha_pi_,
        beta_pi=fitted.beta_pi_,
        gamma_pi=fitted.gamma_pi_,
        var_names=fitted.var_names_,
    )
    assert from_p.fit_path_ is None
    # without a path the projection starts from zinbwave's initialization: still valid
    assert np.isfinite(from_p.transform(pbmc[:10])).all()


def test_projection_follows_the_fit_path_to_better_optima(shared):
    """New cells taken along the fit's path end in better local optima than a cold solve
    (the cells' problems are not concave): real 10x brain cells, 200 top-variance genes."""
    a = ad.read_h5ad(shared / "data" / "brain1m_10x_first10k_cells_first1000_genes.h5ad")
    from zinbgrad.data.readers import select_top_variance_genes

    b = select_top_variance_genes(a[:2500].copy(), 200)
    b = b[np.asarray(b.X.sum(1)).ravel() > 0].copy()
    train, test = b[:2000].copy(), b[2000:].copy()
    model = ZINBWaVE(n_components=6, random_state=0).fit(train)
    with_path = model.score_samples(test)
    model.fit_path_ = None
    cold = model.score_samples(test)
    # 0.40 nats per held-out cell and 86 % of cells >= cold when written
    assert np.isfinite(with_path).all()
    assert with_path.mean() > cold.mean() + 0.1
    assert (with_path >= cold - 1e-6).mean() > 0.6


def test_progress_bar_names_each_phase_with_a_truthful_total():
    # issue 21 item 3: one 100-epoch total used to be spent across sketch, extension, sweeps
    model = ZINBWaVE(2, max_epochs=100)
    cb, bar = model._progress(stochastic_epochs=3)
    try:
        assert bar.desc.endswith("[initialization]") and bar.total is None
        seen = []
        for phase, k in (("stochastic", 3), ("sketch", 7), ("extend", 1), ("full", 4)):
            for _ in range(k):
                cb({"phase": phase, "objective": -1.0})
            seen.append((bar.desc.split("[")[-1].rstrip("]"), bar.n, bar.total))
    finally:
        bar.close()
    assert seen == [
        ("minibatch epochs", 3, 3),  # a known number of epochs
        ("sketch", 7, None),  # stops at tol: no total, no made-up ETA
        ("extension", 1, 1),  # one pass over the cells
        ("sweeps", 4, None),
    ]
    assert ZINBWaVE(2, verbose=False)._progress() == (None, None)
