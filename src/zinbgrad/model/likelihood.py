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

Where things live: the stable special functions (softplus, the lgamma and digamma differences)
in :mod:`zinbgrad.model.special`; the fusion mode and the compiled variants in the backend
:mod:`zinbgrad.model.kernels`; :class:`~zinbgrad.data.counts.SparseCounts` in
:mod:`zinbgrad.data.counts`. Their public names are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.counts import SparseCounts
from .kernels import fusion_available, get_fused, run_fused, set_fused
from .special import (
    lgamma_ratio_minus_ylog,
    log_sigmoid,
    log_softplus,
    psi_diffs,
    softplus,
    theta_times_k,
)

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
    if zeta.dim() == 2:  # per-entry dispersion (cells x genes): the nonzeros' own values
        zk = zeta.reshape(-1)[counts.flat]
    else:
        zk = zeta.expand(counts.n_cols)[counts.cols]
    return lgamma_ratio_minus_ylog(counts.values, zk) - counts.lgamma_y1


def _common_zeta(zeta: Tensor) -> bool:
    return zeta.numel() == 1 or bool((zeta == zeta.reshape(-1)[0]).all())


def dispersion_constants(counts: SparseCounts, zeta: Tensor) -> tuple[Tensor, Tensor] | None:
    """The digamma/trigamma differences ``(D1, E)`` of :func:`~zinbgrad.model.special.psi_diffs`
    at the nonzeros, for one common dispersion (once per distinct count); ``None`` for gene-wise
    dispersions (the kernels then evaluate them per nonzero)."""
    if not _common_zeta(zeta):
        return None
    u, inverse = counts.distinct_values
    cols = torch.zeros(u.numel(), dtype=torch.long, device=u.device)  # one "gene": the zeta
    d1, e = psi_diffs(u, zeta.reshape(-1)[:1], cols)
    return d1[inverse], e[inverse]


#: Names of the per-entry arrays, in the order the tuple-valued kernels below return them.
_TERMS = ("ll", "la", "laa", "lb", "lbb", "lab", "lz", "lzz")
_Terms = tuple[Tensor | None, ...]


def _dense_terms(a: Tensor, b: Tensor | None, zeta: Tensor, order: int, dispersion: bool) -> _Terms:
    """The ``y = 0`` formulas of :func:`entry_derivatives` on the whole (cells x genes) block.

    Pure tensor function (static Python arguments only, no data-dependent control flow when
    compiled), so ``torch.compile`` fuses it into a few loops. Returns the arrays named by
    ``_TERMS``; ``None`` for those not requested. ``b is None``: negative binomial.

    Evaluated eagerly, every block-sized array costs a pass and a fresh allocation, so the
    intermediates are updated in place once no longer needed: each value is formed by the
    same operations in the same order as the expression in its comment (IEEE ``+``/``*``
    commute exactly), so the results are bitwise those of the plain expressions.
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
            ll = _fsp(-t).sub_(_fsp(-b))
        else:
            # = log NB(0) - softplus(b) + softplus(t): where softplus(t) = t, b is cancelled
            # down to float32's rounding of log NB(0) (6e-8 |log NB(0)|), but this compiles
            # into a 15 % faster order-0 kernel, the check of every step of large fits
            ll = log_nb0.sub_(_fsp(b)).add_(_fsp(t))
        if order >= 1 or dispersion:
            one_m_r = t.sigmoid_()  # sigmoid(t)
            r = 1.0 - one_m_r  # P(zero came from the NB component)
    else:
        ll = log_nb0
    if order >= 1 or dispersion:
        mu_q = torch.sub(a, sp_s).exp_()  # exp(a - sp_s) = theta p = mu q
    if order >= 1:
        d_l0 = mu_q.neg() if dispersion else mu_q.neg_()  # d log NB(0)/da = -theta p = -mu q
        if zi:
            pi = torch.sigmoid(b)
            la = r * d_l0
            lb = one_m_r - pi
        else:
            la = d_l0
        if order >= 2:
            q = (torch.neg(sp_s) if dispersion else sp_s.neg_()).exp_()  # exp(-sp_s)
            if zi:
                rr = r * one_m_r
                rd = rr * d_l0
                laa = q.mul_(r).add_(rd).mul_(d_l0)  # d_l0 * (r q + rr d_l0)
                lbb = rr.sub_(torch.rsub(pi, 1.0).mul_(pi))  # rr - pi (1 - pi)
                lab = rd.neg_()  # -(rr d_l0)
            else:
                laa = q.mul_(d_l0)  # d_l0 q
    if dispersion:
        p = torch.sigmoid(s)
        dz_l0 = theta_times_k(s, a, theta, sp_s, p).neg_()  # -theta k
        d2z_l0 = p.mul_(mu_q).add_(dz_l0)  # -theta k + mu q p = -theta k + theta p^2
        if zi:
            lz = r * dz_l0
            rq = (r * one_m_r).mul_(dz_l0).mul_(dz_l0)  # r (1 - r) dz_l0^2
            lzz = d2z_l0.mul_(r).add_(rq)  # r d2z_l0 + r (1 - r) dz_l0^2
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
    :func:`dispersion_constants`. Pure tensor function like :func:`_dense_terms`, and like it
    updates its intermediates in place (bitwise the values of the expressions in comments).
    """
    zi = b is not None
    # index_select: the same values as advanced indexing, gathered 1.5-3x faster on the CPU
    ak = a.view(-1).index_select(0, flat)
    if zeta.dim() == 2:  # per-entry dispersion: each nonzero's own zeta, indexed by itself
        zeta = zeta.reshape(-1).index_select(0, flat)
        cols = torch.arange(flat.numel(), device=flat.device)
    zk = zeta.index_select(0, cols)
    thk = torch.exp(zeta).index_select(0, cols)
    sk = ak - zk
    spk = _fsp(sk)
    ll = (y * ak).add_(const).sub_((y + thk).mul_(spk))  # y ak + const - (y + thk) spk
    la = laa = lb = lbb = lz = lzz = None
    if zi:
        bk = b.view(-1).index_select(0, flat)
        ll.sub_(_fsp(bk))
    if order >= 1 or dispersion:
        muq = torch.sub(ak, spk).exp_()  # exp(ak - spk)
    if order >= 1:
        qk = torch.neg(spk).exp_()  # exp(-spk)
        la = (y * qk).sub_(muq)  # y qk - muq
        if zi:
            pik = torch.sigmoid(bk)
            lb = pik.neg()
        if order >= 2:
            pk = 1.0 - qk
            laa = (y * pk).mul_(qk).add_(muq * qk).neg_()  # -(y pk qk + muq qk)
            if zi:
                lbb = torch.rsub(pik, 1.0).mul_(lb)  # -pik (1 - pik)
    if dispersion:
        pk = torch.sigmoid(sk)
        d1, e = psi_diffs(y, zeta, cols) if psi is None else psi
        theta_k = theta_times_k(sk, ak, thk, spk, pk)
        y_pk = y * pk
        lz = torch.add(d1, y_pk).sub_(theta_k)  # d1 + y pk - theta k
        # d1 + e - y pk (1 - pk) - theta k + theta p^2 (theta p^2 = muq pk)
        lzz = torch.add(d1, e).sub_(y_pk.mul_(1.0 - pk)).sub_(theta_k).add_(muq.mul_(pk))
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


