"""Bitwise parity of fits before and after a behaviour-preserving change (issue 16).

Four fits, each saved with every fitted attribute (the estimator's attributes ending in ``_``):

1. ``pbmc_small``: Seurat's pbmc_small, K=2, defaults;
2. ``zeisel_full``: the Zeisel cortex subset, K=10, ``solver="full"``;
3. ``brain_stochastic``: the first 2,000 cells of the 10x brain slice, K=10,
   ``solver="stochastic"``, batch size 500, 5 epochs;
4. ``synthetic_100k_sketch``: a 100k-cell synthetic ``.h5ad`` (drawn once with
   :func:`zinbgrad.simulate.make_synthetic` from a K=10 fit to the brain slice and cached in
   ``--scratch``), streamed from disk, ``solver="sketch"``, float32; its wall time is recorded.

Run it on the code before the change and after it, on the same machine (the 100k file is drawn
once and reused, so both runs read the same counts), then compare::

    python benchmarks/parity.py run --out /tmp/parity/before.npz
    # ... change the code ...
    python benchmarks/parity.py run --out /tmp/parity/after.npz
    python benchmarks/parity.py compare /tmp/parity/before.npz /tmp/parity/after.npz

``compare`` prints, per fit and attribute, whether the arrays are bitwise identical (and the
largest difference where not) and the two 100k wall times with the load averages; it exits
with status 1 when any attribute differs. ``--only`` runs a subset of the fits.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FITS = ("pbmc_small", "zeisel_full", "brain_stochastic", "synthetic_100k_sketch")


def _fitted(model) -> dict[str, np.ndarray]:
    """Every fitted attribute (name ending in ``_``) that is a number or an array."""
    out = {}
    for name, value in sorted(vars(model).items()):
        if not name.endswith("_") or name.startswith("_") or name == "fit_time_":
            continue  # fit_time_ is wall-clock time, recorded apart (name#seconds)
        if isinstance(value, (bool, int, float, np.number)):
            out[name] = np.asarray(value)
        elif isinstance(value, np.ndarray) and value.dtype != object:
            out[name] = value
    return out


def _brain(n_cells: int | None = None):
    import anndata as ad

    a = ad.read_h5ad(DATA / "brain1m_10x_first10k_cells_first1000_genes.h5ad")
    if n_cells is not None:
        a = a[:n_cells].copy()
    X = a.X.tocsr()
    a = a[np.asarray(X.getnnz(axis=1) > 0)].copy()
    return a[:, np.asarray(a.X.getnnz(axis=0) > 0)].copy()


def synthetic_100k(scratch: Path) -> Path:
    """The cached 100k-cell file (drawn once; later runs reuse it)."""
    path = scratch / "parity_synthetic_100k.h5ad"
    if path.exists():
        return path
    import zinbgrad
    from benchmarks.scaling import drop_empty
    from zinbgrad.simulate import make_synthetic

    scratch.mkdir(parents=True, exist_ok=True)
    ref = zinbgrad.ZINBWaVE(10, max_epochs=30, verbose=False).fit(_brain())
    raw = scratch / "parity_synthetic_100k.raw.h5ad"
    make_synthetic(ref, 100_000, path=raw, random_state=0, overwrite=True)
    drop_empty(raw)
    os.replace(raw, path)
    return path


def run_fit(name: str, scratch: Path) -> tuple[dict[str, np.ndarray], float]:
    import anndata as ad

    import zinbgrad

    t0 = time.perf_counter()
    if name == "pbmc_small":
        data = ad.read_h5ad(DATA / "seurat_pbmc_small.h5ad")
        model = zinbgrad.ZINBWaVE(2, verbose=False)
    elif name == "zeisel_full":
        data = ad.read_h5ad(DATA / "zeisel2015_descend_subset.h5ad")
        model = zinbgrad.ZINBWaVE(10, solver="full", verbose=False)
    elif name == "brain_stochastic":
        data = _brain(2_000)
        model = zinbgrad.ZINBWaVE(
            10, solver="stochastic", batch_size=500, max_epochs=5, verbose=False
        )
    elif name == "synthetic_100k_sketch":
        data = str(synthetic_100k(scratch))
        model = zinbgrad.ZINBWaVE(10, solver="sketch", dtype="float32", verbose=False)
    else:
        raise ValueError(f"unknown fit {name!r}; choose from {', '.join(FITS)}")
    t0 = time.perf_counter()
    model.fit(data)
    return _fitted(model), time.perf_counter() - t0


def cmd_run(args: argparse.Namespace) -> int:
    fits = FITS if not args.only else tuple(args.only.split(","))
    arrays: dict[str, np.ndarray] = {}
    for name in fits:
        load = os.getloadavg()[0]
        fitted, secs = run_fit(name, Path(args.scratch))
        print(f"{name}: {secs:.1f} s (load {load:.2f}), {len(fitted)} fitted attributes")
        for key, value in fitted.items():
            arrays[f"{name}/{key}"] = value
        arrays[f"{name}#seconds"] = np.asarray(secs)
        arrays[f"{name}#load"] = np.asarray(load)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **arrays)
    print(f"saved {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    a, b = np.load(args.before), np.load(args.after)
    fits_a = {k.split("#")[0] for k in a.files if k.endswith("#seconds")}
    fits_b = {k.split("#")[0] for k in b.files if k.endswith("#seconds")}
    for name in sorted(fits_a ^ fits_b):
        print(f"{name}: run only {'before' if name in fits_a else 'after'}, not compared")
    both = fits_a & fits_b
    keys = sorted(
        k
        for k in set(a.files) | set(b.files)
        if "#" not in k and k.split("/")[0] in both and not k.endswith("/fit_time_")
    )
    differ = 0
    for key in keys:
        if key not in a.files or key not in b.files:
            print(f"{key}: only in {'before' if key in a.files else 'after'}")
            differ += 1
            continue
        x, y = a[key], b[key]
        same = x.shape == y.shape and x.dtype == y.dtype and x.tobytes() == y.tobytes()
        if not same:
            differ += 1
            gap = (
                float(np.nanmax(np.abs(x.astype(float) - y.astype(float))))
                if x.shape == y.shape and x.dtype.kind in "fiub"
                else float("nan")
            )
            print(f"{key}: DIFFERS (max |diff| {gap:.3g})")
    for key in sorted(k for k in a.files if k.endswith("#seconds")):
        name = key.split("#")[0]
        if key in b.files:
            print(
                f"{name}: {float(a[key]):.1f} s (load {float(a[name + '#load']):.2f}) -> "
                f"{float(b[key]):.1f} s (load {float(b[name + '#load']):.2f})"
            )
    print(f"{len(keys) - differ} of {len(keys)} attributes bitwise identical")
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the fits and save their fitted attributes")
    r.add_argument("--out", required=True)
    r.add_argument("--scratch", default="/tmp/zinbgrad_parity")
    r.add_argument("--only", default="", help=f"comma-separated subset of {','.join(FITS)}")
    c = sub.add_parser("compare", help="compare two saved runs attribute by attribute")
    c.add_argument("before")
    c.add_argument("after")
    args = p.parse_args(argv)
    return cmd_run(args) if args.cmd == "run" else cmd_compare(args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
