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

The element-wise work of :func:`entry_derivatives` is written as pure tensor functions (no
data-dependent Python control flow when traced), so it can optionally be fused into a few loops
by ``torch.compile`` (:func:`set_fused`, the ``fused`` argument, :func:`fusion_available`;
``ZINBGRAD_FUSED=0`` disables it): several times faster on large blocks, same formulas.
"""

from __future__ import annotations

import os
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

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
    "set_fused",
    "get_fused",
    "fusion_available",
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


def _theta_k(s: Tensor, a: Tensor, theta: Tensor, sp_s: Tensor, p: Tensor) -> Tensor:
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

    @cached_property
    def flat(self) -> Tensor:
        """Flat (row-major) position of each nonzero in the block; computed once per block."""
        return self.rows * self.n_cols + self.cols

    @cached_property
    def distinct_values(self) -> tuple[Tensor, Tensor]:
        """``(u, inverse)`` with ``values = u[inverse]``: counts take few distinct values, so
        functions of the count alone (for a common dispersion) are evaluated on ``u``.

        Counts are integers: a presence table over ``0..max`` (linear time) replaces the sort
        of :func:`torch.unique` unless the largest count dwarfs the number of nonzeros."""
        v = self.values
        if v.numel() == 0:
            return torch.unique(v, return_inverse=True)
        top = int(v.max())
        if top > 4 * v.numel() + 65536:
            return torch.unique(v, return_inverse=True)
        vl = v.long()
        present = torch.bincount(vl, minlength=top + 1) > 0
        u = present.nonzero().squeeze(1).to(v.dtype)
        slot = torch.cumsum(present, 0) - 1
        return u, slot[vl]

    def _with_flat(self, out: SparseCounts, fn: Callable[[Tensor], Tensor]) -> SparseCounts:
        if "flat" in self.__dict__:  # carry the cached flat positions along
            out.__dict__["flat"] = fn(self.__dict__["flat"])
        return out

    @classmethod
    def from_csr(
        cls, indptr: Tensor, indices: Tensor, data: Tensor, n_cols: int, dtype: torch.dtype
    ) -> SparseCounts:
        """Build from CSR arrays of a block (``indptr`` starting at 0)."""
        n_rows = indptr.numel() - 1
        counts = indptr[1:] - indptr[:-1]
        rows = torch.repeat_interleave(  # output_size: no device-to-host read on a GPU
            torch.arange(n_rows, device=indices.device),
            counts.to(indices.device),
            output_size=indices.numel(),
        )
        vals = data.to(dtype)
        keep = vals != 0
        if not bool(keep.all()):
            rows, indices, vals = rows[keep], indices[keep], vals[keep]
        return cls(n_rows, n_cols, rows, indices.long(), vals, torch.lgamma(vals + 1.0))

    def pin_memory(self) -> SparseCounts:
        out = SparseCounts(
            self.n_rows,
            self.n_cols,
            self.rows.pin_memory(),
            self.cols.pin_memory(),
            self.values.pin_memory(),
            self.lgamma_y1.pin_memory(),
        )
        return self._with_flat(out, Tensor.pin_memory)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SparseCounts:
        def mv(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=non_blocking)

        out = SparseCounts(
            self.n_rows,
            self.n_cols,
            mv(self.rows),
            mv(self.cols),
            mv(self.values),
            mv(self.lgamma_y1),
        )
        return self._with_flat(out, mv)


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


def _fsp(x: Tensor) -> Tensor:
    """Fused softplus (torch's kernel: log1p(exp(x)) below 40, x above; exact in float64)."""
    return F.softplus(x, beta=1.0, threshold=40.0)


def nonzero_constant(counts: SparseCounts, zeta: Tensor) -> Tensor:
    """``lgamma(y + theta) - lgamma(theta) - y*zeta - lgamma(y + 1)`` at the nonzero entries.

    Depends only on the counts and the dispersion, so the optimizer caches it while zeta is
    unchanged. For one common dispersion it is evaluated once per distinct count.
    """
    if _common_zeta(zeta):
        u, inverse = counts.distinct_values
        z = zeta.reshape(-1)[:1].expand_as(u)
        return lgamma_ratio_minus_ylog(u, z)[inverse] - counts.lgamma_y1
    zk = zeta.expand(counts.n_cols)[counts.cols]
    return lgamma_ratio_minus_ylog(counts.values, zk) - counts.lgamma_y1


def _common_zeta(zeta: Tensor) -> bool:
    return zeta.numel() == 1 or bool((zeta == zeta.reshape(-1)[0]).all())


def dispersion_constants(counts: SparseCounts, zeta: Tensor) -> tuple[Tensor, Tensor] | None:
    """The digamma/trigamma differences ``(D1, E)`` of :func:`_psi_diffs` at the nonzeros, for
    one common dispersion (once per distinct count); ``None`` for gene-wise dispersions (the
    kernels then evaluate them per nonzero)."""
    if not _common_zeta(zeta):
        return None
    u, inverse = counts.distinct_values
    cols = torch.zeros(u.numel(), dtype=torch.long, device=u.device)  # one "gene": the zeta
    d1, e = _psi_diffs(u, zeta.reshape(-1)[:1], cols)
    return d1[inverse], e[inverse]


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


def _psi_diffs(y: Tensor, zeta: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
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


#: Names of the per-entry arrays, in the order the tuple-valued kernels below return them.
_TERMS = ("ll", "la", "laa", "lb", "lbb", "lab", "lz", "lzz")
_Terms = tuple[Tensor | None, ...]


def _dense_terms(a: Tensor, b: Tensor | None, zeta: Tensor, order: int, dispersion: bool) -> _Terms:
    """The ``y = 0`` formulas of :func:`entry_derivatives` on the whole (cells x genes) block.

    Pure tensor function (static Python arguments only, no data-dependent control flow when
    compiled), so ``torch.compile`` fuses it into a few loops. Returns the arrays named by
    ``_TERMS``; ``None`` for those not requested. ``b is None``: negative binomial.
    """
    zi = b is not None
    theta = torch.exp(zeta)
    s = a - zeta
    sp_s = _fsp(s)  # -log q, q = theta / (theta + mu)
    log_nb0 = sp_s * (-theta)
    la = laa = lb = lbb = lab = lz = lzz = None
    if zi:
        t = b - log_nb0
        # log(pi + (1 - pi) NB(0)) = log(e^b + NB(0)) - log(1 + e^b)
        if a.dtype == torch.float64:
            # = softplus(log NB(0) - b) - softplus(-b): exact also where |log NB(0)| >> |b|
            # (the first term underflows to 0, leaving log pi)
            ll = _fsp(-t) - _fsp(-b)
        else:
            # = log NB(0) + softplus(t) - softplus(b): where softplus(t) = t, b is cancelled
            # down to float32's rounding of log NB(0) (6e-8 |log NB(0)|), but this compiles
            # into a 15 % faster order-0 kernel, the check of every step of large fits
            ll = log_nb0 - _fsp(b) + _fsp(t)
        if order >= 1 or dispersion:
            one_m_r = torch.sigmoid(t)
            r = 1.0 - one_m_r  # P(zero came from the NB component)
    else:
        ll = log_nb0
    if order >= 1 or dispersion:
        mu_q = torch.exp(a - sp_s)  # theta p = mu q
    if order >= 1:
        d_l0 = mu_q.neg() if dispersion else mu_q.neg_()  # d log NB(0)/da = -theta p = -mu q
        if zi:
            pi = torch.sigmoid(b)
            la = r * d_l0
            lb = one_m_r - pi
        else:
            la = d_l0
        if order >= 2:
            q = torch.exp(-sp_s)
            if zi:
                rr = r * one_m_r
                laa = d_l0 * (r * q + rr * d_l0)
                lbb = rr - pi * (1.0 - pi)
                lab = (rr * d_l0).neg_()
            else:
                laa = d_l0 * q
    if dispersion:
        p = torch.sigmoid(s)
        theta_k = _theta_k(s, a, theta, sp_s, p)
        dz_l0 = -theta_k
        d2z_l0 = -theta_k + mu_q * p  # -theta k + theta p^2
        if zi:
            lz = r * dz_l0
            lzz = r * d2z_l0 + r * one_m_r * dz_l0 * dz_l0
        else:
            lz, lzz = dz_l0, d2z_l0
    return ll, la, laa, lb, lbb, lab, lz, lzz


def _sparse_terms(
    a: Tensor,
    b: Tensor | None,
    zeta: Tensor,
    flat: Tensor,
    cols: Tensor,
    y: Tensor,
    const: Tensor,
    order: int,
    dispersion: bool,
    psi: tuple[Tensor, Tensor] | None = None,
) -> _Terms:
    """The ``y > 0`` values at the nonzeros (``flat`` positions of the contiguous block).

    ``lab`` is ``None`` (it is zero at the nonzeros). ``psi``: precomputed
    :func:`dispersion_constants`. Pure tensor function like :func:`_dense_terms`.
    """
    zi = b is not None
    ak = a.view(-1)[flat]
    zk = zeta[cols]
    thk = torch.exp(zeta)[cols]
    sk = ak - zk
    spk = _fsp(sk)
    ll = y * ak + const - (y + thk) * spk
    la = laa = lb = lbb = lz = lzz = None
    if zi:
        bk = b.view(-1)[flat]
        ll = ll - _fsp(bk)
    if order >= 1 or dispersion:
        muq = torch.exp(ak - spk)
    if order >= 1:
        qk = torch.exp(-spk)
        la = y * qk - muq
        if zi:
            pik = torch.sigmoid(bk)
            lb = -pik
        if order >= 2:
            pk = 1.0 - qk
            laa = -(y * pk * qk + muq * qk)
            if zi:
                lbb = -pik * (1.0 - pik)
    if dispersion:
        pk = torch.sigmoid(sk)
        d1, e = _psi_diffs(y, zeta, cols) if psi is None else psi
        theta_k = _theta_k(sk, ak, thk, spk, pk)
        theta_p2 = muq * pk
        lz = d1 + y * pk - theta_k
        lzz = d1 + e - y * pk * (1.0 - pk) - theta_k + theta_p2
    return ll, la, laa, lb, lbb, None, lz, lzz


def _block_parts(
    a: Tensor,
    b: Tensor | None,
    zeta: Tensor,
    flat: Tensor | None,
    cols: Tensor | None,
    y: Tensor | None,
    const: Tensor | None,
    d1: Tensor | None = None,
    e: Tensor | None = None,
    *,
    order: int,
    dispersion: bool,
) -> tuple[_Terms, _Terms | None]:
    """The dense ``y = 0`` terms and the ``y > 0`` values at the nonzeros (``flat``; ``None``
    when the block has none); ``d1``, ``e``: optional :func:`dispersion_constants`.

    Pure tensor function: the unit that is compiled. The nonzeros' values are written into the
    dense arrays outside it (:func:`_merge`): inside one compiled graph the scatter made
    inductor's order-0 kernel 2x slower (10.7 against 5.1 ms per 2,933 x 715 block, 10 %
    nonzeros) and the order-2 kernel 25 % slower.
    """
    dense = _dense_terms(a, b, zeta, order, dispersion)
    if flat is None:
        return dense, None
    psi = None if d1 is None else (d1, e)
    return dense, _sparse_terms(a, b, zeta, flat, cols, y, const, order, dispersion, psi)


def _merge(dense: _Terms, sparse: _Terms | None, flat: Tensor | None) -> _Terms:
    """The dense arrays with the nonzeros' values written in at ``flat`` (in place)."""
    if sparse is None:
        return dense
    for name, d, v in zip(_TERMS, dense, sparse, strict=True):
        if d is None:
            continue
        if name == "lab":  # zero at the nonzeros
            d.view(-1).index_fill_(0, flat, 0.0)
        else:
            d.view(-1).index_copy_(0, flat, v)
    return dense


# ---- optional fusion of the element-wise work with torch.compile ----------------------------

_FUSED_MODES = ("auto", True, False)
_ENV_ON = ("1", "true", "yes", "on")
_ENV_OFF = ("0", "false", "no", "off")
_fused_mode: bool | str = (
    True if os.environ.get("ZINBGRAD_FUSED", "").strip().lower() in _ENV_ON else "auto"
)
#: why fused evaluation was given up in this process (None: not given up)
_fused_failure: str | None = None
#: one compiled callable per static configuration
_compiled: dict[tuple, Callable[..., tuple[_Terms, _Terms | None]]] = {}


def _env_disabled() -> bool:
    return os.environ.get("ZINBGRAD_FUSED", "").strip().lower() in _ENV_OFF


def get_fused() -> bool | str:
    """The module-wide fusion mode: ``"auto"`` (default), ``True`` or ``False``."""
    return _fused_mode


class set_fused:  # a class so that it also works as a context manager (torch.set_grad_enabled)
    """Set the module-wide fusion mode of :func:`entry_derivatives`; also a context manager that
    restores the previous mode on exit.

    * ``"auto"`` (default): fused only where the caller passes ``fused=True``;
    * ``True``: fused unless the caller passes ``fused=False``;
    * ``False``: never fused (also ignores ``fused=True``).

    Returns the previous mode as ``.prev``. ``with set_fused(True): ...`` restores it on exit.

    Fused evaluation compiles the element-wise kernels with ``torch.compile(dynamic=True)`` on
    first use (one compilation per configuration of zero inflation, derivative order and
    dispersion; inductor caches them on disk across processes). The environment variable
    ``ZINBGRAD_FUSED=0`` disables it regardless of this setting (``ZINBGRAD_FUSED=1`` makes
    ``True`` the initial mode). If compiling or running a
    compiled kernel fails, a single warning is issued and the process falls back to eager
    evaluation for good. Results agree with eager evaluation to a few units of rounding.
    """

    def __init__(self, mode: bool | str) -> None:
        global _fused_mode
        if not any(mode is m or (isinstance(m, str) and mode == m) for m in _FUSED_MODES):
            raise ValueError(f"fused mode must be 'auto', True or False, not {mode!r}")
        self.prev = _fused_mode
        _fused_mode = mode

    def __enter__(self) -> set_fused:
        return self

    def __exit__(self, *exc: object) -> None:
        global _fused_mode
        _fused_mode = self.prev


def fusion_available(device: torch.device | str | None = None) -> bool:
    """Whether ``entry_derivatives(..., fused=True)`` would use compiled kernels.

    False where disabled (``ZINBGRAD_FUSED=0``, ``set_fused(False)``), after an earlier failure in
    this process, where torch.compile is unsupported, or (with ``device``) where the backend
    inductor needs for that device (a C++ compiler for CPU, triton for CUDA) is missing. It does
    not compile anything; a failure at first use still falls back to eager with a warning.
    """
    if _env_disabled() or _fused_failure is not None or _fused_mode is False:
        return False
    if not hasattr(torch, "compile"):
        return False
    try:
        from torch._dynamo import is_dynamo_supported

        if not is_dynamo_supported():
            return False
        kind = None if device is None else torch.device(device).type
        if kind == "cpu":
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        elif kind == "cuda":
            from torch.utils._triton import has_triton

            return bool(has_triton())
    except Exception:
        return False
    return True


def _want_fused(fused: bool | None) -> bool:
    if _fused_mode is False or _fused_failure is not None or _env_disabled():
        return False
    if fused is None:
        return _fused_mode is True
    return bool(fused)


def _compiled_block_parts(
    zi: bool, nonzeros: bool, order: int, dispersion: bool
) -> Callable[..., tuple[_Terms, _Terms | None]]:
    """The compiled :func:`_block_parts` for one static configuration (created on first use).

    Each configuration gets its own code object: dynamo keeps its compiled graphs (and counts
    them against its recompile limit) per code object, so sharing one closure would pile all
    configurations onto one cache.
    """
    key = (zi, nonzeros, order, dispersion)
    fn = _compiled.get(key)
    if fn is None:

        def block_terms(a, b, zeta, flat, cols, y, const, d1, e):
            return _block_parts(
                a, b, zeta, flat, cols, y, const, d1, e, order=order, dispersion=dispersion
            )

        name = f"block_terms_{'zinb' if zi else 'nb'}_o{order}{'_disp' if dispersion else ''}"
        name += "" if nonzeros else "_allzero"
        code = block_terms.__code__.replace(co_name=name)
        fresh = types.FunctionType(
            code, block_terms.__globals__, name, None, block_terms.__closure__
        )
        fn = _compiled[key] = torch.compile(fresh, dynamic=True)
    return fn


def _plain(x: Tensor | None) -> Tensor | None:
    """``x`` as a contiguous tensor at storage offset 0 (views are copied): compiled graphs are
    guarded on strides and storage offsets, and a view's offset that happens to equal a size
    would be specialized on ("duck sizing") and force a recompilation later."""
    if x is None or (x.is_contiguous() and x.storage_offset() == 0):
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _give_up_fusion(exc: BaseException) -> None:
    global _fused_failure
    msg = str(exc).strip().splitlines()
    reason = f"{type(exc).__name__}: {msg[0][:300] if msg else ''}"
    _fused_failure = reason
    _compiled.clear()
    warnings.warn(
        f"zinbgrad: fused (torch.compile) likelihood kernels failed ({reason}); "
        "using eager evaluation for the rest of this process (set ZINBGRAD_FUSED=0 to skip).",
        RuntimeWarning,
        stacklevel=3,
    )


def entry_derivatives(
    a: Tensor,
    b: Tensor | None,
    zeta: Tensor,
    counts: SparseCounts,
    *,
    order: int = 2,
    dispersion: bool = False,
    nz_const: Tensor | None = None,
    fused: bool | None = None,
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
    fused
        Evaluate the element-wise work with kernels compiled by ``torch.compile`` (several times
        faster on large blocks; the first call of each configuration compiles, seconds to tens
        of seconds, cached on disk). ``None``: the module setting (:func:`set_fused`, by default
        not fused). Falls back to eager evaluation where unavailable (:func:`fusion_available`).

    Returns
    -------
    EntryDerivatives
        Dense per-entry arrays. The y > 0 formulas are evaluated only at the nonzero entries.

    Notes
    -----
    The dense part is written for speed (few fused kernels, ``theta`` formed per gene only):
    ``log NB(0) = -theta * softplus(a - zeta)`` and, at zeros,
    ``log(pi + (1-pi) NB(0)) = softplus(log NB(0) - b) - softplus(-b)`` in float64 (in float32
    ``log NB(0) - softplus(b) + softplus(b - log NB(0))``, to float32's rounding of
    ``log NB(0)``).
    These agree with :func:`log_zinb` to a few float64 roundings of the larger of ``|b|`` and
    ``|log NB(0)|`` (absolute, not relative, accuracy); :func:`log_zinb` is the form with full
    relative accuracy for tiny probabilities.
    """
    a = a.contiguous()
    b = None if b is None else b.contiguous()
    zeta = zeta.expand(a.shape[1]).contiguous()
    flat = counts.flat
    d1 = e = None
    if flat.numel() == 0:
        flat = cols = y = const = None
    else:
        cols, y = counts.cols, counts.values
        const = nonzero_constant(counts, zeta) if nz_const is None else nz_const
        if dispersion:
            d1, e = dispersion_constants(counts, zeta) or (None, None)
    args = (a, b, zeta, flat, cols, y, const, d1, e)
    parts = None
    # blocks with a dimension of 0 or 1 stay eager (compiling would specialize on that size)
    if _want_fused(fused) and min(a.shape) > 1 and (flat is None or flat.numel() > 1):
        try:
            fn = _compiled_block_parts(b is not None, flat is not None, order, dispersion)
            parts = fn(*(_plain(x) for x in args))
        except Exception as exc:  # no compiler, unsupported platform, ...
            _give_up_fusion(exc)
    if parts is None:
        parts = _block_parts(*args, order=order, dispersion=dispersion)
    terms = _merge(*parts, flat)
    return EntryDerivatives(**dict(zip(_TERMS, terms, strict=True)))
