"""Input checks shared by the metrics: latent spaces, labels and counts of repetitions."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["ArrayLike", "as_labels", "as_latent", "check_positive_int"]

ArrayLike = Any


def as_latent(latent: ArrayLike, name: str = "latent") -> np.ndarray:
    """``latent`` as a finite dense float64 ``(n_cells, n_dims)`` array (>= 2 cells, >= 1 dim);
    ``ValueError`` naming ``name`` otherwise."""
    if hasattr(latent, "detach"):  # torch tensor
        latent = latent.detach().cpu().numpy()
    if sp.issparse(latent):
        raise ValueError(f"{name} must be a dense (n_cells, n_dims) array, got a sparse matrix")
    arr = np.asarray(latent, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_cells, n_dims), got shape {arr.shape}")
    if arr.shape[0] < 2 or arr.shape[1] < 1:
        raise ValueError(f"{name} needs at least 2 cells and 1 dimension, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def as_labels(labels: ArrayLike, n: int, name: str) -> np.ndarray:
    """Integer codes ``0..levels-1`` of ``n`` labels without missing values (``pd.factorize``
    order); ``ValueError`` naming ``name`` otherwise."""
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.ravel()
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries but latent has {n} cells")
    codes, _ = pd.factorize(arr, use_na_sentinel=True)
    if np.any(codes < 0):
        raise ValueError(f"{name} contains missing values")
    return codes


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as an ``int`` >= 1 (booleans refused); ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
