"""Runtime policy: the device, dtype, block size and CPU threads of a computation.

Functions over explicit arguments (an estimator's ``device``, ``dtype`` and ``block_entries``
parameters), shared by :class:`~zinbgrad.ZINBWaVE`, the projection of new cells and
:func:`zinbgrad.query.map_query`.
"""

from __future__ import annotations

import ctypes
import os
import sys
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch

from .model.kernel_cache import cache_dir
from .model.kernels import CACHED
from .optim.distributed import local_gpu

__all__ = [
    "CPU_BLOCK_ENTRIES",
    "CPU_FLOAT32_MIN_ENTRIES",
    "FUSED_CACHED_MIN_ENTRIES",
    "FUSED_MIN_ENTRIES",
    "GPU_BLOCK_ENTRIES",
    "block_entries",
    "cpu_threads",
    "gpu_block_entries",
    "keep_heap",
    "resolve_device",
    "resolve_dtype",
    "resolve_fused",
    "torch_setup",
]

#: fits at least this large (cells x genes) use fused kernels by default, compiled in the
#: process (torch.compile) unless this machine's kernel cache has them
FUSED_MIN_ENTRIES = 50_000_000
#: on the CPU, fits at least this large use the fused kernels of this machine's kernel cache
#: where it is in use (opt-in, :mod:`zinbgrad.model.kernel_cache`; loaded in milliseconds) and
#: queue a background build of missing ones; measured in BENCHMARKS.md section 2 (issue 20)
FUSED_CACHED_MIN_ENTRIES = 1_000_000

#: ``dtype="auto"`` on the CPU: float32 for computations of at least this many entries (cells x
#: genes), float64 below. Measured in BENCHMARKS.md, section 7: from half a million entries on,
#: float32 fits took 1.8-4x less time on 2 cores and agreed with float64 within the
#: seed-to-seed spread (objective, 15-NN overlap, cell-type scores); on tiny data (pbmc_small,
#: 80 x 230) float32 saved nothing and its optima spread over 0.5-2.4 % of the objective.
CPU_FLOAT32_MIN_ENTRIES = 1_000_000

#: default ``block_entries`` on the CPU, and the range of the default on a GPU
CPU_BLOCK_ENTRIES = 2**21
GPU_BLOCK_ENTRIES = (2**21, 2**27)
#: GPU memory taken per block entry, in floats of the fit's dtype (measured on an H200 in
#: float32: ~110 bytes per entry with the fused kernels, see BENCHMARKS.md), and the share of
#: the free GPU memory the default block may take
GPU_FLOATS_PER_ENTRY = 28
GPU_MEMORY_SHARE = 0.25


@contextmanager
def cpu_threads(device: torch.device, entries: int):
    """Use one CPU thread for small problems (thread start-up and synchronisation cost more
    than they save there, and badly so when other processes load the machine); otherwise
    torch's default, all available cores."""
    if device.type != "cpu" or entries >= 1_000_000:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: glibc's mallopt parameters and the values set while a CPU computation runs (see keep_heap)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest (64-bit): blocks of 2^21 floats and less
_HEAP_TRIM_THRESHOLD = 2**30
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024
#: whether keep_heap's settings are in force (the outermost keep_heap restores them)
_heap_kept = False


@lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


@contextmanager
def keep_heap(device: torch.device):
    """Keep freed memory in the process's heap while a CPU computation runs (glibc only).

    Every eager torch operation allocates its result; a block's arrays (2^21 floats, 8-16 MB)
    are above glibc's mmap/trim thresholds, so each one was mapped afresh and page-faulted in,
    which cost ~1 ms per array against ~0.2 ms for the arithmetic (the order-2 likelihood call
    of a 2,933 x 715 float32 block: 74 ms, 32 ms with this; BENCHMARKS.md section 2, issue
    20). Inside, ``mallopt`` serves such arrays from the heap and does not give freed memory
    back (peak memory is unchanged: it is reused); on exit glibc's initial thresholds are set
    again and ``malloc_trim`` returns the free memory. ``ZINBGRAD_HEAP=0`` disables it.
    """
    global _heap_kept
    libc = _glibc() if device.type == "cpu" else None
    off = os.environ.get("ZINBGRAD_HEAP", "").strip().lower() in ("0", "off")
    if libc is None or off or _heap_kept:  # nested: the outermost one restores
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, _HEAP_TRIM_THRESHOLD)
    _heap_kept = True
    try:
        yield
    finally:
        _heap_kept = False
        libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
        libc.malloc_trim(0)


