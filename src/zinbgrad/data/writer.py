"""Write per-entry outputs (normalized values, residuals, weights, ...) into an .h5ad in chunks.

For data that does not fit in memory: the input file is copied to a temporary file next to the
output, the layer is created as a chunked HDF5 dataset in anndata's on-disk layout and filled
block of cells by block of cells (counts streamed from the input, never loaded whole), then the
temporary file is renamed to the output (atomic: never a half-written file under that name).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..io_utils import atomic_write
from .source import elem_io

__all__ = ["CSRAppender", "add_elements", "write_layer"]


class CSRAppender:
    """Append CSR rows to an h5py group in anndata's ``csr_matrix`` encoding."""

    def __init__(
        self, group, shape: tuple[int, int], dtype, compression: str | None = None
    ) -> None:
        n, J = shape
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = np.array([n, J], dtype=np.int64)
        kw = {"maxshape": (None,), "chunks": (2**16,), "compression": compression}
        idx_dtype = np.int32 if J < 2**31 else np.int64
        self.data = group.create_dataset("data", shape=(0,), dtype=dtype, **kw)
        self.indices = group.create_dataset("indices", shape=(0,), dtype=idx_dtype, **kw)
        self.indptr = group.create_dataset("indptr", shape=(n + 1,), dtype=np.int64)
        self.indptr[0] = 0
        self.n, self.row, self.nnz = n, 0, 0

    def append(self, m: sp.csr_matrix) -> None:
        k, r = m.nnz, m.shape[0]
        if k:
            self.data.resize((self.nnz + k,))
            self.indices.resize((self.nnz + k,))
            self.data[self.nnz :] = m.data
            self.indices[self.nnz :] = m.indices
        self.indptr[self.row + 1 : self.row + r + 1] = self.nnz + m.indptr[1:].astype(np.int64)
        self.row += r
        self.nnz += k

    def finish(self) -> None:
        if self.row != self.n:
            raise RuntimeError(f"wrote {self.row} rows, expected {self.n}")


def add_elements(
    path: str | os.PathLike, elements: dict[str, dict], merge_uns: tuple[str, ...] = ()
) -> None:
    """Add entries to the ``obsm``, ``varm``, ``obs`` / ``var`` (columns) and ``uns`` of an
    .h5ad on disk, through anndata's element I/O: nothing else of the file (X, layers) is
    loaded.

    ``elements`` maps those element names to ``{key: value}``; existing keys are replaced,
    except the ``uns`` dicts named in ``merge_uns``, which are updated (as
    ``uns["zinbgrad_outputs"]``, one record per output).
    """
    import h5py

    read_elem, write_elem = elem_io()
    with h5py.File(path, "r+") as f:
        for name in ("obsm", "varm", "uns"):
            entries = elements.get(name) or {}
            if not entries:
                continue
            if name not in f:
                write_elem(f, name, {})
            group = f[name]
            for key, value in entries.items():
                if name == "uns" and key in merge_uns and key in group:
                    value = {**read_elem(group[key]), **value}
                if key in group:
                    del group[key]
                write_elem(group, key, value)
        for name in ("obs", "var"):
            columns = elements.get(name) or {}
            if columns:
                frame = read_elem(f[name])
                for key, values in columns.items():
                    frame[key] = values
                del f[name]
                write_elem(f, name, frame)


def write_layer(
    inp: str | os.PathLike,
    out: str | os.PathLike,
    key_added: str,
    shape: tuple[int, int],
    blocks: Iterable[tuple[int, int, np.ndarray]],
    *,
    record: dict | None = None,
    block_rows: int = 4096,
    out_dtype=np.float32,
) -> Path:
    """Write a copy of the .h5ad ``inp`` as ``out`` with a new dense ``layers[key_added]``
    filled block of cells by block of cells, atomically.

    Parameters
    ----------
    inp, out
        The input .h5ad (copied, never modified) and the output path.
    key_added
        Key of the new layer (an existing one is replaced).
    shape
        ``(n_cells, n_genes)`` of the layer.
    blocks
        ``(start, stop, values)`` triples: rows ``start:stop`` of the layer, as an array of
        shape ``(stop - start, n_genes)``; consumed while the copy is open, so that a
        generator computes each block only when it is written (peak memory one block).
    record
        Stored as ``uns["zinbgrad_outputs"][key_added]`` (merged with the records of other
        layers), e.g. what the layer holds.
    block_rows
        Rows per HDF5 chunk of the layer.
    out_dtype
        dtype of the layer; each block is cast to it.

    Returns
    -------
    pathlib.Path
        ``out``.
    """
    import h5py

    inp, out = Path(inp), Path(out)
    n, J = shape
    with atomic_write(out) as tmp:
        shutil.copyfile(inp, tmp)
        with h5py.File(tmp, "r+") as f:
            layers = f.require_group("layers")
            layers.attrs.setdefault("encoding-type", "dict")
            layers.attrs.setdefault("encoding-version", "0.1.0")
            if key_added in layers:
                del layers[key_added]
            ds = layers.create_dataset(
                key_added, shape=(n, J), dtype=out_dtype, chunks=(min(block_rows, n), J)
            )
            ds.attrs["encoding-type"] = "array"
            ds.attrs["encoding-version"] = "0.2.0"
            for start, stop, values in blocks:
                ds[start:stop] = values.astype(out_dtype)
        if record is not None:
            add_elements(
                tmp, {"uns": {"zinbgrad_outputs": {key_added: record}}}, ("zinbgrad_outputs",)
            )
    return out
