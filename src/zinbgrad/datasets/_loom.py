"""Reader of loom files (e.g. the scVI RETINA ``retina.loom``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._common import (
    PathLike,
    as_path,
    check_integer_counts,
    decode_strings,
    open_hdf5,
    to_obs_column,
    unique_names,
)

__all__ = ["read_loom"]

#: Column attributes tried (in order) when ``read_loom`` auto-detects a batch.
_LOOM_BATCH_CANDIDATES = ("BatchID", "batch", "Batch", "batch_indices")
#: Column attributes tried (in order) when ``read_loom`` auto-detects labels.
_LOOM_LABEL_CANDIDATES = ("ClusterID", "labels", "Clusters", "cell_type", "CellType")
#: Column attributes tried (in order) for the cell names of a loom file.
_LOOM_CELL_NAME_CANDIDATES = ("CellID", "cell_names", "obs_names", "CellId")


def _loom_global_attrs(f: h5py.File) -> dict[str, Any]:
    """Global attributes: HDF5 attributes of the root (loom 2) and ``/attrs`` (loom 3)."""
    raw: dict[str, Any] = dict(f.attrs.items())
    if "attrs" in f and isinstance(f["attrs"], h5py.Group):
        for key, dset in f["attrs"].items():
            if isinstance(dset, h5py.Dataset):
                raw[key] = dset[()]
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        elif isinstance(value, np.ndarray):
            value = decode_strings(value)
        out[key] = value
    return out


def _iter_row_blocks(dset: h5py.Dataset, target_elements: int) -> Iterator[tuple[int, int]]:
    n_rows, n_cols = dset.shape
    step = max(1, target_elements // max(1, n_cols))
    if dset.chunks is not None:
        chunk_rows = dset.chunks[0]
        step = max(chunk_rows, (step // chunk_rows) * chunk_rows)
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def read_loom(
    path: PathLike,
    batch_key: str | None = None,
    label_key: str | None = None,
    *,
    gene_key: str = "Gene",
    layer: str | None = None,
    drop_empty_cells: bool = False,
    dtype: np.dtype | type = np.float32,
    block_elements: int = 2**24,
) -> ad.AnnData:
    """Read a loom file into a cells x genes CSR AnnData.

    The loom ``/matrix`` (genes x cells, usually dense and chunked) is read in
    blocks of gene rows, each block is sparsified, and the sparse blocks are
    stacked and transposed, so the dense matrix is never held in memory.

    Parameters
    ----------
    path
        Path to the ``.loom`` file.
    batch_key
        Column attribute holding the batch of each cell, copied to
        ``obs["batch"]`` (categorical). ``None`` auto-detects one of
        ``BatchID``, ``batch``, ``Batch``, ``batch_indices`` (the RETINA file
        uses ``BatchID``) and skips the column when none exists; a name given
        explicitly must exist.
    label_key
        Column attribute holding the cell labels, copied to ``obs["labels"]``
        (categorical). ``None`` auto-detects ``ClusterID`` (RETINA),
        ``labels``, ``Clusters``, ``cell_type``, ``CellType``. When the labels
        are integer codes and the file has a global ``CellTypes`` attribute
        with a name for every code, ``obs["cell_type"]`` holds the names;
        otherwise ``obs["cell_type"]`` equals ``obs["labels"]``.
    gene_key
        Row attribute with the gene names used as ``var_names`` (made unique
        if needed); falls back to ``Accession`` and then to positions.
    layer
        Read ``/layers/<layer>`` instead of ``/matrix``.
    drop_empty_cells
        Drop cells without any count. The scVI ``LoomDataset`` loader does
        this ("Take out cells that don't express any gene").
    dtype
        dtype of the returned counts.
    block_elements
        Approximate number of matrix entries read per block.

    Returns
    -------
    anndata.AnnData
        Counts in ``X`` (CSR), every 1-D column attribute in ``obs`` (strings
        as categoricals), every 1-D row attribute in ``var``, 2-D attributes in
        ``obsm`` / ``varm`` and global attributes in ``uns["loom_attrs"]``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not HDF5, lacks ``/matrix`` (or the layer), or an
        attribute's length disagrees with the matrix, or an explicitly named
        ``batch_key`` / ``label_key`` is missing.
    """
    p = as_path(path)
    source = str(p)
    X, row_attrs, col_attrs, global_attrs = _read_loom_file(p, source, layer, dtype, block_elements)
    n_cells, n_genes = X.shape
    obs, obsm = _split_attrs(col_attrs, n_cells)
    var, varm = _split_attrs(row_attrs, n_genes)
    _name_cells_and_genes(obs, var, gene_key)
    _add_batch_and_labels(obs, batch_key, label_key, global_attrs, source)
    adata = _assemble(X, obs, var, obsm, varm, global_attrs)
    if drop_empty_cells:
        keep = np.asarray(adata.X.sum(axis=1)).ravel() > 0
        if not keep.all():
            adata = adata[keep].copy()
    return adata


def _assemble(
    X: sp.csr_matrix,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    obsm: dict[str, np.ndarray],
    varm: dict[str, np.ndarray],
    global_attrs: dict[str, Any],
) -> ad.AnnData:
    """The AnnData: 2-D attributes in ``obsm`` / ``varm``, global ones in ``uns``."""
    adata = ad.AnnData(X=X, obs=obs, var=var)
    for key, value in obsm.items():
        adata.obsm[key] = value
    for key, value in varm.items():
        adata.varm[key] = value
    if global_attrs:
        adata.uns["loom_attrs"] = {
            k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in global_attrs.items()
        }
    return adata


def _read_loom_file(
    p: Path, source: str, layer: str | None, dtype: np.dtype | type, block_elements: int
) -> tuple[sp.csr_matrix, dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """The counts (cells x genes CSR, read by blocks of gene rows), the row and column
    attributes and the global attributes of a loom file."""
    with open_hdf5(p, "a loom file") as f:
        mat_name = "matrix" if layer is None else f"layers/{layer}"
        if mat_name not in f or not isinstance(f[mat_name], h5py.Dataset):
            raise ValueError(f"{source}: no /{mat_name} dataset; not a loom file")
        dset = f[mat_name]
        if dset.ndim != 2:
            raise ValueError(f"{source}: /{mat_name} is not a 2-D matrix (shape {dset.shape})")
        n_genes, n_cells = dset.shape

        blocks = []
        for start, stop in _iter_row_blocks(dset, block_elements):
            block = np.asarray(dset[start:stop, :])
            check_integer_counts(block[block != 0], source, stacklevel=4)
            blocks.append(sp.csr_matrix(block.astype(dtype, copy=False)))
        genes_by_cells = (
            sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, n_cells), dtype=dtype)
        )
        X = genes_by_cells.T.tocsr()
        X.sort_indices()

        row_attrs = _read_attr_group(f, "row_attrs", n_genes, source)
        col_attrs = _read_attr_group(f, "col_attrs", n_cells, source)
        global_attrs = _loom_global_attrs(f)
    return X, row_attrs, col_attrs, global_attrs


def _name_cells_and_genes(obs: pd.DataFrame, var: pd.DataFrame, gene_key: str) -> None:
    """``obs_names`` from the first cell-name attribute found, ``var_names`` from ``gene_key``
    (else ``Accession``), both made unique; positions when there is none."""
    n_cells, n_genes = len(obs), len(var)
    cell_names = next((k for k in _LOOM_CELL_NAME_CANDIDATES if k in obs), None)
    obs.index = (
        unique_names(obs[cell_names].astype(str))
        if cell_names
        else pd.Index([str(i) for i in range(n_cells)])
    )
    gene_col = gene_key if gene_key in var else ("Accession" if "Accession" in var else None)
    var.index = (
        unique_names(var[gene_col].astype(str))
        if gene_col
        else pd.Index([str(i) for i in range(n_genes)])
    )


def _add_batch_and_labels(
    obs: pd.DataFrame,
    batch_key: str | None,
    label_key: str | None,
    global_attrs: dict[str, Any],
    source: str,
) -> None:
    """``obs["batch"]``, ``obs["labels"]`` and ``obs["cell_type"]`` from the attributes named
    (or auto-detected, see :func:`read_loom`)."""
    bkey = _pick_attr(batch_key, _LOOM_BATCH_CANDIDATES, obs, source, "batch_key")
    if bkey is not None:
        obs["batch"] = pd.Categorical(np.asarray(obs[bkey]))
    lkey = _pick_attr(label_key, _LOOM_LABEL_CANDIDATES, obs, source, "label_key")
    if lkey is not None:
        _add_labels(obs, lkey, global_attrs.get("CellTypes"))


def _add_labels(obs: pd.DataFrame, lkey: str, names) -> None:
    """``obs["labels"]`` from the attribute ``lkey``, and ``obs["cell_type"]``: the global
    ``CellTypes`` names (``names``) of integer codes, else the labels themselves."""
    labels = np.asarray(obs[lkey])
    obs["labels"] = pd.Categorical(labels)
    cell_type: Any = obs["labels"]
    if names is not None and np.issubdtype(np.asarray(labels).dtype, np.number):
        names = np.atleast_1d(np.asarray(names)).astype(str)
        codes = np.asarray(labels)
        if np.all(codes == np.round(codes)) and codes.min() >= 0 and codes.max() < len(names):
            cell_type = pd.Categorical(names[codes.astype(np.int64)])
    obs["cell_type"] = cell_type


def _read_attr_group(f: h5py.File, group: str, length: int, source: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if group not in f:
        return out
    for key, dset in f[group].items():
        if not isinstance(dset, h5py.Dataset):
            continue
        values = decode_strings(dset[()])
        if values.ndim == 0 or values.shape[0] != length:
            raise ValueError(
                f"{source}: /{group}/{key} has shape {values.shape}, expected "
                f"{length} entries along its first axis"
            )
        out[key] = values
    return out


def _split_attrs(
    attrs: dict[str, np.ndarray], length: int
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    frame = pd.DataFrame(index=pd.RangeIndex(length))
    multi: dict[str, np.ndarray] = {}
    for key, values in attrs.items():
        if values.ndim == 1:
            frame[key] = to_obs_column(values)
        elif values.ndim == 2 and values.shape[1] == 1:
            frame[key] = to_obs_column(values[:, 0])
        else:
            multi[key] = values
    return frame, multi


def _pick_attr(
    key: str | None,
    candidates: Sequence[str],
    obs: pd.DataFrame,
    source: str,
    argname: str,
) -> str | None:
    if key is not None:
        if key not in obs:
            raise ValueError(
                f"{source}: {argname}={key!r} is not a column attribute "
                f"(available: {sorted(obs.columns)})"
            )
        return key
    return next((k for k in candidates if k in obs), None)
