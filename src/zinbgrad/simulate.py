"""Simulate counts from a fitted ZINB-WaVE model.

* :func:`zinb_sim`: zinbwave's ``zinbSim`` - one count matrix for the model's own cells (or
  cells resampled from them): negative binomial draws, then Bernoulli(pi) dropout masks, counts =
  NB draw where no dropout. Returned as an AnnData with the NB draws and the dropout masks.
* :func:`make_synthetic`: realistic synthetic datasets of any size (1M+ cells) for scaling
  benchmarks: new cells drawn from the fit's latent distribution (resampled fitted cells with
  jitter, or a Gaussian mixture fitted to them), planted batch effects and planted differential
  expression with their ground truth, streamed to an ``.h5ad`` file chunk by chunk (sparse CSR
  written incrementally in anndata's on-disk layout, atomically: temporary file + rename).

Random numbers come from NumPy generators seeded per *unit* of cells
(``numpy.random.default_rng([seed, stream, unit])``); the unit size depends only on the number of
genes, so a result depends on ``random_state`` only - not on ``chunk_cells`` or the block size.

Sampling details: the NB draw is the gamma-Poisson mixture ``Poisson(mu G / theta)``,
``G ~ Gamma(theta, 1)``; where ``mu / theta < 1e-8`` the gamma factor is skipped (the NB is then
a Poisson to within a relative variance of 1e-8: the common-dispersion fits of zinbwave run
theta to ~1e20). Poisson means above 1e15 use the normal approximation (NumPy's Poisson sampler
stops at ~9e18).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .data.writer import CSRAppender
from .io_utils import atomic_write
from .model.params import linear_predictors

__all__ = ["zinb_sim", "make_synthetic", "sample_zinb"]

_GAMMA_SKIP_LOG_RATIO = float(np.log(1e-8))
_POISSON_NORMAL_ABOVE = 1e15
_UNIT_ENTRIES = 2**20
_STREAM_GLOBAL, _STREAM_CELLS = 0, 1


def _unit_rows(J: int) -> int:
    """Cells per random-number unit (depends on the number of genes only)."""
    return max(1, min(4096, _UNIT_ENTRIES // max(int(J), 1)))


def _seed(random_state: int | None) -> int:
    if random_state is None:
        return int(np.random.SeedSequence().entropy % (2**63))
    if isinstance(random_state, np.integer | int) and random_state >= 0:
        return int(random_state)
    raise ValueError(
        "random_state (--seed on the command line) must be a non-negative integer or None, "
        f"got {random_state!r}"
    )


def _whole(v, name: str, minimum: int = 1) -> int:
    """``v`` as an integer of at least ``minimum``; a fractional value is an error, not
    truncated."""
    ok = isinstance(v, numbers.Integral) and not isinstance(v, bool)
    if not ok and isinstance(v, numbers.Real) and np.isfinite(v) and float(v).is_integer():
        ok = True
    if not ok or int(v) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _poisson(rng: np.random.Generator, lam: np.ndarray) -> np.ndarray:
    if not np.isfinite(lam).all():
        raise ValueError(
            "the model has infinite means (log mu > 709); cannot sample counts from it"
        )
    big = lam > _POISSON_NORMAL_ABOVE
    if not big.any():
        return rng.poisson(lam)
    small_lam = np.where(big, 0.0, lam)
    out = rng.poisson(small_lam)
    approx = np.rint(lam[big] + np.sqrt(lam[big]) * rng.standard_normal(int(big.sum())))
    # means beyond int64 (degenerate genes whose counts are nearly always dropped out) are
    # capped instead of wrapping around to negative counts
    out[big] = np.clip(approx, 0, 2.0**62).astype(np.int64)
    return out


def sample_zinb(
    rng: np.random.Generator, a: np.ndarray, b: np.ndarray | None, zeta: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``(nb, dropout)`` for a block: NB(mu = e^a, theta = e^zeta) draws and Bernoulli(pi).

    Parameters
    ----------
    rng
        The generator.
    a, b
        ``log mu`` and ``logit pi`` (``None``: no zero inflation), shape (cells, genes).
    zeta
        ``log theta`` per gene.

    Returns
    -------
    nb, dropout
        int64 NB draws and a boolean dropout mask (True: the count is replaced by a zero); the
        ZINB counts are ``np.where(dropout, 0, nb)``. Degenerate entries (log mu >
        :data:`zinbgrad.model.outputs.DEGENERATE_LOG_MU`, where pi ~ 1) are not drawn where
        they drop out (``nb`` 0) and drawn from the capped mean 2^30 where they do not.
    """
    from .model.outputs import DEGENERATE_LOG_MU

    zeta = np.broadcast_to(np.asarray(zeta, dtype=np.float64), a.shape)
    # degenerate entries (log mu beyond any count, pi ~ 1): the NB value is drawn only if
    # the entry does not drop out (below), from the capped mean
    deg = (a > DEGENERATE_LOG_MU) if b is not None else np.zeros(a.shape, dtype=bool)
    with np.errstate(over="ignore"):
        mu = np.exp(np.where(deg, -np.inf, a))
    lam = mu.copy()
    mix = ((a - zeta) > _GAMMA_SKIP_LOG_RATIO) & ~deg
    if mix.any():
        th = np.exp(zeta[mix])
        lam[mix] = rng.gamma(th, mu[mix] / th)
    nb = _poisson(rng, lam)
    if b is None:
        return nb, np.zeros(a.shape, dtype=bool)
    with np.errstate(over="ignore"):
        pi = 1.0 / (1.0 + np.exp(-b))
    drop = rng.random(a.shape) < pi
    kept = deg & ~drop
    if kept.any():
        nb[kept] = rng.poisson(np.exp(DEGENERATE_LOG_MU), int(kept.sum()))
    return nb, drop


