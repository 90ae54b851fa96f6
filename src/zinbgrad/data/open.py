"""One entry point for every kind of input: in-memory matrices, AnnData, and .h5ad on disk."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .source import BackedCounts, InMemoryCounts
from .validate import extract_counts

__all__ = ["CountsHandle", "open_counts"]


@dataclass
class CountsHandle:
    """Validated counts with their names and cell annotations; hands out block sources."""

    shape: tuple[int, int]
    obs: pd.DataFrame | None
    obs_names: np.ndarray
    var_names: np.ndarray
    X: sp.csr_matrix | None = None
    path: str | None = None
    layer: str | None = None
    named: bool = True  # see CountsInput.named

    def source(self, start: int, stop: int, dtype: torch.dtype, device: torch.device):
        """A block source over the cells ``[start, stop)`` (all of them by default)."""
        if self.X is not None:
            X = self.X if (start, stop) == (0, self.shape[0]) else self.X[start:stop]
            return InMemoryCounts(X, dtype=dtype, device=device)
        return BackedCounts(self.path, self.layer, dtype, device, row_range=(start, stop))


def _backed_path(data) -> str | None:
    if isinstance(data, str | os.PathLike):
        return str(data)
    try:
        import anndata as ad
    except ImportError:  # pragma: no cover
        return None
    if isinstance(data, ad.AnnData) and getattr(data, "isbacked", False):
        # a view (adata[cells, genes]) selects part of the file: only that part is read, into
        # memory; the whole file is streamed only when the whole file is meant
        return None if data.is_view else str(data.filename)
    return None


def open_counts(
    data, layer: str | None = None, *, allow_non_integer: bool = False, check_empty: bool = True
) -> CountsHandle:
    """Validate an input and describe it; .h5ad paths and backed AnnData stay on disk."""
    path = _backed_path(data)
    if path is None:
        c = extract_counts(
            data, layer, allow_non_integer=allow_non_integer, check_empty=check_empty
        )
        return CountsHandle(c.X.shape, c.obs, c.obs_names, c.var_names, X=c.X, named=c.named)
    import anndata as ad

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file: {p}")
    try:
        a = ad.read_h5ad(p, backed="r")
    except Exception as err:  # noqa: BLE001 - any reader failure is reported the same way
        raise ValueError(f"cannot read {p} as .h5ad ({type(err).__name__}: {err})") from err
    obs, obs_names, var_names = a.obs.copy(), np.asarray(a.obs_names), np.asarray(a.var_names)
    a.file.close()
    src = BackedCounts(p, layer)
    try:
        src.validate(allow_non_integer=allow_non_integer, check_empty=check_empty)
        shape = src.shape
    finally:
        src.close()
    return CountsHandle(shape, obs, obs_names, var_names, path=str(p), layer=layer)
