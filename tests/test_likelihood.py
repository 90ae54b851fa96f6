"""The ZINB log-likelihood against references computed another way (mpmath, scipy)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from zinbgrad.model.likelihood import SparseCounts, entry_derivatives, log_nb, log_zinb

mpmath = pytest.importorskip("mpmath")

Y = [0, 1, 2, 7, 30, 500, 1e5]
MU = [1e-8, 1e-3, 0.5, 3.0, 80.0, 1e4, 1e6]
THETA = [1e-4, 1e-2, 0.7, 10.0, 49.0, 51.0, 1e3, 1e6, 1e12, 1e20]
LOGIT_PI = [-30.0, -4.0, 0.0, 3.0, 30.0]


def _mp_reference(y, mu, theta, lp):
    y, mu, th, lp = (mpmath.mpf(v) for v in (y, mu, theta, lp))
    pi = 1 / (1 + mpmath.e ** (-lp))
    lnb = (
        mpmath.loggamma(y + th)
        - mpmath.loggamma(th)
        - mpmath.loggamma(y + 1)
        + th * mpmath.log(th / (th + mu))
        + y * mpmath.log(mu / (th + mu))
    )
    lzinb = mpmath.log(pi + (1 - pi) * mpmath.e**lnb) if y == 0 else mpmath.log(1 - pi) + lnb
    return float(lzinb), float(lnb)


@pytest.fixture(scope="module")
def grid():
    pts = np.array(list(itertools.product(Y, MU, THETA, LOGIT_PI)), dtype=np.float64)
    with mpmath.workdps(50):
        ref = np.array([_mp_reference(*p) for p in pts])
    return pts, ref


def _rel(a, b):
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-300)


def test_log_zinb_matches_50_digit_reference(grid):
    pts, ref = grid
    t = torch.as_tensor(pts)
    got = log_zinb(t[:, 0], t[:, 1].log(), t[:, 3], t[:, 2].log()).numpy()
    err = _rel(got, ref[:, 0])
    assert err.max() <= 1e-10, pts[err.argmax()]
    got_nb = log_nb(t[:, 0], t[:, 1].log(), t[:, 2].log()).numpy()
    assert _rel(got_nb, ref[:, 1]).max() <= 1e-10


def test_log_zinb_matches_scipy_mixture():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    mu = np.exp(rng.uniform(-3, 6, 2000))
    theta = np.exp(rng.uniform(-2, 5, 2000))
    pi = rng.uniform(0.01, 0.9, 2000)
    y = rng.negative_binomial(theta, theta / (theta + mu)).astype(float)
    y[:300] = 0
    nb = stats.nbinom.logpmf(y, theta, theta / (theta + mu))
    ref = np.where(y == 0, np.log(pi + (1 - pi) * np.exp(nb)), np.log1p(-pi) + nb)
    got = log_zinb(
        torch.as_tensor(y),
        torch.as_tensor(np.log(mu)),
        torch.as_tensor(np.log(pi / (1 - pi))),
        torch.as_tensor(np.log(theta)),
    ).numpy()
    assert _rel(got, ref).max() < 1e-10


def test_autograd_gradients_finite_on_grid(grid):
    pts, _ = grid
    t = torch.as_tensor(pts)
    a = t[:, 1].log().clone().requires_grad_()
    b = t[:, 3].clone().requires_grad_()
    z = t[:, 2].log().clone().requires_grad_()
    f = log_zinb(t[:, 0], a, b, z).sum()
    ga, gb, gz = torch.autograd.grad(f, (a, b, z))
    for g in (ga, gb, gz):
        assert torch.isfinite(g).all()


def _sparse(y: torch.Tensor) -> SparseCounts:
    idx = y.nonzero()
    v = y[idx[:, 0], idx[:, 1]]
    return SparseCounts(y.shape[0], y.shape[1], idx[:, 0], idx[:, 1], v, torch.lgamma(v + 1))


@pytest.mark.parametrize("zeta_level", [-2.0, 1.0, 4.5, 25.0])
@pytest.mark.parametrize("zi", [True, False])
def test_sparse_derivatives_equal_autograd_of_dense_loglik(zeta_level, zi):
    g = torch.Generator().manual_seed(1)
    n, J = 30, 25
    a = torch.randn(n, J, generator=g, dtype=torch.float64) * 1.5
    b = torch.randn(n, J, generator=g, dtype=torch.float64) * 1.5
    zeta = zeta_level + 0.2 * torch.randn(J, generator=g, dtype=torch.float64)
    lam = torch.exp(a).clamp(max=1e4)
    y = torch.poisson(lam, generator=g) * (torch.rand(n, J, generator=g) > 0.3)
    d = entry_derivatives(a, b if zi else None, zeta, _sparse(y), order=2)
    A, B = a.clone().requires_grad_(), b.clone().requires_grad_()
    f = log_zinb(y, A, B, zeta) if zi else log_nb(y, A, zeta)
    torch.testing.assert_close(d.ll, f.detach(), rtol=1e-11, atol=1e-11)
    ga, gb = torch.autograd.grad(f.sum(), (A, B), create_graph=True, allow_unused=True)
    torch.testing.assert_close(d.la, ga.detach(), rtol=1e-8, atol=1e-10)
    (gaa,) = torch.autograd.grad(ga.sum(), A, retain_graph=True)
    ok = torch.isfinite(gaa)
    torch.testing.assert_close(d.laa[ok], gaa[ok], rtol=1e-7, atol=1e-9)
    if zi:
        torch.testing.assert_close(d.lb, gb.detach(), rtol=1e-8, atol=1e-10)
        gbb, gab = torch.autograd.grad(gb.sum(), (B, A))
        torch.testing.assert_close(d.lbb, gbb, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(d.lab, gab, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("y", [0.0, 1.0, 9.0, 250.0])
@pytest.mark.parametrize("zeta", [-1.0, 3.0, 20.0, 45.0])
def test_dispersion_derivatives_against_mpmath(y, zeta):
    a, b = 1.3, -0.4

    def f(z):
        th, mu = mpmath.e**z, mpmath.e ** mpmath.mpf(a)
        pi = 1 / (1 + mpmath.e ** (-mpmath.mpf(b)))
        lnb = (
            mpmath.loggamma(y + th)
            - mpmath.loggamma(th)
            - mpmath.loggamma(y + 1)
            + th * mpmath.log(th / (th + mu))
            + y * mpmath.log(mu / (th + mu))
        )
        return mpmath.log(pi + (1 - pi) * mpmath.e**lnb) if y == 0 else mpmath.log(1 - pi) + lnb

    yt = torch.tensor([[y]], dtype=torch.float64)
    d = entry_derivatives(
        torch.tensor([[a]], dtype=torch.float64),
        torch.tensor([[b]], dtype=torch.float64),
        torch.tensor([zeta], dtype=torch.float64),
        _sparse(yt),
        order=0,
        dispersion=True,
    )
    with mpmath.workdps(60):
        g1 = float(mpmath.diff(f, mpmath.mpf(zeta)))
        g2 = float(mpmath.diff(f, mpmath.mpf(zeta), 2))
    # relative to the size of the terms that cancel (exact to a few ulps of those)
    assert abs(float(d.lz) - g1) <= 1e-9 * max(abs(g1), 1e-300) + 1e-15 * (1 + y)
    assert abs(float(d.lzz) - g2) <= 1e-9 * max(abs(g2), 1e-300) + 1e-15 * (1 + y)