def _block_variant(
    zi: bool, nonzeros: bool, order: int, dispersion: bool, per_entry: bool = False
) -> tuple:
    """``(key, name, fn)`` of :func:`_block_parts` for one static configuration, as
    :func:`~zinbgrad.model.kernels.run_fused` compiles it (one code object per configuration;
    ``per_entry``: a (cells x genes) zeta, e.g. a dispersion per gene and batch); ``fn`` is
    picklable, for the background builder of the kernel cache."""
    block_terms = partial(_block_parts, order=order, dispersion=dispersion)
    name = f"block_terms_{'zinb' if zi else 'nb'}_o{order}{'_disp' if dispersion else ''}"
    name += "" if nonzeros else "_allzero"
    if per_entry:
        return (zi, nonzeros, order, dispersion, "per_entry"), name + "_zeta2d", block_terms
    return (zi, nonzeros, order, dispersion), name, block_terms


def _block_dims(a: Tensor, per_entry: bool) -> tuple[str, ...] | None:
    """The dimensions of :func:`_block_parts`'s arguments (cells n, genes J, nonzeros k), for
    the packages of the kernel cache (CPU only; ``None`` elsewhere)."""
    if a.device.type != "cpu":
        return None
    return ("nJ", "nJ", "nJ" if per_entry else "J") + ("k",) * 6


def entry_derivatives(
    a: Tensor,
    b: Tensor | None,
    zeta: Tensor,
    counts: SparseCounts,
    *,
    order: int = 2,
    dispersion: bool = False,
    nz_const: Tensor | None = None,
    fused: bool | str | None = None,
) -> EntryDerivatives:
    """Log-likelihood and derivatives of every entry of a block, sparse-aware.

    Parameters
    ----------
    a
        ``log mu`` for the block, shape (cells, genes).
    b
        ``logit pi`` for the block, or ``None`` for a plain negative binomial model.
    zeta
        ``log theta`` per gene, shape (genes,) (broadcast over cells), or per entry, shape
        (cells, genes) (e.g. a dispersion per gene and batch, expanded by the cells' batches).
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
        of seconds, cached on disk), or by the kernels built ahead of time into this machine's
        cache where present (loaded in milliseconds, :mod:`zinbgrad.model.kernel_cache`).
        ``"cached"``: only those (a missing one is queued for a background build and the call
        evaluates eagerly). ``None``: the module setting (:func:`set_fused`, by default not
        fused). Falls back to eager evaluation where unavailable (:func:`fusion_available`).

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
    per_entry = zeta.dim() == 2
    zeta = (zeta.expand_as(a) if per_entry else zeta.expand(a.shape[1])).contiguous()
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
    if min(a.shape) > 1 and (flat is None or flat.numel() > 1):
        variant = _block_variant(b is not None, flat is not None, order, dispersion, per_entry)
        parts = run_fused(*variant, args, fused, _block_dims(a, per_entry))
    if parts is None:
        parts = _block_parts(*args, order=order, dispersion=dispersion)
    terms = _merge(*parts, flat)
    return EntryDerivatives(**dict(zip(_TERMS, terms, strict=True)))
