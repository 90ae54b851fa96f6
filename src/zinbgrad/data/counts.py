"""The nonzero entries of a block of cells (:class:`SparseCounts`), the form in which count
sources (:mod:`zinbgrad.data.source`) hand blocks to the likelihood and the optimizer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

__all__ = ["SparseCounts"]


@dataclass
class SparseCounts:
    """The nonzero entries of a block of cells, in flat (row-major) positions of the block.

    Attributes
    ----------
    n_rows, n_cols
        Shape of the block (cells x genes).
    rows, cols
        Row (within the block) and column index of each nonzero entry (int64).
    values
        The counts (> 0) as floating point.
    lgamma_y1
        ``lgamma(values + 1)``, cached because it is constant during a fit.
    """

    n_rows: int
    n_cols: int
    rows: Tensor
    cols: Tensor
    values: Tensor
    lgamma_y1: Tensor

    @cached_property
    def flat(self) -> Tensor:
        """Flat (row-major) position of each nonzero in the block; computed once per block."""
        return self.rows * self.n_cols + self.cols

    @cached_property
    def distinct_values(self) -> tuple[Tensor, Tensor]:
        """``(u, inverse)`` with ``values = u[inverse]``: counts take few distinct values, so
        functions of the count alone (for a common dispersion) are evaluated on ``u``.

        Counts are integers: a presence table over ``0..max`` (linear time) replaces the sort
        of :func:`torch.unique` unless the largest count dwarfs the number of nonzeros."""
        v = self.values
        if v.numel() == 0:
            return torch.unique(v, return_inverse=True)
        top = int(v.max())
        if top > 4 * v.numel() + 65536:
            return torch.unique(v, return_inverse=True)
        vl = v.long()
        present = torch.bincount(vl, minlength=top + 1) > 0
        u = present.nonzero().squeeze(1).to(v.dtype)
        slot = torch.cumsum(present, 0) - 1
        return u, slot[vl]

    def _with_flat(self, out: SparseCounts, fn: Callable[[Tensor], Tensor]) -> SparseCounts:
        if "flat" in self.__dict__:  # carry the cached flat positions along
            out.__dict__["flat"] = fn(self.__dict__["flat"])
        return out

    @classmethod
    def from_csr(
        cls, indptr: Tensor, indices: Tensor, data: Tensor, n_cols: int, dtype: torch.dtype
    ) -> SparseCounts:
        """Build from CSR arrays of a block (``indptr`` starting at 0)."""
        n_rows = indptr.numel() - 1
        counts = indptr[1:] - indptr[:-1]
        rows = torch.repeat_interleave(  # output_size: no device-to-host read on a GPU
            torch.arange(n_rows, device=indices.device),
            counts.to(indices.device),
            output_size=indices.numel(),
        )
        vals = data.to(dtype)
        keep = vals != 0
        if not bool(keep.all()):
            rows, indices, vals = rows[keep], indices[keep], vals[keep]
        return cls(n_rows, n_cols, rows, indices.long(), vals, torch.lgamma(vals + 1.0))

    def pin_memory(self) -> SparseCounts:
        out = SparseCounts(
            self.n_rows,
            self.n_cols,
            self.rows.pin_memory(),
            self.cols.pin_memory(),
            self.values.pin_memory(),
            self.lgamma_y1.pin_memory(),
        )
        return self._with_flat(out, Tensor.pin_memory)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SparseCounts:
        def mv(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=non_blocking)

        out = SparseCounts(
            self.n_rows,
            self.n_cols,
            mv(self.rows),
            mv(self.cols),
            mv(self.values),
            mv(self.lgamma_y1),
        )
        return self._with_flat(out, mv)

    def take_rows(self, keep: Tensor) -> tuple[SparseCounts, Tensor]:
        """The block of the rows where ``keep`` (bool, one per row) is true, in their order,
        and the mask of the nonzeros kept (to subset per-nonzero arrays alike)."""
        entries = keep[self.rows]
        new_row = torch.cumsum(keep, 0) - 1
        out = SparseCounts(
            int(keep.sum()),
            self.n_cols,
            new_row[self.rows[entries]],
            self.cols[entries],
            self.values[entries],
            self.lgamma_y1[entries],
        )
        return out, entries
