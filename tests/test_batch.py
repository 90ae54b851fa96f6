"""Batch-specific loadings (``batch_loadings``) and mapping cells of unseen batches."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import zinbgrad
from zinbgrad import ZINBWaVE
from zinbgrad.optim.engine import Engine
from zinbgrad.optim.state import Problem


def simulate(n=300, J=60, K=2, B=2, seed=0, delta_sd=0.8, shift_sd=0.5, theta=5.0):
    """NB counts with planted batch shifts and batch-specific loadings alpha + delta_b."""
    rng = np.random.default_rng(seed)
    batch = rng.permutation(np.arange(n) % B)
    W = rng.normal(size=(n, K))
    alpha = rng.normal(scale=0.7, size=(K, J))
    delta = rng.normal(scale=delta_sd, size=(B, K, J))
    beta = rng.normal(1.5, 0.5, size=J)
    shift = rng.normal(scale=shift_sd, size=(B, J))
    shift[0] = 0.0
    eta = beta + shift[batch] + np.einsum("ik,ikj->ij", W, alpha[None] + delta[batch])
    mu = np.exp(np.clip(eta, -10, 8))
    y = rng.negative_binomial(theta, theta / (theta + mu))
    a = ad.AnnData(sp.csr_matrix(y.astype(np.float32)))
    a.obs["batch"] = [f"b{b}" for b in batch]
    a.var_names = [f"g{j}" for j in range(J)]
    a.obs_names = [f"c{i}" for i in range(n)]
    return a, {"W": W, "alpha": alpha, "delta": delta, "shift": shift, "batch": batch}


def fit(adata, **kw):
    kw = {"zero_inflation": False, "verbose": False, "solver": "full"} | kw
    return ZINBWaVE(2, **kw).fit(adata, batch_key="batch")


@pytest.fixture(scope="module")
def planted():
    return simulate()


@pytest.fixture(scope="module")
def fitted(planted):
    return fit(planted[0], batch_loadings=True)


def test_planted_loading_offsets_recovered(planted, fitted):
    adata, truth = planted
    m = fitted
    assert m.delta_mu_.shape == (2, 2, adata.n_vars)
    # the identifiable part: how a cell's batch changes its log mean, W_i (delta_1 - delta_0)
    est = m.W_ @ (m.delta_mu_[1] - m.delta_mu_[0])
    true = truth["W"] @ (truth["delta"][1] - truth["delta"][0])
    assert np.corrcoef(est.ravel(), true.ravel())[0, 1] > 0.85
    plain = fit(adata)
    assert m.loglik_ > plain.loglik_ + 0.05 * abs(plain.loglik_)


def test_strong_penalty_gives_zinbwave_model(planted):
    adata, _ = planted
    plain = fit(adata, tol=1e-8)
    stiff = fit(adata, batch_loadings=True, epsilon_delta=1e12, tol=1e-8)
    assert np.abs(stiff.delta_mu_).max() < 1e-6
    assert stiff.loglik_ == pytest.approx(plain.loglik_, rel=1e-6)
    Wa = plain.W_ @ plain.alpha_mu_
    assert np.abs(stiff.W_ @ stiff.alpha_mu_ - Wa).max() < 2e-2 * np.abs(Wa).max()


def test_off_is_zinbwave_model_and_format(planted, tmp_path):
    adata, _ = planted
    a, b = fit(adata), fit(adata, batch_loadings=False, epsilon_delta=3.0)
    assert a.delta_mu_ is None and "epsilon_delta" not in a.penalty_params_
    for name in ("W_", "alpha_mu_", "beta_mu_", "zeta_"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert "delta_mu" not in np.load(a.save(tmp_path / "plain"), allow_pickle=False).files


def test_gradients_match_finite_differences(planted, fitted):
    """The gene gradient in delta_mu and the cell gradient in W (batch-specific loadings)
    against central differences of the penalized log-likelihood."""
    adata, _ = planted
    m = fitted
    dev, dt = torch.device("cpu"), torch.float64
    design = m.training_design(dev, dt)
    params = m.get_params_torch(dev, dt)
    g = torch.Generator().manual_seed(0)
    params.delta_mu = params.delta_mu + 0.1 * torch.randn(params.delta_mu.shape, generator=g)
    params.W = params.W + 0.1 * torch.randn(params.W.shape, generator=g)
    counts = zinbgrad.data.open.open_counts(adata, None)
    source = counts.source(0, adata.n_obs, dt, dev)
    problem = Problem(source, design, m._penalty_obj(design), 2, zero_inflation=False)
    engine = Engine(problem, params)
    rows = slice(0, adata.n_obs)
    block = source.block(0, adata.n_obs)
    stats = engine._new_stats()
    d, a, b = engine.cell_newton(rows, block, 0)
    engine.accumulate(stats, rows, d, a, b, block, dispersion=False)
    _, grad = engine._gene_system(stats, engine._get_gene_vec())
    col = engine.gene_slices()["delta_mu"].start + 3  # batch 1? offset (0, 3) of gene j

    def objective() -> float:
        return engine.loglik() - engine.penalty_value()

    h = 1e-5
    for j in (0, 7):
        base = params.delta_mu[3, j].item()
        vals = []
        for s in (h, -h):
            params.delta_mu[3, j] = base + s
            vals.append(objective())
        params.delta_mu[3, j] = base
        assert grad[j, col].item() == pytest.approx((vals[0] - vals[1]) / (2 * h), rel=1e-5)
    feats = engine._cell_features()
    groups = engine._batch_groups(rows)
    _, gcell = engine._cell_system(d, engine._get_cell_vec(rows), feats, groups)
    for i in (0, 1, 5):  # cells of both batches
        base = params.W[i, 1].item()
        vals = []
        for s in (h, -h):
            params.W[i, 1] = base + s
            vals.append(objective())
        params.W[i, 1] = base
        assert gcell[i, 1].item() == pytest.approx((vals[0] - vals[1]) / (2 * h), rel=1e-5)


def test_rebalancing_keeps_products_and_lowers_penalty(planted, fitted):
    m = fitted
    dev, dt = torch.device("cpu"), torch.float64
    design = m.training_design(dev, dt)
    params = m.get_params_torch(dev, dt)
    g = torch.Generator().manual_seed(1)
    R = torch.eye(2, dtype=dt) + 0.5 * torch.randn(2, 2, generator=g, dtype=dt)
    params.W = params.W @ R  # an unbalanced factorization of the same products
    Rinv = torch.linalg.inv(R)
    params.alpha_mu = Rinv @ params.alpha_mu
    params.delta_mu = (Rinv @ params.delta_mu.view(2, 2, -1)).reshape(4, -1)
    counts = zinbgrad.data.open.open_counts(planted[0], None)
    source = counts.source(0, planted[0].n_obs, dt, dev)
    pen = m._penalty_obj(design)
    engine = Engine(Problem(source, design, pen, 2, zero_inflation=False), params)
    before = [params.W @ params.alpha_mu] + [params.W @ d for d in params.delta_mu.view(2, 2, -1)]
    p0 = pen.value(params)
    engine.orthogonalize()
    after = [params.W @ params.alpha_mu] + [params.W @ d for d in params.delta_mu.view(2, 2, -1)]
    for x, y in zip(before, after, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)
    assert pen.value(params) < p0
    Wg = params.W.T @ params.W
    assert abs(Wg[0, 1].item()) < 1e-8 * Wg[0, 0].item()


def test_save_load_and_anndata_round_trip(planted, fitted, tmp_path):
    adata, _ = planted
    m = fitted
    back = ZINBWaVE.load(m.save(tmp_path / "bl"))
    assert np.array_equal(back.delta_mu_, m.delta_mu_)
    assert back.penalty_params_["epsilon_delta"] == m.penalty_params_["epsilon_delta"]
    new = adata[:20].copy()
    W = m.transform(new, batch_key="batch")
    assert np.allclose(back.transform(new, batch_key="batch"), W)
    target = adata.copy()
    zinbgrad.tl.zinbwave(
        target,
        2,
        batch_key="batch",
        batch_loadings=True,
        zero_inflation=False,
        solver="full",
        verbose=False,
    )
    assert np.array_equal(target.obsm["X_zinbwave"], m.W_)  # the batch-free latent space
    assert np.array_equal(target.varm["X_zinbwave_delta_mu"], m.delta_mu_.reshape(4, -1).T)
    zinbgrad.tl.project(new, target, "W_query", batch_key="batch")
    assert np.allclose(new.obsm["W_query"], W)


def test_training_cells_recovered_by_transform(planted, fitted):
    """A training cell projected with its batch lands near its fitted W (the cell problems
    use the batch's loadings)."""
    adata, _ = planted
    m = fitted
    W = m.transform(adata[:30].copy(), batch_key="batch")
    assert np.abs(W - m.W_[:30]).max() < 0.05 * np.abs(m.W_).max()


def test_batch_loadings_need_batch_key(planted):
    with pytest.raises(ValueError, match="batch_loadings=True needs batch_key"):
        ZINBWaVE(2, batch_loadings=True, verbose=False).fit(planted[0])
    with pytest.raises(ValueError, match="batch_loadings must be True or False"):
        ZINBWaVE(2, batch_loadings="yes", verbose=False).fit(planted[0], batch_key="batch")


@pytest.mark.parametrize("loadings", [False, True])
def test_map_query_of_unseen_batch(loadings):
    adata, truth = simulate(n=450, B=3, seed=2, delta_sd=0.5 if loadings else 0.0)
    b = truth["batch"]
    ref, query = adata[b < 2].copy(), adata[b == 2].copy()
    m = fit(ref, batch_loadings=loadings)
    before = {k: getattr(m, k).copy() for k in ("beta_mu_", "alpha_mu_", "zeta_", "W_")}
    with pytest.raises(ValueError, match="levels the model was not fitted with"):
        m.transform(query, batch_key="batch")
    q = m.map_query(query)
    assert q.levels == ["b2"] and q.converged
    assert (q.delta_mu is not None) == loadings
    # the estimated effect of the new level is the planted shift (up to the reference's)
    assert np.corrcoef(q.beta_mu[0], truth["shift"][2])[0, 1] > 0.9
    # much better than projecting the cells as the reference batch
    assert q.loglik.mean() > m.score(query, reference_batch=True) + 1.0
    assert np.array_equal(m.transform(query, new_batches=True), q.W)
    assert np.array_equal(m.score_samples(query, new_batches=True), q.loglik)
    for k, v in before.items():
        assert np.array_equal(getattr(m, k), v)


def test_map_query_needs_batch_design(planted):
    m = fit(planted[0])
    plain = ZINBWaVE(2, zero_inflation=False, verbose=False, solver="full").fit(planted[0])
    with pytest.raises(ValueError, match="needs a model fitted with batch_key"):
        plain.map_query(planted[0])
    with pytest.raises(ValueError, match="X/covariate_keys unused"):
        m.score_samples(planted[0], new_batches=True, X=np.ones((planted[0].n_obs, 2)))


def test_map_query_onto_single_batch_fit():
    """A model fitted on one batch (no batch_key) maps another batch's cells: the fitted
    cells are the reference level, the query's level gets an X column and, on request,
    loading offsets."""
    adata, truth = simulate(n=400, B=2, seed=3)
    b = truth["batch"]
    ref, query = adata[b == 0].copy(), adata[b == 1].copy()
    m = ZINBWaVE(2, zero_inflation=False, verbose=False, solver="full").fit(ref)
    with pytest.raises(ValueError, match="needs a model fitted with batch_key"):
        m.map_query(query)
    plain = m.map_query(query, batch_key="batch")
    q = m.map_query(query, batch_key="batch", batch_loadings=True)
    assert plain.levels == q.levels == ["b1"]
    assert plain.delta_mu is None and q.delta_mu.shape == (1, 2, adata.n_vars)
    assert np.corrcoef(q.beta_mu[0], truth["shift"][1])[0, 1] > 0.8
    # the planted offsets: the query's loadings differ from the reference's
    assert q.loglik.mean() > plain.loglik.mean() + 1.0 > m.score(query) + 1.0


def test_latent_scores_keep_log_mean_distances(fitted, planted):
    m = fitted
    S = m.latent_scores()
    P = m.W_ @ m.alpha_mu_
    i, j = np.triu_indices(40, 1)
    dS = np.linalg.norm(S[i] - S[j], axis=1)
    dP = np.linalg.norm(P[i] - P[j], axis=1)
    np.testing.assert_allclose(dS, dP, rtol=1e-10)
    var = S.var(0)
    assert (np.diff(var) <= 0).all() and np.allclose(S.mean(0), 0.0, atol=1e-12)
    # the principal scores of the centred W alpha_mu: its singular values
    sv = np.linalg.svd(P - P.mean(0), compute_uv=False)[:2]
    np.testing.assert_allclose(np.linalg.norm(S, axis=0), sv, rtol=1e-8)
    np.testing.assert_allclose(m.latent_scores(m.W_[:5]), S[:5])
    target = planted[0].copy()
    zinbgrad.tl.zinbwave(target, 2, batch_key="batch", zero_inflation=False, verbose=False)
    assert target.obsm["X_zinbwave_scores"].shape == (target.n_obs, 2)


@pytest.mark.filterwarnings("ignore:the fit stopped at max_epochs")
def test_gene_information_is_the_nb_fisher_information(planted):
    """gene_information: the mean over cells of (1 - pi) mu theta / (mu + theta), checked
    against the fitted means, zero-inflation probabilities and dispersions (batch loadings,
    zero inflation and a dispersion per batch: every part of a cell's distribution)."""
    adata, _ = planted
    m = fit(
        adata,
        batch_loadings=True,
        zero_inflation=True,
        common_dispersion=False,
        batch_dispersion=True,
        max_epochs=5,
    )
    p = m.get_likelihood_params()
    mu, pi, theta = p["mu"], p["pi"], p["theta"]
    ref = ((1 - pi) * mu * theta / (mu + theta)).mean(0)
    np.testing.assert_allclose(m.gene_information(), ref, rtol=1e-10)
    # block by block over the cells: the same numbers
    from zinbgrad.fitted import gene_information

    np.testing.assert_allclose(gene_information(m, block_cells=7), ref, rtol=1e-10)


def test_fisher_scores_keep_weighted_log_mean_distances(fitted):
    m = fitted
    w = m.gene_information()
    assert w.shape == (m.alpha_mu_.shape[1],) and (w > 0).all()
    S = m.latent_scores(gene_weights="fisher")
    np.testing.assert_allclose(S, m.latent_scores(gene_weights=w))
    # Euclidean distances of the rows of W alpha_mu diag(sqrt(w))
    P = m.W_ @ (m.alpha_mu_ * np.sqrt(w))
    i, j = np.triu_indices(40, 1)
    np.testing.assert_allclose(
        np.linalg.norm(S[i] - S[j], axis=1), np.linalg.norm(P[i] - P[j], axis=1), rtol=1e-10
    )
    # unit weights: the unweighted scores; other cells' W mapped by the same linear map
    np.testing.assert_allclose(m.latent_scores(gene_weights=np.ones_like(w)), m.latent_scores())
    np.testing.assert_allclose(m.latent_scores(m.W_[:5], gene_weights=w), S[:5])
    for bad in ("pearson", -w, w[:-1], np.full_like(w, np.nan)):
        with pytest.raises(ValueError, match="gene_weights"):
            m.latent_scores(gene_weights=bad)


def test_outputs_use_the_batch_loadings(fitted):
    """Fitted means and batch-corrected means follow each cell's (or the target batch's)
    loadings alpha_mu + delta_b."""
    from zinbgrad.model.outputs import batch_corrected

    m = fitted
    code = (m.X_[:, 1] == 1).astype(int)  # b1 is the only non-reference level
    cell = (m.V_ @ m.gamma_mu_).T  # the cells' intercepts (library size)
    bias = m.beta_mu_[0] + m.X_[:, 1:2] * m.beta_mu_[1] + cell
    eta = bias + np.einsum("ik,ikj->ij", m.W_, m.alpha_mu_[None] + m.delta_mu_[code])
    np.testing.assert_allclose(m.get_mu(), np.exp(eta), rtol=1e-10)
    moved = batch_corrected(m, reference="b1")
    eta1 = m.beta_mu_[0] + m.beta_mu_[1] + cell + m.W_ @ (m.alpha_mu_ + m.delta_mu_[1])
    np.testing.assert_allclose(moved, np.exp(eta1), rtol=1e-10)


@pytest.mark.parametrize(
    ("solver", "kw"), [("sketch", {"sketch_size": 150}), ("stochastic", {"batch_size": 64})]
)
def test_other_solvers_fit_the_offsets(planted, fitted, solver, kw):
    adata, truth = planted
    m = fit(adata, batch_loadings=True, solver=solver, **kw)
    est = m.W_ @ (m.delta_mu_[1] - m.delta_mu_[0])
    true = truth["W"] @ (truth["delta"][1] - truth["delta"][0])
    assert np.corrcoef(est.ravel(), true.ravel())[0, 1] > 0.85
    assert m.loglik_ == pytest.approx(fitted.loglik_, rel=1e-3)
