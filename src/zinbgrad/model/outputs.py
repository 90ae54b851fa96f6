"""Per-entry outputs of a fitted ZINB-WaVE model: fitted values, residuals, weights, imputation.

Everything here is computed in blocks of cells, in the natural parameters ``a = log mu``,
``b = logit pi`` and ``zeta = log theta`` and in log space, so that no entry under- or overflows
where the exact value is representable and nothing larger than (block of cells x genes) is ever
dense, except the result the caller asks for (which can also be streamed block by block with
:func:`iter_output_blocks` or written into a caller-provided array / memmap).

Definitions (zinbwave 1.25.2, ``R/normalized_values.R``), with ``pi = sigmoid(b)``,
``mu = exp(a)``, ``theta = exp(zeta)`` and ``l(y)`` the ZINB log-probability of the count:

* **deviance residuals** (``computeDevianceResiduals``): ``s * sqrt(-2 l(y))`` with ``s = +1``
  where ``y > (1 - pi) mu`` and ``s = -1`` otherwise (ties included). zinbwave uses the
  log-likelihood of the entry itself, *not* its difference to a saturated model. R evaluates
  ``log(pi [y = 0] + (1 - pi) dnbinom(y))`` and replaces likelihoods that underflow to exactly 0
  by the smallest non-zero likelihood of the matrix; here ``l(y)`` is evaluated in log space
  (:func:`zinbgrad.model.likelihood.log_zinb`), which never underflows, so that replacement is
  neither needed nor copied (the two differ only where R's likelihood underflowed, i.e.
  ``l(y) < -745``, and where R's ``log`` of a likelihood within 1e-13 of 1 loses digits).
* **normalized values** (``normalizedValues``): the deviance residuals of the model with ``W``
  set to 0 (both ``log mu`` and ``logit pi`` lose their ``W alpha`` term; the sign uses that
  model's mean too).
* **Pearson residuals**: ``(y - E[Y]) / sqrt(Var[Y])`` with ``E[Y] = (1 - pi) mu`` and
  ``Var[Y] = (1 - pi) mu (1 + mu / theta + pi mu)``.
* **observational weights** (``computeObservationalWeights``): the posterior probability that a
  zero comes from the negative binomial, ``(1 - pi) NB(0) / ZINB(0)``, at zeros; 1 where
  ``y > 0``; floored at 1e-15.
* **imputed zeros** (``imputeZeros``): zeros replaced by
  ``E[NB draw | Y = 0] = mu pi / (pi + (1 - pi) (1 + mu / theta)^(-theta))`` (the zero is a
  dropout with posterior probability ``pi / ZINB(0)``, and then the NB value has mean ``mu``),
  counts > 0 kept. R evaluates ``(1 + mu phi)^(-1/phi)`` with ``phi = 1/theta`` directly, which
  rounds to 1 whenever ``mu / theta < 1.1e-16`` (e.g. every entry of a common-dispersion fit
  where theta ~ 6e19); here ``NB(0) = exp(-theta softplus(a - zeta))`` is exact.
* **denoised mean** ``E[Y] = (1 - pi) mu``.

Without zero inflation (``b`` is ``None``), ``pi = 0``: the log-likelihood is the NB one,
weights are all 1 and imputed zeros are 0.

Batch-corrected values replace the batch columns of the cell design X by those of one batch
(:func:`batch_design`) or average the fitted means over all batches (:func:`batch_corrected`),
like scVI's ``transform_batch``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from .likelihood import log_nb, log_sigmoid, log_zinb, softplus
from .params import Design, Params, block_zeta, linear_predictors

__all__ = [
    "OUTPUTS",
    "COUNT_OUTPUTS",
    "EXCLUDED_GENE_VALUES",
    "DEGENERATE_LOG_MU",
    "degenerate_genes",
    "warn_degenerate",
    "spread_to_input",
    "DEFAULT_BLOCK_ENTRIES",
    "WEIGHT_FLOOR",
    "zinb_mean",
    "zinb_log_variance",
    "entry_loglik",
    "deviance_residuals",
    "pearson_residuals",
    "observational_weights",
    "impute_zeros",
    "block_output",
    "iter_output_blocks",
    "compute_output",
    "batch_columns",
    "batch_design",
    "model_output",
    "batch_corrected",
]

#: Default number of matrix entries per block of cells.
DEFAULT_BLOCK_ENTRIES = 2**21
#: zinbwave's floor for observational weights.
WEIGHT_FLOOR = 1e-15

#: Every output :func:`compute_output` knows; those in :data:`COUNT_OUTPUTS` need the counts.
OUTPUTS = (
    "log_mu",
    "mu",
    "logit_pi",
    "pi",
    "mean",
    "variance",
    "loglik",
    "deviance",
    "pearson",
    "weights",
    "impute_zeros",
)
COUNT_OUTPUTS = ("loglik", "deviance", "pearson", "weights", "impute_zeros")

#: log mu above which an entry is *degenerate*: a NB mean beyond 2^30 counts, which no real
#: count reaches (they are stored as int32; a whole 10x cell holds ~1e4-1e5 UMIs). The model
#: allows it where the zero inflation is ~1 (pi -> 1 leaves mu unidentified: R zinbwave
#: reaches log mu 41.6 on PBMC 8k too). Simulated NB values are not drawn there where they
#: drop out (``tl.impute`` caps imputed zeros at the gene's largest observed count).
DEGENERATE_LOG_MU = float(np.log(2.0**30))

#: The value of each output for a gene left out of the fit for having no counts (see
#: ``empty_genes`` of :class:`~zinbgrad.ZINBWaVE`): the model of a point mass at 0 (mu = 0,
#: pi = 0), which gives the training cells' all-zero counts probability 1. Cells left out
#: (``empty_cells``) get NaN.
EXCLUDED_GENE_VALUES = {
    "log_mu": -np.inf,
    "mu": 0.0,
    "logit_pi": -np.inf,
    "pi": 0.0,
    "mean": 0.0,
    "variance": 0.0,
    "loglik": 0.0,
    "deviance": 0.0,
    "pearson": 0.0,
    "weights": 1.0,
    "impute_zeros": 0.0,
}


def spread_to_input(
    values: np.ndarray, what: str, genes: np.ndarray, cells: np.ndarray | None = None
) -> np.ndarray:
    """An output over the fitted cells x genes spread over all the cells and genes of the
    data the model was fitted on (masks ``cells`` / ``genes``): genes left out get
    :data:`EXCLUDED_GENE_VALUES`, cells left out NaN. Returned as is when nothing was left
    out."""
    cells = np.ones(values.shape[0], dtype=bool) if cells is None else cells
    if genes.all() and cells.all():
        return values
    out = np.full((len(cells), len(genes)), np.nan, dtype=values.dtype)
    out[np.ix_(cells, genes)] = values
    out[np.ix_(cells, ~genes)] = EXCLUDED_GENE_VALUES.get(what, np.nan)
    return out


# ============================================================================ element-wise math
def _zeta_like(zeta: Tensor, a: Tensor) -> Tensor:
    """``zeta`` per gene broadcast to the genes of ``a``; a (cells x genes) zeta as it is."""
    z = zeta.to(dtype=a.dtype, device=a.device)
    return z if z.dim() == 2 else z.expand(a.shape[-1])


def zinb_mean(a: Tensor, b: Tensor | None) -> Tensor:
    """``E[Y] = (1 - pi) mu = exp(a - softplus(b))`` (``mu`` without zero inflation)."""
    return torch.exp(a) if b is None else torch.exp(a - softplus(b))


def zinb_log_variance(a: Tensor, b: Tensor | None, zeta: Tensor) -> Tensor:
    """``log Var[Y]`` with ``Var[Y] = (1 - pi) mu (1 + mu/theta + pi mu)``.

    Evaluated as ``-softplus(b) + a + logsumexp(0, a - zeta, a + log pi)`` (NB:
    ``a + softplus(a - zeta)``), exact for any magnitude of ``mu``, ``theta`` and ``pi``.
    """
    s = a - _zeta_like(zeta, a)
    if b is None:
        return a + softplus(s)
    terms = torch.stack([torch.zeros_like(a), s, a + log_sigmoid(b)])
    return a - softplus(b) + torch.logsumexp(terms, dim=0)


def entry_loglik(y: Tensor, a: Tensor, b: Tensor | None, zeta: Tensor) -> Tensor:
    """Element-wise log-probability of the counts (ZINB, or NB when ``b`` is ``None``)."""
    z = _zeta_like(zeta, a)
    return log_nb(y, a, z) if b is None else log_zinb(y, a, b, z)


def deviance_residuals(y: Tensor, a: Tensor, b: Tensor | None, zeta: Tensor) -> Tensor:
    """zinbwave's deviance residuals ``sign(y - (1 - pi) mu) * sqrt(-2 log ZINB(y))``.

    The sign is ``+1`` only where ``y`` exceeds the mean (ties give ``-1``, as in R).
    """
    ll = entry_loglik(y, a, b, zeta)
    sign = torch.where(y > zinb_mean(a, b), 1.0, -1.0).to(ll.dtype)
    # -2 ll >= 0 exactly; clamp only the sign of a rounding-level positive ll
    return sign * torch.sqrt(torch.clamp(-2.0 * ll, min=0.0))


def pearson_residuals(y: Tensor, a: Tensor, b: Tensor | None, zeta: Tensor) -> Tensor:
    """``(y - E[Y]) / sqrt(Var[Y])`` under the fitted ZINB (NB without zero inflation)."""
    return (y - zinb_mean(a, b)) * torch.exp(-0.5 * zinb_log_variance(a, b, zeta))


def observational_weights(
    y: Tensor, a: Tensor, b: Tensor | None, zeta: Tensor, floor: float = WEIGHT_FLOOR
) -> Tensor:
    """zinbwave's observational weights: ``(1 - pi) NB(0) / ZINB(0)`` at zeros, 1 for ``y > 0``.

    Computed as ``exp(log(1 - pi) + log NB(0) - log ZINB(0))`` and floored at ``floor``
    (zinbwave: 1e-15). All ones without zero inflation.
    """
    if b is None:
        return torch.ones_like(a)
    z = _zeta_like(zeta, a)
    zero = torch.zeros_like(a)
    log_w = log_nb(zero, a, z) - softplus(b) - log_zinb(zero, a, b, z)
    w = torch.clamp(torch.exp(log_w), min=floor, max=1.0)
    return torch.where(y > 0, torch.ones_like(w), w)


def impute_zeros(y: Tensor, a: Tensor, b: Tensor | None, zeta: Tensor) -> Tensor:
    """zinbwave's ``imputeZeros``: zeros replaced by ``mu pi / ZINB(0)``, counts > 0 kept.

    ``mu pi / (pi + (1 - pi) NB(0)) = exp(a + log pi - log ZINB(0))``; 0 without zero
    inflation (zinbwave's definition; :func:`zinbgrad.tl.impute` caps it for degenerate
    genes).
    """
    y = y.to(a.dtype)
    if b is None:
        return y.clone()
    z = _zeta_like(zeta, a)
    imp = torch.exp(a + log_sigmoid(b) - log_zinb(torch.zeros_like(a), a, b, z))
    return torch.where(y > 0, y, imp)


# ============================================================================ blocks of cells
def _block_rows(J: int, block_entries: int) -> int:
    return max(1, int(block_entries) // max(int(J), 1))


def block_output(
    what: str, a: Tensor, b: Tensor | None, zeta: Tensor, y: Tensor | None = None
) -> Tensor:
    """One output for a block, from its linear predictors (and counts where needed).

    Parameters
    ----------
    what
        One of :data:`OUTPUTS`: ``"log_mu"``, ``"mu"``, ``"logit_pi"``, ``"pi"``, ``"mean"``
        (``(1 - pi) mu``), ``"variance"``, ``"loglik"``, ``"deviance"``, ``"pearson"``,
        ``"weights"``, ``"impute_zeros"``.
    a, b
        ``log mu`` and ``logit pi`` (``None``: no zero inflation, i.e. ``pi = 0`` and
        ``logit pi = -inf``; zinbwave stores 0 there), shape (cells, genes).
    zeta
        ``log theta``, shape (genes,) or scalar.
    y
        Dense counts of the block, needed for :data:`COUNT_OUTPUTS`.
    """
    if what in COUNT_OUTPUTS and y is None:
        raise ValueError(f"output {what!r} needs the counts")
    if what == "log_mu":
        return a
    if what == "mu":
        return torch.exp(a)
    if what == "logit_pi":
        return torch.full_like(a, -torch.inf) if b is None else b
    if what == "pi":
        return torch.zeros_like(a) if b is None else torch.sigmoid(b)
    if what == "mean":
        return zinb_mean(a, b)
    if what == "variance":
        return torch.exp(zinb_log_variance(a, b, zeta))
    if what == "loglik":
        return entry_loglik(y, a, b, zeta)
    if what == "deviance":
        return deviance_residuals(y, a, b, zeta)
    if what == "pearson":
        return pearson_residuals(y, a, b, zeta)
    if what == "weights":
        return observational_weights(y, a, b, zeta)
    if what == "impute_zeros":
        return impute_zeros(y, a, b, zeta)
    raise ValueError(f"unknown output {what!r}; choose one of {', '.join(OUTPUTS)}")


def _dense_counts(counts, start: int, stop: int, dtype, device) -> Tensor:
    rows = counts[start:stop]
    arr = rows.toarray() if sp.issparse(rows) else np.asarray(rows)
    return torch.as_tensor(np.asarray(arr, dtype=np.float64), dtype=dtype, device=device)


def _prepare(
    design: Design, params: Params, ignore_W: bool, device, dtype
) -> tuple[Design, Params]:
    dev = torch.device(device) if device is not None else params.beta_mu.device
    design = design.to(dev, dtype)
    params = params.to(dev, dtype)
    if ignore_W:
        params = dataclasses.replace(params, W=torch.zeros_like(params.W))
    return design, params


def iter_output_blocks(
    what: str,
    design: Design,
    params: Params,
    counts=None,
    *,
    zero_inflation: bool = True,
    ignore_W: bool = False,
    block_entries: int = DEFAULT_BLOCK_ENTRIES,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype = torch.float64,
) -> Iterator[tuple[int, int, Tensor]]:
    """Yield ``(start, stop, values)`` for consecutive blocks of cells.

    Parameters
    ----------
    what
        The output (see :func:`block_output`).
    design, params
        Cell/gene designs and all fitted parameters (cells in ``params`` match the design).
    counts
        Cells x genes counts (scipy.sparse or array) aligned with the design, for
        :data:`COUNT_OUTPUTS`.
    zero_inflation
        ``False``: plain NB model (``pi = 0``).
    ignore_W
        Set ``W`` to 0 (zinbwave's ``ignoreW``, used for the normalized values).
    block_entries
        About this many entries per block (bounds the working memory).
    device, dtype
        Where and in which precision to compute (float64 on CPU by default).
    """
    if what not in OUTPUTS:
        raise ValueError(f"unknown output {what!r}; choose one of {', '.join(OUTPUTS)}")
    if what in COUNT_OUTPUTS and counts is None:
        raise ValueError(f"output {what!r} needs the counts")
    design, params = _prepare(design, params, ignore_W, device, dtype)
    n, J = design.n, design.J
    if counts is not None and tuple(counts.shape) != (n, J):
        raise ValueError(f"counts have shape {tuple(counts.shape)}; the model has {(n, J)}")
    step = _block_rows(J, block_entries)
    dev = params.beta_mu.device
    with torch.no_grad():
        for start in range(0, n, step):
            stop = min(start + step, n)
            a, b = linear_predictors(design, params, slice(start, stop), zero_inflation)
            y = None
            if what in COUNT_OUTPUTS:
                y = _dense_counts(counts, start, stop, dtype, dev)
            zeta = block_zeta(design, params.zeta, slice(start, stop))  # per batch: expanded
            yield start, stop, block_output(what, a, b, zeta, y)


def compute_output(
    what: str,
    design: Design,
    params: Params,
    counts=None,
    *,
    out: np.ndarray | None = None,
    out_dtype: Any = np.float64,
    **blocks,
) -> np.ndarray:
    """The full (cells x genes) output as a NumPy array, computed block by block.

    ``out`` may be a preallocated array or ``numpy.memmap`` of shape (cells, genes); otherwise
    one of dtype ``out_dtype`` is allocated. The other parameters, and the keywords
    ``blocks`` (``zero_inflation``, ``ignore_W``, ``block_entries``, ``device``, ``dtype``),
    are those of :func:`iter_output_blocks`.
    """
    n, J = design.n, design.J
    if out is None:
        out = np.empty((n, J), dtype=out_dtype)
    elif out.shape != (n, J):
        raise ValueError(f"out has shape {out.shape}; expected {(n, J)}")
    for start, stop, block in iter_output_blocks(what, design, params, counts, **blocks):
        out[start:stop] = block.cpu().numpy()
    return out


# ============================================================================ batches
def batch_columns(X_columns: Sequence[str], batch_info: dict) -> dict[str, int | None]:
    """Map each batch level to its indicator column of X (``None`` for the reference level).

    ``batch_info`` is the estimator's ``batch_info_`` (keys ``batch_key``, ``levels``,
    ``reference``); the columns are named ``f"{batch_key}[{level}]"``.
    """
    if not batch_info or "levels" not in batch_info:
        raise ValueError(
            "the model has no batch columns in X: fit it with batch_key=... to batch-correct"
        )
    key, ref = batch_info["batch_key"], str(batch_info["reference"])
    cols = list(X_columns)
    out: dict[str, int | None] = {}
    for lv in batch_info["levels"]:
        lv = str(lv)
        if lv == ref:
            out[lv] = None
            continue
        name = f"{key}[{lv}]"
        if name not in cols:
            raise ValueError(f"batch column {name!r} not found among X's columns {cols}")
        out[lv] = cols.index(name)
    return out


def batch_design(
    X: np.ndarray, X_columns: Sequence[str], batch_info: dict, level: str
) -> np.ndarray:
    """A copy of X in which every cell belongs to batch ``level`` (its indicator set)."""
    cols = batch_columns(X_columns, batch_info)
    level = str(level)
    if level not in cols:
        raise ValueError(f"unknown batch {level!r}; the model's batches are {list(cols)}")
    Xn = np.array(X, dtype=np.float64, copy=True)
    for idx in cols.values():
        if idx is not None:
            Xn[:, idx] = 0.0
    if cols[level] is not None:
        Xn[:, cols[level]] = 1.0
    return Xn


# ============================================================================ fitted models
def _model_tensors(model, X: np.ndarray | None, device, dtype) -> tuple[Design, Params]:
    """Design (X replaced by ``X`` if given) and parameters of a fitted model's training cells,
    through the model's public accessors (``training_design``, ``get_params_torch``)."""
    dev = torch.device(device)
    design = model.training_design(dev, dtype, X=X)
    return design, model.get_params_torch(dev, dtype)


