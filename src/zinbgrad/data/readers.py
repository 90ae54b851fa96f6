"""Readers for the original files of the scVI benchmark data sets.

Every reader returns an :class:`anndata.AnnData` whose ``X`` holds the raw,
integer-valued counts as a :class:`scipy.sparse.csr_matrix` of shape
``(n_cells, n_genes)``. Large matrices are never densified as a whole: text
rows, loom row blocks and 10x cell blocks are sparsified one block at a time.

Readers
-------
read_zeisel_txt
    Zeisel et al. (2015) ``expression_mRNA_17-Aug-2014.txt`` (CORTEX).
read_loom
    Loom files, e.g. the scVI RETINA ``retina.loom``.
read_10x_h5
    10x Cell Ranger HDF5 (v2 per-genome layout and v3 ``/matrix`` layout), e.g.
    ``1M_neurons_filtered_gene_bc_matrices_h5.h5`` (BRAIN).
read_counts
    Dispatch on the file extension (``.h5ad``, ``.loom``, ``.h5``, ``.txt``).

Gene selection
--------------
select_top_variance_genes
    The scVI papers' "top-variance genes" selection (558 for CORTEX, 720 for
    BRAIN).
"""

from __future__ import annotations

import gzip
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = [
    "read_zeisel_txt",
    "read_loom",
    "read_10x_h5",
    "read_counts",
    "select_top_variance_genes",
]

PathLike = str | os.PathLike[str]

#: Cell metadata rows of the Zeisel file (row label -> ``.obs`` column).
ZEISEL_METADATA_KEYS: dict[str, str] = {
    "tissue": "tissue",
    "group #": "group",
    "total mRNA mol": "total_mrna_mol",
    "well": "well",
    "sex": "sex",
    "age": "age",
    "diameter": "diameter",
    "cell_id": "cell_id",
    "level1class": "level1class",
    "level2class": "level2class",
}

#: Column attributes tried (in order) when ``read_loom`` auto-detects a batch.
_LOOM_BATCH_CANDIDATES = ("BatchID", "batch", "Batch", "batch_indices")
#: Column attributes tried (in order) when ``read_loom`` auto-detects labels.
_LOOM_LABEL_CANDIDATES = ("ClusterID", "labels", "Clusters", "cell_type", "CellType")
#: Column attributes tried (in order) for the cell names of a loom file.
_LOOM_CELL_NAME_CANDIDATES = ("CellID", "cell_names", "obs_names", "CellId")


# --------------------------------------------------------------------------- helpers


def _as_path(path: PathLike) -> Path:
    p = Path(os.fspath(path))
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if not p.is_file():
        raise ValueError(f"{p}: not a regular file")
    return p


def _open_hdf5(path: Path, what: str) -> h5py.File:
    """Open ``path`` read-only, turning every failure into a ValueError naming the file."""
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path}: not an HDF5 file, so it cannot be read as {what}")
    try:
        return h5py.File(path, "r")
    except OSError as err:  # pragma: no cover - corrupt HDF5 that passes is_hdf5
        raise ValueError(f"{path}: unreadable HDF5 file ({err})") from err


def _decode_strings(values: Any) -> np.ndarray:
    """Decode an HDF5 string array (fixed-length bytes or variable-length) to ``str``."""
    arr = np.asarray(values)
    if arr.dtype.kind == "S":
        return np.char.decode(arr, "utf-8").astype(object)
    if arr.dtype.kind == "O":
        return np.array(
            [v.decode("utf-8") if isinstance(v, bytes) else v for v in arr.ravel()],
            dtype=object,
        ).reshape(arr.shape)
    if arr.dtype.kind == "U":
        return arr.astype(object)
    return arr


def _unique_names(names: Sequence[str]) -> pd.Index:
    """Make names unique the way AnnData does (``name``, ``name-1``, ``name-2``...)."""
    index = pd.Index([str(n) for n in names])
    if index.is_unique:
        return index
    return pd.Index(ad.utils.make_index_unique(index))


def _check_integer_counts(data: np.ndarray, source: str) -> None:
    if data.size == 0:
        return
    if not np.all(np.isfinite(data)):
        raise ValueError(f"{source}: the count matrix contains NaN or infinite values")
    if np.any(data < 0):
        raise ValueError(f"{source}: the count matrix contains negative values")
    if data.dtype.kind == "f" and np.any(data != np.floor(data)):
        warnings.warn(
            f"{source}: the matrix holds non-integer values; these are not raw counts",
            UserWarning,
            stacklevel=3,
        )


