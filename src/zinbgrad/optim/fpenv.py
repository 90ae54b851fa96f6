"""Flush denormal floats to zero in every CPU compute thread for the duration of a fit.

The ZINB terms exponentiate large negative numbers (``exp(logit pi)`` of strongly
non-inflated entries, ``mu * q`` of tiny means), which in float32 often land in the denormal
range (below 1.2e-38). x86 CPUs handle denormal operands in microcode, tens of times slower
than normal ones, and one denormal lane slows a whole vector instruction: on the 10x brain
data this doubled the time of the per-entry kernels. With FTZ/DAZ set, such values become 0,
a change far below float32's resolution of any quantity they are added to.

``torch.set_flush_denormal`` sets the control register of the calling thread only, and the
OpenMP worker threads that run torch's (and inductor's) parallel loops keep their own. This
module therefore also runs the setting inside one OpenMP parallel region of the libgomp torch
loaded (``GOMP_parallel`` through ctypes), so that every thread of the pool gets it. Where
that is not possible (no libgomp, another OpenMP runtime), only the calling thread is set.
The previous state of the calling thread is restored on exit. ``ZINBGRAD_FTZ=0`` disables it.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["flush_denormals", "flushing", "set_all_threads"]

_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_gomp: ctypes.CDLL | None | bool = None  # None: not looked up yet; False: unavailable


def _libgomp() -> ctypes.CDLL | None:
    """The libgomp torch loaded (found in ``/proc/self/maps``), or None."""
    global _gomp
    if _gomp is None:
        _gomp = False
        try:
            if torch.backends.openmp.is_available():
                with open("/proc/self/maps") as fh:
                    paths = {line.split()[-1] for line in fh if "libgomp" in line}
                # other packages bundle their own copy (scikit-learn does): torch's one only
                here = os.path.dirname(torch.__file__) + os.sep
                own = [p for p in paths if p.startswith(here)]
                for p in own or (sorted(paths) if len(paths) == 1 else []):
                    if os.path.exists(p):
                        lib = ctypes.CDLL(p)
                        lib.GOMP_parallel.argtypes = [
                            _CALLBACK,
                            ctypes.c_void_p,
                            ctypes.c_uint,
                            ctypes.c_uint,
                        ]
                        lib.GOMP_parallel.restype = None
                        _gomp = lib
                        break
        except (OSError, AttributeError):
            _gomp = False
    return _gomp or None


def flushing() -> bool:
    """Whether the calling thread currently flushes denormal results to zero."""
    tiny = torch.tensor([1e-37], dtype=torch.float32)
    return bool((tiny * 1e-3).item() == 0.0)


def set_all_threads(flag: bool) -> bool:
    """Set flush-to-zero in the calling thread and every thread of torch's OpenMP pool.

    Returns False where the CPU does not support it; True otherwise (the pool threads are
    only reached where torch uses libgomp).
    """
    if not torch.set_flush_denormal(flag):
        return False
    lib = _libgomp()
    if lib is not None:

        def _set(_arg) -> None:
            torch.set_flush_denormal(flag)

        cb = _CALLBACK(_set)
        lib.GOMP_parallel(cb, None, max(1, torch.get_num_threads()), 0)
    return True


@contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[None]:
    """Flush denormals to zero in all CPU compute threads inside the block (see module)."""
    if not enabled or os.environ.get("ZINBGRAD_FTZ", "").strip().lower() in ("0", "false", "no"):
        yield
        return
    before = flushing()
    on = set_all_threads(True)
    try:
        yield
    finally:
        if on and not before:
            set_all_threads(False)
