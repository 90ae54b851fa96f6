"""Count sources: a cells x genes count matrix read in blocks of contiguous cells.

The optimizer never sees a whole matrix: it asks a source for the nonzero entries of rows
``[start, stop)`` as a :class:`~zinbgrad.data.counts.SparseCounts`. Counts are never
densified.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .counts import SparseCounts
from .validate import CountTally, check_count_dtype

__all__ = ["BackedCounts", "CountsFingerprint", "InMemoryCounts", "block_bounds"]


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


class CountsFingerprint:
    """A digest of a count matrix's values, fed block of cells by block of cells: its shape,
    the sum of every cell and of every gene (rounded to float32, so that sums taken in
    another order agree). Checkpoints record it, and a resumed fit must have the same."""

    def __init__(self, n_obs: int, n_vars: int) -> None:
        import hashlib

        self._h = hashlib.sha1(np.array([n_obs, n_vars], dtype=np.int64).tobytes())
        self._genes = np.zeros(n_vars)

    def update(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> None:
        """Add the next rows (CSR arrays, ``indptr`` of these rows only)."""
        d = np.asarray(data, dtype=np.float64)
        rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        cells = np.bincount(rows, weights=d, minlength=len(indptr) - 1)
        self._h.update(cells.astype(np.float32).tobytes())
        self._genes += np.bincount(indices, weights=d, minlength=len(self._genes))

    def hexdigest(self) -> str:
        h = self._h.copy()
        h.update(self._genes.astype(np.float32).tobytes())
        return h.hexdigest()


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def h5_encoding(node) -> str:
    """anndata's ``encoding-type`` of an HDF5 group or dataset ("" where it has none); files
    of anndata before 0.7 mark sparse matrices with ``h5sparse_format`` instead."""
    if "encoding-type" in node.attrs:
        return _text(node.attrs["encoding-type"])
    if "h5sparse_format" in node.attrs:
        return _text(node.attrs["h5sparse_format"]) + "_matrix"
    return ""


def h5_shape(node) -> tuple[int, int]:
    """The shape of a sparse matrix group (``h5sparse_shape`` in files of anndata < 0.7)."""
    shape = node.attrs["shape"] if "shape" in node.attrs else node.attrs["h5sparse_shape"]
    return tuple(int(v) for v in shape)


def elem_io():
    """anndata's element reader and writer (``read_elem``, ``write_elem``)."""
    try:
        from anndata.io import read_elem, write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem, write_elem
    return read_elem, write_elem


def read_annotations(path: str | os.PathLike) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """``obs``, ``obs_names`` and ``var_names`` of an .h5ad, read without anything else of
    the file (``anndata.read_h5ad(backed="r")`` would load every layer into memory)."""
    import h5py

    read_elem, _ = elem_io()
    try:
        with h5py.File(path, "r") as f:
            obs, var = read_elem(f["obs"]), read_elem(f["var"])
    except Exception as err:  # noqa: BLE001 - any reader failure is reported the same way
        raise ValueError(f"cannot read {path} as .h5ad ({type(err).__name__}: {err})") from err
    return obs, np.asarray(obs.index).astype(str), np.asarray(var.index).astype(str)


def _torch_int(a: np.ndarray) -> np.ndarray:
    """Column indices in a type torch handles on every device (int32 or int64)."""
    return a if a.dtype in (np.int32, np.int64) else a.astype(np.int64)


def _torch_num(a: np.ndarray) -> np.ndarray:
    """Stored counts in a type torch converts on every device: int32/int64/float32/float64 as
    they are (integers convert exactly to float64), others (unsigned, 8/16-bit, float16) as
    float64."""
    ok = (np.int32, np.int64, np.float32, np.float64)
    return a if a.dtype in ok else a.astype(np.float64)


