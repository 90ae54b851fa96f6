"""One entry point for every kind of input: in-memory matrices, AnnData, and .h5ad on disk."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .source import BackedCounts, CountsFingerprint, InMemoryCounts, read_annotations
from .validate import empty_counts_message, empty_rows_and_columns, extract_counts

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
    #: indices of the cells / genes without a non-zero count, found by the validation pass
    empty_cells: np.ndarray | None = None
    empty_genes: np.ndarray | None = None
    #: a file's genes that the sources expose (all when None); see :meth:`keep`
    genes: np.ndarray | None = None
    #: digest of a file's counts (computed while validating it); in memory, on demand
    digest: str | None = None

    def fingerprint(self) -> str:
        """A :class:`~zinbgrad.data.source.CountsFingerprint` digest of the counts."""
        if self.digest is None:
            fp = CountsFingerprint(*self.shape)
            fp.update(self.X.indptr, self.X.indices, self.X.data)
            self.digest = fp.hexdigest()
        return self.digest

    def source(self, start: int, stop: int, dtype: torch.dtype, device: torch.device):
        """A block source over the cells ``[start, stop)`` (all of them by default)."""
        if self.X is not None:
            X = self.X if (start, stop) == (0, self.shape[0]) else self.X[start:stop]
            return InMemoryCounts(X, dtype=dtype, device=device)
        return BackedCounts(
            self.path, self.layer, dtype, device, row_range=(start, stop), genes=self.genes
        )

    def keep(self, cells: np.ndarray, genes: np.ndarray) -> None:
        """Restrict to the cells and genes of two boolean masks (a file's cells cannot be
        restricted: its shards are contiguous row ranges)."""
        if not cells.all():
            if self.X is None:
                raise ValueError(
                    f"{self.path}: cells cannot be left out of a streamed fit; remove them "
                    "from the file first (e.g. scanpy.pp.filter_cells(adata, min_counts=1))"
                )
            self.X = self.X[np.flatnonzero(cells)]
            self.obs_names = self.obs_names[cells]
            if self.obs is not None:
                self.obs = self.obs.iloc[np.flatnonzero(cells)]
        if not genes.all():
            if self.X is not None:
                self.X = self.X[:, np.flatnonzero(genes)]
            else:
                self.genes = genes
            self.var_names = self.var_names[genes]
        self.shape = (int(cells.sum()), int(genes.sum()))


def _backed(data):
    """A backed AnnData of a whole file (not a view), else None."""
    try:
        import anndata as ad
    except ImportError:  # pragma: no cover
        return None
    if isinstance(data, ad.AnnData) and getattr(data, "isbacked", False) and not data.is_view:
        return data
    # a view (adata[cells, genes]) selects part of the file: only that part is read, into
    # memory; the whole file is streamed only when the whole file is meant
    return None


def open_counts(
    data, layer: str | None = None, *, allow_non_integer: bool = False, check_empty: bool = True
) -> CountsHandle:
    """Validate an input and describe it; .h5ad paths and backed AnnData stay on disk.

    A backed AnnData's own ``obs``, ``obs_names`` and ``var_names`` are used (they may have
    been changed in memory); for a path they are read from the file.
    """
    backed = _backed(data)
    if backed is None and not isinstance(data, str | os.PathLike):
        c = extract_counts(data, layer, allow_non_integer=allow_non_integer, check_empty=False)
        handle = CountsHandle(c.X.shape, c.obs, c.obs_names, c.var_names, X=c.X, named=c.named)
        handle.empty_cells, handle.empty_genes = empty_rows_and_columns(c.X)
        where = ""
    else:
        path = Path(data if backed is None else backed.filename)
        handle = _open_file(path, backed, layer, allow_non_integer)
        where = f"{path}: "
    if check_empty:
        _raise_empty(handle, where)
    return handle


def _open_file(p: Path, backed, layer: str | None, allow_non_integer: bool) -> CountsHandle:
    """The handle of an .h5ad file (``backed``: its backed AnnData, whose annotations are
    used, or None), its counts validated in one pass that also finds empty cells/genes."""
    if not p.exists():
        raise FileNotFoundError(f"no such file: {p}")
    if backed is None:
        obs, obs_names, var_names = read_annotations(p)
    else:
        obs = backed.obs.copy()
        obs_names = np.asarray(backed.obs_names).astype(str)
        var_names = np.asarray(backed.var_names).astype(str)
    src = BackedCounts(p, layer)
    try:
        cells, genes = src.validate(allow_non_integer=allow_non_integer, check_empty=False)
        shape, digest = src.shape, src.fingerprint
    finally:
        src.close()
    if shape != (len(obs_names), len(var_names)):
        raise ValueError(
            f"{p}: the counts are {shape[0]} x {shape[1]} but there are {len(obs_names)} cells "
            f"and {len(var_names)} genes"
        )
    return CountsHandle(
        shape,
        obs,
        obs_names,
        var_names,
        path=str(p),
        layer=layer,
        digest=digest,
        empty_cells=cells,
        empty_genes=genes,
    )


def _raise_empty(handle: CountsHandle, prefix: str) -> None:
    """The error for cells / genes without counts, named as on every other path."""
    for what, idx, names in (
        ("cells", handle.empty_cells, handle.obs_names),
        ("genes", handle.empty_genes, handle.var_names),
    ):
        if idx.size:
            raise ValueError(prefix + empty_counts_message(what, idx, names))
