"""What the benchmark-file readers share: path and HDF5 checks, string decoding, unique
names, count checks."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd

__all__ = [
    "PathLike",
    "as_path",
    "check_integer_counts",
    "decode_strings",
    "open_hdf5",
    "to_obs_column",
    "unique_names",
]

PathLike = str | os.PathLike[str]


def as_path(path: PathLike) -> Path:
    """``path`` as a :class:`~pathlib.Path`, which must be an existing regular file."""
    p = Path(os.fspath(path))
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if not p.is_file():
        raise ValueError(f"{p}: not a regular file")
    return p


def open_hdf5(path: Path, what: str) -> h5py.File:
    """Open ``path`` read-only, turning every failure into a ValueError naming the file."""
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path}: not an HDF5 file, so it cannot be read as {what}")
    try:
        return h5py.File(path, "r")
    except OSError as err:  # pragma: no cover - corrupt HDF5 that passes is_hdf5
        raise ValueError(f"{path}: unreadable HDF5 file ({err})") from err


def decode_strings(values: Any) -> np.ndarray:
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


def unique_names(names: Sequence[str]) -> pd.Index:
    """Make names unique the way AnnData does (``name``, ``name-1``, ``name-2``...)."""
    index = pd.Index([str(n) for n in names])
    if index.is_unique:
        return index
    return pd.Index(ad.utils.make_index_unique(index))


def check_integer_counts(data: np.ndarray, source: str, stacklevel: int = 3) -> None:
    """Refuse NaN, infinite or negative counts in ``data`` (the stored values of a matrix read
    from ``source``) and warn, ``stacklevel`` frames up, when some are not integers."""
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
            stacklevel=stacklevel,
        )


def to_obs_column(values: np.ndarray) -> pd.Series | np.ndarray:
    """Numeric columns stay numeric, string columns become categoricals."""
    values = decode_strings(values)
    if values.dtype.kind == "O":
        return pd.Categorical(values.astype(str))
    return values
