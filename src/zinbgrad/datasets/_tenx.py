"""Reader of 10x Cell Ranger HDF5 count files (v2 and v3 layouts), e.g. the scVI BRAIN
``1M_neurons_filtered_gene_bc_matrices_h5.h5``."""

from __future__ import annotations

from collections.abc import Sequence

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
    unique_names,
)

__all__ = ["read_10x_h5"]


def _10x_layout(f: h5py.File, genome: str | None, source: str) -> tuple[str, h5py.Group]:
    """Return ("v3" | "v2", group holding data/indices/indptr/shape)."""
    if "matrix" in f and isinstance(f["matrix"], h5py.Group) and "features" in f["matrix"]:
        return "v3", f["matrix"]
    required = ("data", "indices", "indptr", "shape", "barcodes")
    groups = [
        k for k, g in f.items() if isinstance(g, h5py.Group) and all(r in g for r in required)
    ]
    if not groups:
        raise ValueError(
            f"{source}: not a 10x Cell Ranger HDF5 file (neither /matrix/features (v3) nor a "
            f"genome group with {'/'.join(required)} (v2); top-level keys: {sorted(f.keys())})"
        )
    if genome is None:
        if len(groups) > 1:
            raise ValueError(
                f"{source}: several genomes {sorted(groups)}; pass genome= to choose one"
            )
        return "v2", f[groups[0]]
    if genome not in groups:
        raise ValueError(f"{source}: genome {genome!r} not found; available: {sorted(groups)}")
    return "v2", f[genome]


def _normalize_cell_selection(
    cells: Sequence[int] | np.ndarray | None, n_cells: int | None, total: int, source: str
) -> np.ndarray | None:
    """Return ``None`` for "the first ``n`` cells" or a 1-D int64 index array."""
    if cells is not None and n_cells is not None:
        raise ValueError("pass either n_cells or cells, not both")
    if cells is None:
        return None
    idx = np.asarray(cells)
    if idx.ndim != 1:
        raise ValueError(f"cells must be 1-D, got shape {idx.shape}")
    if idx.dtype == bool:
        if idx.shape[0] != total:
            raise ValueError(
                f"boolean cells mask has length {idx.shape[0]}, but {source} has {total} cells"
            )
        return np.flatnonzero(idx)
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"cells must hold integer indices or a boolean mask, got {idx.dtype}")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < -total or idx.max() >= total):
        raise ValueError(f"cell indices out of range for {source} with {total} cells")
    idx = np.where(idx < 0, idx + total, idx)
    if np.unique(idx).size != idx.size:
        raise ValueError("cells contains duplicate indices")
    return idx


def read_10x_h5(
    path: PathLike,
    genome: str | None = None,
    *,
    n_cells: int | None = None,
    cells: Sequence[int] | np.ndarray | None = None,
    gene_expression_only: bool = True,
    dtype: np.dtype | type = np.float32,
    chunk_cells: int = 100_000,
) -> ad.AnnData:
    """Read a 10x Cell Ranger HDF5 count file, optionally only some of its cells.

    Both layouts are supported:

    * v2 (Cell Ranger < 3, e.g. ``1M_neurons_filtered_gene_bc_matrices_h5.h5``):
      one group per genome, ``/<genome>/{data, indices, indptr, shape,
      barcodes, genes, gene_names}``.
    * v3 (Cell Ranger >= 3): ``/matrix/{data, indices, indptr, shape,
      barcodes, features/{id, name, feature_type, genome}}``.

    The stored matrix is CSC genes x cells, i.e. ``indptr`` runs over cells,
    which is exactly CSR cells x genes; only the ``indptr`` range and the
    ``data`` / ``indices`` slices of the requested cells are read, in blocks of
    ``chunk_cells`` cells.

    Parameters
    ----------
    path
        Path to the ``.h5`` file.
    genome
        v2: the genome group to read (required when the file has several).
        v3: keep only the features of this genome (``None``: all).
    n_cells
        Read only the first ``n_cells`` cells (clipped to the number of cells).
    cells
        Read only these cells: integer indices (returned in the given order)
        or a boolean mask over all cells. Exclusive with ``n_cells``.
    gene_expression_only
        v3 only: keep only the features whose ``feature_type`` is
        ``"Gene Expression"``.
    dtype
        dtype of the returned counts.
    chunk_cells
        Number of cells per block when reading a cell subset.

    Returns
    -------
    anndata.AnnData
        Counts (CSR, cells x genes); ``obs_names`` are the barcodes,
        ``var_names`` the gene symbols (made unique), ``var["gene_ids"]`` the
        Ensembl ids (plus ``feature_types`` and ``genome`` for v3);
        ``obs["cell_index"]`` is the cell's position in the file.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not HDF5, has neither 10x layout, the genome is
        ambiguous / unknown, the stored arrays disagree in length, or the
        cell selection is invalid.
    """
    p = as_path(path)
    source = str(p)
    if n_cells is not None and (not isinstance(n_cells, (int, np.integer)) or n_cells < 0):
        raise ValueError(f"n_cells must be a non-negative integer, got {n_cells!r}")
    if chunk_cells < 1:
        raise ValueError(f"chunk_cells must be positive, got {chunk_cells}")
    with open_hdf5(p, "a 10x Cell Ranger HDF5 file") as f:
        version, grp = _10x_layout(f, genome, source)
        shape = _10x_shape(grp, source)
        var, gene_names = _10x_features(grp, version, shape, source)
        selection = _normalize_cell_selection(cells, n_cells, shape[1], source)
        X, cell_index, barcodes = _10x_cells(grp, selection, n_cells, shape, dtype, chunk_cells)
    X = _checked_counts(X, source)
    keep = _v3_kept_features(var, genome, gene_expression_only, source) if version == "v3" else None
    return _10x_anndata(X, var, gene_names, cell_index, barcodes, keep)