class BackedCounts:
    """CSR counts of an ``.h5ad`` file read from disk in blocks of cells (never loaded whole).

    Only ``indptr`` (n + 1 integers) is held in memory; a block's ``indices``/``data`` are read
    when it is needed, the next block in the background (one-block prefetch). Blocks can be
    restricted to a contiguous shard of cells (``row_range``) for data-parallel fits.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    layer
        Read ``layers/<layer>`` instead of ``X``.
    dtype, device
        Floating type and device of the blocks.
    row_range
        ``(start, stop)``: expose only these cells (re-indexed from 0).
    genes
        Boolean mask over the file's genes: expose only these (re-indexed from 0). The
        genes left out must hold no non-zero count (genes without counts left out of a
        fit); their explicitly stored zeros are dropped.
    """

    cache = False
    #: :class:`CountsFingerprint` digest of the counts, set by :meth:`validate`
    fingerprint: str | None = None

    def __init__(
        self,
        path,
        layer: str | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        row_range: tuple[int, int] | None = None,
        genes: np.ndarray | None = None,
    ) -> None:
        import h5py

        self.path = str(path)
        try:
            self._f = h5py.File(self.path, "r")
        except (OSError, FileNotFoundError) as err:
            raise ValueError(f"cannot open {self.path} as an HDF5/.h5ad file ({err})") from err
        key = "X" if layer is None else f"layers/{layer}"
        if key not in self._f:
            layers = sorted(self._f["layers"]) if "layers" in self._f else []
            self._f.close()
            if layer is None:
                raise ValueError(f"{self.path} has no X; pass layer= (--layer) with the counts")
            raise KeyError(f"layer {layer!r} not found in {self.path} (available: {layers})")
        g = self._f[key]
        convert = (
            "Convert it once with `zinbgrad convert IN.h5ad OUT.h5ad"
            + ("" if layer is None else f" --layer {layer}")
            + "` (writes CSR in chunks, never loading the counts whole)"
        )
        if isinstance(g, h5py.Dataset):
            raise ValueError(
                f"{key} in {self.path} is stored dense; streaming needs CSR. {convert}"
            )
        enc = h5_encoding(g)
        if enc != "csr_matrix":
            raise ValueError(
                f"{key} in {self.path} is {enc or 'not CSR'}; streaming over cells needs CSR "
                f"(cells x genes, row-compressed). {convert}"
            )
        shape = h5_shape(g)
        self._indptr_all = np.asarray(g["indptr"][:], dtype=np.int64)
        self._indices = g["indices"]
        self._data = g["data"]
        lo, hi = row_range if row_range is not None else (0, shape[0])
        self.offset = lo
        self.n_obs, self.n_vars = hi - lo, shape[1]
        self._gene_map = None
        if genes is not None and not np.all(genes):
            genes = np.asarray(genes, dtype=bool)
            self._gene_map = np.where(genes, np.cumsum(genes) - 1, -1)
            self.n_vars = int(genes.sum())
        self.dtype = dtype
        self.device = torch.device(device)
        self._pool = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_obs, self.n_vars

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._f.close()

    def rows_csr(self, start: int, stop: int) -> sp.csr_matrix:
        a, b = start + self.offset, stop + self.offset
        ptr = self._indptr_all[a : b + 1]
        lo, hi = int(ptr[0]), int(ptr[-1])
        data, indices, indptr = self._data[lo:hi], self._indices[lo:hi], ptr - lo
        if self._gene_map is not None:  # drop the left-out genes' (zero) entries, re-index
            new = self._gene_map[indices]
            keep = new >= 0
            rows = np.repeat(np.arange(stop - start), np.diff(indptr))[keep]
            indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=stop - start))])
            data, indices = data[keep], new[keep].astype(self._indices.dtype)
        return sp.csr_matrix((data, indices, indptr), shape=(stop - start, self.n_vars))

    def __getitem__(self, rows: slice) -> sp.csr_matrix:
        """``source[start:stop]``: the CSR rows, read from disk (contiguous slices only)."""
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("BackedCounts supports only contiguous row slices")
        start, stop, _ = rows.indices(self.n_obs)
        return self.rows_csr(start, stop)

    def rows_subset(self, idx: np.ndarray) -> sp.csr_matrix:
        """Rows of a sorted subset (read as runs of consecutive cells)."""
        idx = np.asarray(idx)
        if idx.size == 0:
            return sp.csr_matrix((0, self.n_vars))
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        parts = [self.rows_csr(int(run[0]), int(run[-1]) + 1) for run in np.split(idx, breaks)]
        return sp.vstack(parts, format="csr")

    def block(self, start: int, stop: int) -> SparseCounts:
        """Cells ``[start, stop)`` on ``device``. The raw CSR arrays cross to the device as they
        were stored (pinned host memory, asynchronous copies, ~8 bytes per nonzero), and the
        block (row of each entry, float values, lgamma(y + 1)) is built there: on the host that
        build costs ~15-30 ns per nonzero, about the whole of a streamed GPU sweep at 1.3M
        cells (BENCHMARKS.md)."""
        M = self.rows_csr(start, stop)
        arrays = [
            torch.from_numpy(M.indptr.astype(np.int64, copy=False)),
            torch.from_numpy(_torch_int(M.indices)),
            torch.from_numpy(_torch_num(M.data)),
        ]
        if self.device.type == "cuda":
            arrays = [t.pin_memory() for t in arrays]
        indptr, indices, data = (t.to(self.device, non_blocking=True) for t in arrays)
        return SparseCounts.from_csr(indptr, indices, data, self.n_vars, self.dtype)

    def iter_blocks(self, bounds: list[tuple[int, int]]) -> Iterator[tuple[int, int, SparseCounts]]:
        """Blocks in order, the next one read from disk while the current one is used."""
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zinbgrad-read")
        if not bounds:
            return
        fut = self._pool.submit(self.block, *bounds[0])
        for i, (start, stop) in enumerate(bounds):
            counts = fut.result()
            if i + 1 < len(bounds):
                fut = self._pool.submit(self.block, *bounds[i + 1])
            yield start, stop, counts

    def validate(
        self, allow_non_integer: bool = False, block_rows: int = 65536, check_empty: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Streaming version of :func:`zinbgrad.data.validate.validate_counts`, with its
        wording (the values are tallied over the whole file, then reported), in one pass over
        the blocks. Returns the indices of the cells and genes without a non-zero count
        (raising for them with ``check_empty``) and sets :attr:`fingerprint`."""
        from .validate import empty_counts_message

        what = f"counts in {self.path}"
        if self.n_obs == 0 or self.n_vars == 0:
            raise ValueError(f"{what} are empty (shape {self.shape})")
        check_count_dtype(self._data.dtype, what)
        tally = CountTally()
        gene_nnz = np.zeros(self.n_vars, dtype=np.int64)
        empty_cells = []
        fp = CountsFingerprint(self.n_obs, self.n_vars)
        for start in range(0, self.n_obs, block_rows):
            M = self.rows_csr(start, min(start + block_rows, self.n_obs))
            d = np.asarray(M.data, dtype=np.float64)
            fp.update(M.indptr, M.indices, d)
            tally.add(d)
            nonzero = d != 0
            gene_nnz += np.bincount(M.indices[nonzero], minlength=self.n_vars)
            rows = np.repeat(np.arange(M.shape[0]), np.diff(M.indptr))
            per_cell = np.bincount(rows[nonzero], minlength=M.shape[0])
            empty_cells.append(start + np.flatnonzero(per_cell == 0))
        tally.check(what, allow_non_integer, stacklevel=2)
        self.fingerprint = fp.hexdigest()
        cells = np.concatenate(empty_cells) if empty_cells else np.zeros(0, dtype=np.int64)
        genes = np.flatnonzero(gene_nnz == 0)
        if check_empty:
            for kind, idx in (("cells", cells), ("genes", genes)):
                if idx.size:
                    raise ValueError(f"{self.path}: " + empty_counts_message(kind, idx))
        return cells, genes
