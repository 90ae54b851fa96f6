"""A dispersion per gene and batch level (``batch_dispersion``, scVI's ``gene-batch``)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy import stats

import zinbgrad
from zinbgrad import ZINBWaVE
from zinbgrad.model.likelihood import SparseCounts, entry_derivatives, log_nb, log_zinb
from zinbgrad.model.outputs import compute_output
from zinbgrad.optim.engine import Engine
from zinbgrad.optim.state import Problem


def _sparse(y: torch.Tensor) -> SparseCounts:
    idx = y.nonzero()
    v = y[idx[:, 0], idx[:, 1]]
    return SparseCounts(y.shape[0], y.shape[1], idx[:, 0], idx[:, 1], v, torch.lgamma(v + 1))


def simulate(n=600, J=40, B=2, seed=0, log_theta=(0.0, 3.0)):
    """NB counts whose log inverse dispersion per gene differs by batch (planted), with one
    latent factor and a per-batch shift of the log means."""
    rng = np.random.default_rng(seed)
    batch = rng.permutation(np.arange(n) % B)
    W = rng.normal(size=(n, 1))
    alpha = rng.normal(scale=0.5, size=(1, J))
    beta = rng.normal(2.5, 0.5, size=J)
    shift = rng.normal(scale=0.3, size=(B, J))
    shift[0] = 0.0
    zeta = np.array(log_theta)[:B, None] + rng.normal(scale=0.3, size=(B, J))
    mu = np.exp(beta + shift[batch] + W @ alpha)
    theta = np.exp(zeta[batch])
    y = rng.negative_binomial(theta, theta / (theta + mu))
    a = ad.AnnData(sp.csr_matrix(y.astype(np.float32)))
    a.obs["batch"] = [f"b{b}" for b in batch]
    a.var_names = [f"g{j}" for j in range(J)]
    a.obs_names = [f"c{i}" for i in range(n)]
    return a, {"zeta": zeta, "batch": batch}


def fit(adata, **kw):
    kw = {"zero_inflation": False, "verbose": False, "solver": "full"} | kw
    return ZINBWaVE(1, **kw).fit(adata, batch_key="batch")


@pytest.fixture(scope="module")
def planted():
    return simulate()


@pytest.fixture(scope="module")
def fitted(planted):
    return fit(planted[0], common_dispersion=False, batch_dispersion=True)


@pytest.mark.parametrize("zi", [True, False])
def test_per_entry_dispersion_derivatives_equal_autograd(zi):
    """A (cells x genes) zeta: ll and the zeta derivatives of every entry against autograd of
    the dense log-likelihood, and the (a, b) derivatives against the per-gene path."""
    g = torch.Generator().manual_seed(3)
    n, J = 24, 15
    a = torch.randn(n, J, generator=g, dtype=torch.float64) * 1.5
    b = torch.randn(n, J, generator=g, dtype=torch.float64) if zi else None
    zeta = 1.0 + 1.5 * torch.randn(n, J, generator=g, dtype=torch.float64)
    zeta[:3] = 40.0  # the large-theta branch of the special functions too
    y = torch.poisson(torch.exp(a).clamp(max=1e3), generator=g)
    y = y * (torch.rand(n, J, generator=g) > 0.3)
    d = entry_derivatives(a, b, zeta, _sparse(y), order=2, dispersion=True)
    Z = zeta.clone().requires_grad_()
    f = log_zinb(y, a, b, Z) if zi else log_nb(y, a, Z)
    torch.testing.assert_close(d.ll, f.detach(), rtol=1e-11, atol=1e-11)
    (gz,) = torch.autograd.grad(f.sum(), Z, create_graph=True)
    (gzz,) = torch.autograd.grad(gz.sum(), Z)
    torch.testing.assert_close(d.lz, gz.detach(), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(d.lzz, gzz, rtol=1e-6, atol=1e-8)
    # a zeta that is the same in every row is the per-gene model, to rounding
    z1 = zeta[5]
    one = entry_derivatives(a, b, z1, _sparse(y), order=2, dispersion=True)
    rows = entry_derivatives(a, b, z1.expand(n, J), _sparse(y), order=2, dispersion=True)
    for name in ("ll", "la", "laa", "lz", "lzz") + (("lb", "lbb", "lab") if zi else ()):
        torch.testing.assert_close(getattr(rows, name), getattr(one, name), rtol=1e-12, atol=0)


def _engine(model, adata, params):
    dev, dt = torch.device("cpu"), torch.float64
    design = model.training_design(dev, dt)
    counts = zinbgrad.data.open.open_counts(adata, None)
    source = counts.source(0, adata.n_obs, dt, dev)
    pen = model._penalty_obj(design)
    problem = Problem(source, design, pen, params.K, zero_inflation=False, common_dispersion=False)
    return Engine(problem, params)


def test_batch_dispersion_gradient_matches_finite_differences(planted, fitted):
    """The per-batch dispersion statistics of a sweep (gradient and curvature of the
    log-likelihood in zeta[b, j]) against differences of the engine's log-likelihood."""
    adata, _ = planted
    m = fitted
    params = m.get_params_torch(torch.device("cpu"), torch.float64)
    assert params.zeta.shape == (2, adata.n_vars)
    g = torch.Generator().manual_seed(0)
    params.zeta = params.zeta + 0.2 * torch.randn(params.zeta.shape, generator=g)
    engine = _engine(m, adata, params)
    rows = slice(0, adata.n_obs)
    block = engine.source.block(0, adata.n_obs)
    stats = engine._new_stats()
    d, a, b = engine.cell_newton(rows, block, 0)
    engine.accumulate(stats, rows, d, a, b, block, dispersion=True)
    assert stats.gz.shape == (2, adata.n_vars)
    h = 1e-4
    for bb, j in ((0, 0), (1, 0), (1, 7)):
        base = params.zeta.clone()
        vals = []
        for s in (h, 0.0, -h):  # a new tensor each time (the engine caches per zeta tensor)
            params.zeta = base.clone()
            params.zeta[bb, j] += s
            vals.append(engine.loglik())
        params.zeta = base
        assert stats.gz[bb, j].item() == pytest.approx((vals[0] - vals[2]) / (2 * h), rel=1e-6)
        fd2 = (vals[0] - 2 * vals[1] + vals[2]) / h**2
        assert stats.hz[bb, j].item() == pytest.approx(fd2, rel=1e-3, abs=1e-3)


