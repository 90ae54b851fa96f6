"""Fused kernels compiled ahead of time once per machine and loaded in milliseconds.

``torch.compile`` of the likelihood kernels costs every new process seconds (importing dynamo
and inductor, tracing, loading its cache) before the first fused call; a package built by
AOTInductor (``torch.export`` + ``aoti_compile_and_package``, with dynamic sizes) is a shared
library that a process loads in a few milliseconds without importing either. This module keeps
such packages in a per-machine cache directory and builds missing ones in a background process:

* **opt-in**: without ``$ZINBGRAD_KERNEL_CACHE`` (or with ``0``/``off``) there is no cache, no
  lookup and no builder, so a fit's result never depends on what earlier processes built
  (fused and eager kernels agree to rounding, not bitwise) and no process outlives the
  user's; the lead chose this over the helper's default-on cache (2026-12-05);
* the directory: ``$ZINBGRAD_KERNEL_CACHE`` itself, or with ``on``/``1``
  ``$XDG_CACHE_HOME/zinbgrad/kernels`` (``~/.cache/zinbgrad/kernels``), in a subdirectory per
  *fingerprint*: the torch and Python versions, the CPU (its feature flags: inductor compiles
  with ``-march=native``), the package format and the source of :mod:`zinbgrad.model`'s math
  modules (the kernels' formulas), so a package is never used by another torch, machine or
  version of the formulas;
* one package per kernel and argument signature (which arguments are ``None``, their dtypes and
  the names of their dimensions), ``<name>-<hash>.pt2``, with a ``.json`` describing its output;
* :func:`request_build` queues a kernel and starts (at most one per directory) a detached
  builder, ``python -m zinbgrad.model.kernel_cache DIR PID``, at the lowest CPU priority. It
  waits until the requesting process ``PID`` has exited or is idle (used under 10 % of a CPU
  for 3 s) and the load average leaves a CPU free (a build beside a running fit slowed that
  fit several times on 2 cores, even niced), then builds the queued packages one after
  another (~10-20 s each on 2 CPU cores), each written atomically; a failed build leaves a
  ``.failed`` note and is not retried.

Nothing is downloaded and nothing is shipped: every package is built on the machine using it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io_utils import atomic_write, pid_alive

__all__ = [
    "build_queued",
    "cache_dir",
    "lookup",
    "mark_failed",
    "request_build",
    "signature",
    "wait_until_idle",
]

CACHE_ENV = "ZINBGRAD_KERNEL_CACHE"
_OFF = ("0", "off", "false", "no", "none")
_ON = ("1", "on", "true", "yes")
#: example sizes given to the dimensions of a signature when a kernel is exported (distinct
#: primes, so that no two dimensions are taken to be equal)
_EXAMPLE_SIZES = (37, 23, 101, 53, 71, 89)

#: per process: package file -> loaded kernel, or None where it is missing (looked up once)
_loaded: dict[str, Callable[..., Any] | None] = {}
#: builds requested by this process (each at most once)
_requested: set[str] = set()
#: the background builder this process started (it works through the queue until it is empty)
_builder: list[subprocess.Popen] = []


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


#: the packages' format: raise it when :func:`build` changes what it builds
_FORMAT = 1
#: the modules of zinbgrad.model that are not kernel math (their source is not fingerprinted)
_BACKEND = ("kernel_cache.py", "kernels.py")


@lru_cache(maxsize=1)
def _fingerprint() -> str:
    h = hashlib.sha256()
    for part in (torch.__version__, sys.version, platform.machine(), _cpu_flags(), str(_FORMAT)):
        h.update(part.encode())
    for f in sorted(Path(__file__).parent.glob("*.py")):
        if f.name not in _BACKEND:
            h.update(f.read_bytes())
    return f"torch-{torch.__version__}-{h.hexdigest()[:16]}"


def cache_dir() -> Path | None:
    """This machine's directory of compiled kernels, or ``None`` where the cache is not in use.

    Opt-in: ``$ZINBGRAD_KERNEL_CACHE`` unset (or ``0``/``off``) means no cache, so a fit
    neither reads packages nor starts a builder, and its results do not depend on what an
    earlier process left on disk; ``on``/``1`` uses ``$XDG_CACHE_HOME/zinbgrad/kernels``
    (``~/.cache/zinbgrad/kernels``), any other value is the directory itself.
    """
    env = os.environ.get(CACHE_ENV, "").strip()
    if not env or env.lower() in _OFF:
        return None
    if env.lower() in _ON:
        xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "zinbgrad" / "kernels"
    else:
        base = Path(env).expanduser()
    return base / _fingerprint()


def signature(args: Sequence[Tensor | None], dims: Sequence[str | None]) -> tuple:
    """What a package is built for: per argument ``None`` or ``(dtype, device type, dims)``;
    ``dims`` names each argument's dimensions by one letter each (e.g. ``"nJ"``), equal
    letters being equal sizes."""
    return tuple(
        None if x is None else (str(x.dtype).removeprefix("torch."), x.device.type, d)
        for x, d in zip(args, dims, strict=True)
    )


def _file_stem(name: str, sig: tuple) -> str:
    return f"{name}-{hashlib.sha256(repr(sig).encode()).hexdigest()[:12]}"


def _structure(out: Any) -> Any:
    """The nesting of ``out`` (tuples of tensors and ``None``) as JSON: tensors are ``1``."""
    if out is None:
        return None
    if isinstance(out, tuple | list):
        return [_structure(o) for o in out]
    return 1


def _flatten(out: Any) -> list[Tensor]:
    if out is None:
        return []
    if isinstance(out, tuple | list):
        return [t for o in out for t in _flatten(o)]
    return [out]


def _rebuild(structure: Any, flat: Any) -> Any:
    if structure is None:
        return None
    if isinstance(structure, list):
        return tuple(_rebuild(s, flat) for s in structure)
    return next(flat)


class _Packaged:
    """A loaded package: called with the kernel's arguments, returns its nested output."""

    def __init__(self, path: Path, structure: Any) -> None:
        from torch._C._aoti import AOTIModelPackageLoader  # no dynamo/inductor import

        self.loader = AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        self.structure = structure

    def __call__(self, *args: Tensor | None) -> Any:
        outs = self.loader.run([x for x in args if x is not None])
        return _rebuild(self.structure, iter(outs))


