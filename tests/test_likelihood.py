"""The ZINB log-likelihood against references computed another way (mpmath, scipy)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from zinbgrad.model import kernels
from zinbgrad.model.likelihood import SparseCounts, entry_derivatives, log_nb, log_zinb

mpmath = pytest.importorskip("mpmath")

Y = [0, 1, 2, 7, 30, 500, 1e5]
MU = [1e-8, 1e-3, 0.5, 3.0, 80.0, 1e4, 1e6]
THETA = [1e-4, 1e-2, 0.7, 10.0, 49.0, 51.0, 1e3, 1e6, 1e12, 1e20]
LOGIT_PI = [-30.0, -4.0, 0.0, 3.0, 30.0]


def _mp_log_zinb(y, mu, th, pi):
    """log ZINB(y) and log NB(y) in mpmath's precision (mpf arguments)."""
    lnb = (
        mpmath.loggamma(y + th)
        - mpmath.loggamma(th)
        - mpmath.loggamma(y + 1)
        + th * mpmath.log(th / (th + mu))
        + y * mpmath.log(mu / (th + mu))
    )
    lzinb = mpmath.log(pi + (1 - pi) * mpmath.e**lnb) if y == 0 else mpmath.log(1 - pi) + lnb
    return lzinb, lnb


def _mp_reference(y, mu, theta, lp):
    y, mu, th, lp = (mpmath.mpf(v) for v in (y, mu, theta, lp))
    lzinb, lnb = _mp_log_zinb(y, mu, th, 1 / (1 + mpmath.e ** (-lp)))
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


def _autograd_reference(y, a, b, zeta, zi):
    """Per-entry derivatives of :func:`log_zinb`/:func:`log_nb` by autograd (float64), the
    dispersion's per entry (zeta expanded to the block), by the names of ``_TERMS``."""
    A, B = a.clone().requires_grad_(), b.clone().requires_grad_()
    Z = zeta.expand_as(a).clone().requires_grad_()
    f = log_zinb(y, A, B, Z) if zi else log_nb(y, A, Z)
    ga, gb, gz = torch.autograd.grad(f.sum(), (A, B, Z), create_graph=True, allow_unused=True)
    (gaa,) = torch.autograd.grad(ga.sum(), A, retain_graph=True)
    (gzz,) = torch.autograd.grad(gz.sum(), Z, retain_graph=True)
    ref = {"ll": f.detach(), "la": ga.detach(), "laa": gaa, "lz": gz.detach(), "lzz": gzz}
    if zi:
        gbb, gab = torch.autograd.grad(gb.sum(), (B, A))
        ref.update(lb=gb.detach(), lbb=gbb, lab=gab)
    return ref


@pytest.mark.parametrize("zeta_level", [-2.0, 1.0, 4.5, 25.0])
@pytest.mark.parametrize("zi", [True, False])
def test_sparse_derivatives_equal_autograd_of_dense_loglik(zeta_level, zi):
    """Every configuration of the eager kernels (derivative order 0-2, with and without the
    dispersion's, a dispersion per gene or per entry) against autograd of the reference
    log-likelihood; and the terms that several configurations share are bitwise equal
    (the kernels reuse intermediates in place, differently per configuration)."""
    from zinbgrad.model.likelihood import _TERMS

    g = torch.Generator().manual_seed(1)
    n, J = 30, 25
    a = torch.randn(n, J, generator=g, dtype=torch.float64) * 1.5
    b = torch.randn(n, J, generator=g, dtype=torch.float64) * 1.5
    zeta = zeta_level + 0.2 * torch.randn(J, generator=g, dtype=torch.float64)
    lam = torch.exp(a).clamp(max=1e4)
    y = torch.poisson(lam, generator=g) * (torch.rand(n, J, generator=g) > 0.3)
    ref = _autograd_reference(y, a, b, zeta, zi)
    tol = {"ll": (1e-11, 1e-11), "la": (1e-8, 1e-10), "lb": (1e-8, 1e-10)}
    bb = b if zi else None
    for zeta_arg in (zeta, zeta.expand(n, J).clone()):
        full = entry_derivatives(a, bb, zeta_arg, _sparse(y), order=2, dispersion=True)
        for order, dispersion in itertools.product((0, 1, 2), (False, True)):
            d = entry_derivatives(a, bb, zeta_arg, _sparse(y), order=order, dispersion=dispersion)
            for name in _TERMS:
                got = getattr(d, name)
                wanted = (
                    name == "ll"
                    or (order >= 1 and name in ("la", "lb"))
                    or (order >= 2 and name in ("laa", "lbb", "lab"))
                    or (dispersion and name in ("lz", "lzz"))
                ) and (zi or name not in ("lb", "lbb", "lab"))
                assert (got is not None) == wanted, (name, order, dispersion)
                if got is None:
                    continue
                assert torch.equal(got, getattr(full, name)), (name, order, dispersion)
                e = ref[name]
                ok = torch.isfinite(e)
                rtol, atol = tol.get(name, (1e-7, 1e-9))
                torch.testing.assert_close(got[ok], e[ok], rtol=rtol, atol=atol)