def model_output(
    model,
    what: str,
    counts=None,
    *,
    ignore_W: bool = False,
    X: np.ndarray | None = None,
    block_entries: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    out: np.ndarray | None = None,
    out_dtype: Any = np.float64,
) -> np.ndarray:
    """An output of a fitted :class:`~zinbgrad.ZINBWaVE` for its training cells.

    Parameters
    ----------
    model
        The fitted estimator.
    what
        See :func:`block_output`.
    counts
        The training counts (cells x genes, in the model's gene order) for
        :data:`COUNT_OUTPUTS`.
    ignore_W
        Drop the latent factors (zinbwave's ``ignoreW``).
    X
        Replacement cell design (same shape as ``model.X_``), e.g. from :func:`batch_design`.
    block_entries, device, dtype, out, out_dtype
        See :func:`compute_output` (``block_entries`` defaults to the model's).
    """
    design, params = _model_tensors(model, X, device, dtype)
    be = block_entries or getattr(model, "block_entries", None) or DEFAULT_BLOCK_ENTRIES
    return compute_output(
        what,
        design,
        params,
        counts,
        zero_inflation=bool(model.zero_inflation),
        ignore_W=ignore_W,
        block_entries=be,
        device=device,
        dtype=dtype,
        out=out,
        out_dtype=out_dtype,
    )


