"""The draws behind :func:`zinbgrad.simulate.make_synthetic` that do not touch the estimator:
new cells' latent coordinates (:class:`LatentSampler`), the planted batch shifts and the planted
differential expression, and the small argument helpers the simulators share."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

__all__ = [
    "LatentSampler",
    "batch_shifts",
    "latent_matrix",
    "mean_offset_rows",
    "offset_rows",
    "planted_de_genes",
    "reference_design",
    "whole_number",
]


def whole_number(v, name: str, minimum: int = 1) -> int:
    """``v`` as an integer of at least ``minimum``; a fractional value is an error, not
    truncated."""
    ok = isinstance(v, numbers.Integral) and not isinstance(v, bool)
    if not ok and isinstance(v, numbers.Real) and np.isfinite(v) and float(v).is_integer():
        ok = True
    if not ok or int(v) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def offset_rows(O: np.ndarray | None, idx) -> np.ndarray | None:
    """The rows ``idx`` of an offset matrix (``None`` stays ``None``)."""
    return None if O is None else O[idx]


def mean_offset_rows(O: np.ndarray | None, u: int) -> np.ndarray | None:
    """``u`` rows equal to the offset matrix's mean row (``None`` stays ``None``)."""
    return None if O is None else np.broadcast_to(O.mean(0), (u,) + O.shape[1:])


def latent_matrix(model) -> np.ndarray:
    """The fitted cells' ``[W, gamma_mu^T, gamma_pi^T]`` side by side, float64."""
    parts = [model.W_, model.gamma_mu_.T, model.gamma_pi_.T]
    return np.concatenate([np.asarray(p, dtype=np.float64) for p in parts], axis=1)


def reference_design(model) -> np.ndarray:
    """The training X with every batch indicator set to 0 (the reference batch)."""
    X = np.array(model.X_, dtype=np.float64, copy=True)
    info = getattr(model, "batch_info_", None)
    if info and "levels" in info:
        from .model.outputs import batch_columns

        for idx in batch_columns(model.X_columns_, info).values():
            if idx is not None:
                X[:, idx] = 0.0
    return X


class LatentSampler:
    """Draws of (W, gamma_mu, gamma_pi, X row, offsets) for new cells: resampled fitted cells
    with Gaussian jitter (``method="resample"``) or a Gaussian mixture fitted to the
    standardized latent coordinates (``"gmm"``, its seed drawn from ``rng``)."""

    def __init__(
        self, model, method: str, jitter: float, n_mixture: int, rng: np.random.Generator
    ) -> None:
        self.model = model
        Z = latent_matrix(model)
        self.K, self.Lmu = model.W_.shape[1], model.gamma_mu_.shape[0]
        self.center = Z.mean(0)
        sd = Z.std(0)
        self.scale = np.where(sd > 0, sd, 1.0)
        self.Z = Z
        self.Xref = reference_design(model)
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
            O_mu, O_pi = offset_rows(m.O_mu_, src), offset_rows(m.O_pi_, src)
            label = src
        else:
            comp = rng.choice(len(self.weights), size=u, p=self.weights)
            eps = rng.standard_normal((u, self.Z.shape[1]))
            zs = self.means[comp] + np.einsum("nij,nj->ni", self.chol[comp], eps)
            Z = zs * self.scale + self.center
            X = np.broadcast_to(self.Xref.mean(0), (u, self.Xref.shape[1]))
            O_mu, O_pi = mean_offset_rows(m.O_mu_, u), mean_offset_rows(m.O_pi_, u)
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


def batch_shifts(batch_effect, n_batches: int, J: int, rng: np.random.Generator) -> np.ndarray:
    """The ``(n_batches, J)`` planted shifts of ``log mu``: ``N(0, batch_effect^2)`` draws with
    batch 0 the reference (zeros), or the explicit array ``batch_effect`` checked."""
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


def planted_de_genes(
    de_genes, de_lfc: float, J: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The genes with planted differential expression, and their log2 fold changes (0 for
    the others, and for all of them with ``de_lfc=0``: a null control)."""
    frac = isinstance(de_genes, numbers.Real) and not isinstance(de_genes, numbers.Integral)
    if frac and 0 < de_genes < 1:
        n_de = int(round(float(de_genes) * J))
    else:
        try:
            n_de = whole_number(de_genes, "de_genes", 0)
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
