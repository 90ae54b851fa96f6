"""Which optimizer reaches zinbwave's optimum fastest? Batched Newton vs minibatch vs Adam.

On one data set (default: the Zeisel subset, K=10, zinbwave's defaults) this runs, from the same
zinbwave-style initialization,

* ``newton``: zinbgrad's full-batch solver (damped Newton steps for every cell and gene),
* ``stochastic``: zinbgrad's minibatch epochs, then full-batch polish,
* ``adam``: plain Adam with autograd on the same penalized log-likelihood (all parameters,
  full batch, fixed learning rate; the usual deep-learning recipe), for several learning rates,

and prints the penalized log-likelihood against wall time, plus the time each needs to reach
R zinbwave's value (from ../shared/reference). Same process, same threads, one after another.

usage: python benchmarks/solvers.py [--seconds 60] [--out benchmarks/results/solvers.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

import zinbgrad
from zinbgrad.data.source import InMemoryCounts
from zinbgrad.model.likelihood import log_zinb
from zinbgrad.model.params import Design, Penalty, linear_predictors
from zinbgrad.optim.engine import Engine, FitOptions
from zinbgrad.optim.init import initialize
from zinbgrad.optim.state import Problem


def _setup(shared: Path, name: str):
    summ = json.loads((shared / "reference" / name / "summary.json").read_text())
    a = ad.read_h5ad(shared / "data" / f"{summ['dataset']}.h5ad")
    X = sp.csr_matrix(a.X).astype(np.float64)
    X = X[:, np.asarray(X.sum(0)).ravel() > 0]
    n, J = X.shape
    dt = torch.float64
    ones = torch.ones
    design = Design(
        ones(n, 1, dtype=dt), ones(n, 1, dtype=dt), ones(J, 1, dtype=dt), ones(J, 1, dtype=dt)
    )
    pen = Penalty.zinbwave_defaults(design, common_dispersion=True)
    return summ, X, design, pen


def run_zinbgrad(X, design, pen, K, solver, seconds):
    src = InMemoryCounts(sp.csr_matrix(X), torch.float64)
    t0 = time.perf_counter()
    problem = Problem(src, design, pen, K)
    params = initialize(problem)
    trace = []
    opts = FitOptions(max_epochs=10_000, tol=0.0, solver=solver, batch_size=256, t_origin=t0)

    def progress(rec):
        trace.append((rec["seconds"], rec["objective"], rec["phase"]))
        if rec["seconds"] > seconds:
            raise StopIteration

    opts.progress = progress
    eng = Engine(problem, params, options=opts)
    try:
        eng.fit()
    except StopIteration:
        pass
    return trace


def run_adam(X, design, pen, K, lr, seconds):
    """Full-batch Adam on every parameter with autograd (dense counts: small data only)."""
    src = InMemoryCounts(sp.csr_matrix(X), torch.float64)
    t0 = time.perf_counter()
    p = initialize(Problem(src, design, pen, K))
    Y = torch.as_tensor(X.toarray())
    tensors = [p.beta_mu, p.beta_pi, p.alpha_mu, p.alpha_pi, p.zeta, p.W, p.gamma_mu, p.gamma_pi]
    for t in tensors:
        t.requires_grad_(True)
    opt = torch.optim.Adam(tensors, lr=lr)
    trace = []
    n = Y.shape[0]
    while time.perf_counter() - t0 < seconds:
        opt.zero_grad()
        a, b = linear_predictors(design, p, slice(0, n))
        zeta = p.zeta.mean().expand_as(p.zeta)  # common dispersion
        ll = log_zinb(Y, a, b, zeta).sum()
        obj = ll - (pen.gene_values(p).sum() + pen.cell_values(p).sum())
        (-obj).backward()
        opt.step()
        trace.append((time.perf_counter() - t0, float(obj.detach()), "adam"))
    return trace


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--run", default="zeisel2015_descend_subset_K10_commondisp_Xnone")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--lrs", type=float, nargs="*", default=[0.01, 0.05])
    ap.add_argument("--out", default="benchmarks/results/solvers.json")
    args = ap.parse_args(argv)
    summ, X, design, pen = _setup(Path(args.shared), args.run)
    target = summ["penalized_loglik_exact"]
    K = summ["K"]
    runs = {
        "newton": run_zinbgrad(X, design, pen, K, "full", args.seconds),
        "stochastic": run_zinbgrad(X, design, pen, K, "stochastic", args.seconds),
    }
    for lr in args.lrs:
        runs[f"adam_lr{lr:g}"] = run_adam(X, design, pen, K, lr, args.seconds)
    print(
        f"{args.run}: R zinbwave penalized log-likelihood {target:.6g} "
        f"(R needed {summ['fit_seconds']:.0f} s); load {os.getloadavg()[0]:.1f}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, zinbgrad "
        f"{zinbgrad.__version__}"
    )
    print(f"{'method':<16}{'reach R (s)':>12}{'obj @10s':>16}{'obj @end':>16}{'steps':>8}")
    summary = {}
    for name, tr in runs.items():
        reach = next((t for t, o, _ in tr if o >= target), None)
        at10 = max((o for t, o, _ in tr if t <= 10), default=float("nan"))
        end = tr[-1][1] if tr else float("nan")
        summary[name] = {
            "reach_r_seconds": reach,
            "objective_at_10s": at10,
            "objective_end": end,
            "steps": len(tr),
            "trace": tr,
        }
        r = "never" if reach is None else f"{reach:.2f}"
        print(f"{name:<16}{r:>12}{at10:>16.6g}{end:>16.6g}{len(tr):>8}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"target": target, "runs": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
