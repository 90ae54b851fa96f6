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
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ._synthetic import (
    LatentSampler,
    batch_shifts,
    offset_rows,
    planted_de_genes,
    whole_number,
)
from .data.writer import CSRAppender
from .encoding import make_design
from .fitted import check_fitted
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
        check_fitted(model)
        if getattr(model, "zeta_batch_", None) is not None:
            raise ValueError(
                "sampling from a model with batch_dispersion=True is not supported (its "
                "cells' dispersions differ by batch)"
            )
        self.model = model
        self.dev, self.dt = torch.device("cpu"), torch.float64
        self.params = model.get_params_torch(self.dev, self.dt)
        self.zi = bool(model.zero_inflation)
        self.zeta = np.asarray(model.zeta_, dtype=np.float64)

    def predictors(
        self, X: np.ndarray, W: np.ndarray, gmu: np.ndarray, gpi: np.ndarray, O_mu=None, O_pi=None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        m = self.model
        design = make_design(m, X, m.V_, O_mu, O_pi, self.dev, self.dt)

        def t(x):
            return torch.as_tensor(np.ascontiguousarray(x), dtype=self.dt, device=self.dev)

        p = dataclasses.replace(self.params, W=t(W), gamma_mu=t(gmu), gamma_pi=t(gpi))
        with torch.no_grad():
            a, b = linear_predictors(design, p, slice(None), self.zi)
        return a.numpy(), (None if b is None else b.numpy())


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
    J = len(model.zeta_)
    if model.zero_inflation:
        from .model.outputs import warn_degenerate

        warn_degenerate(
            model,
            "their NB values are not drawn where they drop out, and drawn from a mean capped "
            "at 2^30 where they do not",
        )
    dtype = np.dtype(count_dtype)
    idx, obs = _sim_cells(model, n_cells, seed)
    W = np.zeros_like(model.W_[idx]) if ignore_W else model.W_[idx]
    parts, n_zero = _sim_counts(model, gen, idx, W, seed, dtype)
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
                "zero_fraction": n_zero / float(len(idx) * J),
                "random_state": seed,
                "ignore_W": bool(ignore_W),
            }
        },
    )
    return adata


