"""The machine's dense roofline for zinbgrad's element-wise work (issue 5).

Measures, on in-memory tensors of one block of ``rows x genes`` entries (the block size the
engine uses, ``block_entries = 2**21``), in matrix entries per second:

* ``log_zinb_fwd_bwd``: a plain fused forward + backward of the ZINB log-likelihood
  (:func:`zinbgrad.model.likelihood.log_zinb` summed, ``.backward()`` w.r.t. the predictors
  ``a = log mu`` and ``b = logit pi``): the "dense autograd" roofline;
* ``entry_derivatives_o2``: zinbgrad's own analytic, sparse-aware kernel
  (:func:`~zinbgrad.model.likelihood.entry_derivatives`, ``order=2``: log-likelihood, first and
  second derivatives in a, b) on the same block, i.e. one Newton evaluation;
* ``entry_derivatives_disp``: the same with ``order=0, dispersion=True`` (the zeta statistics);
* ``triad``: ``a * b + c`` (memory-bandwidth bound, the cheapest possible element-wise pass);
* ``contract``: the Newton contraction ``(rows x J) @ (J x (K+2)^2)`` the engine does per
  second-order array, in GFLOP/s and entries/s.

``--floor`` adds the least a fit can cost with the present algorithm (issue 20): per block, a
full sweep evaluates the order-2 kernel twice (the cells' start and trial points, the trial's
derivatives reused by the gene step) and contracts three cell and three gene Hessian arrays
(the engine's packed widths); a path step of the sketch's extension evaluates order 2 and
order 0 and contracts the cells' three. Nothing else (Cholesky solves, predictors, writing the
nonzeros, initialization, reading) is counted, so these are lower bounds. They are multiplied
by the passes the default fits take (``FLOOR_FITS``, from the runs recorded in BENCHMARKS.md
section 2) to give each time target's floor on this machine.

Usage::

    python benchmarks/roofline.py --dtype float32 --genes 715 --out roofline.json
    python benchmarks/roofline.py --floor --fused --out floor.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def _bench(fn, repeat: int, min_seconds: float = 1.0) -> tuple[float, float]:
    """Fastest and median seconds of ``fn()`` (after one warm-up call).

    The fastest is the roofline (the machine is shared: the median carries other jobs' load).
    """
    fn()
    times: list[float] = []
    t_all = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - t_all < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 5 * repeat:
            break
    return min(times), statistics.median(times)


#: the passes of the default fits (float32, 715 genes), as recorded in BENCHMARKS.md section 2:
#: (cells, full sweeps, sketch cells, sketch sweeps, extension path steps)
FLOOR_FITS = {
    "brain 10k (target 5 s)": (9_999, 34, 0, 0, 0),
    "synthetic 100k (target 45 s)": (99_939, 10 + 1, 46_929, 47, 23),
    "synthetic 1.3M streamed (target 300 s)": (1_299_278, 11 + 1, 46_929, 47, 23),
}


def _counts_from_file(path: str, rows: int):
    """The first ``rows`` cells of a CSR .h5ad as a dense float64 tensor (realistic zeros)."""
    import h5py
    import numpy as np
    import scipy.sparse as sp
    import torch

    with h5py.File(path, "r") as f:
        X = f["X"]
        J = int(X.attrs["shape"][1])
        ptr = X["indptr"][: rows + 1]
        M = sp.csr_matrix((X["data"][: ptr[-1]], X["indices"][: ptr[-1]], ptr), shape=(rows, J))
    return torch.from_numpy(np.asarray(M.todense(), dtype=np.float64))


def run(
    genes: int,
    block_entries: int,
    dtype_name: str,
    k: int,
    repeat: int,
    data: str | None = None,
    floor: bool = False,
    fused: bool = False,
) -> dict:
    import torch

    from zinbgrad.model.likelihood import SparseCounts, entry_derivatives, log_zinb
    from zinbgrad.optim.newton import SymmetricPacking

    dt = {"float32": torch.float32, "float64": torch.float64}[dtype_name]
    rows = max(1, block_entries // genes)
    n_entries = rows * genes
    g = torch.Generator().manual_seed(0)
    # predictors and counts with the brain data's scale: ~90% zeros, small positive counts
    a = (torch.randn(rows, genes, generator=g) * 1.0 - 1.5).to(dt)
    b = (torch.randn(rows, genes, generator=g) * 1.0 - 2.0).to(dt)
    zeta = torch.full((genes,), 0.5, dtype=dt)
    mu = torch.exp(a.double())
    theta = float(torch.exp(zeta[0].double()))
    lam = torch.distributions.Gamma(theta, theta / mu).sample()
    y = torch.poisson(lam)
    y = torch.where(torch.rand(rows, genes, generator=g) < torch.sigmoid(b.double()), 0.0, y)
    if data is not None:  # real zeros and counts of a data set's first cells
        y = _counts_from_file(data, rows)
        genes = y.shape[1]
        a, b, zeta = a[:, :genes].contiguous(), b[:, :genes].contiguous(), zeta[:genes]
        n_entries = rows * genes
    y = y.to(dt)
    nz = y.reshape(-1) != 0
    flat = nz.nonzero().squeeze(1)
    counts = SparseCounts(
        rows,
        genes,
        flat // genes,
        flat % genes,
        y.reshape(-1)[flat],
        torch.lgamma(y.reshape(-1)[flat] + 1.0),
    )

    def fwd_bwd() -> None:
        aa = a.detach().requires_grad_(True)
        bb = b.detach().requires_grad_(True)
        log_zinb(y, aa, bb, zeta).sum().backward()

    def fwd_only() -> None:
        with torch.no_grad():
            log_zinb(y, a, b, zeta).sum()

    def deriv2() -> None:
        with torch.no_grad():
            entry_derivatives(a, b, zeta, counts, order=2, fused=fused)

    def deriv0() -> None:
        with torch.no_grad():
            entry_derivatives(a, b, zeta, counts, order=0, fused=fused)

    def deriv_disp() -> None:
        with torch.no_grad():
            entry_derivatives(a, b, zeta, counts, order=0, dispersion=True, fused=fused)

    c = torch.randn(rows, genes, generator=g).to(dt)

    def triad() -> None:
        torch.add(torch.mul(a, b), c)

    p = k + 2
    P = torch.randn(genes, p * p, generator=g).to(dt)

    def contract() -> None:
        a @ P

    # the engine's Hessian contractions (packed widths; zero inflation, intercepts only)
    cell_w = SymmetricPacking(k + 2).width  # cells: W, gamma_mu, gamma_pi
    gene_p = k + 1  # genes: beta and alpha, for mu and for pi
    gene_w = SymmetricPacking(gene_p).width
    Pc = torch.randn(genes, cell_w, generator=g).to(dt)
    Pg = torch.randn(rows, gene_w, generator=g).to(dt)
    Pab = torch.randn(rows, gene_p * gene_p, generator=g).to(dt)
    Gt = torch.randn(gene_p, rows, generator=g).to(dt)
    Fc = torch.randn(genes, k + 2, generator=g).to(dt)

    def cell_products() -> None:  # laa, lbb, lab times the packed outer products; gradients
        for _ in range(3):
            a @ Pc
        a @ Fc
        a @ Fc

    def gene_products() -> None:  # haa, hbb (packed), hab (full), and the two gradients
        a.T @ Pg
        a.T @ Pg
        a.T @ Pab
        Gt @ a
        Gt @ a

    out: dict = {
        "dtype": dtype_name,
        "genes": genes,
        "rows": rows,
        "block_entries": n_entries,
        "nonzero_fraction": float(nz.float().mean()),
        "counts_from": data or "simulated",
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
    for name, fn in [
        ("log_zinb_fwd_bwd", fwd_bwd),
        ("log_zinb_fwd", fwd_only),
        ("entry_derivatives_o2", deriv2),
        ("entry_derivatives_disp", deriv_disp),
        ("triad", triad),
        ("contract", contract),
    ] + (
        [
            ("entry_derivatives_o0", deriv0),
            ("cell_products", cell_products),
            ("gene_products", gene_products),
        ]
        if floor
        else []
    ):
        s, med = _bench(fn, repeat)
        out[f"{name}_seconds"] = s
        out[f"{name}_entries_per_second"] = n_entries / s
        out[f"{name}_median_entries_per_second"] = n_entries / med
    out["contract_gflops"] = 2.0 * n_entries * p * p / out["contract_seconds"] / 1e9
    out["fused"] = fused
    if floor:
        _floor(out)
    out["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return out


def _floor(out: dict) -> None:
    """Add the per-entry floor of a sweep and of a path step, and each target's floor."""
    n = out["block_entries"]
    o2, o0 = out["entry_derivatives_o2_seconds"], out["entry_derivatives_o0_seconds"]
    cells, genes = out["cell_products_seconds"], out["gene_products_seconds"]
    sweep = (2 * o2 + cells + genes) / n
    path = (o2 + o0 + cells) / n
    out["floor_ns_per_entry_sweep"] = sweep * 1e9
    out["floor_ns_per_entry_path_step"] = path * 1e9
    J = out["genes"]
    fits = {}
    for name, (n_cells, sweeps, m, sketch_sweeps, steps) in FLOOR_FITS.items():
        sec = J * (n_cells * (sweeps * sweep + steps * path) + m * sketch_sweeps * sweep)
        fits[name] = {
            "cells": n_cells,
            "full_sweeps": sweeps,
            "sketch": [m, sketch_sweeps],
            "path_steps": steps,
            "floor_seconds": round(sec, 1),
        }
    out["floor_fits"] = fits


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="dense element-wise roofline (entries per second)")
    p.add_argument("--genes", type=int, default=715)
    p.add_argument("--block-entries", type=int, default=2**21)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("-k", type=int, default=10, help="latent factors (for the contraction)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--data", default=None, help="take the counts from this CSR .h5ad")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--fused", action="store_true", help="fused (compiled) likelihood kernels")
    p.add_argument(
        "--floor", action="store_true", help="also the per-sweep floor and each target's floor"
    )
    args = p.parse_args(argv)
    res = run(
        args.genes,
        args.block_entries,
        args.dtype,
        args.k,
        args.repeat,
        args.data,
        floor=args.floor,
        fused=args.fused,
    )
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
