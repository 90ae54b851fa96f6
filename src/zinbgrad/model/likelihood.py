"""Numerically stable zero-inflated negative binomial (ZINB) log-likelihood and its derivatives.

Everything is written in the natural parameters of ZINB-WaVE: ``a = log mu`` (log mean),
``b = logit pi`` (logit of the zero-inflation probability) and ``zeta = log theta`` (log inverse
dispersion). No ``eps`` is added anywhere: the forms below stay exact (float64 relative error
~1e-14) from theta = 1e-4 up to theta = 1e26 (the negative binomial -> Poisson limit that
zinbwave's common-dispersion fits run into) and for mu from 1e-30 to 1e18.

Key identities, with ``s = a - zeta``, ``p = sigmoid(s) = mu / (mu + theta)``, ``q = 1 - p``:

* ``log NB(0) = theta * log q = -theta * softplus(s)`` (in :func:`log_nb` as
  ``-exp(zeta + log softplus(s))``, exact even where ``softplus(s)`` underflows);
* ``log NB(y) = y*a - lgamma(y+1) + [lgamma(y+theta) - lgamma(theta) - y*zeta] - y*softplus(s)
  + log NB(0)``, where the bracket is computed directly for small theta and from the Stirling
  series in ``t = y/theta`` for large theta (no catastrophic cancellation);
* at zeros, ``log(pi + (1-pi) NB(0)) = log1p(-(1-pi)(1-NB(0)))`` when that is accurate, else
  ``logaddexp(b, log NB(0)) - softplus(b)``.

Two evaluation paths share these formulas:

* :func:`log_zinb` / :func:`log_nb`: dense, element-wise, autograd-safe (the "double where"
  pattern: the unused branch of every ``torch.where`` receives safe inputs, so gradients are finite
  everywhere);
* :func:`entry_derivatives`: the sparse-aware path used by the optimizer. Terms for ``y = 0`` are
  computed densely on a block of cells; the terms that need ``y > 0`` only at the nonzero entries,
  then scattered. It returns the analytic first and second derivatives with respect to ``a``,
  ``b`` (and optionally ``zeta``) per entry, which the batched Newton solvers contract with the
  design matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "softplus",
    "log_sigmoid",
    "log_softplus",
    "lgamma_ratio_minus_ylog",
    "log_nb",
    "log_zinb",
    "SparseCounts",
    "EntryDerivatives",
    "entry_derivatives",
    "nonzero_constant",
]

#: theta above which the Stirling-series forms are used for lgamma/digamma/trigamma differences.
_THETA_ASYMPTOTIC = 50.0
#: below this t = y/theta the power series for the log1p combinations are used.
_T_SERIES = 0.05


def softplus(x: Tensor) -> Tensor:
    """``log(1 + exp(x))`` without overflow or the threshold approximation of torch's softplus."""
    return torch.clamp(x, min=0) + torch.log1p(torch.exp(-torch.abs(x)))


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


def _pow_m1(t: Tensor, m: float) -> Tensor:
    """``(1 + t)^(-m) - 1``."""
    return torch.expm1(-m * torch.log1p(t))


def _theta_k_series(s: Tensor, zeta: Tensor, a: Tensor) -> Tensor:
    # theta * k = theta * u * (k/u) = mu * (k/u), u = e^s < e^-5: 12 terms reach 1e-27
    return torch.exp(a) * _horner(torch.exp(s), _K_COEFFS)


def _theta_k_direct(s: Tensor, zeta: Tensor, a: Tensor) -> Tensor:
    return torch.exp(zeta + torch.log(_fsp(s) - torch.sigmoid(s)))


def _theta_k(s: Tensor, zeta: Tensor, a: Tensor) -> Tensor:
    """``theta * (softplus(s) - sigmoid(s))`` (>= 0) with s = a - zeta, stable for s -> -inf."""
    s, zeta, a = torch.broadcast_tensors(s, zeta, a)
    return _by_branch(s < -5.0, _theta_k_series, _theta_k_direct, s, zeta, a)


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


def _safe_pos(y: Tensor) -> tuple[Tensor, Tensor]:
    pos = y > 0
    return pos, torch.where(pos, y, torch.ones_like(y))