_BATCH_KINDS = ("mu", "mean", "log_mu")


def batch_corrected(
    model,
    reference: str | None = None,
    *,
    kind: str = "mu",
    ignore_W: bool = False,
    block_entries: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    out_dtype: Any = np.float64,
) -> np.ndarray:
    """Fitted expression of every training cell as if it came from one batch.

    Parameters
    ----------
    model
        A :class:`~zinbgrad.ZINBWaVE` fitted with ``batch_key``.
    reference
        A batch level: every cell is moved to that batch (default: the model's reference
        batch, the first level). ``"average"``: the mean of the fitted values over all batches
        (each batch weighted equally), as scVI's ``transform_batch`` with a list of batches.
    kind
        ``"mu"`` (NB mean), ``"mean"`` (``(1 - pi) mu``; the batch columns are replaced in the
        zero-inflation model too) or ``"log_mu"`` (for ``"average"``: the log of the averaged
        ``mu``).
    ignore_W
        Drop the latent factors as well.

    Notes
    -----
    zinbwave's normalized values (:func:`model_output` with ``"deviance"`` and
    ``ignore_W=True``) are residuals against a model that contains the batch columns, so they
    are already free of the fitted batch effect; they are not recomputed here.
    """
    if kind not in _BATCH_KINDS:
        raise ValueError(f"kind must be one of {_BATCH_KINDS}, got {kind!r}")
    levels = list(batch_columns(model.X_columns_, model.batch_info_))
    if reference is None:
        reference = str(model.batch_info_["reference"])
    kw = {
        "ignore_W": ignore_W,
        "block_entries": block_entries,
        "device": device,
        "dtype": dtype,
    }
    if reference != "average":
        X = batch_design(model.X_, model.X_columns_, model.batch_info_, reference)
        return model_output(model, kind, X=X, out_dtype=out_dtype, **kw)
    # average over batches, block by block (log-mean-exp of log mu: no overflow)
    designs = []
    for lv in levels:
        X = batch_design(model.X_, model.X_columns_, model.batch_info_, lv)
        designs.append(_model_tensors(model, X, device, dtype)[0])
    params = model.get_params_torch(torch.device(device), dtype)
    if ignore_W:
        params = dataclasses.replace(params, W=torch.zeros_like(params.W))
    zi = bool(model.zero_inflation)
    n, J = model.X_.shape[0], len(model.zeta_)
    out = np.empty((n, J), dtype=out_dtype)
    be = block_entries or getattr(model, "block_entries", None) or DEFAULT_BLOCK_ENTRIES
    step = _block_rows(J, be)
    log_L = float(np.log(len(levels)))
    with torch.no_grad():
        for start in range(0, n, step):
            rows = slice(start, min(start + step, n))
            logs = []
            for d in designs:
                a, b = linear_predictors(d, params, rows, zi)
                logs.append(a if (kind != "mean" or b is None) else a - softplus(b))
            lm = torch.logsumexp(torch.stack(logs), dim=0) - log_L
            out[rows] = (lm if kind == "log_mu" else torch.exp(lm)).cpu().numpy()
    return out


