"""What every ``zinbgrad`` command shares: one-line errors and exit codes, checks of the paths
and keys before any work, reading an .h5ad or a model, and atomic writes of the results."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_TERMINATED",
    "add_command",
    "add_design_options",
    "add_force_option",
    "check_io",
    "check_key",
    "check_output_path",
    "cli_error",
    "input_compression",
    "load_model",
    "options_of",
    "read_h5ad_checked",
    "run_command",
    "run_timed",
    "write_h5ad_atomic",
    "write_model_into_copy",
]

#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130
#: Exit status after SIGTERM (128 + SIGTERM: ``kill``, SLURM's time limit).
EXIT_TERMINATED = 143


def cli_error(err: BaseException) -> SystemExit:
    """The command line's one-line ``error: ...`` for an exception (a KeyError's message
    without the quotes its ``str`` adds)."""
    msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return SystemExit(f"error: {msg}")


def run_command(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a command's function and turn the ways it can stop into exit codes: SIGTERM
    (:data:`EXIT_TERMINATED`) and Ctrl-C (:data:`EXIT_INTERRUPTED`) with one line on stderr,
    an ``OSError`` (a full disk, a file removed under our feet) as a one-line error."""
    from ..io_utils import Terminated, terminate_as_interrupt

    try:
        # SIGTERM (kill, SLURM's time limit) unwinds like Ctrl-C: temporary files are removed
        with terminate_as_interrupt():
            return int(func(args) or 0)
    except Terminated:
        print("zinbgrad: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:  # outputs are written atomically: nothing half-written remains
        print("zinbgrad: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as err:  # a full disk, a file removed under our feet, ...
        raise cli_error(err) from None


def run_timed(fn: Callable, errors: tuple[type[BaseException], ...], *args, **kwargs) -> float:
    """Call ``fn(*args, **kwargs)``; return the seconds it took. An exception of a type in
    ``errors`` becomes the command line's one-line error (:func:`cli_error`)."""
    t0 = time.perf_counter()
    try:
        fn(*args, **kwargs)
    except errors as err:
        raise cli_error(err) from err
    return time.perf_counter() - t0


def check_output_path(
    inputs: Path | None | dict[str, Path | None], out: Path, force: bool, what: str = "output"
) -> None:
    """Refuse, before any work is done, an output that could not be written or would destroy
    what the user owns: one of the command's inputs (``inputs``: the input file, or a mapping
    from how to name each input to its path, e.g. ``{"--model": ...}``), an existing file
    without ``--force``, a directory, a device or other non-regular file, or a place without
    write permission (missing folders are created later). Temporary files that earlier
    interrupted writes of ``out`` left behind (``kill -9``) are removed now, not at the end."""
    from ..io_utils import check_writable, remove_stale_temps, same_file

    if not isinstance(inputs, dict):
        inputs = {"the input file": inputs}
    for name, inp in inputs.items():
        if inp is not None and same_file(out, inp):
            raise SystemExit(f"error: {what} {out} is {name}; choose another path")
    try:
        check_writable(out, what)
    except ValueError as err:
        raise cli_error(err) from None
    if out.exists() and not force:
        raise SystemExit(f"error: {out} exists; pass --force to replace it")
    remove_stale_temps(out)


def add_command(
    subparsers, name: str, func: Callable, help_: str, description: str | None = None
) -> argparse.ArgumentParser:
    """Register the subcommand ``name`` (running ``func(args)``) on an ``argparse``
    subparsers object, with its one-line ``help_`` and ``--help`` ``description``."""
    p = subparsers.add_parser(name, help=help_, description=description)
    p.set_defaults(func=func)
    return p


def add_design_options(p: argparse.ArgumentParser, batch_help: str, covariates_help: str) -> None:
    """``--batch-key`` and ``--covariate-keys``: the ``obs`` columns of the design."""
    p.add_argument("--batch-key", default=None, help=batch_help)
    p.add_argument("--covariate-keys", nargs="+", default=None, help=covariates_help)


def options_of(args: argparse.Namespace, *names: str) -> dict:
    """The options ``names`` of ``args`` as keywords of the same names (for the functions
    whose keywords the command's options are)."""
    return {name: getattr(args, name) for name in names}


def add_force_option(p: argparse.ArgumentParser) -> None:
    """``--force``: replace an existing output."""
    p.add_argument("--force", action="store_true", help="replace an existing output")


def check_key(key: str, what: str = "--key-added") -> None:
    """Refuse, before any work, a key that anndata cannot store (see
    :func:`zinbgrad.data.validate.check_key`)."""
    from ..data.validate import check_key as _check

    try:
        _check(key, what)
    except (TypeError, ValueError) as err:
        raise cli_error(err) from None


def check_io(args: argparse.Namespace) -> tuple[Path, Path]:
    """The input and output paths of a command that reads a model, checked before any work:
    the output is none of the command's inputs (the input file, the --model file) and can be
    written; --key-added is a key anndata can store."""
    inp, out = Path(args.input), Path(args.output)
    model = getattr(args, "model", None)
    inputs = {"the input file": inp, "the --model file": None if model is None else Path(model)}
    check_output_path(inputs, out, args.force)
    if getattr(args, "key_added", None) is not None:
        check_key(args.key_added)
    return inp, out


def input_compression(path: Path | None) -> str | None:
    """The HDF5 compression of an .h5ad's counts (``X``, its ``data`` when sparse), so that
    outputs written from it in memory keep it (without, a gzip input of 1 MB became ~5 MB)."""
    if path is None or not Path(path).exists():
        return None
    import h5py

    try:
        with h5py.File(path, "r") as f:
            node = f.get("X")
            if isinstance(node, h5py.Group):
                node = node.get("data")
            comp = getattr(node, "compression", None)
    except OSError:
        return None
    return comp if comp in ("gzip", "lzf") else None


def read_h5ad_checked(path: Path):
    """Read an .h5ad with a clear error for missing or unreadable files."""
    import anndata as ad

    if not path.exists():
        raise SystemExit(f"error: input file {path} does not exist")
    try:
        return ad.read_h5ad(path)
    except Exception as err:  # noqa: BLE001 - any reader failure is reported the same way
        raise SystemExit(
            f"error: cannot read {path} as .h5ad ({type(err).__name__}: {err})"
        ) from err


def load_model(path: str | None, key: str, adata=None):
    """The model from ``--model`` (.npz or .h5ad) or, without it, from ``adata``."""
    from ..estimator import ZINBWaVE
    from ..tl import model_from_anndata

    if path is None:
        if adata is None:
            raise SystemExit("error: --model is required")
        try:
            return model_from_anndata(adata, key)
        except KeyError as err:
            raise SystemExit(
                f"error: {err.args[0] if err.args else err} (fit one with `zinbgrad fit`, or "
                "pass --model)"
            ) from err
    p = Path(path)
    if p.suffix == ".npz":
        try:
            return ZINBWaVE.load(p)
        except (OSError, ValueError) as err:
            raise cli_error(err) from err
    ref = read_h5ad_checked(p)
    try:
        return model_from_anndata(ref, key)
    except KeyError as err:
        raise SystemExit(f"error: {p}: {err.args[0] if err.args else err}") from err


def write_h5ad_atomic(adata, out: Path, like: Path | None = None) -> None:
    """Write ``adata`` to a temporary file next to ``out`` and rename it into place, with the
    compression of the input file ``like`` (if any)."""
    from ..io_utils import atomic_write

    with atomic_write(out) as tmp:
        adata.write_h5ad(tmp, compression=input_compression(like))


def write_model_into_copy(inp: Path, out: Path, model, key_added: str) -> None:
    """Copy ``inp`` to a temporary file, add the model (obsm/varm/var/uns) through anndata's
    element I/O (neither the counts nor any layer is loaded), then rename it to ``out``:
    memory-bounded and atomic."""
    import shutil

    from ..data.writer import add_elements
    from ..io_utils import atomic_write
    from ..persistence import model_elements

    elements = model_elements(model, key_added)
    with atomic_write(out) as tmp:
        shutil.copyfile(inp, tmp)
        add_elements(tmp, elements)
