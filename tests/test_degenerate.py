"""Degenerate genes (issue 21, item 5): where pi ~ 1 the data cannot identify the NB mean, and
the fit may put log mu at 40+ (R zinbwave does too). Sampling and imputation stay sane."""

from __future__ import annotations

import numpy as np
import pytest

import zinbgrad
from zinbgrad import ZINBWaVE
from zinbgrad.model import outputs as O
from zinbgrad.simulate import sample_zinb

DEG = 5  # the gene made degenerate


@pytest.fixture(scope="module")
def planted():
    """A pbmc_small fit with one gene moved to log mu + 40, logit pi + 45 (pi ~ 1 where its
    mean is huge), as the 11 genes of PBMC 8k."""
    a = zinbgrad.datasets.pbmc_small()
    m = ZINBWaVE(2, verbose=False).fit(a)
    d = ZINBWaVE(2, verbose=False).fit(a)
    d.beta_mu_ = d.beta_mu_.copy()
    d.beta_pi_ = d.beta_pi_.copy()
    d.beta_mu_[0, DEG] += 40.0
    d.beta_pi_[0, DEG] += 45.0
    return a, m, d


def test_degenerate_draws_are_not_drawn_where_they_drop_out():
    rng = np.random.default_rng(0)
    a = np.array([[43.7, 1.0]] * 2000)
    b = np.array([[40.0, -2.0]] * 2000)
    nb, drop = sample_zinb(rng, a, b, np.array([2.0, 2.0]))
    assert drop[:, 0].all()  # pi = 1 - 4e-18: every entry drops out ...
    assert (nb[:, 0] == 0).all()  # ... and its NB value, 2^63, is not drawn
    # the other gene is drawn as before: NB(e, theta = e^2) with pi = sigmoid(-2)
    assert nb[:, 1].mean() == pytest.approx(np.e, rel=0.08)
    assert drop[:, 1].mean() == pytest.approx(1 / (1 + np.exp(2.0)), abs=0.03)


def test_sample_of_a_degenerate_model_fits_int32_and_names_the_gene(planted):
    a, _, d = planted
    with pytest.warns(
        UserWarning, match=rf"1 genes have a fitted NB mean beyond 2\^30.*{a.var_names[DEG]}"
    ):
        sim = d.sample()
    assert sim.X.dtype == np.int32
    # the degenerate gene drops out everywhere (pi ~ 1 where its mean is huge)
    assert sim.X[:, DEG].sum() <= a.X[:, DEG].sum() + 50


def test_imputed_zeros_of_degenerate_genes_are_capped(planted):
    a, m, d = planted
    raw = O.model_output(d, "impute_zeros", a.X)  # zinbwave's formula: ~mu = e^40 and more
    assert raw[:, DEG].max() > 1e15
    b = a.copy()
    with pytest.warns(UserWarning, match=rf"over 100x the largest count.*{a.var_names[DEG]}"):
        zinbgrad.tl.impute(b, model=d)
    imp = b.layers["zinbwave_imputed"]
    top = a.X[:, DEG].max()
    assert imp[:, DEG].max() <= top
    others = np.ones(a.n_vars, dtype=bool)
    others[DEG] = False
    np.testing.assert_array_equal(imp[:, others], raw[:, others].astype(np.float32))
    # a regular fit is untouched: zinbwave's imputeZeros exactly, no warning
    c = a.copy()
    zinbgrad.tl.impute(c, model=m)
    np.testing.assert_array_equal(
        c.layers["zinbwave_imputed"], O.model_output(m, "impute_zeros", a.X).astype(np.float32)
    )
