"""Count sources: a cells x genes count matrix read in blocks of contiguous cells.

The optimizer never sees a whole matrix: it asks a source for the nonzero entries of rows
``[start, stop)`` as a :class:`~zinbgrad.model.likelihood.SparseCounts`. Counts are never
densified.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch

from ..model.likelihood import SparseCounts

__all__ = ["InMemoryCounts", "block_bounds"]


def block_bounds(n: int, block_rows: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` row ranges covering ``range(n)``."""
    block_rows = max(1, int(block_rows))
    return [(s, min(s + block_rows, n)) for s in range(0, n, block_rows)]


class InMemoryCounts:
    """A validated scipy CSR matrix held in memory (cells x genes).

    Parameters
    ----------
    X
        CSR matrix of non-negative counts (not modified).
    dtype, device
        Floating type and device of the blocks handed out.
    cache
        Keep converted blocks (indices, values, lgamma(y+1)) for reuse across epochs.
    """

    def __init__(
        self,
        X: sp.csr_matrix,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        cache: bool = True,
    ) -> None:
        if not sp.isspmatrix_csr(X) and not isinstance(X, sp.csr_array):
            raise TypeError("InMemoryCounts needs a scipy CSR matrix")
        self.X = X
        self.n_obs, self.n_vars = X.shape
        self.dtype = dtype
        self.device = torch.device(device)
        self.cache = cache
        self._blocks: dict[tuple[int, int], SparseCounts] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_obs, self.n_vars

    def block(self, start: int, stop: int) -> SparseCounts:
        """Nonzero entries of cells ``[start, stop)``."""
        key = (start, stop)
        hit = self._blocks.get(key)
        if hit is not None:
            return hit
        indptr = self.X.indptr[start : stop + 1]
        lo, hi = int(indptr[0]), int(indptr[-1])
        block = SparseCounts.from_csr(
            torch.from_numpy(np.asarray(indptr - lo, dtype=np.int64)),
            torch.from_numpy(np.asarray(self.X.indices[lo:hi], dtype=np.int64)),
            torch.from_numpy(np.asarray(self.X.data[lo:hi], dtype=np.float64)),
            self.n_vars,
            self.dtype,
        ).to(self.device)
        if self.cache:
            self._blocks[key] = block
        return block

    def iter_blocks(self, bounds: list[tuple[int, int]]) -> Iterator[tuple[int, int, SparseCounts]]:
        for start, stop in bounds:
            yield start, stop, self.block(start, stop)

    def rows_csr(self, start: int, stop: int) -> sp.csr_matrix:
        """The raw CSR rows ``[start, stop)``."""
        return self.X[start:stop]

    def rows_subset(self, idx: np.ndarray) -> sp.csr_matrix:
        """The raw CSR rows of a sorted subset of cells (initialization subsample)."""
        return self.X[idx]