def degenerate_genes(model, X: np.ndarray | None = None, device="cpu") -> np.ndarray:
    """Indices of the genes with a degenerate entry (log mu > :data:`DEGENERATE_LOG_MU`) among
    the training cells (one pass over blocks of cells)."""
    design, params = _model_tensors(model, X, device, torch.float64)
    J = len(model.zeta_)
    worst = np.full(J, -np.inf)
    blocks = iter_output_blocks(
        "log_mu", design, params, None, zero_inflation=bool(model.zero_inflation)
    )
    for _, _, values in blocks:
        worst = np.maximum(worst, values.numpy().max(0))
    return np.flatnonzero(worst > DEGENERATE_LOG_MU)


def warn_degenerate(model, what: str, X: np.ndarray | None = None) -> np.ndarray:
    """One warning naming the degenerate genes of ``model`` (if any) and what ``what`` does
    with them; returns their indices."""
    idx = degenerate_genes(model, X)
    if idx.size:
        import warnings

        names = np.asarray(model.var_names_).astype(str)[idx]
        shown = ", ".join(names[:10]) + (", ..." if idx.size > 10 else "")
        warnings.warn(
            f"{idx.size} genes have a fitted NB mean beyond 2^30 where their zero inflation "
            f"is ~1, which the data cannot identify ({shown}); {what}",
            stacklevel=3,
        )
    return idx