def _log_nb_pos(y: Tensor, a: Tensor, zeta: Tensor, log_nb0: Tensor) -> Tensor:
    """log NB(y) for y > 0 given ``log_nb0 = log NB(0)``."""
    s = a - zeta
    return (
        y * a - torch.lgamma(y + 1.0) + lgamma_ratio_minus_ylog(y, zeta) - y * softplus(s) + log_nb0
    )


def _log_nb0(a: Tensor, zeta: Tensor) -> Tensor:
    return -torch.exp(zeta + log_softplus(a - zeta))


def _log_zinb_zero(b: Tensor, log_nb0: Tensor) -> Tensor:
    """``log(pi + (1 - pi) NB(0))`` without cancellation in either regime."""
    # x = (1 - pi) (1 - NB(0)); log(1 - x) accurately via log1p when x <= 1/2
    log_x = log_sigmoid(-b) + torch.log(-torch.expm1(log_nb0))
    use_log1p = log_x < -0.6931471805599453
    x = torch.exp(torch.where(use_log1p, log_x, torch.full_like(log_x, -1.0)))
    via_log1p = torch.log1p(-x)
    via_lae = torch.logaddexp(b, log_nb0) - softplus(b)
    return torch.where(use_log1p, via_log1p, via_lae)


def log_nb(y: Tensor, a: Tensor, zeta: Tensor) -> Tensor:
    """Element-wise log NB(y; mu = exp(a), theta = exp(zeta)); autograd-safe."""
    y, a, zeta = torch.broadcast_tensors(y, a, zeta)
    pos, ys = _safe_pos(y)
    l0 = _log_nb0(a, zeta)
    return torch.where(pos, _log_nb_pos(ys, a, zeta, l0), l0)


def log_zinb(y: Tensor, a: Tensor, b: Tensor, zeta: Tensor) -> Tensor:
    """Element-wise log ZINB(y; mu = exp(a), pi = sigmoid(b), theta = exp(zeta)); autograd-safe."""
    y, a, b, zeta = torch.broadcast_tensors(y, a, b, zeta)
    pos, ys = _safe_pos(y)
    l0 = _log_nb0(a, zeta)
    lpos = _log_nb_pos(ys, a, zeta, l0) - softplus(b)
    return torch.where(pos, lpos, _log_zinb_zero(b, l0))