def _to_obs_column(values: np.ndarray) -> pd.Series | np.ndarray:
    """Numeric columns stay numeric, string columns become categoricals."""
    values = _decode_strings(values)
    if values.dtype.kind == "O":
        return pd.Categorical(values.astype(str))
    return values


# --------------------------------------------------------------------------- Zeisel


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _parse_numbers(fields: list[str], source: str, lineno: int) -> np.ndarray:
    try:
        return np.array(fields, dtype=np.float64)
    except ValueError:
        bad = next(f for f in fields if not _is_number(f))
        raise ValueError(f"{source}, line {lineno}: non-numeric count {bad!r}") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_zeisel_txt(path: PathLike, dtype: np.dtype | type = np.float32) -> ad.AnnData:
    """Read the Zeisel et al. (2015) mouse cortex file ``expression_mRNA_17-Aug-2014.txt``.

    The file is tab separated and laid out as follows (0-based line numbers,
    as parsed by the scVI ``CortexDataset`` loader and the Bioconductor
    ``simpleSingleCell`` workflow):

    * lines 0-9: one cell metadata row each. The first field is empty, the
      second field holds the row name (``tissue``, ``group #``,
      ``total mRNA mol``, ``well``, ``sex``, ``age``, ``diameter``,
      ``cell_id``, ``level1class``, ``level2class``) and the remaining fields
      hold one value per cell. Rows whose name sits in the first field (with
      an empty second field) are accepted too.
    * line 10: a filler row with empty leading fields (skipped; any number of
      such rows is tolerated).
    * lines 11-: one row per gene: gene name, gene cluster, then the counts of
      every cell.

    Parameters
    ----------
    path
        Path to the text file (optionally gzip-compressed, ``.gz``).
    dtype
        Floating or integer dtype of the returned counts (integer-valued in
        any case).

    Returns
    -------
    anndata.AnnData
        ``X``: CSR counts, cells x genes. ``obs``: one column per metadata row
        (``tissue``, ``group``, ``total_mrna_mol``, ``well``, ``sex``, ``age``,
        ``diameter``, ``cell_id``, ``level1class``, ``level2class``; numeric
        rows stay numeric, string rows are categoricals) plus ``cell_type``
        (= ``level1class``). ``obs_names`` are the cell ids. ``var``:
        ``gene_name`` (as in the file) and ``gene_cluster`` (second column);
        ``var_names`` are the gene names, made unique if needed.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file does not follow the layout above (no metadata rows, no
        ``cell_id`` row, rows of the wrong length, non-numeric or negative
        counts, no gene rows).
    """
    p = _as_path(path)
    source = str(p)
    meta: dict[str, list[str]] = {}
    gene_names: list[str] = []
    gene_clusters: list[str] = []
    row_indices: list[np.ndarray] = []
    row_values: list[np.ndarray] = []
    n_cells: int | None = None
    non_integer = False
    known = {k.lower(): k for k in ZEISEL_METADATA_KEYS}

    try:
        handle = _open_text(p)
        with handle:
            in_genes = False
            for lineno, raw in enumerate(handle):
                line = raw.rstrip("\r\n")
                if not line.strip():
                    continue  # blank or all-tab filler row
                fields = line.split("\t")
                if not in_genes:
                    first = fields[0].strip()
                    second = fields[1].strip() if len(fields) > 1 else ""
                    if first == "" and second != "":
                        meta[second] = fields[2:]
                        continue
                    if first == "":
                        continue  # filler row
                    if first.lower() in known and second == "":
                        meta[known[first.lower()]] = fields[2:]
                        continue
                    # first gene row
                    in_genes = True
                    if not meta:
                        raise ValueError(
                            f"{source}: no cell metadata rows before the first gene row "
                            f"(line {lineno}); not a Zeisel expression_mRNA file"
                        )
                    n_cells = _zeisel_n_cells(meta, source)
                assert n_cells is not None
                while len(fields) > n_cells + 2 and fields[-1] == "":
                    fields.pop()  # tolerate trailing tabs
                if len(fields) != n_cells + 2:
                    raise ValueError(
                        f"{source}, line {lineno}: gene row has {len(fields) - 2} count "
                        f"fields, expected {n_cells} (one per cell)"
                    )
                name = fields[0].strip()
                if name == "":
                    raise ValueError(f"{source}, line {lineno}: empty gene name")
                values = _parse_numbers(fields[2:], source, lineno)
                nz = np.flatnonzero(values)
                nz_values = values[nz]
                if not np.all(np.isfinite(nz_values)) or np.any(nz_values < 0):
                    raise ValueError(
                        f"{source}, line {lineno}: counts must be finite and non-negative"
                    )
                non_integer = non_integer or bool(np.any(nz_values != np.floor(nz_values)))
                gene_names.append(name)
                gene_clusters.append(fields[1].strip())
                row_indices.append(nz.astype(np.int32))
                row_values.append(nz_values.astype(dtype))
    except UnicodeDecodeError as err:
        raise ValueError(f"{source}: not a UTF-8 text file ({err})") from err
    except (OSError, EOFError) as err:
        raise ValueError(f"{source}: unreadable text file ({err})") from err

    if not gene_names:
        if not meta:
            raise ValueError(f"{source}: empty file or no tab-separated rows")
        raise ValueError(f"{source}: no gene rows after the cell metadata rows")
    assert n_cells is not None

    if non_integer:
        warnings.warn(
            f"{source}: the matrix holds non-integer values; these are not raw counts",
            UserWarning,
            stacklevel=2,
        )
    data = np.concatenate(row_values)
    indptr = np.zeros(len(gene_names) + 1, dtype=np.int64)
    np.cumsum([len(ix) for ix in row_indices], out=indptr[1:])
    genes_by_cells = sp.csr_matrix(
        (data, np.concatenate(row_indices), indptr),
        shape=(len(gene_names), n_cells),
    )
    X = genes_by_cells.T.tocsr()  # CSC transpose -> CSR cells x genes
    X.sort_indices()

    obs = pd.DataFrame(index=pd.RangeIndex(n_cells))
    for key, values in meta.items():
        col = ZEISEL_METADATA_KEYS.get(key, _normalize_key(key))
        obs[col] = _parse_meta_values(values)
    if "cell_id" in obs:
        obs.index = _unique_names(obs["cell_id"].astype(str))
    else:
        obs.index = pd.Index([f"cell_{i}" for i in range(n_cells)])
    if "level1class" in obs:
        obs["cell_type"] = pd.Categorical(obs["level1class"].astype(str))
    for col in ("tissue", "level1class", "level2class", "well"):
        if col in obs and not pd.api.types.is_numeric_dtype(obs[col]):
            obs[col] = pd.Categorical(obs[col])

    var = pd.DataFrame(
        {"gene_name": gene_names, "gene_cluster": gene_clusters},
        index=_unique_names(gene_names),
    )
    return ad.AnnData(X=X, obs=obs, var=var)


