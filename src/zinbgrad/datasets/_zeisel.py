"""Reader of the Zeisel et al. (2015) mouse cortex text file (the scVI CORTEX data set)."""

from __future__ import annotations

import gzip
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._common import PathLike, as_path, unique_names

__all__ = ["ZEISEL_METADATA_KEYS", "read_zeisel_txt"]

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


@dataclass
class _ZeiselRows:
    """What the rows of the file held: metadata rows, and each gene's non-zero counts."""

    source: str
    dtype: np.dtype | type
    meta: dict[str, list[str]] = field(default_factory=dict)
    gene_names: list[str] = field(default_factory=list)
    gene_clusters: list[str] = field(default_factory=list)
    row_indices: list[np.ndarray] = field(default_factory=list)
    row_values: list[np.ndarray] = field(default_factory=list)
    n_cells: int | None = None
    non_integer: bool = False

    def add_meta(self, fields: list[str], known: dict[str, str]) -> bool:
        """Take a metadata or filler row (before the first gene row); False for a gene row."""
        first = fields[0].strip()
        second = fields[1].strip() if len(fields) > 1 else ""
        if first == "" and second != "":
            self.meta[second] = fields[2:]
            return True
        if first == "":
            return True  # filler row
        if first.lower() in known and second == "":
            self.meta[known[first.lower()]] = fields[2:]
            return True
        return False

    def start_genes(self, lineno: int) -> None:
        """At the first gene row: the number of cells, from the metadata rows."""
        if not self.meta:
            raise ValueError(
                f"{self.source}: no cell metadata rows before the first gene row "
                f"(line {lineno}); not a Zeisel expression_mRNA file"
            )
        self.n_cells = _zeisel_n_cells(self.meta, self.source)

    def add_gene(self, fields: list[str], lineno: int) -> None:
        """Take a gene row: name, cluster, then one count per cell."""
        source, n_cells = self.source, self.n_cells
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
            raise ValueError(f"{source}, line {lineno}: counts must be finite and non-negative")
        self.non_integer = self.non_integer or bool(np.any(nz_values != np.floor(nz_values)))
        self.gene_names.append(name)
        self.gene_clusters.append(fields[1].strip())
        self.row_indices.append(nz.astype(np.int32))
        self.row_values.append(nz_values.astype(self.dtype))


def _read_zeisel_rows(p: Path, source: str, dtype: np.dtype | type) -> _ZeiselRows:
    """Parse the file line by line (nothing dense is kept: each gene row's non-zeros)."""
    rows = _ZeiselRows(source, dtype)
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
                    if rows.add_meta(fields, known):
                        continue
                    in_genes = True  # first gene row
                    rows.start_genes(lineno)
                rows.add_gene(fields, lineno)
    except UnicodeDecodeError as err:
        raise ValueError(f"{source}: not a UTF-8 text file ({err})") from err
    except (OSError, EOFError) as err:
        raise ValueError(f"{source}: unreadable text file ({err})") from err
    if not rows.gene_names:
        if not rows.meta:
            raise ValueError(f"{source}: empty file or no tab-separated rows")
        raise ValueError(f"{source}: no gene rows after the cell metadata rows")
    return rows


def _zeisel_counts(rows: _ZeiselRows) -> sp.csr_matrix:
    """The cells x genes CSR matrix of the gene rows' non-zeros."""
    data = np.concatenate(rows.row_values)
    indptr = np.zeros(len(rows.gene_names) + 1, dtype=np.int64)
    np.cumsum([len(ix) for ix in rows.row_indices], out=indptr[1:])
    genes_by_cells = sp.csr_matrix(
        (data, np.concatenate(rows.row_indices), indptr),
        shape=(len(rows.gene_names), rows.n_cells),
    )
    X = genes_by_cells.T.tocsr()  # CSC transpose -> CSR cells x genes
    X.sort_indices()
    return X


def _zeisel_obs(meta: dict[str, list[str]], n_cells: int) -> pd.DataFrame:
    """One ``obs`` column per metadata row, the cell ids as names, ``cell_type``."""
    obs = pd.DataFrame(index=pd.RangeIndex(n_cells))
    for key, values in meta.items():
        col = ZEISEL_METADATA_KEYS.get(key, _normalize_key(key))
        obs[col] = _parse_meta_values(values)
    if "cell_id" in obs:
        obs.index = unique_names(obs["cell_id"].astype(str))
    else:
        obs.index = pd.Index([f"cell_{i}" for i in range(n_cells)])
    if "level1class" in obs:
        obs["cell_type"] = pd.Categorical(obs["level1class"].astype(str))
    for col in ("tissue", "level1class", "level2class", "well"):
        if col in obs and not pd.api.types.is_numeric_dtype(obs[col]):
            obs[col] = pd.Categorical(obs[col])
    return obs


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
    p = as_path(path)
    source = str(p)
    rows = _read_zeisel_rows(p, source, dtype)
    assert rows.n_cells is not None
    if rows.non_integer:
        warnings.warn(
            f"{source}: the matrix holds non-integer values; these are not raw counts",
            UserWarning,
            stacklevel=2,
        )
    X = _zeisel_counts(rows)
    obs = _zeisel_obs(rows.meta, rows.n_cells)
    var = pd.DataFrame(
        {"gene_name": rows.gene_names, "gene_cluster": rows.gene_clusters},
        index=unique_names(rows.gene_names),
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
