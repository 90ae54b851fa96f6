"""Uncertainty of W, loadings' standard errors, top genes and the choice of K (issue 18)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy.stats import norm

import zinbgrad
from zinbgrad.model import Design, Params, log_zinb
from zinbgrad.planted import make_planted
from zinbgrad.uncertainty import (
    cell_precisions,
    gene_precisions,
    latent_uncertainty,
    loading_uncertainty,
    predictor_sd,
)

Z90 = norm.ppf(0.95)


def _fit(adata, K, **kw):
    kw.setdefault("verbose", False)
    return zinbgrad.ZINBWaVE(K, **kw).fit(adata)


@pytest.fixture(scope="module")
def planted3():
    adata = make_planted(500, 200, 3, random_state=1)
    return adata, _fit(adata, 3, tol=1e-8, max_epochs=300)


def _signs(model, adata):
    return np.sign(np.sum(adata.obsm["W_true"] * model.W_, 0))


def _double_centered(M):
    return M - M.mean(0) - M.mean(1, keepdims=True) + M.mean()


def test_predictor_coverage_planted(planted3):
    """Nominal 90 % intervals of the (identifiable, doubly centered) latent part W_i . alpha_j
    of log mu cover the planted value 85-95 % of the time (cells' and genes' uncertainty)."""
    adata, m = planted3
    lu = latent_uncertainty(m, adata)
    gu = loading_uncertainty(m, adata)
    K = m.n_components
    err = _double_centered(m.W_ @ m.alpha_mu_) - _double_centered(
        adata.obsm["W_true"] @ adata.varm["alpha_mu_true"].T
    )
    alpha_c = m.alpha_mu_ - m.alpha_mu_.mean(1, keepdims=True)
    sd = predictor_sd(lu, alpha_c, gu.cov[:, 1 : 1 + K, 1 : 1 + K])
    cover = np.mean(np.abs(err) <= Z90 * sd)
    assert 0.85 <= cover <= 0.95, cover
    # the cells' part alone is too narrow (the genes' uncertainty matters at n/J = 2.5)
    assert np.mean(np.abs(err) <= Z90 * predictor_sd(lu, alpha_c)) < cover


def test_projected_cells_coverage(planted3):
    """New cells drawn from the fitted model: 90 % intervals of the projected W_i cover the
    W_i they were drawn with 85-95 % of the time (per factor)."""
    _, m = planted3
    sim = m.sample(random_state=5)  # the training cells' W, new counts
    lu = latent_uncertainty(m, sim, new=True)
    cover = np.mean(np.abs(lu.W - m.W_) <= Z90 * lu.sd, 0)
    assert np.all((cover >= 0.85) & (cover <= 0.95)), cover


def _autograd_problem(model, adata, cell: int | None, gene: int | None):
    """Penalized log-likelihood of one cell (its W, gamma) or one gene (beta, alpha) by autograd
    on the dense log_zinb, for an independent reference Hessian."""
    Y = torch.as_tensor(adata.X.toarray(), dtype=torch.float64)
    p = model.get_params_torch()
    X = torch.as_tensor(model.X_)
    pp = model.penalty_params_
    K = model.n_components

    def ll(W, gmu, gpi, amu, api, bmu, bpi, rows, cols):
        a = X[rows] @ bmu + gmu[:, None] + W @ amu
        b = X[rows] @ bpi + gpi[:, None] + W @ api
        return log_zinb(Y[rows][:, cols], a, b, p.zeta[cols]).sum()

    if cell is not None:
        r = slice(cell, cell + 1)
        eps = torch.tensor([pp["epsilon_W"]] * K + pp["epsilon_gamma_mu"] + pp["epsilon_gamma_pi"])

        def f(u):
            v = ll(
                u[None, :K],
                u[K : K + 1],
                u[K + 1 :],
                p.alpha_mu,
                p.alpha_pi,
                p.beta_mu,
                p.beta_pi,
                r,
                slice(None),
            )
            return v - 0.5 * (eps * u * u).sum()

        u0 = torch.cat([p.W[cell], p.gamma_mu[:, cell], p.gamma_pi[:, cell]])
        return f, u0
    c = slice(gene, gene + 1)
    eps = torch.tensor(pp["epsilon_beta_mu"] + [pp["epsilon_alpha"]] * K)
    eps = torch.cat([eps, torch.tensor(pp["epsilon_beta_pi"] + [pp["epsilon_alpha"]] * K)])

    def g(v):
        bmu, amu = v[:1, None], v[1 : 1 + K, None]
        bpi, api = v[1 + K : 2 + K, None], v[2 + K :, None]
        val = ll(p.W, p.gamma_mu[0], p.gamma_pi[0], amu, api, bmu, bpi, slice(None), c)
        return val - 0.5 * (eps * v * v).sum()

    v0 = torch.cat(
        [p.beta_mu[:, gene], p.alpha_mu[:, gene], p.beta_pi[:, gene], p.alpha_pi[:, gene]]
    )
    return g, v0


def test_hessians_match_autograd(planted3):
    """The assembled cell and gene Hessians equal autograd's Hessians of the dense penalized
    log-likelihood (an independent path through log_zinb)."""
    adata, m = planted3
    small = adata[:60].copy()
    # a model on the first 60 cells: same genes, the fit's cell values for those cells
    sub = zinbgrad.ZINBWaVE.from_params(
        W=m.W_[:60],
        alpha_mu=m.alpha_mu_,
        alpha_pi=m.alpha_pi_,
        beta_mu=m.beta_mu_,
        beta_pi=m.beta_pi_,
        gamma_mu=m.gamma_mu_[:, :60],
        gamma_pi=m.gamma_pi_[:, :60],
        zeta=m.zeta_,
        var_names=m.var_names_,
        obs_names=small.obs_names,
        n_components=3,
        epsilon_W=m.penalty_params_["epsilon_W"],
        epsilon_gamma=m.penalty_params_["epsilon_W"],
    )
    design = sub.training_design()
    params = sub.get_params_torch()
    A = cell_precisions(sub, small)
    G = gene_precisions(sub, small)
    for cell in (0, 17):
        f, u0 = _autograd_problem(sub, small, cell, None)
        H = torch.autograd.functional.hessian(f, u0)
        np.testing.assert_allclose(A[cell].numpy(), -H.numpy(), rtol=1e-8, atol=1e-8)
    for gene in (3, 150):
        g, v0 = _autograd_problem(sub, small, None, gene)
        H = torch.autograd.functional.hessian(g, v0)
        np.testing.assert_allclose(G[gene].numpy(), -H.numpy(), rtol=1e-8, atol=1e-8)
    assert isinstance(design, Design) and isinstance(params, Params)


def test_batch_loadings_hessians_match_autograd():
    """With batch-specific loadings the cell Hessians use each cell's batch loadings
    ``alpha_mu + delta_b`` (and the gene Hessians include the offsets): against autograd on
    the dense log_zinb with log mu written out by hand."""
    adata = make_planted(120, 60, 2, random_state=4)
    adata.obs["batch"] = pd.Categorical(np.repeat(["a", "b"], 60))
    m = zinbgrad.ZINBWaVE(2, batch_loadings=True, max_epochs=30, verbose=False)
    m.fit(adata, batch_key="batch")
    p, K = m.get_params_torch(), 2
    Y = torch.as_tensor(adata.X.toarray(), dtype=torch.float64)
    X = torch.as_tensor(m.X_)
    pp = m.penalty_params_
    delta = p.delta_mu.view(2, K, -1)  # batch b's offsets: rows b*K .. (b+1)*K
    assert float(delta.abs().max()) > 1e-3  # the offsets are not all zero
    A = cell_precisions(m, adata)
    for cell in (3, 90):  # one cell of each batch
        bt = cell // 60
        eps = torch.tensor([pp["epsilon_W"]] * K + pp["epsilon_gamma_mu"] + pp["epsilon_gamma_pi"])

        def f(u, cell=cell, bt=bt, eps=eps):
            a = X[cell] @ p.beta_mu + u[K] + u[:K] @ (p.alpha_mu + delta[bt])
            b = X[cell] @ p.beta_pi + u[K + 1] + u[:K] @ p.alpha_pi
            return log_zinb(Y[cell], a, b, p.zeta).sum() - 0.5 * (eps * u * u).sum()

        u0 = torch.cat([p.W[cell], p.gamma_mu[:, cell], p.gamma_pi[:, cell]])
        H = torch.autograd.functional.hessian(f, u0)
        np.testing.assert_allclose(A[cell].numpy(), -H.numpy(), rtol=1e-8, atol=1e-8)
    # the genes' vectors include the offsets; their ridge weight is epsilon_delta
    G = gene_precisions(m, adata)
    Mmu = X.shape[1]
    assert G.shape[1] == Mmu + K + 2 * K + X.shape[1] + K
    j = 7

    def g(v):
        bmu, amu = v[:Mmu], v[Mmu : Mmu + K]
        dl = v[Mmu + K : Mmu + 3 * K].view(2, K)
        bpi, api = v[Mmu + 3 * K : 2 * Mmu + 3 * K], v[2 * Mmu + 3 * K :]
        off = torch.cat([p.W[:60] @ dl[0], p.W[60:] @ dl[1]])
        a = X @ bmu + p.gamma_mu[0] + p.W @ amu + off
        b = X @ bpi + p.gamma_pi[0] + p.W @ api
        eps = torch.cat(
            [
                torch.tensor(pp["epsilon_beta_mu"] + [pp["epsilon_alpha"]] * K),
                torch.full((2 * K,), float(pp["epsilon_delta"])),
                torch.tensor(pp["epsilon_beta_pi"] + [pp["epsilon_alpha"]] * K),
            ]
        )
        return log_zinb(Y[:, j], a, b, p.zeta[j]).sum() - 0.5 * (eps * v * v).sum()

    v0 = torch.cat(
        [p.beta_mu[:, j], p.alpha_mu[:, j], p.delta_mu[:, j], p.beta_pi[:, j], p.alpha_pi[:, j]]
    )
    H = torch.autograd.functional.hessian(g, v0)
    np.testing.assert_allclose(G[j].numpy(), -H.numpy(), rtol=1e-8, atol=1e-8)
    lu = loading_uncertainty(m, adata)
    assert lu.alpha_mu_se.shape == (K, 60) and np.all(np.isfinite(lu.alpha_mu_se))


def test_loading_se_match_refits():
    """Standard errors of alpha_mu against the spread of alpha_mu over refits to counts
    redrawn from the same parameters (signs aligned): the same size, roughly."""
    adata = make_planted(400, 100, 2, random_state=7, logit_pi=None)
    m0 = _fit(adata, 2, zero_inflation=False, tol=1e-7, max_epochs=200)
    fits, ses = [], []
    for r in range(8):
        sim = m0.sample(random_state=100 + r)
        m = _fit(sim, 2, zero_inflation=False, tol=1e-7, max_epochs=200)
        s = np.sign(np.sum(m.alpha_mu_ * m0.alpha_mu_, 1))
        fits.append(m.alpha_mu_ * s[:, None])
        ses.append(loading_uncertainty(m, sim).alpha_mu_se)
    spread = np.std(np.stack(fits), axis=0, ddof=1)  # (K, J)
    se = np.mean(np.stack(ses), axis=0)
    ratio = np.median(spread / se, axis=1)
    assert np.all((ratio > 0.7) & (ratio < 1.4)), ratio
    # and gene by gene, genes with larger SEs vary more
    assert np.corrcoef(se.ravel(), spread.ravel())[0, 1] > 0.5


def test_tl_outputs_and_top_genes(tmp_path):
    adata = make_planted(300, 120, 2, random_state=3)
    zinbgrad.tl.zinbwave(adata, 2, verbose=False)
    X_before = adata.X.copy()
    zinbgrad.tl.latent_uncertainty(adata, store_cov=True)
    sd, cov = adata.obsm["X_zinbwave_sd"], adata.obsm["X_zinbwave_cov"]
    assert sd.shape == (300, 2) and cov.shape == (300, 2, 2)
    np.testing.assert_allclose(sd, np.sqrt(np.einsum("ikk->ik", cov)))
    np.testing.assert_allclose(cov, cov.transpose(0, 2, 1))
    assert np.all(np.linalg.eigvalsh(cov) > 0)
    df = zinbgrad.tl.top_genes(adata, 5)
    assert list(df.columns) == ["factor", "direction", "rank", "gene", "loading", "se", "z"]
    assert len(df) == 2 * 2 * 5
    assert adata.varm["X_zinbwave_alpha_mu_se"].shape == (120, 2)
    # the planted drivers of each factor are found (the truth in the fit's signs)
    s = np.sign(np.sum(adata.obsm["W_true"] * adata.obsm["X_zinbwave"], 0))
    truth = adata.varm["alpha_mu_true"] * s
    for k in range(2):
        for d, order in (("+", np.argsort(-truth[:, k])), ("-", np.argsort(truth[:, k]))):
            want = set(adata.var_names[order[:5]])
            got = set(df[(df.factor == k) & (df.direction == d)].gene)
            assert len(want & got) >= 4, (k, d, want, got)
    assert (adata.X != X_before).nnz == 0
    adata.write_h5ad(tmp_path / "a.h5ad")  # everything stored is writable
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    assert back.obsm["X_zinbwave_cov"].shape == (300, 2, 2)


def test_latent_uncertainty_new_cells_tl():
    adata = make_planted(300, 120, 2, random_state=3)
    model = zinbgrad.tl.zinbwave(adata, 2, verbose=False)
    query = model.sample(n_cells=40, random_state=1)
    query.obs_names = [f"q{i}" for i in range(40)]
    zinbgrad.tl.latent_uncertainty(query, model=model)
    np.testing.assert_allclose(query.obsm["X_zinbwave"], model.transform(query))
    assert query.obsm["X_zinbwave_sd"].shape == (40, 2)
    with pytest.raises(ValueError, match="training cells"):
        zinbgrad.tl.loadings(query, model=model)
    with pytest.raises(TypeError, match="AnnData"):
        zinbgrad.tl.latent_uncertainty(np.zeros((3, 3)))


@pytest.mark.parametrize("key", ["", "a/b"])
def test_interpretation_keys_are_checked_before_any_work(key):
    """Keys anndata cannot write back are refused up front (as every other tl function does):
    nothing is computed or stored."""
    adata = make_planted(60, 30, 1, random_state=2)
    zinbgrad.tl.zinbwave(adata, 1, verbose=False)
    before = (set(adata.obsm), set(adata.varm), set(adata.uns))
    calls = (
        lambda: zinbgrad.tl.latent_uncertainty(adata, key_added=key),
        lambda: zinbgrad.tl.top_genes(adata, 2, key_added=key),
        lambda: zinbgrad.tl.select_n_components(adata, [1], key_added=key),
    )
    for call in calls:
        with pytest.raises(ValueError, match="key_added"):
            call()
    assert (set(adata.obsm), set(adata.varm), set(adata.uns)) == before


@pytest.mark.slow
@pytest.mark.parametrize("warm_start", [False, True])
@pytest.mark.parametrize("K_true, ks", [(3, [2, 3, 4]), (6, [5, 6, 7])])
def test_select_n_components_recovers_planted_K(K_true, ks, warm_start):
    adata = make_planted(500, 200, K_true, random_state=2)
    df = zinbgrad.tl.select_n_components(adata, ks, warm_start=warm_start)
    assert list(df.n_components) == ks
    u = adata.uns["zinbwave_n_components"]
    assert u["recommended"] == K_true, df
    assert u["recommended_by"]["bic"] == K_true
    # the re-optimized held-out score rises past the truth; bi-cross-validation does not
    assert df.heldout_loglik.iloc[-1] > df.heldout_loglik.iloc[1]
    assert df.bicross_loglik.iloc[-1] < df.bicross_loglik.iloc[1]


def test_select_n_components_validates():
    adata = make_planted(60, 30, 1, random_state=2)
    with pytest.raises(ValueError, match="n_components"):
        zinbgrad.tl.select_n_components(adata, [1.5])
    with pytest.raises(ValueError, match="holdout"):
        zinbgrad.tl.select_n_components(adata, [1], holdout=0.9)
    with pytest.raises(ValueError, match="criterion"):
        zinbgrad.tl.select_n_components(adata, [1], criterion="x")
    # batch options are refused before any fit (the bi-cross-validation scores zinbwave's
    # model), not after the first K's fit with another option's error
    adata.obs["batch"] = np.repeat(["a", "b"], 30)
    for option in ("batch_loadings", "batch_dispersion"):
        with pytest.raises(ValueError, match=f"{option} is not supported"):
            zinbgrad.tl.select_n_components(adata, [1], batch_key="batch", **{option: True})
    assert "zinbwave_n_components" not in adata.uns


def test_select_n_components_drops_genes_absent_from_training_cells():
    adata = make_planted(60, 30, 1, random_state=2)
    n_test = 12  # holdout=0.2 of 60 cells; the split below is select_n_components'
    first_test = np.random.default_rng(0).permutation(60)[0]
    X = adata.X.toarray()
    X[:, 0] = 0
    X[first_test, 0] = 3  # gene 0 is seen in one held-out cell only
    adata.X = sp.csr_matrix(X)
    df = zinbgrad.tl.select_n_components(adata, [1], holdout=n_test / 60)
    assert np.isfinite(df.bicross_loglik).all()
    assert adata.uns["zinbwave_n_components"]["n_genes"] == 29


def test_select_n_components_with_batch_key():
    adata = make_planted(120, 40, 1, random_state=6)
    adata.obs["batch"] = pd.Categorical(np.where(np.arange(120) % 2, "b", "a"))
    df = zinbgrad.tl.select_n_components(adata, [0, 1], batch_key="batch")
    # the held-out cells are encoded against the fitted batch levels (in both scores)
    assert np.isfinite(df[["heldout_loglik", "bicross_loglik"]].to_numpy()).all()
    # each K's time splits into its fit on the training cells and its held-out scoring
    assert (df.fit_seconds > 0).all() and (df.score_seconds > 0).all()
    np.testing.assert_allclose(df.fit_seconds + df.score_seconds, df.seconds)
