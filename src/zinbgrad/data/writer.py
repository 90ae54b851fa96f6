"""Write per-entry outputs (normalized values, residuals, weights, ...) into an .h5ad in chunks.

For data that does not fit in memory: the input file is copied to a temporary file next to the
output, the layer is created as a chunked HDF5 dataset in anndata's on-disk layout and filled
block of cells by block of cells (counts streamed from the input, never loaded whole), then the
temporary file is renamed to the output (atomic: never a half-written file under that name).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from ..io_utils import atomic_write
from ..model.outputs import COUNT_OUTPUTS, iter_output_blocks, spread_to_input
from .source import BackedCounts, elem_io, read_annotations

__all__ = ["CSRAppender", "add_elements", "write_output_layer"]


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


def write_output_layer(
    model,
    what: str,
    inp: str | os.PathLike,
    out: str | os.PathLike,
    key_added: str,
    *,
    ignore_W: bool = False,
    layer: str | None = None,
    block_rows: int = 4096,
    out_dtype=np.float32,
) -> Path:
    """Compute ``what`` (see :func:`zinbgrad.model.outputs.block_output`) for every training cell
    of ``model`` and write it as ``layers[key_added]`` of a copy of ``inp`` saved as ``out``.

    The counts (for residuals, weights, imputation) are read from ``inp`` (``layer`` or ``X``,
    CSR) block by block; peak memory is one block of cells x genes.
    """
    import h5py

    inp, out = Path(inp), Path(out)
    genes, cells, names_in = model.fitted_masks()
    if not cells.all():
        raise ValueError(
            "the model left cells without counts out of its fit; its outputs are written "
            "in memory only (run without --stream)"
        )
    src = BackedCounts(inp, layer)
    n, J = src.shape
    src.close()
    if (n, J) != (model.W_.shape[0], len(genes)):
        raise ValueError(
            f"{inp} has {n} cells x {J} genes; the model was fitted on "
            f"{model.W_.shape[0]} x {len(genes)}"
        )
    src = BackedCounts(inp, layer, genes=genes)  # the genes left out of the fit are skipped
    try:
        _, obs_names, var_names = read_annotations(inp)
        for what_, names, fitted in (
            ("cells", obs_names, model.obs_names_),
            ("genes", var_names, names_in),
        ):
            if not np.array_equal(names, np.asarray(fitted).astype(str)):
                raise ValueError(
                    f"the {what_} of {inp} (their names or order) differ from those the model "
                    "was fitted on; these outputs are for the training data as it was fitted"
                )
        if what in COUNT_OUTPUTS:  # the same checks as the in-memory path, one pass
            src.validate(allow_non_integer=bool(model.allow_non_integer), check_empty=False)
    except BaseException:
        src.close()
        raise
    dev, dt = torch.device("cpu"), torch.float64
    design = model.training_design(dev, dt)
    params = model.get_params_torch(dev, dt)
    try:
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
                blocks = iter_output_blocks(
                    what,
                    design,
                    params,
                    src if what in COUNT_OUTPUTS else None,
                    zero_inflation=bool(model.zero_inflation),
                    ignore_W=ignore_W,
                    block_entries=block_rows * J,
                )
                for start, stop, values in blocks:
                    values = spread_to_input(values.numpy(), what, genes)
                    ds[start:stop] = values.astype(out_dtype)
            record = {"output": what, "ignore_W": bool(ignore_W), "streamed": True}
            add_elements(
                tmp, {"uns": {"zinbgrad_outputs": {key_added: record}}}, ("zinbgrad_outputs",)
            )
    finally:
        src.close()
    return out
