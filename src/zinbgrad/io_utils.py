"""Safe file output: atomic writes, recognizable temporary files, SIGTERM handled as Ctrl-C.

Every file zinbgrad writes (``.h5ad`` outputs, models, checkpoints, synthetic data, the demo's
PNG) goes through :func:`atomic_write`: the content is written to a temporary file in the
output's folder, named ``.<name>.zinbgrad-tmp-<host>-<pid>-XXXXXXXX``, synced to disk and then
renamed onto the output. A reader never sees a half-written file under the output's name.

The temporary file is removed on every exit the process controls (an error, Ctrl-C, and
SIGTERM once :func:`terminate_as_interrupt` is in effect, as the command line does). After a
``kill -9`` or a crash of the machine it stays; its name says what it is, and the next write
of the same output removes the ones left by processes of this host that no longer run
(:func:`remove_stale_temps`). They are safe to delete by hand when no zinbgrad runs.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "TEMP_MARK",
    "Terminated",
    "atomic_write",
    "check_replaceable",
    "check_writable",
    "npz_file",
    "pid_alive",
    "read_npz_metadata",
    "remove_stale_temps",
    "same_file",
    "scratch_dir",
    "stale_temps",
    "terminate_as_interrupt",
]

#: Part of the name of every temporary file or folder zinbgrad creates next to an output.
TEMP_MARK = ".zinbgrad-tmp-"


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM (``kill``, SLURM's time
    limit) while :func:`terminate_as_interrupt` is in effect: it unwinds like Ctrl-C, so
    every temporary file is removed on the way out."""


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _owner_prefix(out: Path) -> str:
    return f".{out.name}{TEMP_MARK}"


def _prefix(out: Path) -> str:
    """The temporary name's start: the output's name, the mark, this host and process."""
    return f"{_owner_prefix(out)}{_host_tag()}-{os.getpid()}-"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def stale_temps(out: str | os.PathLike) -> list[Path]:
    """Temporary files or folders of writes of ``out`` by processes of this host that no
    longer run (left by ``kill -9``, an out-of-memory kill or a power cut)."""
    out = Path(out)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        return []
    start, host = _owner_prefix(out), _host_tag()
    stale = []
    for p in folder.glob(f".{glob.escape(out.name)}{TEMP_MARK}*"):
        rest = p.name[len(start) :].split("-")
        if len(rest) < 3 or rest[0] != host or not rest[1].isdigit():
            continue  # another host's (it may still be running), or not ours
        if int(rest[1]) != os.getpid() and not pid_alive(int(rest[1])):
            stale.append(p)
    return sorted(stale)


def remove_stale_temps(out: str | os.PathLike) -> list[Path]:
    """Remove :func:`stale_temps` of ``out``; returns what was removed."""
    removed = []
    for p in stale_temps(out):
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError:  # removed by someone else meanwhile, or not ours to remove
            continue
        removed.append(p)
    return removed


def check_replaceable(out: str | os.PathLike, what: str = "output") -> None:
    """Refuse an output that exists and is not a regular file: a directory, a device
    (``/dev/full``, ``/dev/null``), a pipe or a socket would be replaced by the rename."""
    out = Path(out)
    try:
        st = os.stat(out)
    except (FileNotFoundError, NotADirectoryError):  # the folder checks come later
        return
    except OSError as err:
        raise ValueError(f"cannot write {what} {out}: {err.strerror}") from err
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{what} {out} is a directory; give a file name")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(
            f"{what} {out} exists and is not a regular file (a device, pipe or socket); "
            "zinbgrad replaces only regular files"
        )