@pytest.mark.parametrize("y", [0.0, 1.0, 9.0, 250.0])
@pytest.mark.parametrize("zeta", [-1.0, 3.0, 20.0, 45.0])
def test_dispersion_derivatives_against_mpmath(y, zeta):
    a, b = 1.3, -0.4

    def f(z):
        th, mu = mpmath.e**z, mpmath.e ** mpmath.mpf(a)
        return _mp_log_zinb(y, mu, th, 1 / (1 + mpmath.e ** (-mpmath.mpf(b))))[0]

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


# ---- fused (torch.compile) evaluation of entry_derivatives ------------------------------------


def _extreme_block(dtype: torch.dtype, common_zeta: float | None = None):
    """A small block spanning theta 1e-4..1e20, mu 1e-26..1e17, logit pi +-30, counts to ~1e4
    (``common_zeta``: one dispersion for all genes instead).

    Returns the inputs and, per entry, a float64 magnitude of the terms that the formulas add up
    (the scale of their rounding error; entries near cancellation have values far below it).
    """
    g = torch.Generator().manual_seed(7)
    n, J = 40, 24
    zeta = torch.linspace(-9.0, 46.0, J, dtype=torch.float64)
    if common_zeta is not None:
        zeta = torch.full_like(zeta, common_zeta)
    a = torch.randn(n, J, generator=g, dtype=torch.float64) * 4
    a[:, ::5] = torch.linspace(-60.0, 40.0, n, dtype=torch.float64)[:, None]
    b = torch.randn(n, J, generator=g, dtype=torch.float64) * 4
    b[:4], b[4:8] = 30.0, -30.0
    lam = torch.exp(a).clamp(max=1e4)
    y = torch.poisson(lam, generator=g) * (torch.rand(n, J, generator=g, dtype=torch.float64) > 0.4)
    s = a - zeta
    l0 = torch.exp(zeta) * torch.nn.functional.softplus(s)  # -log NB(0)
    mq = torch.exp(a - torch.nn.functional.softplus(s))  # mu q
    scale = (1 + y + mq + l0) ** 2 + b.abs() + y * (a.abs() + zeta.abs() + torch.log1p(y))
    cast = (t.to(dtype) for t in (a, b, zeta, y))
    a, b, zeta, y = cast
    return a, b, zeta, _sparse(y), scale


@pytest.fixture(scope="module")
def compiler():
    from zinbgrad.model import likelihood as lik

    if not lik.fusion_available("cpu"):
        pytest.skip("fused evaluation unavailable here (torch.compile/inductor or a C++ compiler)")
    return lik


# (zero inflation, order, dispersion): order 2 with dispersion yields every output; order 0
# (line searches) and order 0 with dispersion (dispersion updates) are what the optimizer uses.
_FUSED_CASES = {
    torch.float64: [(True, 2, True), (False, 2, True), (False, 1, False)],
    torch.float32: [(True, 2, True), (False, 2, True), (True, 0, False), (True, 0, True)],
}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from torch internals (inductor)
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("common_zeta", [None, 2.5, 46.0])
def test_fused_matches_eager_on_extreme_values(compiler, dtype, rtol, common_zeta):
    a, b, zeta, counts, scale = _extreme_block(dtype, common_zeta)
    cases = _FUSED_CASES[dtype]
    if common_zeta is not None:  # the dispersion constants come per distinct count
        cases = [c for c in cases if c[2]]
    for zi, order, dispersion in cases:
        kw = dict(order=order, dispersion=dispersion)
        bb = b if zi else None
        got = entry_derivatives(a, bb, zeta, counts, fused=True, **kw)
        if kernels._fused_failure is not None:
            pytest.skip(f"torch.compile failed here: {kernels._fused_failure}")
        assert (zi, True, order, dispersion) in kernels._compiled
        ref = entry_derivatives(a, bb, zeta, counts, fused=False, **kw)
        for name in compiler._TERMS:
            e, f = getattr(ref, name), getattr(got, name)
            assert (e is None) == (f is None), name
            if e is None:
                continue
            assert f.dtype == dtype and f.shape == e.shape
            fin = torch.isfinite(e)
            assert torch.equal(fin, torch.isfinite(f)), (name, zi, order)
            e, f = e.double(), f.double()
            err = (f - e).abs()[fin] / (e.abs() + scale)[fin]
            assert float(err.max()) <= rtol, (name, zi, order, dispersion, float(err.max()))
            # well-conditioned entries (value comparable to its terms) agree to relative rtol
            ok = fin & (e.abs() >= 0.1 * scale)
            rel = float(((f - e).abs() / e.abs())[ok].max()) if ok.any() else 0.0
            assert rel <= rtol, (name, zi, order, dispersion, rel)


