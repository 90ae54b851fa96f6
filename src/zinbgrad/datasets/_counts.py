"""Reading a count file of any supported format, chosen by its extension."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import scipy.sparse as sp

from ._common import PathLike, as_path
from ._loom import read_loom
from ._tenx import read_10x_h5
from ._zeisel import read_zeisel_txt

__all__ = ["read_counts"]


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
    p = as_path(p)
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
