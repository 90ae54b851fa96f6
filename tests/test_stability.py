"""Fits a user can trust (issue 21, item 6): a deterministic initialization, and the separate
ridge weight of the zero-inflation loadings (``epsilon_alpha_pi``)."""

from __future__ import annotations

import numpy as np
import pytest

import zinbgrad
from zinbgrad import ZINBWaVE


@pytest.fixture(scope="module")
def small():
    return zinbgrad.datasets.pbmc_small()


@pytest.fixture(scope="module")
def fits(small):
    kw = {"n_components": 2, "verbose": False, "tol": 1e-8, "max_epochs": 300}
    return ZINBWaVE(**kw).fit(small), ZINBWaVE(epsilon_alpha_pi=50.0, **kw).fit(small)


def _penalty(m) -> float:
    """The penalty recomputed from the fitted parameters and the recorded weights."""
    pp = m.penalty_params_
    e_pi = pp.get("epsilon_alpha_pi", pp["epsilon_alpha"])
    out = 0.5 * pp["epsilon_W"] * (m.W_**2).sum()
    out += 0.5 * pp["epsilon_alpha"] * (m.alpha_mu_**2).sum()
    out += 0.5 * e_pi * (m.alpha_pi_**2).sum()
    out += 0.5 * (np.asarray(pp["epsilon_beta_mu"])[:, None] * m.beta_mu_**2).sum()
    out += 0.5 * (np.asarray(pp["epsilon_beta_pi"])[:, None] * m.beta_pi_**2).sum()
    out += 0.5 * (np.asarray(pp["epsilon_gamma_mu"])[:, None] * m.gamma_mu_**2).sum()
    out += 0.5 * (np.asarray(pp["epsilon_gamma_pi"])[:, None] * m.gamma_pi_**2).sum()
    return float(out)


def test_alpha_pi_weight_enters_the_penalty_and_is_recorded(fits):
    plain, strong = fits
    assert "epsilon_alpha_pi" not in plain.penalty_params_  # zinbwave's model, as before
    assert strong.penalty_params_["epsilon_alpha_pi"] == 50.0
    for m in fits:
        assert m.penalty_ == pytest.approx(_penalty(m), rel=1e-10)


def test_alpha_pi_weight_keeps_the_factors_balanced(fits):
    """zinbwave's orthogonalization minimizes the factors' penalty over W -> W T: at the
    balance ``eps_W W^T W = eps_alpha A_mu A_mu^T + eps_alpha_pi A_pi A_pi^T``, both diagonal.
    With a separate weight of alpha_pi this must hold with that weight."""
    for m in fits:
        pp = m.penalty_params_
        e_pi = pp.get("epsilon_alpha_pi", pp["epsilon_alpha"])
        left = pp["epsilon_W"] * m.W_.T @ m.W_
        right = pp["epsilon_alpha"] * m.alpha_mu_ @ m.alpha_mu_.T
        right = right + e_pi * m.alpha_pi_ @ m.alpha_pi_.T
        scale = np.abs(left).max()
        np.testing.assert_allclose(left, right, rtol=0, atol=1e-6 * scale)
        np.testing.assert_allclose(left - np.diag(np.diag(left)), 0, atol=1e-6 * scale)


def test_stronger_alpha_pi_weight_shrinks_only_the_zero_inflation_loadings(fits):
    plain, strong = fits
    pi0, pi1 = np.abs(plain.alpha_pi_).max(), np.abs(strong.alpha_pi_).max()
    assert pi1 < 0.3 * pi0
    # the mean loadings keep their size (the product W alpha_mu, rotation-free)
    mu0 = np.linalg.norm(plain.W_ @ plain.alpha_mu_)
    mu1 = np.linalg.norm(strong.W_ @ strong.alpha_mu_)
    assert mu1 == pytest.approx(mu0, rel=0.3)


def test_alpha_pi_weight_survives_save_and_load(fits, tmp_path):
    _, strong = fits
    strong.save(tmp_path / "m.npz")
    back = ZINBWaVE.load(tmp_path / "m.npz")
    assert back.epsilon_alpha_pi == 50.0
    assert back.penalty_params_["epsilon_alpha_pi"] == 50.0


def test_alpha_pi_weight_is_checked(small):
    with pytest.raises(ValueError, match="epsilon_alpha_pi must be a finite non-negative"):
        ZINBWaVE(2, epsilon_alpha_pi=-1.0).fit(small)


def test_converged_is_false_with_a_warning_when_max_epochs_stops_the_fit(small):
    from sklearn.exceptions import ConvergenceWarning

    with pytest.warns(ConvergenceWarning, match="max_epochs=2 before"):
        short = ZINBWaVE(2, verbose=False, max_epochs=2, tol=1e-12).fit(small)
    assert not short.converged_ and short.n_iter_ == 2
    # the rule met: no warning, and the last two objectives differ by at most tol
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        m = ZINBWaVE(2, verbose=False, tol=1e-4).fit(small)
    assert m.converged_ and m.n_iter_ < m.max_epochs
    a, b = (h["objective"] for h in m.history_[-2:])
    assert abs(b - a) <= 1e-4 * abs(a)
