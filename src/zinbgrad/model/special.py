"""Stable special functions of the ZINB likelihood (:mod:`zinbgrad.model.likelihood`).

Overflow-free ``softplus`` and its logarithms, ``lgamma(y + theta) - lgamma(theta) - y log theta``
and the digamma/trigamma differences ``D1``, ``E`` at the nonzero counts, all exact to float64
rounding for theta from 1e-4 to 1e26: above theta = 50 they switch to Stirling series in
``t = y / theta`` instead of differencing ``lgamma``/``digamma`` of huge arguments.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "softplus",
    "log_sigmoid",
    "log_softplus",
    "lgamma_ratio_minus_ylog",
    "theta_times_k",
    "psi_diffs",
]

#: theta above which the Stirling-series forms are used for lgamma/digamma/trigamma differences.
_THETA_ASYMPTOTIC = 50.0
#: below this t = y/theta the power series for the log1p combinations are used.
_T_SERIES = 0.05


def softplus(x: Tensor) -> Tensor:
    """``log(1 + exp(x))`` without overflow or the threshold approximation of torch's softplus.

    Autograd gives its exact derivative ``sigmoid(x)`` everywhere, 1/2 at ``x = 0`` included
    (``max(x, 0) + log1p(exp(-|x|))``, the same value, would give 1 there).
    """
    return torch.logaddexp(x, torch.zeros_like(x))


def log_sigmoid(x: Tensor) -> Tensor:
    """``log(sigmoid(x)) = -softplus(-x)``, exact for all x."""
    return -softplus(-x)


def log_softplus(x: Tensor) -> Tensor:
    """``log(softplus(x))``, accurate also where ``softplus(x)`` underflows (x -> -inf)."""
    cut = -30.0
    small = x < cut
    x_big = torch.where(small, torch.full_like(x, cut), x)
    x_small = torch.where(small, x, torch.full_like(x, cut))
    # softplus(x) = u - u^2/2 + ..., u = e^x: log softplus = x + log1p(-u/2 + u^2/3) ~ x - u/2
    return torch.where(small, x_small - 0.5 * torch.exp(x_small), torch.log(softplus(x_big)))


def _horner(t: Tensor, coeffs: list[float]) -> Tensor:
    out = torch.full_like(t, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        out = out * t + c
    return out


# h(t) = ((1+t) log1p(t) - t) / t = sum_{k>=2} (-1)^k t^(k-1) / (k (k-1))
_H_COEFFS = [(-1.0) ** k / (k * (k - 1)) for k in range(2, 18)]
# m(t) = 1 - log1p(t)/t = sum_{k>=1} (-1)^(k+1) t^k / (k+1)
_M_COEFFS = [0.0] + [(-1.0) ** (k + 1) / (k + 1) for k in range(1, 17)]
# k(s)/u with k(s) = softplus(s) - sigmoid(s), u = e^s: sum_{k>=2} (-1)^k (k-1)/k u^(k-1)
_K_COEFFS = [0.0] + [(-1.0) ** k * (k - 1) / k for k in range(2, 14)]


def _h(t: Tensor) -> Tensor:
    """``((1+t) log1p(t) - t) / t`` for t > 0, series for small t."""
    small = t < _T_SERIES
    ts = torch.where(small, t, torch.zeros_like(t))
    tb = torch.where(small, torch.ones_like(t), t)
    series = _horner(ts, _H_COEFFS) * ts
    direct = ((1.0 + tb) * torch.log1p(tb) - tb) / tb
    return torch.where(small, series, direct)


def _m(t: Tensor) -> Tensor:
    """``1 - log1p(t)/t`` for t > 0, series for small t."""
    small = t < _T_SERIES
    ts = torch.where(small, t, torch.zeros_like(t))
    tb = torch.where(small, torch.ones_like(t), t)
    return torch.where(small, _horner(ts, _M_COEFFS), 1.0 - torch.log1p(tb) / tb)


def _theta_k_series(s: Tensor, a: Tensor) -> Tensor:
    # theta * k = theta * u * (k/u) = mu * (k/u), u = e^s < e^-5: 12 terms reach 1e-27
    return torch.exp(a) * _horner(torch.exp(s), _K_COEFFS)


def theta_times_k(s: Tensor, a: Tensor, theta: Tensor, sp_s: Tensor, p: Tensor) -> Tensor:
    """``theta * k``, ``k = softplus(s) - sigmoid(s)`` (>= 0), s = a - zeta; stable for s -> -inf.

    Given ``sp_s = softplus(s)`` and ``p = sigmoid(s)``: ``theta * (sp_s - p)`` for s >= -5, the
    series in ``e^s`` below. No boolean-mask indexing: under ``torch.compile`` both branches are
    evaluated (the series on safe inputs) and selected with ``torch.where``; eagerly the direct
    form everywhere, then the series only at the (flat) positions where ``s < -5``. ``s`` and
    ``a`` must be contiguous and of the output shape; the rest broadcast against them.
    """
    small = s < -5.0
    direct = theta * (sp_s - p)  # unused (cancels) where s < -5
    if torch.compiler.is_compiling():
        series = _theta_k_series(torch.where(small, s, -5.0), torch.where(small, a, 0.0))
        return torch.where(small, series, direct)
    idx = small.view(-1).nonzero().squeeze(1)
    if idx.numel():
        series = _theta_k_series(s.view(-1)[idx], a.view(-1)[idx])
        direct.view(-1).index_copy_(0, idx, series)
    return direct


def _by_branch(mask: Tensor, f_true, f_false, *args: Tensor) -> Tensor:
    """``where(mask, f_true(*args), f_false(*args))`` evaluating each branch only where used
    (no wasted work, and no NaN/inf from the unused branch reaches the gradient)."""
    if bool(mask.all()):
        return f_true(*args)
    if not bool(mask.any()):
        return f_false(*args)
    out_t = f_true(*(x[mask] for x in args))
    out = torch.empty(mask.shape, dtype=out_t.dtype, device=out_t.device)
    out[mask] = out_t
    out[~mask] = f_false(*(x[~mask] for x in args))
    return out


def _lgr_direct(y: Tensor, zeta: Tensor) -> Tensor:
    th = torch.exp(zeta)
    return torch.lgamma(y + th) - torch.lgamma(th) - y * zeta


def _lgr_asymptotic(y: Tensor, zeta: Tensor) -> Tensor:
    w = torch.exp(-zeta)  # 1/theta
    t = y * w
    v = w / (1.0 + t)  # 1/(theta + y)
    ds = (-w * t / (1.0 + t)) / 12.0 - (v**3 - w**3) / 360.0 + (v**5 - w**5) / 1260.0
    ds = ds - (v**7 - w**7) / 1680.0
    return y * _h(t) - 0.5 * torch.log1p(t) + ds


_LOG_THETA_ASYMPTOTIC = float(torch.log(torch.tensor(_THETA_ASYMPTOTIC, dtype=torch.float64)))


def lgamma_ratio_minus_ylog(y: Tensor, zeta: Tensor) -> Tensor:
    """``lgamma(y + theta) - lgamma(theta) - y * log(theta)`` with theta = exp(zeta), y > 0.

    For theta >= 50 the difference of Stirling series is used; it is exact to float64 rounding
    and never forms ``lgamma(theta)`` for huge theta (where the direct difference cancels).
    """
    y, zeta = torch.broadcast_tensors(y, zeta)
    return _by_branch(zeta > _LOG_THETA_ASYMPTOTIC, _lgr_asymptotic, _lgr_direct, y, zeta)


def _psi_direct(y: Tensor, th: Tensor, dg_th: Tensor, tg_th: Tensor) -> tuple[Tensor, Tensor]:
    """D1, E by the direct difference; ``dg_th``, ``tg_th`` = digamma, trigamma of ``th``."""
    d1 = th * (torch.digamma(y + th) - dg_th) - y
    e = th * th * (torch.polygamma(1, y + th) - tg_th) + y
    return d1, e


def _psi_asymptotic(y: Tensor, zeta: Tensor) -> tuple[Tensor, Tensor]:
    w = torch.exp(-zeta)
    t = y * w
    w3, w5, w7 = w**3, w**5, w**7
    l1p = torch.log1p(t)

    def pow_m1(m: float) -> Tensor:  # (1 + t)^(-m) - 1
        return torch.expm1(-m * l1p)

    d1 = (
        -y * _m(t)
        + 0.5 * t / (1.0 + t)
        - (w / 12.0) * pow_m1(2)
        + (w3 / 120.0) * pow_m1(4)
        - (w5 / 252.0) * pow_m1(6)
        + (w7 / 240.0) * pow_m1(8)
    )
    e = (
        y * t / (1.0 + t)
        - 0.5 * t * (2.0 + t) / (1.0 + t) ** 2
        + (w / 6.0) * pow_m1(3)
        - (w3 / 30.0) * pow_m1(5)
        + (w5 / 42.0) * pow_m1(7)
        - (w7 / 30.0) * pow_m1(9)
    )
    return d1, e


def psi_diffs(y: Tensor, zeta: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """``D1 = theta (psi(y+theta) - psi(theta)) - y`` and
    ``E = theta^2 (psi1(y+theta) - psi1(theta)) + y`` at the nonzeros ``(y, cols)``, with
    ``zeta`` per gene; stable for huge theta (Stirling series above theta = 50).

    The branch is chosen per gene, and the per-gene functions (``psi(theta)``, ``psi1(theta)``)
    are evaluated once per gene. Under ``torch.compile`` both branches are evaluated (on safe
    inputs) and selected with ``torch.where``; eagerly only the branches in use.
    """
    big = zeta > _LOG_THETA_ASYMPTOTIC
    if torch.compiler.is_compiling():
        use_asy = use_dir = True
    else:
        n_big = int(big.sum())
        use_asy, use_dir = n_big > 0, n_big < big.numel()
    mixed = use_asy and use_dir
    if use_dir:
        th = torch.exp(torch.where(big, 0.0, zeta) if mixed else zeta)
        d1, e = _psi_direct(y, th[cols], torch.digamma(th)[cols], torch.polygamma(1, th)[cols])
    if use_asy:
        za = torch.where(big, zeta, _LOG_THETA_ASYMPTOTIC) if mixed else zeta
        d1_a, e_a = _psi_asymptotic(y, za[cols])
        if not mixed:
            return d1_a, e_a
        big_k = big[cols]
        d1, e = torch.where(big_k, d1_a, d1), torch.where(big_k, e_a, e)
    return d1, e