def test_planted_batch_dispersion_recovered(planted, fitted):
    adata, truth = planted
    m = fitted
    assert m.zeta_batch_.shape == (2, adata.n_vars)
    np.testing.assert_array_equal(m.zeta_, m.zeta_batch_.mean(0))
    err = np.abs(m.zeta_batch_ - truth["zeta"])
    assert np.median(err, axis=1).max() < 0.3
    # batch 1's dispersions are ~e^3 times larger: the per-gene model cannot fit both
    gene = fit(adata, common_dispersion=False)
    assert np.median(np.abs(gene.zeta_[None] - truth["zeta"]), axis=1).max() > 1.0
    assert m.loglik_ > gene.loglik_ + 0.01 * abs(gene.loglik_)
    assert m.n_params_ == gene.n_params_ + adata.n_vars  # one more dispersion per gene


def test_off_is_zinbwave_model(planted):
    adata, _ = planted
    a = fit(adata, common_dispersion=False)
    b = fit(adata, common_dispersion=False, batch_dispersion=False)
    assert a.zeta_batch_ is None and b.zeta_batch_ is None
    for name in ("W_", "alpha_mu_", "beta_mu_", "zeta_"):
        assert np.array_equal(getattr(a, name), getattr(b, name))


def test_new_cells_use_their_batch_dispersion(planted, fitted, tmp_path):
    """score_samples of new cells is the NB log-likelihood at their projected means and their
    batch's dispersion (read from obs with the fit's batch_key); the wrong batch scores worse."""
    adata, truth = planted
    m = fitted
    new = adata[:40].copy()
    ll = m.score_samples(new)
    lp = m.get_likelihood_params(new)
    theta = lp["theta"]
    assert theta.shape == (40, adata.n_vars)
    np.testing.assert_allclose(theta, np.exp(m.zeta_batch_[truth["batch"][:40]]), rtol=1e-12)
    y = new.X.toarray()
    mu = lp["mu"]
    direct = stats.nbinom.logpmf(y, theta, theta / (theta + mu)).sum(1)
    np.testing.assert_allclose(ll, direct, rtol=1e-8)
    swapped = new.copy()
    swapped.obs["batch"] = np.where(new.obs["batch"] == "b0", "b1", "b0")
    assert m.score_samples(swapped).mean() < ll.mean() - 5.0
    # training cells projected with their batch land on their fitted W
    W = m.transform(adata[:30].copy())
    assert np.abs(W - m.W_[:30]).max() < 0.05 * np.abs(m.W_).max()