def lookup(name: str, sig: tuple) -> Callable[..., Any] | None:
    """The cached kernel ``name`` for signature ``sig``, loaded (once per process), or ``None``
    where it is not built (yet) or the cache is disabled."""
    d = cache_dir()
    if d is None:
        return None
    stem = str(d / _file_stem(name, sig))
    if stem not in _loaded:
        kernel = None
        pkg, meta = Path(stem + ".pt2"), Path(stem + ".json")
        if pkg.is_file() and meta.is_file() and not Path(stem + ".failed").exists():
            kernel = _Packaged(pkg, json.loads(meta.read_text())["structure"])
        _loaded[stem] = kernel
    return _loaded[stem]


def mark_failed(name: str, sig: tuple, exc: BaseException) -> None:
    """Note that the package of ``name`` for ``sig`` failed to load or run: later processes
    neither use nor rebuild it (remove the ``.failed`` file to try again)."""
    d = cache_dir()
    try:
        (d / f"{_file_stem(name, sig)}.failed").write_text(f"{type(exc).__name__}: {exc}\n")
    except (OSError, TypeError):  # no cache (None), read-only, ...
        pass


def request_build(name: str, fn: Callable[..., Any], sig: tuple) -> bool:
    """Queue the package of ``fn`` (picklable, e.g. a ``functools.partial`` of a module-level
    function) for ``sig`` and start a background builder unless one is running; once per
    process and kernel. Returns whether a build was queued."""
    d = cache_dir()
    if d is None or os.name != "posix":
        return False
    stem = _file_stem(name, sig)
    if stem in _requested:
        return False
    _requested.add(stem)
    if (d / f"{stem}.pt2").exists() or (d / f"{stem}.failed").exists():
        return False
    try:
        with atomic_write(d / "queue" / f"{stem}.pkl") as tmp:
            tmp.write_bytes(pickle.dumps({"name": name, "fn": fn, "sig": sig, "stem": stem}))
        if not (_builder and _builder[-1].poll() is None) and not _builder_running(d):
            _builder[:] = [_start_builder(d)]
    except OSError:  # a read-only or full cache directory, no interpreter to start, ...
        return False
    return True


def _start_builder(d: Path) -> subprocess.Popen:
    """A detached ``python -m zinbgrad.model.kernel_cache DIR PID``, logging to DIR/build.log."""
    cmd = [sys.executable, "-m", "zinbgrad.model.kernel_cache", str(d), str(os.getpid())]
    with open(d / "build.log", "ab") as log:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )


def _builder_running(d: Path) -> bool:
    import time

    lock = d / "build.lock"
    try:
        text = lock.read_text().strip()
        if not text:  # just created, its pid not written yet (or left by a crash long ago)
            return time.time() - lock.stat().st_mtime < 60.0
        return pid_alive(int(text))
    except (OSError, ValueError):
        return False