@dataclass
class SparseCounts:
    """The nonzero entries of a block of cells, in flat (row-major) positions of the block.

    Attributes
    ----------
    n_rows, n_cols
        Shape of the block (cells x genes).
    rows, cols
        Row (within the block) and column index of each nonzero entry (int64).
    values
        The counts (> 0) as floating point.
    lgamma_y1
        ``lgamma(values + 1)``, cached because it is constant during a fit.
    """

    n_rows: int
    n_cols: int
    rows: Tensor
    cols: Tensor
    values: Tensor
    lgamma_y1: Tensor

    @property
    def flat(self) -> Tensor:
        return self.rows * self.n_cols + self.cols

    @classmethod
    def from_csr(
        cls, indptr: Tensor, indices: Tensor, data: Tensor, n_cols: int, dtype: torch.dtype
    ) -> SparseCounts:
        """Build from CSR arrays of a block (``indptr`` starting at 0)."""
        n_rows = indptr.numel() - 1
        counts = indptr[1:] - indptr[:-1]
        rows = torch.repeat_interleave(
            torch.arange(n_rows, device=indices.device), counts.to(indices.device)
        )
        vals = data.to(dtype)
        keep = vals != 0
        if not bool(keep.all()):
            rows, indices, vals = rows[keep], indices[keep], vals[keep]
        return cls(n_rows, n_cols, rows, indices.long(), vals, torch.lgamma(vals + 1.0))

    def pin_memory(self) -> SparseCounts:
        return SparseCounts(
            self.n_rows,
            self.n_cols,
            self.rows.pin_memory(),
            self.cols.pin_memory(),
            self.values.pin_memory(),
            self.lgamma_y1.pin_memory(),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SparseCounts:
        def mv(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=non_blocking)

        return SparseCounts(
            self.n_rows,
            self.n_cols,
            mv(self.rows),
            mv(self.cols),
            mv(self.values),
            mv(self.lgamma_y1),
        )


@dataclass
class EntryDerivatives:
    """Per-entry log-likelihood and its derivatives in (a = log mu, b = logit pi, zeta).

    All tensors are dense (cells x genes) for a block. ``lb``, ``lbb``, ``lab`` are ``None``
    without zero inflation; ``lz``, ``lzz`` only when dispersion derivatives were requested.
    """

    ll: Tensor
    la: Tensor | None = None
    laa: Tensor | None = None
    lb: Tensor | None = None
    lbb: Tensor | None = None
    lab: Tensor | None = None
    lz: Tensor | None = None
    lzz: Tensor | None = None


def _scatter(dense: Tensor, flat: Tensor, values: Tensor) -> Tensor:
    dense.view(-1).index_copy_(0, flat, values)
    return dense


def _fsp(x: Tensor) -> Tensor:
    """Fused softplus (torch's kernel: log1p(exp(x)) below 40, x above; exact in float64)."""
    return F.softplus(x, beta=1.0, threshold=40.0)


def nonzero_constant(counts: SparseCounts, zeta: Tensor) -> Tensor:
    """``lgamma(y + theta) - lgamma(theta) - y*zeta - lgamma(y + 1)`` at the nonzero entries.

    Depends only on the counts and the dispersion, so the optimizer caches it while zeta is
    unchanged.
    """
    zk = zeta.expand(counts.n_cols)[counts.cols]
    return lgamma_ratio_minus_ylog(counts.values, zk) - counts.lgamma_y1


def _psi_direct(y: Tensor, zeta: Tensor) -> Tensor:
    th = torch.exp(zeta)
    d1 = th * (torch.digamma(y + th) - torch.digamma(th)) - y
    e = th * th * (torch.polygamma(1, y + th) - torch.polygamma(1, th)) + y
    return torch.stack([d1, e])


def _psi_asymptotic(y: Tensor, zeta: Tensor) -> Tensor:
    w = torch.exp(-zeta)
    t = y * w
    w3, w5, w7 = w**3, w**5, w**7
    d1 = (
        -y * _m(t)
        + 0.5 * t / (1.0 + t)
        - (w / 12.0) * _pow_m1(t, 2)
        + (w3 / 120.0) * _pow_m1(t, 4)
        - (w5 / 252.0) * _pow_m1(t, 6)
        + (w7 / 240.0) * _pow_m1(t, 8)
    )
    e = (
        y * t / (1.0 + t)
        - 0.5 * t * (2.0 + t) / (1.0 + t) ** 2
        + (w / 6.0) * _pow_m1(t, 3)
        - (w3 / 30.0) * _pow_m1(t, 5)
        + (w5 / 42.0) * _pow_m1(t, 7)
        - (w7 / 30.0) * _pow_m1(t, 9)
    )
    return torch.stack([d1, e])


def _psi_diffs(y: Tensor, zeta: Tensor) -> tuple[Tensor, Tensor]:
    """``D1 = theta (psi(y+theta) - psi(theta)) - y`` and
    ``E = theta^2 (psi1(y+theta) - psi1(theta)) + y``, stable for huge theta."""
    big = zeta > _LOG_THETA_ASYMPTOTIC
    if bool(big.all()):
        out = _psi_asymptotic(y, zeta)
    elif not bool(big.any()):
        out = _psi_direct(y, zeta)
    else:
        out = torch.empty((2,) + y.shape, dtype=y.dtype, device=y.device)
        out[:, big] = _psi_asymptotic(y[big], zeta[big])
        out[:, ~big] = _psi_direct(y[~big], zeta[~big])
    return out[0], out[1]


def entry_derivatives(
    a: Tensor,
    b: Tensor | None,
    zeta: Tensor,
    counts: SparseCounts,
    *,
    order: int = 2,
    dispersion: bool = False,
    nz_const: Tensor | None = None,
) -> EntryDerivatives:
    """Log-likelihood and derivatives of every entry of a block, sparse-aware.

    Parameters
    ----------
    a
        ``log mu`` for the block, shape (cells, genes).
    b
        ``logit pi`` for the block, or ``None`` for a plain negative binomial model.
    zeta
        ``log theta`` per gene, shape (genes,) (broadcast over cells).
    counts
        The nonzero entries of the block.
    order
        0: log-likelihood only; 1: also first derivatives; 2: also second derivatives in (a, b).
    dispersion
        Also return the first and second derivatives with respect to ``zeta``.
    nz_const
        Optional cached :func:`nonzero_constant` for these counts and ``zeta``.

    Returns
    -------
    EntryDerivatives
        Dense per-entry arrays. The y > 0 formulas are evaluated only at the nonzero entries.

    Notes
    -----
    The dense part is written for speed (few fused kernels, ``theta`` formed per gene only):
    ``log NB(0) = -theta * softplus(a - zeta)`` and, at zeros,
    ``log(pi + (1-pi) NB(0)) = log NB(0) - softplus(b) + softplus(b - log NB(0))``. These agree
    with :func:`log_zinb` to float64 rounding in absolute terms; :func:`log_zinb` is the form
    with full relative accuracy for tiny probabilities.
    """
    zi = b is not None
    zeta = zeta.expand(a.shape[1])
    theta = torch.exp(zeta)
    s = a - zeta
    sp_s = _fsp(s)  # -log q, q = theta / (theta + mu)
    log_nb0 = sp_s * (-theta)
    if zi:
        t = b - log_nb0
        sp_b = _fsp(b)
        ll = log_nb0 - sp_b + _fsp(t)
    else:
        ll = log_nb0
    out = EntryDerivatives(ll=ll)
    if zi and (order >= 1 or dispersion):
        one_m_r = torch.sigmoid(t)
        r = 1.0 - one_m_r  # P(zero came from the NB component)
    if order >= 1:
        d_l0 = torch.exp(a - sp_s).neg_()  # d log NB(0)/da = -theta p = -mu q
        if zi:
            pi = torch.sigmoid(b)
            out.la = r * d_l0
            out.lb = one_m_r - pi
        else:
            out.la = d_l0
        if order >= 2:
            q = torch.exp(-sp_s)
            if zi:
                rr = r * one_m_r
                out.laa = d_l0 * (r * q + rr * d_l0)
                out.lbb = rr - pi * (1.0 - pi)
                out.lab = (rr * d_l0).neg_()
            else:
                out.laa = d_l0 * q
    if dispersion:
        theta_k = _theta_k(s, zeta.expand_as(a), a)
        dz_l0 = -theta_k
        d2z_l0 = -theta_k + torch.exp(a - sp_s + log_sigmoid(s))  # -theta k + theta p^2
        if zi:
            out.lz = r * dz_l0
            out.lzz = r * d2z_l0 + r * one_m_r * dz_l0 * dz_l0
        else:
            out.lz, out.lzz = dz_l0, d2z_l0

    # ---- the y > 0 entries -------------------------------------------------------------------
    flat = counts.flat
    if flat.numel() == 0:
        return out
    y = counts.values
    ak = a.reshape(-1)[flat]
    zk = zeta[counts.cols]
    thk = theta[counts.cols]
    sk = ak - zk
    spk = _fsp(sk)
    const = nonzero_constant(counts, zeta) if nz_const is None else nz_const
    ll_k = y * ak + const - (y + thk) * spk
    if zi:
        bk = b.reshape(-1)[flat]
        ll_k = ll_k - _fsp(bk)
    _scatter(out.ll, flat, ll_k)
    if order >= 1:
        qk = torch.exp(-spk)
        muq = torch.exp(ak - spk)
        _scatter(out.la, flat, y * qk - muq)
        if zi:
            pik = torch.sigmoid(bk)
            _scatter(out.lb, flat, -pik)
        if order >= 2:
            pk = 1.0 - qk
            _scatter(out.laa, flat, -(y * pk * qk + muq * qk))
            if zi:
                _scatter(out.lbb, flat, -pik * (1.0 - pik))
                _scatter(out.lab, flat, torch.zeros_like(y))
    if dispersion:
        pk = torch.sigmoid(sk)
        lqk = -spk
        d1, e = _psi_diffs(y, zk)
        theta_k = _theta_k(sk, zk, ak)
        theta_p2 = torch.exp(ak + lqk + log_sigmoid(sk))
        _scatter(out.lz, flat, d1 + y * pk - theta_k)
        _scatter(out.lzz, flat, d1 + e - y * pk * (1.0 - pk) - theta_k + theta_p2)
    return out
