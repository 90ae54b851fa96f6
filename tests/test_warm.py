"""Warm starts: a fit started from a fit of more factors (issue 18, choosing K)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import zinbgrad
from zinbgrad.model.params import Params
from zinbgrad.optim.warm import leading_components
from zinbgrad.planted import make_planted


def _fit(adata, K, **kw):
    kw.setdefault("verbose", False)
    init = kw.pop("init", None)
    return zinbgrad.ZINBWaVE(K, **kw).fit(adata, init=init)


@pytest.fixture(scope="module")
def planted():
    adata = make_planted(200, 80, 3, random_state=3)
    return adata, _fit(adata, 5, tol=1e-6, max_epochs=300)


def test_leading_components_keep_W_alpha_and_truncate_its_svd(planted):
    _, big = planted
    p = big.get_params_torch()
    same, _ = leading_components(p, 5, 0.3, 2.0)  # all factors: W alpha unchanged
    torch.testing.assert_close(same.W @ same.alpha_mu, p.W @ p.alpha_mu)
    torch.testing.assert_close(same.W @ same.alpha_pi, p.W @ p.alpha_pi)
    two, _ = leading_components(p, 2, 0.3, 2.0)
    # the best rank-2 approximation of [W alpha_mu, W alpha_pi] in the balanced metric
    full = torch.cat([same.W @ same.alpha_mu, same.W @ same.alpha_pi], 1)
    kept = torch.cat([two.W @ two.alpha_mu, two.W @ two.alpha_pi], 1)
    S = torch.linalg.svdvals(full)
    assert torch.linalg.svdvals(kept)[:2] == pytest.approx(S[:2].numpy(), rel=1e-8)
    assert float(torch.linalg.matrix_norm(full - kept)) == pytest.approx(
        float(S[2:].norm()), rel=1e-8
    )
    assert two.W.shape == (200, 2) and two.alpha_mu.shape == (2, 80)
    torch.testing.assert_close(two.beta_mu, p.beta_mu)  # the rest as given
    assert torch.equal(p.W, big.get_params_torch().W)  # the input is not changed


@pytest.mark.parametrize("K", [3, 2])
def test_warm_fit_reaches_the_cold_objective(planted, K):
    adata, big = planted
    cold = _fit(adata, K, tol=1e-6, max_epochs=300)
    warm = _fit(adata, K, tol=1e-6, max_epochs=300, init=big)
    assert warm.converged_ and cold.converged_
    # the same optimum up to 1e-4 of the objective (or a better one)
    assert warm.objective_ >= cold.objective_ - 1e-4 * abs(cold.objective_)
    # the fit path starts with the big fit's, so new cells follow the same way
    assert warm.fit_path_["alpha_mu"].shape[1:] == (K, 80)
    np.testing.assert_array_equal(warm.fit_path_["alpha_mu"][0], big.fit_path_["alpha_mu"][0][:K])


def test_warm_start_is_checked(planted):
    adata, big = planted
    with pytest.raises(ValueError, match="keeps 0 to 5 factors"):
        _fit(adata, 6, init=big)
    with pytest.raises(ValueError, match="other genes"):
        _fit(adata[:, :70], 2, init=big)
    with pytest.raises(ValueError, match="other cells"):
        _fit(adata[:150], 2, init=big)
    with pytest.raises(ValueError, match="zero_inflation"):
        _fit(adata, 2, init=big, zero_inflation=False)
    with pytest.raises(TypeError, match="fitted ZINBWaVE or Params"):
        _fit(adata, 2, init=np.zeros(3))
    p = big.get_params_torch()
    bad = Params(**{**p.__dict__, "W": p.W[:10]})
    with pytest.raises(ValueError, match="W has shape"):
        _fit(adata, 2, init=bad)
    from_params = _fit(adata, 2, init=p, tol=1e-6, max_epochs=300)
    assert from_params.converged_ and from_params.fit_path_["alpha_mu"].shape[1] == 2


def test_select_n_components_cold_and_warm_scans_agree():
    adata = make_planted(200, 80, 2, random_state=4)
    ks = [1, 2, 3]
    tabs = {
        warm: zinbgrad.tl.select_n_components(adata, ks, warm_start=warm) for warm in (False, True)
    }
    for df in tabs.values():
        assert list(df.n_components) == ks
        assert int(df.n_components[df.bicross_loglik.idxmax()]) == 2
    # the largest K is fitted from zinbwave's initialization in both scans
    big = [df.set_index("n_components").loc[3] for df in tabs.values()]
    assert big[0].n_iter == big[1].n_iter and big[0].train_loglik == big[1].train_loglik
