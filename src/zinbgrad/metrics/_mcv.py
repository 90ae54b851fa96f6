"""Molecular cross-validation (Batson, Royer & Webber 2019) of denoised counts."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._checks import ArrayLike

__all__ = ["mcv_loss", "mcv_zinbwave", "molecular_split"]


def molecular_split(
    X: ArrayLike, train_frac: float = 0.9, random_state: int | None = 0
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Split every count binomially into a training and a test part (molecular
    cross-validation, Batson, Royer & Webber 2019; the Open Problems denoising split).

    ``train = Binomial(x, train_frac)``, ``test = x - train``: each molecule goes to one part
    independently, so for Poisson counts the two parts are independent given the mean, with
    means ``train_frac * mu`` and ``(1 - train_frac) * mu``.

    Parameters
    ----------
    X
        Cells x genes non-negative integer counts (dense or sparse; not modified).
    train_frac
        Expected fraction of the molecules in the training part, in (0, 1).
    random_state
        Seed (``numpy.random.default_rng``).

    Returns
    -------
    (train, test)
        Two CSR integer matrices of the shape of ``X`` that add up to ``X``.
    """
    if not 0.0 < float(train_frac) < 1.0:
        raise ValueError(f"train_frac must be in (0, 1), got {train_frac}")
    M = sp.csr_matrix(X, copy=True)
    M.sum_duplicates()
    data = np.asarray(M.data)
    if data.size and (
        not np.all(np.isfinite(data)) or np.any(data < 0) or np.any(data != np.round(data))
    ):
        raise ValueError("molecular cross-validation needs non-negative integer counts")
    rng = np.random.default_rng(random_state)
    counts = data.astype(np.int64)
    tr = rng.binomial(counts, float(train_frac))
    train = sp.csr_matrix((tr, M.indices.copy(), M.indptr.copy()), shape=M.shape)
    test = sp.csr_matrix((counts - tr, M.indices.copy(), M.indptr.copy()), shape=M.shape)
    train.eliminate_zeros()
    test.eliminate_zeros()
    return train, test


def _dense(X: ArrayLike) -> np.ndarray:
    if hasattr(X, "detach"):
        X = X.detach().cpu().numpy()
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)


def mcv_loss(
    train: ArrayLike,
    test: ArrayLike,
    denoised: ArrayLike,
    *,
    eps: float = 1e-6,
    per_cell: bool = False,
) -> dict[str, Any]:
    """Score a denoised matrix fitted on ``train`` against the held-out ``test`` counts.

    The two losses of the Open Problems denoising task:

    * ``poisson``: ``mean(d - y log(d + eps))`` over all entries, with ``d`` the denoised
      values rescaled from the training to the test depth (``d = denoised * sum(test) /
      sum(train)``, i.e. by ``(1 - train_frac) / train_frac``) and ``y`` the test counts;
    * ``mse``: mean squared error between ``log1p`` of the test counts and of the denoised
      values, each cell scaled to the median test library size (the ``normalize_total`` +
      ``log1p`` of scanpy; CP10k-like).

    Parameters
    ----------
    train, test
        The two parts from :func:`molecular_split` (cells x genes).
    denoised
        The denoised (expected) counts of the cells at the depth of ``train``, e.g. a model's
        mean fitted to ``train``.
    eps
        Added inside the logarithm of the Poisson loss.
    per_cell
        Also return ``"poisson_per_cell"``: each cell's mean Poisson loss over the genes (for
        paired comparisons of denoisers on the same split).

    Returns
    -------
    dict
        ``{"poisson": ..., "mse": ...}`` (lower is better).
    """
    Y = _dense(test)
    D = _dense(denoised)
    if Y.shape != D.shape:
        raise ValueError(f"test and denoised differ in shape: {Y.shape} vs {D.shape}")
    if not np.all(np.isfinite(D)) or np.any(D < 0):
        raise ValueError("denoised values must be finite and non-negative")
    train_total = float(_dense(train).sum())
    if train_total <= 0:
        raise ValueError("the training counts are all zero")
    d = D * (Y.sum() / train_total)
    cell_loss = np.mean(d - Y * np.log(d + eps), axis=1)
    poisson = float(np.mean(cell_loss))
    target = float(np.median(Y.sum(1)))

    def norm(A: np.ndarray) -> np.ndarray:
        tot = A.sum(1, keepdims=True)
        return np.log1p(A * np.divide(target, tot, out=np.zeros_like(tot), where=tot > 0))

    mse = float(np.mean((norm(Y) - norm(D)) ** 2))
    out: dict[str, Any] = {"poisson": poisson, "mse": mse}
    if per_cell:
        out["poisson_per_cell"] = cell_loss
    return out