def _10x_anndata(
    X: sp.csr_matrix,
    var: pd.DataFrame,
    gene_names: np.ndarray,
    cell_index: np.ndarray,
    barcodes: np.ndarray,
    keep: np.ndarray | None,
) -> ad.AnnData:
    """The AnnData of the cells read, named by barcode and gene symbol (made unique), with
    only the features ``keep`` (``None``: all)."""
    var.index = unique_names(np.asarray(gene_names).astype(str))
    obs = pd.DataFrame(
        {"cell_index": np.asarray(cell_index, dtype=np.int64)},
        index=unique_names(np.asarray(barcodes).astype(str)),
    )
    if keep is not None and not keep.all():
        X = X[:, np.flatnonzero(keep)].tocsr()
        var = var.iloc[np.flatnonzero(keep)].copy()
        var.index = unique_names(np.asarray(gene_names)[keep].astype(str))
    return ad.AnnData(X=X, obs=obs, var=var)


def _checked_counts(X: sp.csr_matrix, source: str) -> sp.csr_matrix:
    """``X`` after checking its sparse structure and counts, with sorted indices."""
    try:
        X.check_format(full_check=True)
    except ValueError as err:
        raise ValueError(f"{source}: corrupt sparse matrix ({err})") from err
    X.sort_indices()
    check_integer_counts(X.data, source, stacklevel=4)
    return X


def _v3_kept_features(
    var: pd.DataFrame, genome: str | None, gene_expression_only: bool, source: str
) -> np.ndarray:
    """The v3 features kept: gene expression only (if asked) and of ``genome`` (if given)."""
    keep_genes = np.ones(len(var), dtype=bool)
    if gene_expression_only and "feature_types" in var:
        keep_genes &= var["feature_types"].to_numpy() == "Gene Expression"
    if genome is not None and "genome" in var:
        keep_genes &= var["genome"].to_numpy() == genome
        if not keep_genes.any():
            raise ValueError(f"{source}: no features of genome {genome!r}")
    return keep_genes


def _10x_shape(grp: h5py.Group, source: str) -> tuple[int, int]:
    """``(genes, cells)`` of the stored matrix, after checking its arrays are all there and
    agree in length."""
    for key in ("data", "indices", "indptr", "shape", "barcodes"):
        if key not in grp:
            raise ValueError(f"{source}: missing {grp.name}/{key}; not a 10x HDF5 file")
    shape = tuple(int(s) for s in grp["shape"][()])
    if len(shape) != 2:
        raise ValueError(f"{source}: {grp.name}/shape is {shape}, expected 2 entries")
    total_genes, total_cells = shape
    indptr_ds = grp["indptr"]
    if indptr_ds.shape[0] != total_cells + 1:
        raise ValueError(
            f"{source}: {grp.name}/indptr has {indptr_ds.shape[0]} entries, expected "
            f"{total_cells + 1} (number of cells + 1)"
        )
    if grp["barcodes"].shape[0] != total_cells:
        raise ValueError(f"{source}: {grp.name}/barcodes length disagrees with shape")
    return total_genes, total_cells