def _sim_cells(model, n_cells: int | None, seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    """The training cells simulated by :func:`zinb_sim` (sorted, with repeats when drawn) and
    the ``obs`` frame of the result."""
    names = np.asarray(model.obs_names_).astype(str)
    if n_cells is None:
        return np.arange(model.W_.shape[0]), pd.DataFrame(index=pd.Index(names))
    n_cells = whole_number(n_cells, "n_cells")
    pick = np.random.default_rng([seed, _STREAM_GLOBAL])
    idx = np.sort(pick.integers(model.W_.shape[0], size=n_cells))
    obs = pd.DataFrame(index=pd.Index([f"sim{i}" for i in range(n_cells)]))
    obs["source_cell"] = names[idx]
    return idx, obs


def _sim_counts(
    model, gen: _Generator, idx: np.ndarray, W: np.ndarray, seed: int, dtype: np.dtype
) -> tuple[dict[str, list], int]:
    """ZINB draws for the training cells ``idx`` (latent factors ``W``), one random unit at a
    time: CSR blocks of the counts, the NB draws and the dropouts, and the number of zeros."""
    step = _unit_rows(len(model.zeta_))
    parts: dict[str, list] = {"X": [], "nb": [], "drop": []}
    n_zero = 0
    for unit, start in enumerate(range(0, len(idx), step)):
        rows = idx[start : start + step]
        sel = slice(start, start + len(rows))
        a, b = gen.predictors(
            model.X_[rows],
            W[sel],
            model.gamma_mu_[:, rows],
            model.gamma_pi_[:, rows],
            offset_rows(model.O_mu_, rows),
            offset_rows(model.O_pi_, rows),
        )
        rng = np.random.default_rng([seed, _STREAM_CELLS, unit])
        nb, drop = sample_zinb(rng, a, b, gen.zeta)
        counts = np.where(drop, 0, nb)
        n_zero += int((counts == 0).sum())
        parts["X"].append(sp.csr_matrix(_as_count_dtype(counts, dtype)))
        parts["nb"].append(sp.csr_matrix(_as_count_dtype(nb, dtype)))
        parts["drop"].append(sp.csr_matrix(drop.astype(np.int8)))
    return parts, n_zero


# ============================================================================ make_synthetic
def _write_elem(group, key: str, value) -> None:
    from .data.source import elem_io

    elem_io()[1](group, key, value)


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
    check_fitted(model)
    n_cells, n_batches, chunk_cells, n_mixture = (
        whole_number(v, name)
        for v, name in (
            (n_cells, "n_cells"),
            (n_batches, "n_batches"),
            (chunk_cells, "chunk_cells"),
            (n_mixture, "n_mixture"),
        )
    )
    if not (np.isfinite(jitter) and jitter >= 0):
        raise ValueError(f"jitter must be a finite number >= 0, got {jitter!r}")
    seed = _seed(random_state)
    dtype = np.dtype(count_dtype)
    J = len(model.zeta_)
    grng = np.random.default_rng([seed, _STREAM_GLOBAL])
    truth = _Truth(
        shifts=batch_shifts(batch_effect, n_batches, J, grng),
        de=planted_de_genes(de_genes, de_lfc, J, grng),
        latent=LatentSampler(model, latent, jitter, n_mixture, grng),
    )
    gen = _Generator(model)
    cells = _CellRecord(n_cells, model.W_.shape[1])
    # the temporary file is renamed onto ``path`` after h5 is closed (the stack unwinds in
    # reverse), or removed on any exception
    with ExitStack() as stack:
        sink = _Sink(stack, path, overwrite, (n_cells, J), dtype, compression, chunk_cells)
        _draw_cells(seed, truth, gen, n_batches, dtype, cells, sink)
        obs, var, varm = _synthetic_frames(model, truth, cells, latent, n_batches)
        settings = {
            "n_cells": n_cells,
            "n_batches": n_batches,
            "batch_effect": (
                float(batch_effect) if np.ndim(batch_effect) == 0 else "explicit array"
            ),
            "de_genes": int(truth.de[0].sum()),
            "de_lfc": float(de_lfc),
            "latent": latent,
            "jitter": float(jitter),
            "random_state": seed,
            "zero_fraction": cells.n_zero / float(n_cells * J),
            "model_params": json.dumps(
                {k: v for k, v in model.get_params().items() if np.isscalar(v) or v is None}
            ),
        }
        return sink.finish(obs, var, {"W_true": cells.W_true}, varm, {"synthetic": settings})


@dataclasses.dataclass
class _Truth:
    """The draws shared by all cells of :func:`make_synthetic`: the batch shifts of ``log mu``,
    the planted DE genes and log2 fold changes, and the sampler of new cells' latent values."""

    shifts: np.ndarray
    de: tuple[np.ndarray, np.ndarray]
    latent: LatentSampler

    @property
    def has_de(self) -> bool:
        return bool(self.de[0].any())

    @property
    def has_batch(self) -> bool:
        """Batches are recorded where there are several, or one with a planted shift."""
        return self.shifts.shape[0] > 1 or bool(np.any(self.shifts))


def _synthetic_unit(
    rng: np.random.Generator, u: int, truth: _Truth, gen: _Generator, n_batches: int
) -> tuple[np.ndarray, dict[str, Any], np.ndarray, np.ndarray]:
    """One unit of ``u`` new cells, all its draws from ``rng`` in a fixed order: latent values,
    batches, conditions, then the counts. Returns the counts, the latent draw, the batch and
    condition codes."""
    d = truth.latent.draw(rng, u)
    bt = rng.integers(n_batches, size=u) if n_batches > 1 else np.zeros(u, np.int64)
    cd = rng.integers(2, size=u) if truth.has_de else np.zeros(u, np.int64)
    a, b = gen.predictors(d["X"], d["W"], d["gamma_mu"], d["gamma_pi"], d["O_mu"], d["O_pi"])
    a = a + truth.shifts[bt]
    if truth.has_de:
        a = a + np.log(2.0) * truth.de[1][None, :] * cd[:, None]
    nb, drop = sample_zinb(rng, a, b, gen.zeta)
    return np.where(drop, 0, nb), d, bt, cd


def _draw_cells(seed, truth, gen, n_batches, dtype, cells, sink) -> None:
    """Draw :func:`make_synthetic`'s cells one random unit at a time (each unit's generator is
    seeded by its index), recording them in ``cells`` and handing their counts to ``sink``."""
    n_cells = cells.batch.size
    step = _unit_rows(len(gen.zeta))
    for unit, start in enumerate(range(0, n_cells, step)):
        u = min(step, n_cells - start)
        rng = np.random.default_rng([seed, _STREAM_CELLS, unit])
        counts, d, bt, cd = _synthetic_unit(rng, u, truth, gen, n_batches)
        sink.add(sp.csr_matrix(_as_count_dtype(counts, dtype)), u)
        cells.record(slice(start, start + u), counts, d, bt, cd)


class _CellRecord:
    """Per-cell annotations of :func:`make_synthetic`, filled one unit of cells at a time."""

    def __init__(self, n_cells: int, K: int) -> None:
        self.batch = np.zeros(n_cells, dtype=np.int32)
        self.cond = np.zeros(n_cells, dtype=np.int8)
        self.label = np.zeros(n_cells, dtype=np.int64)
        self.total = np.zeros(n_cells, dtype=np.int64)
        self.W_true = np.zeros((n_cells, K), dtype=np.float32)
        self.n_zero = 0

    def record(self, sel: slice, counts: np.ndarray, d: dict, bt, cd) -> None:
        self.n_zero += int((counts == 0).sum())
        self.batch[sel], self.cond[sel], self.label[sel] = bt, cd, d["label"]
        self.total[sel] = counts.sum(1)
        self.W_true[sel] = d["W"]


class _Sink:
    """Where :func:`make_synthetic`'s count blocks go: kept in memory (``path=None``), or
    buffered up to ``chunk_cells`` cells and appended to ``X`` of an ``.h5ad`` file written
    atomically (a temporary file entered on ``stack``, renamed when the stack closes)."""

    def __init__(self, stack: ExitStack, path, overwrite, shape, dtype, compression, chunk_cells):
        self.blocks: list[sp.csr_matrix] = []
        self.pending: list[sp.csr_matrix] = []
        self.pending_rows, self.chunk_cells = 0, chunk_cells
        self.path, self.h5, self.writer = None, None, None
        if path is not None:
            import h5py

            self.path = Path(path)
            tmp = stack.enter_context(atomic_write(self.path, overwrite=overwrite))
            self.h5 = h5 = stack.enter_context(h5py.File(tmp, "w"))
            h5.attrs["encoding-type"] = "anndata"
            h5.attrs["encoding-version"] = "0.1.0"
            self.writer = CSRAppender(h5.create_group("X"), shape, dtype, compression)

    def add(self, m: sp.csr_matrix, u: int) -> None:
        if self.writer is None:
            self.blocks.append(m)
            return
        self.pending.append(m)
        self.pending_rows += u
        if self.pending_rows >= self.chunk_cells:
            self.writer.append(sp.vstack(self.pending, format="csr"))
            self.pending, self.pending_rows = [], 0

    def finish(self, obs, var, obsm, varm, uns):
        """The AnnData (in memory), or the path after writing the rest of the file."""
        if self.writer is None:
            import anndata as ad

            X = sp.vstack(self.blocks, format="csr")
            return ad.AnnData(X=X, obs=obs, var=var, obsm=obsm, varm=varm, uns=uns)
        if self.pending:
            self.writer.append(sp.vstack(self.pending, format="csr"))
        self.writer.finish()
        parts = {"obs": obs, "var": var, "obsm": obsm, "varm": varm, "uns": uns}
        for key, value in parts.items():
            _write_elem(self.h5, key, value)
        for key in ("layers", "obsp", "varp"):
            _write_elem(self.h5, key, {})
        return self.path


def _synthetic_frames(
    model, truth: _Truth, cells: _CellRecord, latent: str, n_batches: int
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, np.ndarray]]:
    """``obs``, ``var`` and ``varm`` of :func:`make_synthetic`'s result, with the truth."""
    n_cells = cells.batch.size
    obs = pd.DataFrame(index=pd.Index([f"cell{i}" for i in range(n_cells)]))
    if truth.has_batch:
        obs["batch"] = pd.Categorical.from_codes(
            cells.batch, categories=[f"batch{k}" for k in range(n_batches)]
        )
    if truth.has_de:
        obs["condition"] = pd.Categorical.from_codes(cells.cond, categories=["A", "B"])
    if latent == "resample":
        obs["source_cell"] = np.asarray(model.obs_names_).astype(str)[cells.label]
    else:
        obs["component"] = cells.label
    obs["total_counts"] = cells.total
    var = pd.DataFrame(index=pd.Index(np.asarray(model.var_names_).astype(str)))
    var["true_zeta"] = np.asarray(model.zeta_, dtype=np.float64)
    if truth.has_de:
        var["is_de"], var["true_log2fc"] = truth.de
    varm = {"true_batch_shift": truth.shifts.T.copy()} if truth.has_batch else {}
    return obs, var, varm
