"""The fused-kernel backend: optional ``torch.compile`` evaluation of pure tensor functions.

:func:`zinbgrad.model.likelihood.entry_derivatives` writes its element-wise work as pure tensor
functions; this module decides whether they run compiled and keeps the compiled variants. All of
its state is the process-wide registry below, and only the functions of this module change it:

* the fusion mode (:func:`set_fused`, :func:`get_fused`; ``ZINBGRAD_FUSED=1`` makes ``True`` the
  initial mode, ``ZINBGRAD_FUSED=0`` disables fusion regardless of the mode);
* the compiled variants, one per static configuration (:func:`run_fused` creates them);
* the reason fusion was given up in this process, if it was (after a failure :func:`run_fused`
  warns once and answers ``None`` for good, so callers evaluate eagerly).

Kernels built ahead of time into this machine's cache (:mod:`zinbgrad.model.kernel_cache`) are
preferred to ``torch.compile`` where present: they load in milliseconds. A caller that passes
``fused="cached"`` uses only those (and queues a background build of a missing one),
never compiling in its own process.
"""

from __future__ import annotations

import os
import types
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

from .kernel_cache import lookup, mark_failed, request_build, signature

__all__ = ["CACHED", "fusion_available", "get_fused", "run_fused", "set_fused"]

#: a caller's ``fused`` request for kernels of the per-machine cache only (no compiling here)
CACHED = "cached"

_FUSED_MODES = ("auto", True, False)
_ENV_ON = ("1", "true", "yes", "on")
_ENV_OFF = ("0", "false", "no", "off")

# ---- the registry (changed only by set_fused, _compiled_variant and _give_up_fusion) ---------
#: "auto" (fused where the caller asks), True (fused unless the caller refuses) or False
_fused_mode: bool | str = (
    True if os.environ.get("ZINBGRAD_FUSED", "").strip().lower() in _ENV_ON else "auto"
)
#: why fused evaluation was given up in this process (None: not given up)
_fused_failure: str | None = None
#: one compiled callable per static configuration (the key given to run_fused)
_compiled: dict[Hashable, Callable[..., Any]] = {}


def _env_disabled() -> bool:
    return os.environ.get("ZINBGRAD_FUSED", "").strip().lower() in _ENV_OFF


def get_fused() -> bool | str:
    """The module-wide fusion mode: ``"auto"`` (default), ``True`` or ``False``."""
    return _fused_mode


class set_fused:  # a class so that it also works as a context manager (torch.set_grad_enabled)
    """Set the module-wide fusion mode of :func:`~zinbgrad.model.likelihood.entry_derivatives`;
    also a context manager that restores the previous mode on exit.

    * ``"auto"`` (default): fused only where the caller passes ``fused=True``;
    * ``True``: fused unless the caller passes ``fused=False``;
    * ``False``: never fused (also ignores ``fused=True``).

    Returns the previous mode as ``.prev``. ``with set_fused(True): ...`` restores it on exit.

    Fused evaluation compiles the element-wise kernels with ``torch.compile(dynamic=True)`` on
    first use (one compilation per configuration of zero inflation, derivative order and
    dispersion; inductor caches them on disk across processes). The environment variable
    ``ZINBGRAD_FUSED=0`` disables it regardless of this setting (``ZINBGRAD_FUSED=1`` makes
    ``True`` the initial mode). If compiling or running a
    compiled kernel fails, a single warning is issued and the process falls back to eager
    evaluation for good. Results agree with eager evaluation to a few units of rounding.
    """

    def __init__(self, mode: bool | str) -> None:
        global _fused_mode
        if not any(mode is m or (isinstance(m, str) and mode == m) for m in _FUSED_MODES):
            raise ValueError(f"fused mode must be 'auto', True or False, not {mode!r}")
        self.prev = _fused_mode
        _fused_mode = mode

    def __enter__(self) -> set_fused:
        return self

    def __exit__(self, *exc: object) -> None:
        global _fused_mode
        _fused_mode = self.prev


