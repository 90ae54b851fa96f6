"""Model math against R zinbwave golden outputs and independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import REFERENCES, load_reference
from zinbgrad import ZINBWaVE
from zinbgrad.model.params import EPSILON_NAMES, Design, Penalty, orthogonalize_trace_norm


def _model_from_reference(ref: dict) -> ZINBWaVE:
    s, p = ref["summary"], ref["params"]
    return ZINBWaVE.from_params(
        W=p["W"],
        alpha_mu=p["alpha_mu"],
        alpha_pi=p["alpha_pi"],
        beta_mu=p["beta_mu"],
        beta_pi=p["beta_pi"],
        gamma_mu=p["gamma_mu"],
        gamma_pi=p["gamma_pi"],
        zeta=p["zeta"],
        X=p["X"],
        var_names=ref["adata"].var_names,
        zero_inflation=s["zeroinflation"],
        common_dispersion=s["commondispersion"],
    )


@pytest.mark.parametrize("name", REFERENCES)
def test_loglik_and_penalty_equal_r_zinbwave(shared, name):
    ref = load_reference(shared, name)
    s = ref["summary"]
    model = _model_from_reference(ref)
    ll = model.loglik(ref["adata"])
    assert ll == pytest.approx(s["loglik_exact"], rel=1e-6)
    assert model.penalty_ == pytest.approx(s["penalty"], rel=1e-6)
    # every epsilon as zinbwave set it
    pp = model.penalty_params_
    assert np.allclose(pp["epsilon_beta_mu"], s["epsilon_beta_mu"])
    assert np.allclose(pp["epsilon_beta_pi"], s["epsilon_beta_pi"])
    assert np.allclose(pp["epsilon_gamma_mu"], s["epsilon_gamma_mu"])
    assert np.allclose(pp["epsilon_gamma_pi"], s["epsilon_gamma_pi"])
    assert pp["epsilon_W"] == pytest.approx(s["epsilon_W"][0])
    assert pp["epsilon_alpha"] == pytest.approx(s["epsilon_alpha"][0])
    assert pp["epsilon_zeta"] == pytest.approx(s["epsilon_zeta"])
    # zinbwave's nParams; AIC/BIC from the same definitions (R used its own loglik)
    assert model.n_params_ == s["n_params"]
    assert model.aic_ - 2 * model.n_params_ == pytest.approx(-2 * ll, rel=1e-12)
    n = s["n_cells"]
    assert 2 * model.n_params_ - 2 * s["loglik"] == pytest.approx(s["aic"], rel=1e-9)
    assert np.log(n) * model.n_params_ - 2 * s["loglik"] == pytest.approx(s["bic"], rel=1e-9)


def test_orthogonalize_trace_norm_against_qr_form():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(200, 4, generator=g, dtype=torch.float64) @ torch.randn(
        4, 4, generator=g, dtype=torch.float64
    )
    A = torch.randn(4, 60, generator=g, dtype=torch.float64)
    eW, eA = 0.3, 1.7
    W2, A2 = orthogonalize_trace_norm(W, A, eW, eA)
    torch.testing.assert_close(W2 @ A2, W @ A, rtol=1e-10, atol=1e-10)
    gram = W2.T @ W2
    torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), rtol=0, atol=1e-9)
    assert torch.all(torch.diff(torch.diagonal(gram)) <= 1e-9)  # ordered by singular value
    # the QR / SVD form of zinbwave's orthogonalizeTraceNorm, computed independently
    Qu, Ru = torch.linalg.qr(W)
    Qv, Rv = torch.linalg.qr(A.T)
    U, D, Vh = torch.linalg.svd(Ru @ Rv.T)
    s = (eW / eA) ** 0.25
    W_ref = Qu @ U * D.sqrt() / s
    A_ref = (s * (Qv @ Vh.T * D.sqrt())).T
    sign = torch.sign((W_ref * W2).sum(0))
    torch.testing.assert_close(W2, W_ref * sign, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(A2, A_ref * sign[:, None], rtol=1e-8, atol=1e-8)
    # it minimises the penalty among factorisations of W A
    before = eW * W.pow(2).sum() + eA * A.pow(2).sum()
    after = eW * W2.pow(2).sum() + eA * A2.pow(2).sum()
    assert after <= before
    T = torch.eye(4, dtype=torch.float64) + 0.1 * torch.randn(
        4, 4, generator=g, dtype=torch.float64
    )
    other = eW * (W2 @ T).pow(2).sum() + eA * (torch.linalg.solve(T, A2)).pow(2).sum()
    assert after <= other + 1e-9


def test_penalty_defaults_follow_zinbwave():
    n, J = 50, 40
    X = torch.cat([torch.ones(n, 1), torch.randn(n, 1)], 1).double()
    V = torch.ones(J, 1, dtype=torch.float64)
    pen = Penalty.zinbwave_defaults(Design(X, X, V, V), common_dispersion=False)
    assert pen.beta_mu.tolist() == [0.0, 1.0]
    assert pen.beta_pi.tolist() == [1e-3, 1.0]
    assert pen.gamma_mu.tolist() == [0.0] and pen.gamma_pi.tolist() == [1e-3]
    assert pen.W == pytest.approx(J / n) and pen.alpha == 1.0 and pen.zeta == J
    pen2 = Penalty.zinbwave_defaults(Design(X, X, V, V), epsilon=1000.0)
    assert pen2.W == pytest.approx(1000 / n) and pen2.alpha == pytest.approx(1000 / J)


def test_penalty_defaults_take_each_epsilon_by_name():
    n, J = 30, 20
    X = torch.cat([torch.ones(n, 1), torch.randn(n, 1)], 1).double()
    V = torch.ones(J, 1, dtype=torch.float64)
    given = dict(zip(EPSILON_NAMES, (7.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.5, 8.0), strict=True))
    pen = Penalty.zinbwave_defaults(Design(X, X, V, V), **given)
    assert pen.beta_mu.tolist() == [0.0, 2.0] and pen.beta_pi.tolist() == [0.5, 2.0]
    assert pen.gamma_mu.tolist() == [0.0] and pen.gamma_pi.tolist() == [0.5]
    assert (pen.W, pen.alpha, pen.zeta, pen.alpha_pi) == (4.0, 5.0, 6.0, 8.0)
    assert pen.gene_vector(1, True).tolist() == [0.0, 2.0, 5.0, 0.5, 2.0, 8.0]
    # None is zinbwave's default: epsilon = J, eps_W = epsilon / n
    assert Penalty.zinbwave_defaults(Design(X, X, V, V), epsilon_W=None).W == pytest.approx(J / n)
    with pytest.raises(TypeError, match="epsilon_betta"):
        Penalty.zinbwave_defaults(Design(X, X, V, V), epsilon_betta=1.0)