def _zeisel_n_cells(meta: dict[str, list[str]], source: str) -> int:
    if "cell_id" not in meta:
        raise ValueError(
            f"{source}: no 'cell_id' metadata row among {sorted(meta)}; "
            "not a Zeisel expression_mRNA file"
        )
    ids = meta["cell_id"]
    while ids and ids[-1] == "":
        ids.pop()
    n_cells = len(ids)
    if n_cells == 0:
        raise ValueError(f"{source}: the 'cell_id' row is empty")
    for key, values in meta.items():
        while len(values) > n_cells and values[-1] == "":
            values.pop()
        if len(values) != n_cells:
            raise ValueError(
                f"{source}: metadata row {key!r} has {len(values)} values, "
                f"expected {n_cells} (one per cell)"
            )
    return n_cells


def _normalize_key(key: str) -> str:
    return "_".join(key.replace("#", "").lower().split())


def _parse_meta_values(values: list[str]) -> np.ndarray:
    try:
        num = np.array(values, dtype=np.float64)
    except ValueError:
        return np.array(values, dtype=object)
    if np.all(num == np.round(num)) and np.all(np.abs(num) < 2**53):
        return num.astype(np.int64)
    return num


# --------------------------------------------------------------------------- loom


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
            value = _decode_strings(value)
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
    p = _as_path(path)
    source = str(p)
    with _open_hdf5(p, "a loom file") as f:
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
            _check_integer_counts(block[block != 0], source)
            blocks.append(sp.csr_matrix(block.astype(dtype, copy=False)))
        genes_by_cells = (
            sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, n_cells), dtype=dtype)
        )
        X = genes_by_cells.T.tocsr()
        X.sort_indices()

        row_attrs = _read_attr_group(f, "row_attrs", n_genes, source)
        col_attrs = _read_attr_group(f, "col_attrs", n_cells, source)
        global_attrs = _loom_global_attrs(f)

    obs, obsm = _split_attrs(col_attrs, n_cells)
    var, varm = _split_attrs(row_attrs, n_genes)

    cell_names = next((k for k in _LOOM_CELL_NAME_CANDIDATES if k in obs), None)
    obs.index = (
        _unique_names(obs[cell_names].astype(str))
        if cell_names
        else pd.Index([str(i) for i in range(n_cells)])
    )
    gene_col = gene_key if gene_key in var else ("Accession" if "Accession" in var else None)
    var.index = (
        _unique_names(var[gene_col].astype(str))
        if gene_col
        else pd.Index([str(i) for i in range(n_genes)])
    )

    bkey = _pick_attr(batch_key, _LOOM_BATCH_CANDIDATES, obs, source, "batch_key")
    if bkey is not None:
        obs["batch"] = pd.Categorical(np.asarray(obs[bkey]))
    lkey = _pick_attr(label_key, _LOOM_LABEL_CANDIDATES, obs, source, "label_key")
    if lkey is not None:
        labels = np.asarray(obs[lkey])
        obs["labels"] = pd.Categorical(labels)
        names = global_attrs.get("CellTypes")
        cell_type: Any = obs["labels"]
        if names is not None and np.issubdtype(np.asarray(labels).dtype, np.number):
            names = np.atleast_1d(np.asarray(names)).astype(str)
            codes = np.asarray(labels)
            if np.all(codes == np.round(codes)) and codes.min() >= 0 and codes.max() < len(names):
                cell_type = pd.Categorical(names[codes.astype(np.int64)])
        obs["cell_type"] = cell_type

    adata = ad.AnnData(X=X, obs=obs, var=var)
    for key, value in obsm.items():
        adata.obsm[key] = value
    for key, value in varm.items():
        adata.varm[key] = value
    if global_attrs:
        adata.uns["loom_attrs"] = {
            k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in global_attrs.items()
        }
    if drop_empty_cells:
        keep = np.asarray(adata.X.sum(axis=1)).ravel() > 0
        if not keep.all():
            adata = adata[keep].copy()
    return adata