def fusion_available(device: torch.device | str | None = None) -> bool:
    """Whether ``entry_derivatives(..., fused=True)`` would use compiled kernels.

    False where disabled (``ZINBGRAD_FUSED=0``, ``set_fused(False)``), after an earlier failure in
    this process, where torch.compile is unsupported, or (with ``device``) where the backend
    inductor needs for that device (a C++ compiler for CPU, triton for CUDA) is missing. It does
    not compile anything; a failure at first use still falls back to eager with a warning.
    """
    if _env_disabled() or _fused_failure is not None or _fused_mode is False:
        return False
    if not hasattr(torch, "compile"):
        return False
    try:
        from torch._dynamo import is_dynamo_supported

        if not is_dynamo_supported():
            return False
        kind = None if device is None else torch.device(device).type
        if kind == "cpu":
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        elif kind == "cuda":
            from torch.utils._triton import has_triton

            return bool(has_triton())
    except Exception:
        return False
    return True


def _want_fused(fused: bool | str | None) -> bool:
    if _fused_mode is False or _fused_failure is not None or _env_disabled():
        return False
    if fused is None:
        return _fused_mode is True
    return fused == CACHED or bool(fused)


def _compiled_variant(key: Hashable, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """The compiled ``fn`` for one static configuration ``key`` (created on first use).

    Each configuration gets its own code object, named ``name``: dynamo keeps its compiled
    graphs (and counts them against its recompile limit) per code object, so sharing one closure
    would pile all configurations onto one cache.
    """
    compiled = _compiled.get(key)
    if compiled is None:

        def call(*args: Tensor | None) -> Any:
            return fn(*args)

        code = call.__code__.replace(co_name=name)
        fresh = types.FunctionType(code, call.__globals__, name, None, call.__closure__)
        compiled = _compiled[key] = torch.compile(fresh, dynamic=True)
    return compiled


def _plain(x: Tensor | None) -> Tensor | None:
    """``x`` as a contiguous tensor at storage offset 0 (views are copied): compiled graphs are
    guarded on strides and storage offsets, and a view's offset that happens to equal a size
    would be specialized on ("duck sizing") and force a recompilation later."""
    if x is None or (x.is_contiguous() and x.storage_offset() == 0):
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _give_up_fusion(exc: BaseException) -> None:
    global _fused_failure
    msg = str(exc).strip().splitlines()
    reason = f"{type(exc).__name__}: {msg[0][:300] if msg else ''}"
    _fused_failure = reason
    _compiled.clear()
    warnings.warn(
        f"zinbgrad: fused (torch.compile) likelihood kernels failed ({reason}); "
        "using eager evaluation for the rest of this process (set ZINBGRAD_FUSED=0 to skip).",
        RuntimeWarning,
        stacklevel=4,
    )


def run_fused(
    key: Hashable,
    name: str,
    fn: Callable[..., Any],
    args: tuple[Tensor | None, ...],
    fused: bool | str | None,
    dims: tuple[str | None, ...] | None = None,
) -> Any | None:
    """``fn(*args)`` evaluated by its compiled variant, or ``None`` to evaluate eagerly.

    The variant is the package of the per-machine cache where it is built
    (:mod:`~zinbgrad.model.kernel_cache`; ``dims`` given), else (unless ``fused="cached"``)
    ``torch.compile(fn, dynamic=True)``; a missing package is queued for a background build.

    Parameters
    ----------
    key
        The static configuration ``fn`` closes over (one compiled variant per key).
    name
        Name of the variant's code object (shown in profiles and dynamo's logs) and package.
    fn
        Pure tensor function of ``args`` (no data-dependent Python control flow when traced);
        picklable (e.g. a ``functools.partial`` of a module-level function) for the cache.
    args
        Tensors or ``None``; views are copied to contiguous tensors first.
    fused
        The caller's request: ``True``, ``False``, ``None`` (the mode of :func:`set_fused`) or
        ``"cached"`` (only a package of the cache, never compiling in this process).
    dims
        Per argument, a letter per dimension naming its size (equal letters, equal sizes), for
        the cache's packages, which are built for dynamic sizes; ``None``: no package.

    Returns
    -------
    object or None
        ``fn``'s result, or ``None`` where fusion is not wanted, disabled, or failed (the first
        failure warns once and gives fusion up for the rest of the process).
    """
    if not _want_fused(fused):
        return None
    sig = None
    try:
        args = tuple(_plain(x) for x in args)
        if dims is not None:
            sig = signature(args, dims)
            kernel = lookup(name, sig)
            if kernel is not None:
                return kernel(*args)
            request_build(name, fn, sig)
            sig = None
        if fused == CACHED:
            return None
        compiled = _compiled_variant(key, name, fn)
        return compiled(*args)
    except Exception as exc:  # no compiler, unsupported platform, a broken package, ...
        if sig is not None:
            mark_failed(name, sig, exc)
        _give_up_fusion(exc)
        return None