def check_writable(out: str | os.PathLike, what: str = "output") -> None:
    """Refuse, before any work, an output that could not be written: a directory, an existing
    file that is not a regular one, or a place without write permission (missing folders are
    created when it is written)."""
    out = Path(out)
    check_replaceable(out, what)
    folder = out.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"cannot write {what} {out}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {what} {out}: no write permission in {folder}")
    try:  # permissions say little to root, or on read-only and special file systems
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}{TEMP_MARK}probe-", dir=folder)
    except OSError as err:
        raise ValueError(f"cannot write {what} {out}: {folder}: {err.strerror}") from None
    os.close(fd)
    os.unlink(probe)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (``../``, symbolic and hard links resolved)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def npz_file(path: str | os.PathLike, what: str = "file") -> Path:
    """The ``.npz`` file meant by ``path``: itself when it ends in ``.npz``, with ``.npz``
    appended when it has no extension (as numpy's ``savez`` does); a folder or another
    extension is refused rather than rewritten."""
    text = os.fspath(path)
    p = Path(text)
    if text.endswith(("/", os.sep)) or p.is_dir():
        raise ValueError(f"{what} {text} is a directory; give a file name (e.g. {p / 'x.npz'})")
    if p.suffix == ".npz":
        return p
    if p.suffix:
        raise ValueError(
            f"{what} {text} must be a .npz file (e.g. {p.with_suffix('.npz')}); zinbgrad "
            "does not change the extension it is given"
        )
    return p.with_name(p.name + ".npz")


def read_npz_metadata(path: str | os.PathLike, what: str) -> tuple[Any, Any]:
    """A ``.npz`` archive and its JSON ``metadata`` entry, or a ValueError saying what the file
    is instead (never numpy's advice to unpickle it)."""
    import h5py
    import numpy as np

    try:
        z = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        if h5py.is_hdf5(path):
            hint = (
                "; it is an HDF5 file (an .h5ad?): a model stored in an AnnData is read with "
                "zinbgrad.tl.model_from_anndata(anndata.read_h5ad(path))"
            )
        else:
            hint = ""
        raise ValueError(f"{path} is not a zinbgrad {what} (not a .npz archive{hint})") from err
    if not isinstance(z, np.lib.npyio.NpzFile) or "metadata" not in z.files:
        raise ValueError(f"{path} is not a zinbgrad {what} (no zinbgrad metadata)")
    try:
        meta = json.loads(str(z["metadata"]))
    except Exception as err:  # noqa: BLE001 - any unreadable entry is reported the same way
        raise ValueError(f"{path} is not a valid zinbgrad {what} (unreadable metadata)") from err
    return z, meta


def _publish(tmp: Path, out: Path) -> None:
    """Sync ``tmp`` to disk, give it the usual permissions (mkstemp creates 0600) and rename it
    onto ``out`` (atomic on one file system)."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, out)


@contextmanager
def atomic_write(
    out: str | os.PathLike,
    *,
    overwrite: bool = True,
    suffix: str = "",
    what: str = "output",
) -> Iterator[Path]:
    """Write ``out`` atomically: yields the path of an empty temporary file next to it, to be
    written (and closed) inside the ``with`` block; on success it is renamed onto ``out``, on
    any exception (Ctrl-C and :class:`Terminated` included) it is removed.

    Parameters
    ----------
    out
        The file to write. Missing folders are created.
    overwrite
        Replace an existing ``out`` (otherwise :class:`FileExistsError`).
    suffix
        End of the temporary name (e.g. ``".png"`` for writers that choose the format by it).
    what
        How errors name ``out``.

    Raises
    ------
    ValueError
        ``out`` exists and is not a regular file (a directory, a device, ...).
    FileExistsError
        ``out`` exists and ``overwrite`` is False.
    """
    out = Path(out)
    check_replaceable(out, what)
    if not overwrite and out.exists():
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    fd, name = tempfile.mkstemp(prefix=_prefix(out), suffix=suffix, dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _publish(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def scratch_dir(out: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder next to ``out`` for a writer's intermediate files, named like
    :func:`atomic_write`'s temporary files (found and removed the same way when left behind)
    and removed on every exit."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=_prefix(out) + "d", dir=out.parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _raise_terminated(signum, frame) -> None:
    raise Terminated(f"terminated by signal {signum}")


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (as SIGINT
    raises ``KeyboardInterrupt``), so that temporary files are removed before the process
    ends. A no-op outside the main thread, where Python cannot install signal handlers."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