def _as_count_dtype(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if x.size and x.max() > np.iinfo(dtype).max:
        raise OverflowError(
            f"a simulated count ({x.max()}) does not fit in {dtype}; pass count_dtype='int64'"
            " (--count-dtype int64 on the command line)"
        )
    return x.astype(dtype, copy=False)


def _batch_labels(model, X: np.ndarray) -> tuple[str, np.ndarray] | None:
    """The batch of each row of a design, from the model's batch indicator columns."""
    info = getattr(model, "batch_info_", None)
    if not info or "levels" not in info:
        return None
    from .model.outputs import batch_columns

    cols = batch_columns(model.X_columns_, info)
    labels = np.full(X.shape[0], str(info["reference"]), dtype=object)
    for lv, idx in cols.items():
        if idx is not None:
            labels[X[:, idx] == 1] = lv
    levels = [str(lv) for lv in info["levels"]]
    return str(info["batch_key"]), pd.Categorical(labels, categories=levels)


class _Generator:
    """Linear predictors of arbitrary cells of a fitted model, on CPU in float64."""

    def __init__(self, model) -> None:
        model._check_fitted()
        self.model = model
        self.dev, self.dt = torch.device("cpu"), torch.float64
        self.params = model.get_params_torch(self.dev, self.dt)
        self.zi = bool(model.zero_inflation)
        self.zeta = np.asarray(model.zeta_, dtype=np.float64)

    def predictors(
        self, X: np.ndarray, W: np.ndarray, gmu: np.ndarray, gpi: np.ndarray, O_mu=None, O_pi=None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        m = self.model
        design = m._make_design(X, m.V_, O_mu, O_pi, self.dev, self.dt)

        def t(x):
            return torch.as_tensor(np.ascontiguousarray(x), dtype=self.dt, device=self.dev)

        p = dataclasses.replace(self.params, W=t(W), gamma_mu=t(gmu), gamma_pi=t(gpi))
        with torch.no_grad():
            a, b = linear_predictors(design, p, slice(None), self.zi)
        return a.numpy(), (None if b is None else b.numpy())


def _rows(O: np.ndarray | None, idx) -> np.ndarray | None:
    return None if O is None else O[idx]


def _mean_rows(O: np.ndarray | None, u: int) -> np.ndarray | None:
    return None if O is None else np.broadcast_to(O.mean(0), (u,) + O.shape[1:])


def zinb_sim(
    model,
    n_cells: int | None = None,
    *,
    ignore_W: bool = False,
    random_state: int | None = 0,
    count_dtype: str = "int32",
):
    """zinbwave's ``zinbSim``: simulate a count matrix from a fitted model.

    Parameters
    ----------
    model
        A fitted :class:`~zinbgrad.ZINBWaVE`.
    n_cells
        ``None``: one draw for each training cell (zinbwave's behaviour). Otherwise this many
        cells drawn with replacement from the training cells (``obs["source_cell"]``), in the
        training cells' order (shuffle the result for a random subset of it).
    ignore_W
        Simulate with the latent factors set to 0.
    random_state
        Seed (non-negative integer; ``None`` for a fresh one).
    count_dtype
        Integer type of the counts.

    Returns
    -------
    anndata.AnnData
        ``X``: CSR counts (cells x genes); ``layers["nb_counts"]``: the NB draws before dropout
        (zinbwave's ``dataNB``); ``layers["dropouts"]``: the dropout mask (int8, 1 = dropout,
        ``dataDropouts``); ``obsm["W"]``: the latent factors used; ``uns["zinb_sim"]``: the
        zero fraction (``zeroFraction``) and the seed. Cells x genes, unlike zinbwave.
    """
    import anndata as ad

    gen = _Generator(model)
    seed = _seed(random_state)
    n_train, J = model.W_.shape[0], len(model.zeta_)
    if model.zero_inflation:
        from .model.outputs import warn_degenerate

        warn_degenerate(
            model,
            "their NB values are not drawn where they drop out, and drawn from a mean capped "
            "at 2^30 where they do not",
        )
    dtype = np.dtype(count_dtype)
    if n_cells is None:
        idx = np.arange(n_train)
        obs = pd.DataFrame(index=pd.Index(np.asarray(model.obs_names_).astype(str)))
    else:
        n_cells = _whole(n_cells, "n_cells")
        pick = np.random.default_rng([seed, _STREAM_GLOBAL])
        idx = np.sort(pick.integers(n_train, size=n_cells))
        obs = pd.DataFrame(index=pd.Index([f"sim{i}" for i in range(n_cells)]))
        obs["source_cell"] = np.asarray(model.obs_names_).astype(str)[idx]
    W = np.zeros_like(model.W_[idx]) if ignore_W else model.W_[idx]
    n = len(idx)
    step = _unit_rows(J)
    parts: dict[str, list] = {"X": [], "nb": [], "drop": []}
    n_zero = 0
    for unit, start in enumerate(range(0, n, step)):
        rows = idx[start : start + step]
        sel = slice(start, start + len(rows))
        a, b = gen.predictors(
            model.X_[rows],
            W[sel],
            model.gamma_mu_[:, rows],
            model.gamma_pi_[:, rows],
            _rows(model.O_mu_, rows),
            _rows(model.O_pi_, rows),
        )
        rng = np.random.default_rng([seed, _STREAM_CELLS, unit])
        nb, drop = sample_zinb(rng, a, b, gen.zeta)
        counts = np.where(drop, 0, nb)
        n_zero += int((counts == 0).sum())
        parts["X"].append(sp.csr_matrix(_as_count_dtype(counts, dtype)))
        parts["nb"].append(sp.csr_matrix(_as_count_dtype(nb, dtype)))
        parts["drop"].append(sp.csr_matrix(drop.astype(np.int8)))
    labels = _batch_labels(model, model.X_[idx])
    if labels is not None:
        obs[labels[0]] = labels[1]
    obs["total_counts"] = np.asarray(sp.vstack(parts["X"]).sum(1)).ravel()
    adata = ad.AnnData(
        X=sp.vstack(parts["X"], format="csr"),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(np.asarray(model.var_names_).astype(str))),
        layers={
            "nb_counts": sp.vstack(parts["nb"], format="csr"),
            "dropouts": sp.vstack(parts["drop"], format="csr"),
        },
        obsm={"W": np.asarray(W, dtype=np.float64)},
        uns={
            "zinb_sim": {
                "zero_fraction": n_zero / float(n * J),
                "random_state": seed,
                "ignore_W": bool(ignore_W),
            }
        },
    )
    return adata


# ============================================================================ make_synthetic
def _write_elem(group, key: str, value) -> None:
    from .data.source import elem_io

    elem_io()[1](group, key, value)


def _latent_matrix(model) -> np.ndarray:
    parts = [model.W_, model.gamma_mu_.T, model.gamma_pi_.T]
    return np.concatenate([np.asarray(p, dtype=np.float64) for p in parts], axis=1)


def _reference_design(model) -> np.ndarray:
    """The training X with every batch indicator set to 0 (the reference batch)."""
    X = np.array(model.X_, dtype=np.float64, copy=True)
    info = getattr(model, "batch_info_", None)
    if info and "levels" in info:
        from .model.outputs import batch_columns

        for idx in batch_columns(model.X_columns_, info).values():
            if idx is not None:
                X[:, idx] = 0.0
    return X


class _Latent:
    """Draws of (W, gamma_mu, gamma_pi, X row, offsets) for new cells."""

    def __init__(
        self, model, method: str, jitter: float, n_mixture: int, rng: np.random.Generator
    ) -> None:
        self.model = model
        Z = _latent_matrix(model)
        self.K, self.Lmu = model.W_.shape[1], model.gamma_mu_.shape[0]
        self.center = Z.mean(0)
        sd = Z.std(0)
        self.scale = np.where(sd > 0, sd, 1.0)
        self.Z = Z
        self.Xref = _reference_design(model)
        self.method, self.jitter = method, float(jitter)
        if method == "gmm":
            from sklearn.mixture import GaussianMixture

            G = max(1, min(int(n_mixture), Z.shape[0] // 5))
            gm = GaussianMixture(
                n_components=G,
                covariance_type="full",
                reg_covar=1e-6,
                random_state=int(rng.integers(2**31 - 1)),
            ).fit((Z - self.center) / self.scale)
            self.weights = gm.weights_ / gm.weights_.sum()
            self.means = gm.means_
            self.chol = np.linalg.cholesky(gm.covariances_)
        elif method != "resample":
            raise ValueError(f"latent must be 'resample' or 'gmm', got {method!r}")

    def draw(self, rng: np.random.Generator, u: int) -> dict[str, Any]:
        m = self.model
        if self.method == "resample":
            src = rng.integers(self.Z.shape[0], size=u)
            noise = rng.standard_normal((u, self.Z.shape[1])) * (self.jitter * self.scale)
            Z = self.Z[src] + noise
            X = self.Xref[src]
            O_mu, O_pi = _rows(m.O_mu_, src), _rows(m.O_pi_, src)
            label = src
        else:
            comp = rng.choice(len(self.weights), size=u, p=self.weights)
            eps = rng.standard_normal((u, self.Z.shape[1]))
            zs = self.means[comp] + np.einsum("nij,nj->ni", self.chol[comp], eps)
            Z = zs * self.scale + self.center
            X = np.broadcast_to(self.Xref.mean(0), (u, self.Xref.shape[1]))
            O_mu, O_pi = _mean_rows(m.O_mu_, u), _mean_rows(m.O_pi_, u)
            label = comp
        K, L = self.K, self.Lmu
        return {
            "W": Z[:, :K],
            "gamma_mu": Z[:, K : K + L].T,
            "gamma_pi": Z[:, K + L :].T,
            "X": np.ascontiguousarray(X),
            "O_mu": None if O_mu is None else np.ascontiguousarray(O_mu),
            "O_pi": None if O_pi is None else np.ascontiguousarray(O_pi),
            "label": label,
        }


def _batch_shifts(batch_effect, n_batches: int, J: int, rng: np.random.Generator) -> np.ndarray:
    if np.ndim(batch_effect) == 0:
        sd = float(batch_effect)
        if not (np.isfinite(sd) and sd >= 0):
            raise ValueError(f"batch_effect must be a finite number >= 0, got {batch_effect!r}")
        shifts = rng.standard_normal((n_batches, J)) * sd
        shifts[0] = 0.0
        return shifts
    shifts = np.asarray(batch_effect, dtype=np.float64)
    if shifts.shape != (n_batches, J):
        raise ValueError(f"batch_effect array must have shape {(n_batches, J)}, got {shifts.shape}")
    if not np.isfinite(shifts).all():
        raise ValueError("batch_effect array has NaN or infinite values")
    return shifts


def _de_genes(
    de_genes, de_lfc: float, J: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The genes with planted differential expression, and their log2 fold changes (0 for
    the others, and for all of them with ``de_lfc=0``: a null control)."""
    frac = isinstance(de_genes, numbers.Real) and not isinstance(de_genes, numbers.Integral)
    if frac and 0 < de_genes < 1:
        n_de = int(round(float(de_genes) * J))
    else:
        try:
            n_de = _whole(de_genes, "de_genes", 0)
        except ValueError:
            n_de = -1
    if not 0 <= n_de <= J:
        raise ValueError(
            f"de_genes must be a whole number between 0 and {J}, or a fraction in (0, 1); "
            f"got {de_genes!r}"
        )
    if not np.isfinite(de_lfc):
        raise ValueError(f"de_lfc must be finite, got {de_lfc!r}")
    is_de = np.zeros(J, dtype=bool)
    lfc = np.zeros(J)
    if n_de:
        genes = rng.choice(J, size=n_de, replace=False)
        is_de[genes] = True
        lfc[genes] = float(de_lfc) * rng.choice([-1.0, 1.0], size=n_de)
    return is_de, lfc


def make_synthetic(
    model,
    n_cells: int,
    path: str | os.PathLike | None = None,
    *,
    n_batches: int = 2,
    batch_effect=0.5,
    de_genes: int | float = 0,
    de_lfc: float = 1.0,
    latent: str = "resample",
    jitter: float = 0.1,
    n_mixture: int = 8,
    chunk_cells: int = 50_000,
    count_dtype: str = "int32",
    compression: str | None = None,
    overwrite: bool = False,
    random_state: int | None = 0,
):
    """Generate a realistic synthetic dataset of any size from a fitted model.

    Each new cell gets latent factors and cell effects ``(W, gamma_mu, gamma_pi)`` drawn from the
    fit's latent distribution, the design row of the reference batch, a batch label with a
    planted per-gene batch effect on ``log mu`` and optionally a condition with planted
    differential expression; its counts are drawn from the ZINB as in :func:`zinb_sim`.

    Parameters
    ----------
    model
        A fitted :class:`~zinbgrad.ZINBWaVE`.
    n_cells
        Number of cells (any size: with ``path`` only one unit of cells is dense at a time).
    path
        ``.h5ad`` file to stream to (written to a temporary file in the same folder and renamed
        when complete). ``None``: build and return an in-memory AnnData.
    n_batches
        Number of synthetic batches (``obs["batch"]``, ``"batch0"`` is the reference).
    batch_effect
        Standard deviation of the per-gene log-scale batch shifts (0: none), or an explicit
        ``(n_batches, n_genes)`` array of shifts of ``log mu``. Stored in
        ``varm["true_batch_shift"]``.
    de_genes
        Number (or fraction, if a float < 1) of genes with planted differential expression
        between ``obs["condition"] == "B"`` and ``"A"`` (cells assigned at random).
    de_lfc
        Absolute planted log2 fold change (sign random per gene); ``var["true_log2fc"]``,
        ``var["is_de"]``.
    latent
        ``"resample"``: a random fitted cell plus Gaussian jitter (``jitter`` times each
        coordinate's standard deviation across cells; ``obs["source_cell"]``), or ``"gmm"``: a
        Gaussian mixture with up to ``n_mixture`` components fitted to the standardized latent
        coordinates (``obs["component"]``).
    jitter, n_mixture
        See ``latent``.
    chunk_cells
        Cells buffered (as CSR) between writes to the file.
    count_dtype
        Integer type of the counts (``"int32"``, as in the project's data, or ``"int64"``).
    compression
        h5py compression of ``X`` (e.g. ``"gzip"``; ``None`` is fastest).
    overwrite
        Replace an existing ``path``.
    random_state
        Seed: the same seed gives the same dataset, whatever ``chunk_cells``.

    Returns
    -------
    pathlib.Path or anndata.AnnData
        The written path, or the AnnData when ``path`` is ``None``. ``obsm["W_true"]`` holds
        the latent factors of the cells; ``obs["total_counts"]`` their library sizes;
        ``uns["synthetic"]`` the settings and the zero fraction.
    """
    import anndata as ad

    model._check_fitted()
    n_cells = _whole(n_cells, "n_cells")
    n_batches = _whole(n_batches, "n_batches")
    chunk_cells = _whole(chunk_cells, "chunk_cells")
    n_mixture = _whole(n_mixture, "n_mixture")
    if not (np.isfinite(jitter) and jitter >= 0):
        raise ValueError(f"jitter must be a finite number >= 0, got {jitter!r}")
    seed = _seed(random_state)
    dtype = np.dtype(count_dtype)
    J = len(model.zeta_)
    K = model.W_.shape[1]
    grng = np.random.default_rng([seed, _STREAM_GLOBAL])
    shifts = _batch_shifts(batch_effect, n_batches, J, grng)
    is_de, lfc = _de_genes(de_genes, de_lfc, J, grng)
    has_de = bool(is_de.any())
    # batches are recorded where there are several, or one with a planted shift
    has_batch = n_batches > 1 or bool(np.any(shifts))
    lat = _Latent(model, latent, jitter, n_mixture, grng)
    gen = _Generator(model)

    batch = np.zeros(n_cells, dtype=np.int32)
    cond = np.zeros(n_cells, dtype=np.int8)
    label = np.zeros(n_cells, dtype=np.int64)
    total = np.zeros(n_cells, dtype=np.int64)
    W_true = np.zeros((n_cells, K), dtype=np.float32)
    n_zero = 0

    writer = None
    h5 = None
    blocks: list[sp.csr_matrix] = []
    # the temporary file is renamed onto ``path`` after h5 is closed (the stack unwinds in
    # reverse), or removed on any exception
    with ExitStack() as stack:
        if path is not None:
            import h5py

            path = Path(path)
            tmp = stack.enter_context(atomic_write(path, overwrite=overwrite))
            h5 = stack.enter_context(h5py.File(tmp, "w"))
            h5.attrs["encoding-type"] = "anndata"
            h5.attrs["encoding-version"] = "0.1.0"
            writer = CSRAppender(h5.create_group("X"), (n_cells, J), dtype, compression)
        step = _unit_rows(J)
        pending: list[sp.csr_matrix] = []
        pending_rows = 0
        for unit, start in enumerate(range(0, n_cells, step)):
            u = min(step, n_cells - start)
            sel = slice(start, start + u)
            rng = np.random.default_rng([seed, _STREAM_CELLS, unit])
            d = lat.draw(rng, u)
            bt = rng.integers(n_batches, size=u) if n_batches > 1 else np.zeros(u, np.int64)
            cd = rng.integers(2, size=u) if has_de else np.zeros(u, np.int64)
            a, b = gen.predictors(
                d["X"], d["W"], d["gamma_mu"], d["gamma_pi"], d["O_mu"], d["O_pi"]
            )
            a = a + shifts[bt]
            if has_de:
                a = a + np.log(2.0) * lfc[None, :] * cd[:, None]
            nb, drop = sample_zinb(rng, a, b, gen.zeta)
            counts = np.where(drop, 0, nb)
            n_zero += int((counts == 0).sum())
            m = sp.csr_matrix(_as_count_dtype(counts, dtype))
            batch[sel], cond[sel], label[sel] = bt, cd, d["label"]
            total[sel] = counts.sum(1)
            W_true[sel] = d["W"]
            if writer is None:
                blocks.append(m)
                continue
            pending.append(m)
            pending_rows += u
            if pending_rows >= chunk_cells:
                writer.append(sp.vstack(pending, format="csr"))
                pending, pending_rows = [], 0
        if writer is not None and pending:
            writer.append(sp.vstack(pending, format="csr"))

        obs = pd.DataFrame(index=pd.Index([f"cell{i}" for i in range(n_cells)]))
        if has_batch:
            obs["batch"] = pd.Categorical.from_codes(
                batch, categories=[f"batch{k}" for k in range(n_batches)]
            )
        if has_de:
            obs["condition"] = pd.Categorical.from_codes(cond, categories=["A", "B"])
        if latent == "resample":
            obs["source_cell"] = np.asarray(model.obs_names_).astype(str)[label]
        else:
            obs["component"] = label
        obs["total_counts"] = total
        var = pd.DataFrame(index=pd.Index(np.asarray(model.var_names_).astype(str)))
        var["true_zeta"] = np.asarray(model.zeta_, dtype=np.float64)
        if has_de:
            var["is_de"] = is_de
            var["true_log2fc"] = lfc
        varm = {"true_batch_shift": shifts.T.copy()} if has_batch else {}
        settings = {
            "n_cells": n_cells,
            "n_batches": n_batches,
            "batch_effect": (
                float(batch_effect) if np.ndim(batch_effect) == 0 else "explicit array"
            ),
            "de_genes": int(is_de.sum()),
            "de_lfc": float(de_lfc),
            "latent": latent,
            "jitter": float(jitter),
            "random_state": seed,
            "zero_fraction": n_zero / float(n_cells * J),
            "model_params": json.dumps(
                {k: v for k, v in model.get_params().items() if np.isscalar(v) or v is None}
            ),
        }
        uns = {"synthetic": settings}
        obsm = {"W_true": W_true}
        if writer is None:
            return ad.AnnData(
                X=sp.vstack(blocks, format="csr"), obs=obs, var=var, obsm=obsm, varm=varm, uns=uns
            )
        writer.finish()
        _write_elem(h5, "obs", obs)
        _write_elem(h5, "var", var)
        _write_elem(h5, "obsm", obsm)
        _write_elem(h5, "varm", varm)
        _write_elem(h5, "uns", uns)
        for key in ("layers", "obsp", "varp"):
            _write_elem(h5, key, {})
    return path