def _example(spec: tuple, sizes: dict[str, int]) -> Tensor:
    dtype, device, dims = spec
    shape = [sizes.setdefault(c, _EXAMPLE_SIZES[len(sizes)]) for c in dims]
    dt = getattr(torch, dtype)
    if dt.is_floating_point:
        return torch.rand(shape, dtype=dt, device=device) + 0.5
    return torch.zeros(shape, dtype=dt, device=device)  # indices: 0 is valid everywhere


def build(d: Path, name: str, fn: Callable[..., Any], sig: tuple) -> Path:
    """Export ``fn`` for ``sig`` with dynamic sizes and compile it into ``d`` (atomically)."""
    from torch._inductor import aoti_compile_and_package
    from torch._inductor import config as inductor_config
    from torch.export import Dim, export

    sizes: dict[str, int] = {}
    full = [None if s is None else _example(s, sizes) for s in sig]
    tensors = [x for x in full if x is not None]
    slots = [i for i, x in enumerate(full) if x is not None]

    class Kernel(torch.nn.Module):
        def forward(self, xs: list[Tensor]) -> list[Tensor]:
            args: list[Tensor | None] = [None] * len(full)
            for i, x in zip(slots, xs, strict=True):
                args[i] = x
            return _flatten(fn(*args))

    symbols = {c: Dim(f"d_{c}", min=2) for c in sizes}
    dyn = [{k: symbols[c] for k, c in enumerate(sig[i][2])} for i in slots]
    structure = _structure(fn(*full))
    ep = export(Kernel(), (tensors,), dynamic_shapes=(dyn,), strict=False)
    stem = _file_stem(name, sig)
    with atomic_write(d / f"{stem}.pt2", suffix=".pt2") as tmp:
        # the number of OpenMP threads is read when the kernel runs, not fixed when it is built
        with inductor_config.patch({"cpp.dynamic_threads": True}):
            aoti_compile_and_package(ep, package_path=str(tmp))
        with atomic_write(d / f"{stem}.json") as meta:  # published just before the package
            meta.write_text(json.dumps({"name": name, "sig": repr(sig), "structure": structure}))
    return d / f"{stem}.pt2"


def _cpu_seconds(pid: int) -> float | None:
    """CPU time used so far by process ``pid`` (Linux ``/proc``), ``None`` where unknown or
    the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def wait_until_idle(pid: int, window: float = 3.0, share: float = 0.1) -> None:
    """Return once process ``pid`` has exited or used under ``share`` of a CPU during
    ``window`` seconds (where its CPU time cannot be read: once it has exited), and the
    machine has a CPU to spare (1-minute load average below the number of CPUs)."""
    import time

    while True:
        if pid > 0 and pid_alive(pid):
            before = _cpu_seconds(pid)
            time.sleep(window)
            after = _cpu_seconds(pid)
            if before is None or after is None or after - before >= share * window:
                continue
        if not hasattr(os, "getloadavg") or os.getloadavg()[0] < (os.cpu_count() or 1):
            return
        time.sleep(window)


def build_queued(d: Path, wait_for: int = 0) -> int:
    """Build every package queued in ``d`` (the background builder's work), each once process
    ``wait_for`` is idle or gone (:func:`wait_until_idle`); returns how many were built. Holds
    ``d/build.lock`` while it runs; returns 0 if another builder holds it."""
    lock = d / "build.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if _builder_running(d):
            return 0
        lock.unlink(missing_ok=True)
        return build_queued(d)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    built = 0
    try:
        while specs := sorted((d / "queue").glob("*.pkl")):
            for spec_file in specs:
                spec = pickle.loads(spec_file.read_bytes())
                stem = spec["stem"]
                if not (d / f"{stem}.pt2").exists():
                    wait_until_idle(wait_for)
                    try:
                        build(d, spec["name"], spec["fn"], spec["sig"])
                        built += 1
                    except Exception as exc:  # no compiler, unsupported op, ...
                        (d / f"{stem}.failed").write_text(f"{type(exc).__name__}: {exc}\n")
                spec_file.unlink(missing_ok=True)
    finally:
        lock.unlink(missing_ok=True)
    return built


if __name__ == "__main__":  # the builder: python -m zinbgrad.model.kernel_cache DIR [PID]
    os.nice(19)
    torch.set_num_threads(1)
    waited = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    print(f"zinbgrad kernel builder {os.getpid()}: built {build_queued(Path(sys.argv[1]), waited)}")