def _10x_features(
    grp: h5py.Group, version: str, shape: tuple[int, int], source: str
) -> tuple[pd.DataFrame, np.ndarray]:
    """``var`` (``gene_ids``, and v3's ``feature_types`` and ``genome``) and the gene names."""
    if version == "v3":
        feats = grp["features"]
        gene_ids = decode_strings(feats["id"][()])
        gene_names = decode_strings(feats["name"][()])
        var = pd.DataFrame({"gene_ids": gene_ids.astype(str)})
        if "feature_type" in feats:
            var["feature_types"] = decode_strings(feats["feature_type"][()]).astype(str)
        if "genome" in feats:
            var["genome"] = decode_strings(feats["genome"][()]).astype(str)
    else:
        if "genes" not in grp:
            raise ValueError(f"{source}: missing {grp.name}/genes; not a 10x HDF5 file")
        gene_ids = decode_strings(grp["genes"][()])
        gene_names = decode_strings(grp["gene_names"][()]) if "gene_names" in grp else gene_ids
        var = pd.DataFrame({"gene_ids": gene_ids.astype(str)})
    if len(gene_ids) != shape[0] or len(gene_names) != shape[0]:
        raise ValueError(f"{source}: gene annotation length disagrees with shape {shape}")
    return var, gene_names


def _10x_cells(
    grp: h5py.Group,
    selection: np.ndarray | None,
    n_cells: int | None,
    shape: tuple[int, int],
    dtype: np.dtype | type,
    chunk_cells: int,
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """The counts (cells x genes CSR), file positions and barcodes of the cells read: the
    first ``n_cells`` (``selection`` None: one contiguous slice) or ``selection``."""
    total_genes, total_cells = shape
    if selection is None:
        n_take = total_cells if n_cells is None else min(int(n_cells), total_cells)
        indptr = grp["indptr"][: n_take + 1].astype(np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        X = sp.csr_matrix(
            (
                grp["data"][lo:hi].astype(dtype),
                grp["indices"][lo:hi].astype(np.int32 if total_genes < 2**31 else np.int64),
                indptr - lo,
            ),
            shape=(n_take, total_genes),
        )
        return X, np.arange(n_take), decode_strings(grp["barcodes"][:n_take])
    X = _read_10x_cell_subset(grp, selection, total_genes, dtype, chunk_cells)
    barcodes = (
        decode_strings(grp["barcodes"][()])[selection]
        if selection.size > 0
        else np.array([], dtype=object)
    )
    return X, selection, barcodes


def _read_10x_cell_subset(
    grp: h5py.Group,
    selection: np.ndarray,
    n_genes: int,
    dtype: np.dtype | type,
    chunk_cells: int,
) -> sp.csr_matrix:
    """Read the rows ``selection`` (any order) of the cells x genes CSR stored in ``grp``."""
    if selection.size == 0:
        return sp.csr_matrix((0, n_genes), dtype=dtype)
    order = np.argsort(selection, kind="stable")
    sorted_sel = selection[order]
    indptr_ds = grp["indptr"]
    pieces = []
    start = 0
    while start < sorted_sel.size:
        block_lo = int(sorted_sel[start])
        block_hi = block_lo + chunk_cells
        stop = int(np.searchsorted(sorted_sel, block_hi, side="left"))
        rows = sorted_sel[start:stop]
        last = int(rows[-1])
        ptr = indptr_ds[block_lo : last + 2].astype(np.int64)
        lo, hi = int(ptr[0]), int(ptr[-1])
        block = sp.csr_matrix(
            (grp["data"][lo:hi].astype(dtype), grp["indices"][lo:hi], ptr - lo),
            shape=(last + 1 - block_lo, n_genes),
        )
        pieces.append(block[rows - block_lo])
        start = stop
    stacked = sp.vstack(pieces, format="csr")
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    return stacked[inverse].tocsr()