def test_fused_switch_and_env(monkeypatch):
    from zinbgrad.model import kernels as lik

    monkeypatch.delenv("ZINBGRAD_FUSED", raising=False)
    monkeypatch.setattr(lik, "_fused_failure", None)
    monkeypatch.setattr(lik, "_fused_mode", "auto")  # the default (unless ZINBGRAD_FUSED=1)
    assert not lik._want_fused(None) and lik._want_fused(True)
    with lik.set_fused(True):
        assert lik.get_fused() is True
        assert lik._want_fused(None) and not lik._want_fused(False)
        with lik.set_fused(False):
            assert not lik._want_fused(True) and not lik.fusion_available()
        assert lik.get_fused() is True
    assert lik.get_fused() == "auto"
    with pytest.raises(ValueError):
        lik.set_fused("yes")
    monkeypatch.setenv("ZINBGRAD_FUSED", "0")
    assert not lik._want_fused(True) and not lik.fusion_available()
    with lik.set_fused(True):
        assert not lik._want_fused(None)


def test_fused_failure_warns_once_and_falls_back(monkeypatch):
    from zinbgrad.model import kernels as lik

    def broken_compile(fn, **kw):
        def run(*args):
            raise RuntimeError("no compiler in this test")

        return run

    monkeypatch.delenv("ZINBGRAD_FUSED", raising=False)
    monkeypatch.setattr(lik, "_fused_failure", None)
    monkeypatch.setattr(lik, "_fused_mode", "auto")
    monkeypatch.setattr(lik, "_compiled", {})
    monkeypatch.setattr(torch, "compile", broken_compile)
    a, b, zeta, counts, _ = _extreme_block(torch.float64)
    ref = entry_derivatives(a, b, zeta, counts, order=2, fused=False)
    with pytest.warns(RuntimeWarning, match="no compiler in this test") as rec:
        got = entry_derivatives(a, b, zeta, counts, order=2, fused=True)
        again = entry_derivatives(a, b, zeta, counts, order=0, fused=True)
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    assert not lik.fusion_available() and not lik._want_fused(True)
    for name in ("ll", "la", "laa", "lb", "lbb", "lab"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=0)
    torch.testing.assert_close(again.ll, ref.ll, rtol=0, atol=0)


def test_sparse_counts_flat_is_cached_and_carried():
    y = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 5.0]])
    c = _sparse(y)
    flat = c.flat
    assert c.flat is flat
    torch.testing.assert_close(flat, torch.tensor([1, 3, 5]))
    moved = c.to("cpu")
    assert "flat" in moved.__dict__
    torch.testing.assert_close(moved.flat, flat)


@pytest.mark.parametrize("top", [7, 5_000, 10**9])
def test_distinct_values_match_torch_unique(top):
    """The presence-table distinct counts equal torch.unique's, also for a huge count (which
    falls back to the sort)."""
    g = torch.Generator().manual_seed(11)
    vals = torch.randint(1, 8, (500,), generator=g).to(torch.float32)
    vals[::97] = float(top)
    rows = torch.arange(500) // 10
    cols = torch.arange(500) % 10
    counts = SparseCounts(50, 10, rows, cols, vals, torch.lgamma(vals + 1.0))
    u, inverse = counts.distinct_values
    u_ref, inv_ref = torch.unique(vals, return_inverse=True)
    assert torch.equal(u, u_ref) and u.dtype == vals.dtype
    assert torch.equal(inverse, inv_ref)
    assert torch.equal(u[inverse], vals)


