"""Rewrite the counts of an .h5ad as CSR, in chunks, so that they can be streamed by cells.

Streaming (``ZINBWaVE().fit(path)``) reads contiguous blocks of cells, which needs the counts
stored row-compressed (CSR). An .h5ad with a dense or a CSC ``X`` (or layer) is converted once
with ``zinbgrad convert IN.h5ad OUT.h5ad`` (:func:`to_csr`): every other element of the file
(obs, var, uns, obsm, other layers, ...) is copied as it is, and the counts are rewritten
without ever being loaded whole.

* A dense matrix is read and compressed in blocks of rows, in one pass.
* A CSC matrix is transposed in two passes over its columns: the first counts the entries of
  every row (the CSR ``indptr``), the second places each block of columns' entries at their rows'
  positions in memory-mapped scratch arrays next to the output (the operating system pages them
  to disk as needed), which are then copied into the output in chunks.

The output is written to a temporary file next to ``out`` and renamed at the end: an
interrupted conversion never leaves a half-written file under that name.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..io_utils import atomic_write, scratch_dir
from .source import h5_encoding, h5_shape
from .writer import CSRAppender

__all__ = ["to_csr"]

#: Entries per block read from the input (bounds the conversion's memory).
CHUNK_ENTRIES = 2**24


def _blocks(ptr: np.ndarray, chunk_entries: int):
    """``(start, stop)`` of consecutive rows (or columns) of a compressed matrix with pointer
    array ``ptr``, each holding about ``chunk_entries`` entries (at least one row)."""
    m, i0 = len(ptr) - 1, 0
    while i0 < m:
        i1 = int(np.searchsorted(ptr, ptr[i0] + chunk_entries, side="right")) - 1
        i1 = min(max(i1, i0 + 1), m)
        yield i0, i1
        i0 = i1


def _dense_to_csr(ds, group, chunk_entries: int) -> None:
    """Compress a dense (cells x genes) dataset block of rows by block of rows, in one pass."""
    n, J = ds.shape
    rows = max(1, chunk_entries // max(J, 1))
    out = CSRAppender(group, (n, J), ds.dtype)
    for r0 in range(0, n, rows):
        out.append(sp.csr_matrix(ds[r0 : r0 + rows]))
    out.finish()


def _csc_to_csr(src, group, chunk_entries: int, scratch: Path) -> None:
    """Transpose a CSC group into CSR in two passes over blocks of its columns."""
    n, J = h5_shape(src)
    col_ptr = np.asarray(src["indptr"][:], dtype=np.int64)
    nnz = int(col_ptr[-1])
    src_data, src_idx = src["data"], src["indices"]
    # pass 1: entries per row
    counts = np.zeros(n, dtype=np.int64)
    for e0 in range(0, nnz, chunk_entries):
        counts += np.bincount(src_idx[e0 : e0 + chunk_entries], minlength=n)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    index_dtype = np.int32 if J < 2**31 else np.int64
    fill = indptr[:-1].copy()  # next free position of every row
    out_data = np.memmap(scratch / "data", dtype=src_data.dtype, mode="w+", shape=(max(nnz, 1),))
    out_idx = np.memmap(scratch / "indices", dtype=index_dtype, mode="w+", shape=(max(nnz, 1),))
    # pass 2: blocks of whole columns, in column order, so each row's entries stay sorted
    for c0, c1 in _blocks(col_ptr, chunk_entries):
        e0, e1 = int(col_ptr[c0]), int(col_ptr[c1])
        if e1 > e0:
            rows = np.asarray(src_idx[e0:e1], dtype=np.int64)
            cols = np.repeat(np.arange(c0, c1), np.diff(col_ptr[c0 : c1 + 1]))
            order = np.argsort(rows, kind="stable")  # by row, columns increasing within a row
            rows, cols = rows[order], cols[order]
            vals = np.asarray(src_data[e0:e1])[order]
            starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
            sizes = np.diff(np.r_[starts, len(rows)])
            rank = np.arange(len(rows)) - np.repeat(starts, sizes)
            pos = fill[rows] + rank
            out_data[pos] = vals
            out_idx[pos] = cols
            fill[rows[starts]] += sizes
    out = CSRAppender(group, (n, J), src_data.dtype)
    for r0, r1 in _blocks(indptr, chunk_entries):
        a, b = int(indptr[r0]), int(indptr[r1])
        ptr = indptr[r0 : r1 + 1] - a
        out.append(sp.csr_matrix((out_data[a:b], out_idx[a:b], ptr), shape=(r1 - r0, J)))
    out.finish()
    del out_data, out_idx


def to_csr(
    inp: str | os.PathLike,
    out: str | os.PathLike,
    *,
    layer: str | None = None,
    chunk_entries: int = CHUNK_ENTRIES,
) -> Path:
    """Write a copy of ``inp`` whose counts (``X``, or ``layers[layer]``) are stored as CSR.

    Parameters
    ----------
    inp
        An .h5ad whose counts are dense or CSC on disk (never modified).
    out
        The converted copy (written to a temporary file, then renamed).
    layer
        Convert this layer instead of ``X``.
    chunk_entries
        Matrix entries (dense) or nonzeros (CSC) per block read; bounds the memory used.

    Returns
    -------
    The output path.

    Raises
    ------
    ValueError
        If ``inp`` is not an .h5ad, has no such element, or its counts are already CSR.
    """
    import h5py

    inp, out = Path(inp), Path(out)
    if not inp.exists():
        raise FileNotFoundError(f"no such file: {inp}")
    if out.resolve() == inp.resolve():
        raise ValueError("the output must be a new file, not the input")
    key = "X" if layer is None else f"layers/{layer}"
    try:
        f_in = h5py.File(inp, "r")
    except OSError as err:
        raise ValueError(f"cannot open {inp} as an HDF5/.h5ad file ({err})") from err
    with f_in:
        if key not in f_in:
            raise KeyError(f"{key!r} not found in {inp}")
        node = f_in[key]
        enc = h5_encoding(node)
        dense = isinstance(node, h5py.Dataset)
        if not dense and enc != "csc_matrix":
            raise ValueError(
                f"{key} in {inp} is {enc or 'of an unknown encoding'}"
                + ("; it can be streamed as it is" if enc == "csr_matrix" else "")
            )
        if dense and node.ndim != 2:
            raise ValueError(f"{key} in {inp} has shape {node.shape}, not cells x genes")
        with atomic_write(out) as tmp:
            with h5py.File(tmp, "w") as f_out:
                for name, value in f_in.attrs.items():
                    f_out.attrs[name] = value
                parent_name = "layers" if layer is not None else None
                for name in f_in:
                    if name == parent_name:
                        continue
                    if name != "X" or layer is not None:
                        f_in.copy(f_in[name], f_out, name=name)
                if parent_name is not None:  # every other layer as it is
                    g = f_out.create_group("layers")
                    for a, v in f_in["layers"].attrs.items():
                        g.attrs[a] = v
                    for name in f_in["layers"]:
                        if name != layer:
                            f_in.copy(f_in["layers"][name], g, name=name)
                target = f_out.create_group(key)
                if dense:
                    _dense_to_csr(node, target, chunk_entries)
                else:
                    with scratch_dir(out) as scratch:
                        _csc_to_csr(node, target, chunk_entries, scratch)
    return out