def _read_attr_group(f: h5py.File, group: str, length: int, source: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if group not in f:
        return out
    for key, dset in f[group].items():
        if not isinstance(dset, h5py.Dataset):
            continue
        values = _decode_strings(dset[()])
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
            frame[key] = _to_obs_column(values)
        elif values.ndim == 2 and values.shape[1] == 1:
            frame[key] = _to_obs_column(values[:, 0])
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


# --------------------------------------------------------------------------- 10x


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
    p = _as_path(path)
    source = str(p)
    if n_cells is not None and (not isinstance(n_cells, (int, np.integer)) or n_cells < 0):
        raise ValueError(f"n_cells must be a non-negative integer, got {n_cells!r}")
    if chunk_cells < 1:
        raise ValueError(f"chunk_cells must be positive, got {chunk_cells}")

    with _open_hdf5(p, "a 10x Cell Ranger HDF5 file") as f:
        version, grp = _10x_layout(f, genome, source)
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

        if version == "v3":
            feats = grp["features"]
            gene_ids = _decode_strings(feats["id"][()])
            gene_names = _decode_strings(feats["name"][()])
            var = pd.DataFrame({"gene_ids": gene_ids.astype(str)})
            if "feature_type" in feats:
                var["feature_types"] = _decode_strings(feats["feature_type"][()]).astype(str)
            if "genome" in feats:
                var["genome"] = _decode_strings(feats["genome"][()]).astype(str)
        else:
            if "genes" not in grp:
                raise ValueError(f"{source}: missing {grp.name}/genes; not a 10x HDF5 file")
            gene_ids = _decode_strings(grp["genes"][()])
            gene_names = _decode_strings(grp["gene_names"][()]) if "gene_names" in grp else gene_ids
            var = pd.DataFrame({"gene_ids": gene_ids.astype(str)})
        if len(gene_ids) != total_genes or len(gene_names) != total_genes:
            raise ValueError(f"{source}: gene annotation length disagrees with shape {shape}")

        selection = _normalize_cell_selection(cells, n_cells, total_cells, source)
        if selection is None:
            n_take = total_cells if n_cells is None else min(int(n_cells), total_cells)
            indptr = indptr_ds[: n_take + 1].astype(np.int64)
            lo, hi = int(indptr[0]), int(indptr[-1])
            X = sp.csr_matrix(
                (
                    grp["data"][lo:hi].astype(dtype),
                    grp["indices"][lo:hi].astype(np.int32 if total_genes < 2**31 else np.int64),
                    indptr - lo,
                ),
                shape=(n_take, total_genes),
            )
            cell_index = np.arange(n_take)
            barcodes = _decode_strings(grp["barcodes"][:n_take])
        else:
            X = _read_10x_cell_subset(grp, selection, total_genes, dtype, chunk_cells)
            cell_index = selection
            all_barcodes_needed = selection.size > 0
            barcodes = (
                _decode_strings(grp["barcodes"][()])[selection]
                if all_barcodes_needed
                else np.array([], dtype=object)
            )

    try:
        X.check_format(full_check=True)
    except ValueError as err:
        raise ValueError(f"{source}: corrupt sparse matrix ({err})") from err
    X.sort_indices()
    _check_integer_counts(X.data, source)

    keep_genes = np.ones(total_genes, dtype=bool)
    if version == "v3":
        if gene_expression_only and "feature_types" in var:
            keep_genes &= var["feature_types"].to_numpy() == "Gene Expression"
        if genome is not None and "genome" in var:
            keep_genes &= var["genome"].to_numpy() == genome
            if not keep_genes.any():
                raise ValueError(f"{source}: no features of genome {genome!r}")
    var.index = _unique_names(np.asarray(gene_names).astype(str))
    obs = pd.DataFrame(
        {"cell_index": np.asarray(cell_index, dtype=np.int64)},
        index=_unique_names(np.asarray(barcodes).astype(str)),
    )
    if not keep_genes.all():
        X = X[:, np.flatnonzero(keep_genes)].tocsr()
        var = var.iloc[np.flatnonzero(keep_genes)].copy()
        var.index = _unique_names(np.asarray(gene_names)[keep_genes].astype(str))
    return ad.AnnData(X=X, obs=obs, var=var)


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


# --------------------------------------------------------------------------- gene selection


def gene_variances(
    adata: ad.AnnData, layer: str | None = None, n_cells: int | None = None
) -> np.ndarray:
    """Population variance (``ddof=0``) of every gene's raw counts.

    Parameters
    ----------
    adata
        Cells x genes AnnData.
    layer
        Layer holding the counts (``None``: ``X``).
    n_cells
        Use only the first ``n_cells`` cells (``None``: all).

    Returns
    -------
    numpy.ndarray
        ``float64`` array of length ``n_vars``.
    """
    X = adata.X if layer is None else adata.layers[layer]
    if X is None:
        raise ValueError("adata.X is empty")
    if n_cells is not None:
        if n_cells < 1:
            raise ValueError(f"n_cells must be positive, got {n_cells}")
        X = X[: min(int(n_cells), X.shape[0])]
    n = X.shape[0]
    if n == 0:
        raise ValueError("no cells to compute gene variances from")
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        mean = np.asarray(X.sum(axis=0, dtype=np.float64)).ravel() / n
        sq = X.copy()
        sq.data = np.asarray(sq.data, dtype=np.float64) ** 2
        mean_sq = np.asarray(sq.sum(axis=0)).ravel() / n
        return np.maximum(mean_sq - mean**2, 0.0)
    return np.asarray(X, dtype=np.float64).var(axis=0)


def select_top_variance_genes(
    adata: ad.AnnData,
    n_top: int,
    layer: str | None = None,
    *,
    n_cells: int | None = None,
    return_mask: bool = False,
) -> ad.AnnData | np.ndarray:
    """Keep the ``n_top`` genes of highest raw-count variance (the scVI selection).

    The variance is the population variance (``ddof=0``) of each gene's raw
    counts over cells, without normalisation or log transform, as in the scVI
    loaders: ``CortexDataset`` ranks genes by ``np.std(X, axis=0)`` of the raw
    counts and keeps 558; ``BrainLargeDataset`` ranks by the variance of the
    raw counts (``StandardScaler(with_mean=False).var_`` in the 2018 code, the
    sparse ``E[x^2] - E[x]^2`` in later versions) computed on the first cells of
    the file (100,000 in the 2018 code, 10,000 later) and keeps 720. Ranking by
    standard deviation and by variance is identical. Ties are broken in favour
    of the earlier gene.

    Parameters
    ----------
    adata
        Cells x genes AnnData with raw counts.
    n_top
        Number of genes to keep (``1 <= n_top <= n_vars``).
    layer
        Layer holding the counts (``None``: ``X``).
    n_cells
        Compute the variances on the first ``n_cells`` cells only (the BRAIN
        protocol); ``None`` uses every cell (the CORTEX protocol).
    return_mask
        Return the boolean gene mask instead of a new AnnData.

    Returns
    -------
    anndata.AnnData or numpy.ndarray
        A copy of ``adata`` restricted to the selected genes, in their original
        order, with ``var["count_variance"]``; or the boolean mask of length
        ``n_vars``.
    """
    if not isinstance(n_top, (int, np.integer)) or isinstance(n_top, bool):
        raise ValueError(f"n_top must be an integer, got {n_top!r}")
    if not 1 <= n_top <= adata.n_vars:
        raise ValueError(f"n_top must be in [1, {adata.n_vars}] (n_vars), got {n_top}")
    var = gene_variances(adata, layer=layer, n_cells=n_cells)
    order = np.argsort(-var, kind="stable")
    mask = np.zeros(adata.n_vars, dtype=bool)
    mask[order[:n_top]] = True
    if return_mask:
        return mask
    out = adata[:, mask].copy()
    out.var["count_variance"] = var[mask]
    return out


# --------------------------------------------------------------------------- dispatch


def read_counts(path: PathLike, **kwargs: Any) -> ad.AnnData:
    """Read a count file, choosing the reader from the file extension.

    ===================  =================================================
    extension            reader
    ===================  =================================================
    ``.h5ad``            :func:`anndata.read_h5ad` (``X`` made CSR)
    ``.loom``            :func:`read_loom`
    ``.h5``, ``.hdf5``   :func:`read_10x_h5`
    ``.txt``, ``.tsv``   :func:`read_zeisel_txt` (also ``.txt.gz``)
    ===================  =================================================

    Parameters
    ----------
    path
        Path to the file.
    **kwargs
        Passed on to the reader.

    Returns
    -------
    anndata.AnnData
        Cells x genes counts as CSR.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the extension is unknown or the file cannot be read in the format
        its extension promises; the message names the file and the problem.
    """
    p = Path(os.fspath(path))
    suffixes = [s.lower() for s in p.suffixes]
    ext = suffixes[-1] if suffixes else ""
    if ext == ".gz" and len(suffixes) > 1:
        ext = suffixes[-2] + ".gz"
    readers = {
        ".loom": read_loom,
        ".h5": read_10x_h5,
        ".hdf5": read_10x_h5,
        ".txt": read_zeisel_txt,
        ".tsv": read_zeisel_txt,
        ".txt.gz": read_zeisel_txt,
        ".tsv.gz": read_zeisel_txt,
    }
    if ext != ".h5ad" and ext not in readers:
        raise ValueError(
            f"{p}: unknown count file extension {ext or '(none)'!r}; "
            "expected .h5ad, .loom, .h5/.hdf5 or .txt/.tsv(.gz)"
        )
    p = _as_path(p)
    if ext == ".h5ad":
        return _read_h5ad(p, **kwargs)
    return readers[ext](p, **kwargs)


def _read_h5ad(path: Path, **kwargs: Any) -> ad.AnnData:
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path}: not an HDF5 file, so it cannot be read as .h5ad")
    try:
        adata = ad.read_h5ad(path, **kwargs)
    except Exception as err:  # anndata raises several types for bad layouts
        raise ValueError(f"{path}: cannot be read as .h5ad ({type(err).__name__}: {err})") from err
    if adata.X is None:
        raise ValueError(f"{path}: the .h5ad file has no X matrix")
    if not sp.isspmatrix_csr(adata.X):
        adata.X = sp.csr_matrix(adata.X)
    return adata