def test_save_load_and_anndata_round_trip(planted, fitted, tmp_path):
    adata, _ = planted
    m = fitted
    back = ZINBWaVE.load(m.save(tmp_path / "gb"))
    assert np.array_equal(back.zeta_batch_, m.zeta_batch_) and back.batch_dispersion
    new = adata[:20].copy()
    np.testing.assert_allclose(back.score_samples(new), m.score_samples(new), rtol=1e-12)
    target = adata.copy()
    kw = {"common_dispersion": False, "batch_dispersion": True, "zero_inflation": False}
    zinbgrad.tl.zinbwave(target, 1, batch_key="batch", solver="full", verbose=False, **kw)
    assert np.array_equal(target.varm["X_zinbwave_zeta_batch"], m.zeta_batch_.T)
    again = zinbgrad.tl.model_from_anndata(target)
    assert np.array_equal(again.zeta_batch_, m.zeta_batch_)
    np.testing.assert_allclose(again.score_samples(new), m.score_samples(new), rtol=1e-10)
    # the per-entry outputs of the training cells use each cell's batch dispersion
    code = (m.X_[:, 1] == 1).astype(int)
    np.testing.assert_allclose(m.get_likelihood_params()["theta"], np.exp(m.zeta_batch_[code]))
    assert m.loglik(adata) == pytest.approx(m.loglik_, rel=1e-10)
    y, mu = adata.X.toarray(), m.get_mu()
    theta = np.exp(m.zeta_batch_[code])
    direct = stats.nbinom.logpmf(y, theta, theta / (theta + mu))
    ll = compute_output(
        "loglik", m.training_design(), m.get_params_torch(), adata.X, zero_inflation=False
    )
    np.testing.assert_allclose(ll, direct, rtol=1e-9)


@pytest.mark.parametrize(
    ("solver", "kw"), [("sketch", {"sketch_size": 300}), ("stochastic", {"batch_size": 128})]
)
def test_other_solvers_fit_the_batch_dispersion(planted, fitted, solver, kw):
    adata, truth = planted
    m = fit(adata, common_dispersion=False, batch_dispersion=True, solver=solver, **kw)
    assert np.median(np.abs(m.zeta_batch_ - truth["zeta"]), axis=1).max() < 0.35
    assert m.loglik_ == pytest.approx(fitted.loglik_, rel=2e-3)


def test_zero_inflated_fit_with_batch_dispersion(planted):
    adata, truth = planted
    m = fit(adata, common_dispersion=False, batch_dispersion=True, zero_inflation=True)
    assert np.median(np.abs(m.zeta_batch_ - truth["zeta"]), axis=1).max() < 0.4
    assert np.isfinite(m.score_samples(adata[:10].copy())).all()


def test_batch_dispersion_errors(planted, fitted, tmp_path):
    adata, _ = planted
    with pytest.raises(ValueError, match="batch_dispersion=True needs batch_key"):
        ZINBWaVE(1, common_dispersion=False, batch_dispersion=True, verbose=False).fit(adata)
    with pytest.raises(ValueError, match="needs common_dispersion=False"):
        ZINBWaVE(1, batch_dispersion=True, verbose=False).fit(adata, batch_key="batch")
    with pytest.raises(ValueError, match="batch_dispersion must be True or False"):
        ZINBWaVE(1, batch_dispersion="yes", verbose=False).fit(adata, batch_key="batch")
    query = adata[:30].copy()
    query.obs["batch"] = "b_new"
    with pytest.raises(ValueError, match="cannot map unseen batch levels"):
        fitted.map_query(query, batch_key="batch")
    with pytest.raises(ValueError, match="batch_dispersion=True is not supported"):
        fitted.sample()
    bad = ZINBWaVE.load(fitted.save(tmp_path / "m"))  # a state with a wrong shape
    bad.zeta_batch_ = bad.zeta_batch_[:1]
    with pytest.raises(ValueError, match="zeta_batch has shape"):
        zinbgrad.persistence.check_state(bad)
    with pytest.raises(ValueError, match="batch_dispersion must be False"):
        ZINBWaVE.from_params(
            W=fitted.W_,
            alpha_mu=fitted.alpha_mu_,
            beta_mu=fitted.beta_mu_,
            gamma_mu=fitted.gamma_mu_,
            zeta=fitted.zeta_,
            batch_dispersion=True,
        )