def gpu_block_entries(device: torch.device, itemsize: int = 4) -> int:
    """The default ``block_entries`` on a GPU: the largest power of two whose working arrays
    (~``GPU_FLOATS_PER_ENTRY`` floats per entry) take at most ``GPU_MEMORY_SHARE`` of the
    device's free memory, within ``GPU_BLOCK_ENTRIES`` (2^27 on an 80 GB or larger GPU, 2^25
    on a 16 GB one)."""
    lo, hi = GPU_BLOCK_ENTRIES
    free, _ = torch.cuda.mem_get_info(device)
    fit = GPU_MEMORY_SHARE * free / (GPU_FLOATS_PER_ENTRY * itemsize)
    return int(min(max(2 ** int(np.floor(np.log2(max(fit, 1.0)))), lo), hi))


def block_entries(
    entries: int | None, device: torch.device, dtype: torch.dtype | None = None
) -> int:
    """The block size of a computation on ``device``.

    Parameters
    ----------
    entries
        An estimator's ``block_entries`` parameter: used when given.
    device, dtype
        Where and in which dtype the computation runs. ``entries=None``:
        :data:`CPU_BLOCK_ENTRIES` on the CPU, :func:`gpu_block_entries` on a GPU (float32
        when ``dtype`` is ``None``).

    Returns
    -------
    int
        Cells x genes entries per block.
    """
    if entries is not None:
        return int(entries)
    if device.type == "cuda":
        return gpu_block_entries(device, 4 if dtype is None else dtype.itemsize)
    return CPU_BLOCK_ENTRIES


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise ``torch.device(device)``.

    A CUDA device without an index is this process's GPU: under torch.distributed (``torchrun``
    or ``zinbgrad fit --nproc``, ``WORLD_SIZE`` > 1) the one of its ``LOCAL_RANK`` (modulo the
    visible GPUs), so that the ranks on one host use different GPUs; else the current device.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}"
        ) from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} requested but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
        if dev.index is None:
            dev = torch.device("cuda", local_gpu())
    return dev


def resolve_dtype(
    dtype: str | torch.dtype, device: torch.device, entries: int | None = None
) -> torch.dtype:
    """The dtype of a computation of ``entries`` cells x genes on ``device``.

    ``"auto"`` -> float32 on a GPU; on the CPU float32 when ``entries`` is at least
    :data:`CPU_FLOAT32_MIN_ENTRIES`, float64 below it (and when ``entries`` is ``None``);
    ``"float32"``/``"float64"`` or a ``torch.dtype`` as given; anything else is an error.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "float64": torch.float64}
    if dtype == "auto":
        if device.type == "cuda":
            return torch.float32
        large = entries is not None and entries >= CPU_FLOAT32_MIN_ENTRIES
        return torch.float32 if large else torch.float64
    if dtype not in table:
        raise ValueError(f"dtype must be 'auto', 'float32' or 'float64', got {dtype!r}")
    return table[dtype]


def resolve_fused(fused: bool | str, device: torch.device, entries: int) -> bool | str:
    """The fused-kernel request of a fit of ``entries`` cells x genes on ``device``.

    ``"auto"`` -> ``True`` (fused, compiled in the process where the kernel cache lacks the
    kernels) from :data:`FUSED_MIN_ENTRIES`; on the CPU, where the opt-in kernel cache is in
    use (:func:`zinbgrad.model.kernel_cache.cache_dir`), ``"cached"`` (only the kernels of
    this machine's cache, missing ones built in the background for later fits) from
    :data:`FUSED_CACHED_MIN_ENTRIES`; ``False`` below. ``True``/``False`` as given.
    """
    if fused != "auto":
        return bool(fused)
    if entries >= FUSED_MIN_ENTRIES:
        return True
    if device.type == "cpu" and entries >= FUSED_CACHED_MIN_ENTRIES and cache_dir() is not None:
        return CACHED
    return False


def torch_setup(
    device: str | torch.device, dtype: str | torch.dtype, entries: int | None = None
) -> tuple[torch.device, torch.dtype]:
    """The resolved device and dtype of a computation of ``entries`` cells x genes
    (:func:`resolve_device`, :func:`resolve_dtype`), e.g. from an estimator's ``device`` and
    ``dtype`` parameters."""
    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev, entries)