@pytest.mark.parametrize("z", [-3.0, 1.5, 8.0, 45.0])
def test_dispersion_constants_on_distinct_counts_match_every_entry(z):
    """For a common dispersion the digamma/trigamma differences are evaluated once per
    distinct count; they equal the per-nonzero evaluation (direct and Stirling branches)."""
    from zinbgrad.model.likelihood import dispersion_constants
    from zinbgrad.model.special import psi_diffs as _psi_diffs

    g = torch.Generator().manual_seed(5)
    Y = torch.poisson(torch.rand(30, 20, generator=g, dtype=torch.float64) * 40.0, generator=g)
    Y[Y < 4] = 0.0
    idx = Y.nonzero()
    vals = Y[idx[:, 0], idx[:, 1]]
    counts = SparseCounts(30, 20, idx[:, 0], idx[:, 1], vals, torch.lgamma(vals + 1.0))
    zeta = torch.full((20,), z, dtype=torch.float64)
    d1, e = dispersion_constants(counts, zeta)
    d1_ref, e_ref = _psi_diffs(vals, zeta, idx[:, 1])
    torch.testing.assert_close(d1, d1_ref, rtol=1e-14, atol=0)
    torch.testing.assert_close(e, e_ref, rtol=1e-14, atol=0)
    zeta[3] += 0.5  # gene-wise: left to the kernels
    assert dispersion_constants(counts, zeta) is None


def test_nonzero_constant_on_distinct_counts_matches_every_entry():
    """A common dispersion evaluates the lgamma terms once per distinct count."""
    from zinbgrad.model.likelihood import SparseCounts, lgamma_ratio_minus_ylog, nonzero_constant

    g = torch.Generator().manual_seed(3)
    n, J = 40, 30
    Y = torch.poisson(torch.rand(n, J, generator=g, dtype=torch.float64) * 20.0, generator=g)
    Y[Y < 3] = 0.0
    idx = Y.nonzero()
    vals = Y[idx[:, 0], idx[:, 1]]
    counts = SparseCounts(n, J, idx[:, 0], idx[:, 1], vals, torch.lgamma(vals + 1.0))
    assert counts.distinct_values[0].numel() < vals.numel()
    for z in (-3.0, 1.5, 8.0, 45.0):  # direct and Stirling branches
        zeta = torch.full((J,), z, dtype=torch.float64)
        expect = lgamma_ratio_minus_ylog(vals, zeta[idx[:, 1]]) - counts.lgamma_y1
        torch.testing.assert_close(nonzero_constant(counts, zeta), expect, rtol=1e-14, atol=0)
        torch.testing.assert_close(
            nonzero_constant(counts, torch.tensor(z, dtype=torch.float64)),
            expect,
            rtol=1e-14,
            atol=0,
        )


@pytest.mark.parametrize("b", [-50.0, -3.0, 0.0, 20.0])
def test_zero_entries_keep_pi_where_nb0_vanishes(b):
    # mu ~ 1e18 and theta ~ 6e19: |log NB(0)| ~ 1e18, far beyond b; log(pi + (1-pi) NB(0))
    # is then log(pi) = log sigmoid(b), which a form adding b to log NB(0) would round away
    a = torch.full((2, 3), 41.4, dtype=torch.float64)
    bb = torch.full((2, 3), b, dtype=torch.float64)
    zeta = torch.full((3,), 45.5, dtype=torch.float64)
    d = entry_derivatives(a, bb, zeta, _sparse(torch.zeros(2, 3, dtype=torch.float64)), order=0)
    with mpmath.workdps(50):
        ref = float(mpmath.log(1 / (1 + mpmath.e ** (-mpmath.mpf(b)))))
    torch.testing.assert_close(d.ll, torch.full_like(d.ll, ref), rtol=1e-12, atol=1e-12)


def test_autograd_gradients_at_the_kinks():
    # a - zeta = 0 and b = 0 are where max(x, 0) has a kink; the exact derivative of
    # softplus there is 1/2, and autograd of log_zinb must give the true gradient
    def mp_ll(y, args):
        a, b, z = args
        return _mp_log_zinb(y, mpmath.e**a, mpmath.e**z, 1 / (1 + mpmath.e ** (-b)))[0]

    def partial(y, i):
        return float(mpmath.diff(lambda t: mp_ll(y, [t if j == i else 0 for j in range(3)]), 0))

    for y in (0.0, 2.0):
        x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        log_zinb(torch.tensor(y, dtype=torch.float64), x[0], x[1], x[2]).backward()
        with mpmath.workdps(40):
            ref = [partial(y, i) for i in range(3)]
        np.testing.assert_allclose(x.grad.numpy(), ref, rtol=1e-10, atol=1e-12)