def mcv_zinbwave(
    adata: ad.AnnData,
    n_components: Sequence[int] = (2, 5, 10, 20),
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    train_frac: float = 0.9,
    random_state: int = 0,
    **kwargs: Any,
) -> pd.DataFrame:
    """Molecular cross-validation of ZINB-WaVE's denoised mean for several K.

    The counts are split binomially (:func:`molecular_split`); for each K a model is fitted to
    the training part and its expected counts ``E[Y] = (1 - pi) mu`` are scored against the
    test part (:func:`mcv_loss`). The ridge penalty shrinks superfluous factors, so the loss
    flattens past the right K rather than rising: the recommended K is the smallest whose
    Poisson loss is within one standard error (paired over cells) of the lowest.

    Parameters
    ----------
    adata
        Raw counts (never modified).
    n_components
        The values of K.
    layer, batch_key
        As in :func:`zinbgrad.tl.zinbwave`.
    train_frac
        Fraction of the molecules in the training part.
    random_state
        Seed of the split and of the fits (unless ``kwargs`` sets one).
    **kwargs
        Hyper-parameters of :class:`zinbgrad.ZINBWaVE`.

    Returns
    -------
    pandas.DataFrame
        ``n_components``, ``poisson``, ``poisson_se`` (standard error of the paired per-cell
        difference to the lowest), ``mse``, ``seconds``; ``attrs["recommended"]`` (the
        one-standard-error rule above), ``attrs["lowest"]`` (the K of the lowest Poisson loss)
        and ``attrs["lowest_mse"]`` (of the lowest MSE).
    """
    from ..estimator import ZINBWaVE

    X = adata.X if layer is None else adata.layers[layer]
    if X is None:
        raise ValueError("adata.X is empty; pass layer= with the raw counts")
    train, test = molecular_split(X, train_frac, random_state)
    keep = np.flatnonzero(np.asarray(train.sum(0)).ravel() > 0)  # fittable genes
    tr = ad.AnnData(train[:, keep], obs=adata.obs[[batch_key]] if batch_key else None)
    tr.var_names = np.asarray(adata.var_names)[keep]
    kwargs.setdefault("random_state", random_state)
    kwargs.setdefault("verbose", False)
    rows, cells = [], []
    for K in sorted({int(k) for k in n_components}):
        t0 = time.perf_counter()
        m = ZINBWaVE(K, **kwargs).fit(tr, batch_key=batch_key)
        denoised = np.zeros(X.shape)
        denoised[:, keep] = m.get_mu() * (1.0 - m.get_pi())
        scores = mcv_loss(train, test, denoised, per_cell=True)
        cells.append(scores.pop("poisson_per_cell"))
        rows.append({"n_components": K, **scores, "seconds": time.perf_counter() - t0})
    df = pd.DataFrame(rows)
    best = int(df["poisson"].idxmin())
    df.insert(
        2,
        "poisson_se",
        [float(np.std(c - cells[best], ddof=1) / np.sqrt(len(c))) for c in cells],
    )
    ok = df["poisson"] <= df["poisson"].iloc[best] + df["poisson_se"]
    df.attrs["recommended"] = int(df["n_components"][ok].min())
    df.attrs["lowest"] = int(df["n_components"].iloc[best])
    df.attrs["lowest_mse"] = int(df["n_components"].iloc[df["mse"].idxmin()])
    df.attrs["n_genes_fitted"] = int(len(keep))
    return df
