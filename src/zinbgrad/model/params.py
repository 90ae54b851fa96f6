"""ZINB-WaVE parameters, design, linear predictors and zinbwave's ridge penalty.

Orientation follows zinbwave: ``beta_mu`` (M_mu x J), ``gamma_mu`` (L_mu x n), ``W`` (n x K),
``alpha_mu`` (K x J), ``zeta`` (J,). The linear predictors of a block of cells ``rows`` are

    log mu  = X_mu[rows] beta_mu + (V_mu gamma_mu[:, rows])^T + W[rows] alpha_mu + O_mu[rows]
    logit pi = X_pi[rows] beta_pi + (V_pi gamma_pi[:, rows])^T + W[rows] alpha_pi + O_pi[rows]
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

__all__ = ["EPSILON_NAMES", "Design", "Params", "Penalty", "orthogonalize_trace_norm"]

EPSILON_MIN_LOGIT = 1e-3

#: zinbwave's penalty weights as the estimator's hyper-parameters name them: the keywords of
#: :meth:`Penalty.zinbwave_defaults` (zinbwave's ``epsilon``, ``epsilonW``, ...)
EPSILON_NAMES = (
    "epsilon",
    "epsilon_beta",
    "epsilon_gamma",
    "epsilon_W",
    "epsilon_alpha",
    "epsilon_zeta",
    "epsilon_min_logit",
    "epsilon_alpha_pi",
)


def _is_intercept(M: Tensor) -> Tensor:
    """Columns that are all ones (zinbwave's definition of an intercept column)."""
    if M.shape[1] == 0:
        return torch.zeros(0, dtype=torch.bool, device=M.device)
    return (M == 1).all(dim=0)


@dataclass
class Design:
    """Fixed covariates: cell-level X (n x M), gene-level V (J x L), optional offsets.

    Offsets ``O_mu`` / ``O_pi`` are (n x J) or (n x 1) (a per-cell vector such as log library
    size) or ``None``.
    """

    X_mu: Tensor
    X_pi: Tensor
    V_mu: Tensor
    V_pi: Tensor
    O_mu: Tensor | None = None
    O_pi: Tensor | None = None
    #: each cell's batch code (n,), int64, for the batch-specific parts of a model (loadings
    #: ``alpha_mu + delta_b``); ``None`` when the model has none
    batch: Tensor | None = None
    n_batches: int = 0

    @property
    def n(self) -> int:
        return self.X_mu.shape[0]

    @property
    def J(self) -> int:
        return self.V_mu.shape[0]

    def to(self, device: torch.device, dtype: torch.dtype) -> Design:
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        batch = None if self.batch is None else self.batch.to(device=device)
        return Design(*(mv(getattr(self, f.name)) for f in fields(self)[:6]), batch, self.n_batches)

    def take(self, idx: Tensor | slice) -> Design:
        """The design of the cells ``idx`` (e.g. a subsample); gene covariates unchanged."""

        def sl(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[idx]

        return Design(
            sl(self.X_mu),
            sl(self.X_pi),
            self.V_mu,
            self.V_pi,
            sl(self.O_mu),
            sl(self.O_pi),
            sl(self.batch),
            self.n_batches,
        )

    def batch_onehot(self, rows: slice | Tensor) -> Tensor:
        """Indicators (cells x n_batches) of the batches of the cells ``rows``."""
        if self.batch is None:
            raise ValueError("this design has no batch codes")
        b = self.batch[rows]
        out = torch.zeros(b.shape[0], self.n_batches, dtype=self.X_mu.dtype, device=b.device)
        return out.scatter_(1, b[:, None], 1.0)

    def rows(self, start: int, stop: int) -> Design:
        """The design of the cells ``[start, stop)`` (a shard); gene covariates unchanged."""
        if start == 0 and stop == self.n:
            return self
        return self.take(slice(start, stop))


def batch_interaction(W: Tensor, onehot: Tensor) -> Tensor:
    """The features ``Z`` (cells x B*K) of batch-specific loadings: ``Z[i, b*K:(b+1)*K] = W_i``
    for the cell's batch b, zero elsewhere, so that ``Z @ delta`` (delta: B*K x J, the batches'
    loading offsets stacked) is ``W_i delta_{b_i}``."""
    return (onehot[:, :, None] * W[:, None, :]).reshape(W.shape[0], -1)


def block_zeta(design: Design, zeta: Tensor, rows: slice | Tensor) -> Tensor:
    """The dispersion of the cells ``rows``: ``zeta`` itself when it is per gene (J,), or,
    for a dispersion per batch level and gene (B x J), the rows of the cells' batches
    (cells x genes)."""
    if zeta.dim() < 2:
        return zeta
    if design.batch is None:
        raise ValueError("a dispersion per batch needs the cells' batch codes (design.batch)")
    return zeta[design.batch[rows]]


@dataclass
class Params:
    """All ZINB-WaVE parameters (gene-level first, then cell-level)."""

    beta_mu: Tensor
    beta_pi: Tensor
    alpha_mu: Tensor
    alpha_pi: Tensor
    #: log inverse dispersion: (J,), or (B, J) with a dispersion per batch level and gene
    zeta: Tensor
    W: Tensor
    gamma_mu: Tensor
    gamma_pi: Tensor
    #: batch-specific loading offsets (B*K x J: delta_0 ... delta_{B-1} stacked), so that a
    #: cell of batch b has mean loadings ``alpha_mu + delta_b``; ``None`` in zinbwave's model
    delta_mu: Tensor | None = None

    GENE_FIELDS = ("beta_mu", "beta_pi", "alpha_mu", "alpha_pi", "zeta")
    CELL_FIELDS = ("W", "gamma_mu", "gamma_pi")
    OPTIONAL_GENE_FIELDS = ("delta_mu",)

    @property
    def K(self) -> int:
        return self.W.shape[1]

    def gene_fields(self) -> tuple[str, ...]:
        """The gene parameters this model has (:attr:`GENE_FIELDS` and the optional ones set)."""
        extra = tuple(k for k in self.OPTIONAL_GENE_FIELDS if getattr(self, k) is not None)
        return self.GENE_FIELDS + extra

    @classmethod
    def zeros(
        cls, design: Design, K: int, n_cells: int | None = None, genes: dict | None = None
    ) -> Params:
        """All-zero parameters of the right shapes for ``design`` (``n_cells`` local cells);
        ``genes``: given gene parameters (name -> tensor) instead of zeros for those."""
        kw = {"dtype": design.X_mu.dtype, "device": design.X_mu.device}
        n, J = design.n if n_cells is None else n_cells, design.J
        out = cls(
            beta_mu=torch.zeros(design.X_mu.shape[1], J, **kw),
            beta_pi=torch.zeros(design.X_pi.shape[1], J, **kw),
            alpha_mu=torch.zeros(K, J, **kw),
            alpha_pi=torch.zeros(K, J, **kw),
            zeta=torch.zeros(J, **kw),
            W=torch.zeros(n, K, **kw),
            gamma_mu=torch.zeros(design.V_mu.shape[1], n, **kw),
            gamma_pi=torch.zeros(design.V_pi.shape[1], n, **kw),
        )
        for name, value in (genes or {}).items():
            if name not in cls.GENE_FIELDS + cls.OPTIONAL_GENE_FIELDS:
                raise KeyError(f"{name!r} is not a gene parameter ({cls.GENE_FIELDS})")
            setattr(out, name, value)
        return out

    def clone(self) -> Params:
        return Params(*(_opt(getattr(self, f.name), lambda t: t.clone()) for f in fields(self)))

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Params:
        return Params(
            *(
                _opt(getattr(self, f.name), lambda t: t.to(device=device, dtype=dtype))
                for f in fields(self)
            )
        )

    def as_numpy(self) -> dict:
        """Every parameter set (an optional one that is ``None`` is left out)."""
        return {
            f.name: getattr(self, f.name).detach().cpu().numpy()
            for f in fields(self)
            if getattr(self, f.name) is not None
        }


def _opt(t: Tensor | None, fn) -> Tensor | None:
    return None if t is None else fn(t)


def linear_predictors(
    design: Design, params: Params, rows: slice | Tensor, zero_inflation: bool = True
) -> tuple[Tensor, Tensor | None]:
    """``(log mu, logit pi)`` of the cells ``rows`` (all genes); logit pi is None without ZI.

    Each predictor is one matrix product ``[X, gamma^T, W] @ [beta; V^T; alpha]`` (the dense
    cells x genes arrays are the memory traffic; the terms are not materialized one by one).
    """
    W = params.W[rows]
    a = torch.cat([design.X_mu[rows], params.gamma_mu[:, rows].T, W], 1) @ torch.cat(
        [params.beta_mu, design.V_mu.T, params.alpha_mu], 0
    )
    if design.O_mu is not None:
        a = a + design.O_mu[rows]
    if params.delta_mu is not None:
        a = a + batch_interaction(W, design.batch_onehot(rows)) @ params.delta_mu
    if not zero_inflation:
        return a, None
    b = torch.cat([design.X_pi[rows], params.gamma_pi[:, rows].T, W], 1) @ torch.cat(
        [params.beta_pi, design.V_pi.T, params.alpha_pi], 0
    )
    if design.O_pi is not None:
        b = b + design.O_pi[rows]
    return a, b


@dataclass
class Penalty:
    """zinbwave's ridge penalty weights.

    The penalty subtracted from the log-likelihood is
    ``1/2 [sum_m eps_beta_mu[m] |beta_mu[m]|^2 + ... + eps_W |W|^2 + eps_alpha |alpha_mu|^2 +
    eps_alpha_pi |alpha_pi|^2] + 1/2 eps_zeta var(zeta)`` (sample variance, 0 for a common
    dispersion); zinbwave has ``eps_alpha_pi = eps_alpha`` (:attr:`alpha_pi` None).
    """

    beta_mu: Tensor
    beta_pi: Tensor
    gamma_mu: Tensor
    gamma_pi: Tensor
    W: float
    alpha: float
    zeta: float
    common_dispersion: bool = True
    extra: dict = field(default_factory=dict)
    #: ridge weight of the batch-specific loading offsets ``delta_mu`` (``None``: the model
    #: has none)
    delta: float | None = None
    #: ridge weight of the zero-inflation loadings ``alpha_pi`` (``None``: :attr:`alpha`, as
    #: zinbwave)
    alpha_pi: float | None = None
    #: the dispersion is per batch level and gene (``zeta``: B x J; ``batch_dispersion``); its
    #: ``var(zeta)`` term is then the variance of all B*J values
    zeta_batch: bool = False

    @property
    def alpha_zi(self) -> float:
        """The ridge weight of ``alpha_pi`` in effect."""
        return self.alpha if self.alpha_pi is None else self.alpha_pi

    @classmethod
    def zinbwave_defaults(
        cls, design: Design, *, common_dispersion: bool = True, **epsilons: float | None
    ) -> Penalty:
        """zinbwave's defaults: epsilon = J; eps_beta = eps_alpha = epsilon/J; eps_gamma = eps_W =
        epsilon/n; eps_zeta = epsilon; intercept columns of X/V get 0 (mean model) and
        ``epsilon_min_logit`` (zero-inflation model, default 1e-3); ``epsilon_alpha_pi`` (not
        zinbwave's) weights ``alpha_pi`` apart from ``alpha_mu`` (None: ``eps_alpha``).

        ``epsilons``: the weights given, by the names of :data:`EPSILON_NAMES` (``None``:
        zinbwave's default)."""
        unknown = sorted(set(epsilons) - set(EPSILON_NAMES))
        if unknown:
            raise TypeError(f"zinbwave_defaults() got unexpected keyword arguments {unknown}")

        def given(name: str, default: float | None) -> float | None:
            value = epsilons.get(name)
            return default if value is None else float(value)

        n, J = design.n, design.J
        eps = given("epsilon", float(J))
        e_beta = given("epsilon_beta", eps / J)
        e_gamma = given("epsilon_gamma", eps / n)
        e_W = given("epsilon_W", eps / n)
        e_alpha = given("epsilon_alpha", eps / J)
        e_zeta = given("epsilon_zeta", eps)
        epsilon_min_logit = given("epsilon_min_logit", EPSILON_MIN_LOGIT)

        def col_eps(M: Tensor, value: float, intercept_value: float) -> Tensor:
            out = torch.full((M.shape[1],), value, dtype=M.dtype, device=M.device)
            out[_is_intercept(M)] = intercept_value
            return out

        return cls(
            beta_mu=col_eps(design.X_mu, e_beta, 0.0),
            beta_pi=col_eps(design.X_pi, e_beta, epsilon_min_logit),
            gamma_mu=col_eps(design.V_mu, e_gamma, 0.0),
            gamma_pi=col_eps(design.V_pi, e_gamma, epsilon_min_logit),
            W=e_W,
            alpha=e_alpha,
            zeta=e_zeta,
            common_dispersion=common_dispersion,
            alpha_pi=given("epsilon_alpha_pi", None),
        )

    def to(self, device: torch.device, dtype: torch.dtype) -> Penalty:
        def mv(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype)

        return Penalty(
            mv(self.beta_mu),
            mv(self.beta_pi),
            mv(self.gamma_mu),
            mv(self.gamma_pi),
            self.W,
            self.alpha,
            self.zeta,
            self.common_dispersion,
            dict(self.extra),
            self.delta,
            self.alpha_pi,
            self.zeta_batch,
        )

    # -- pieces -----------------------------------------------------------------------------
    def gene_vector(self, K: int, zero_inflation: bool, n_batches: int = 0) -> Tensor:
        """Ridge weights of one gene's block ``[beta_mu, alpha_mu, (delta_mu), (beta_pi,
        alpha_pi)]`` (``delta_mu``: ``n_batches * K`` weights, when :attr:`delta` is set)."""
        a = torch.full((K,), self.alpha, dtype=self.beta_mu.dtype, device=self.beta_mu.device)
        parts = [self.beta_mu, a]
        if self.delta is not None:
            parts.append(torch.full_like(a, self.delta).repeat(n_batches))
        if zero_inflation:
            a_pi = a if self.alpha_pi is None else torch.full_like(a, self.alpha_pi)
            parts += [self.beta_pi, a_pi]
        return torch.cat(parts)

    def cell_vector(self, K: int, zero_inflation: bool) -> Tensor:
        """Ridge weights of one cell's block ``[W, gamma_mu, (gamma_pi)]``."""
        w = torch.full((K,), self.W, dtype=self.beta_mu.dtype, device=self.beta_mu.device)
        parts = [w, self.gamma_mu]
        if zero_inflation:
            parts.append(self.gamma_pi)
        return torch.cat(parts)

    def zeta_value(self, zeta: Tensor) -> Tensor:
        if self.common_dispersion or zeta.numel() < 2:
            return zeta.new_zeros(())
        return 0.5 * self.zeta * torch.var(zeta, unbiased=True)

    def gene_values(self, p: Params) -> Tensor:
        """Per-gene ridge penalty (without the dispersion term), shape (J,)."""
        out = 0.5 * (self.beta_mu[:, None] * p.beta_mu**2).sum(0)
        out = out + 0.5 * (self.beta_pi[:, None] * p.beta_pi**2).sum(0)
        if self.alpha_pi is None:  # zinbwave's sum, rounded as before
            out = out + 0.5 * self.alpha * ((p.alpha_mu**2).sum(0) + (p.alpha_pi**2).sum(0))
        else:
            out = out + 0.5 * self.alpha * (p.alpha_mu**2).sum(0)
            out = out + 0.5 * self.alpha_pi * (p.alpha_pi**2).sum(0)
        if p.delta_mu is not None:
            out = out + 0.5 * self.delta * (p.delta_mu**2).sum(0)
        return out

    def cell_values(self, p: Params) -> Tensor:
        """Per-cell ridge penalty, shape (n,)."""
        out = 0.5 * self.W * (p.W**2).sum(1)
        out = out + 0.5 * (self.gamma_mu[:, None] * p.gamma_mu**2).sum(0)
        out = out + 0.5 * (self.gamma_pi[:, None] * p.gamma_pi**2).sum(0)
        return out

    def value(self, p: Params) -> float:
        """zinbwave's ``penalty(model)``."""
        total = self.gene_values(p).sum() + self.cell_values(p).sum() + self.zeta_value(p.zeta)
        return float(total)


def orthogonalize_trace_norm(
    W: Tensor, alpha: Tensor, eps_W: float, eps_alpha: float
) -> tuple[Tensor, Tensor]:
    """zinbwave's ``orthogonalizeTraceNorm`` for ``W`` (n x K) and ``alpha`` (K x m).

    Returns ``(W', alpha')`` with ``W' alpha' = W alpha``, the columns of ``W'`` orthogonal and
    ordered by decreasing singular value, and ``eps_W |W'|^2 + eps_alpha |alpha'|^2`` minimal
    among all factorizations of that product. Uses the K x K Gram matrix of W, so it is
    equivalent to the QR-based form but needs only ``W^T W`` (streamable, all-reducible).
    """
    K = W.shape[1]
    if K == 0:
        return W, alpha
    T, alpha_new = orthogonalization_transform(W.T @ W, alpha, eps_W, eps_alpha)
    return W @ T, alpha_new


def orthogonalization_transform(
    gram: Tensor, alpha: Tensor, eps_W: float, eps_alpha: float
) -> tuple[Tensor, Tensor]:
    """The K x K matrix T (new W = W T) and the new alpha, from the Gram matrix ``W^T W``."""
    evals, U = torch.linalg.eigh(gram)
    tol = evals.max().clamp(min=0) * gram.shape[0] * torch.finfo(gram.dtype).eps
    keep = evals > tol
    sqrt_l = torch.where(keep, evals.clamp(min=0).sqrt(), torch.zeros_like(evals))
    inv_sqrt_l = torch.where(keep, 1.0 / torch.where(keep, sqrt_l, torch.ones_like(sqrt_l)), 0.0)
    R = sqrt_l[:, None] * U.T  # W = Q R with Q = W U diag(1/sqrt l)
    P, S, Rt = torch.linalg.svd(R @ alpha, full_matrices=False)
    s = (eps_W / eps_alpha) ** 0.25 if eps_W > 0 and eps_alpha > 0 else 1.0
    sqrt_S = S.sqrt()
    T = (U * inv_sqrt_l[None, :]) @ P * (sqrt_S / s)[None, :]
    alpha_new = (s * sqrt_S)[:, None] * Rt
    return T, alpha_new
