"""Sweeps to ``tol`` of the full-batch solver, per variant of the optimization path (issue 20).

Each variant is fitted in its own child process (all at once with ``--parallel``, so that on a
busy machine they share the same load), with zinbgrad's defaults except the settings the
variant names, and prints one JSON line (seconds, sweeps, final objective) followed by the
objective of every sweep and whether its gene step was checked in the next sweep (``lag``).

Usage::

    python benchmarks/sweeps.py --data brain --cells 3000 --dtype float32 \\
        --variants plain,relax1.5,relax1.3,local2 --threads 1 --parallel

Variants: ``plain``; ``relax<w>`` (``FitOptions.relaxation = w``: cells' and genes' Newton
steps times ``w`` in the lagged sweeps); ``local<k>`` (``local_steps = k``).
``--data brain`` is the 715-gene 10x brain slice of ``benchmarks/scaling.py`` (made from the
shared file when ``--brain`` does not exist); ``--data zeisel`` the Zeisel subset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _counts(data: str, cells: int, brain: str):
    import anndata as ad
    import numpy as np

    if data == "zeisel":
        X = ad.read_h5ad(DATA / "zeisel2015_descend_subset.h5ad").X
    else:
        if not Path(brain).exists():
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from benchmarks.scaling import write_brain_slice

            write_brain_slice(Path(brain))
        X = ad.read_h5ad(brain).X
    X = X[:cells].tocsr()
    return X[:, np.asarray((X != 0).sum(0)).ravel() > 0]


def _child(args: argparse.Namespace) -> None:
    import torch

    from zinbgrad import ZINBWaVE
    from zinbgrad.optim import solvers

    torch.set_num_threads(args.threads)
    v = args.variant
    relaxation = float(v[5:]) if v.startswith("relax") else 1.0
    local = int(v[5:]) if v.startswith("local") else 1
    orig_options = ZINBWaVE._fit_options

    def fit_options(self, *a, **k):
        opts, m, bar = orig_options(self, *a, **k)
        return dataclasses.replace(opts, relaxation=relaxation), m, bar

    ZINBWaVE._fit_options = fit_options
    lagged = []
    orig_record = solvers.Solvers._record

    def record(self, history, rec):
        lagged.append(self.proposal is not None)
        orig_record(self, history, rec)

    solvers.Solvers._record = record
    X = _counts(args.data, args.cells, args.brain)
    t0 = time.perf_counter()
    m = ZINBWaVE(10, dtype=args.dtype, local_steps=local, verbose=False).fit(X)
    out = {
        "variant": v,
        "data": args.data,
        "shape": list(X.shape),
        "dtype": args.dtype,
        "seconds": round(time.perf_counter() - t0, 2),
        "sweeps": int(m.n_iter_),
        "objective": float(m.objective_),
        "load": os.getloadavg()[0],
        "sweep_objectives": [h["objective"] for h in m.history_],
        "lagged": lagged,
    }
    print(json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=("brain", "zeisel"), default="brain")
    ap.add_argument("--cells", type=int, default=3000)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--variants", default="plain,relax1.5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parallel", action="store_true")
    ap.add_argument("--brain", default="/tmp/zinbgrad_scaling/brain10k_top_var.h5ad")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return _child(args)
    base = [sys.executable, __file__, "--data", args.data, "--cells", str(args.cells)]
    base += ["--dtype", args.dtype, "--threads", str(args.threads), "--brain", args.brain]
    procs = []
    for v in args.variants.split(","):
        p = subprocess.Popen([*base, "--variant", v], stdout=subprocess.PIPE, text=True)
        if not args.parallel:
            p.wait()
        procs.append(p)
    for p in procs:
        print(p.communicate()[0].strip(), flush=True)


if __name__ == "__main__":
    main()
