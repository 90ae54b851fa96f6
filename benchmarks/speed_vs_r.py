"""zinbgrad against R zinbwave on the shared reference fits: time to reach R's optimum.

For every run in ``../shared/reference/<dataset>_K<K>_...`` this fits zinbgrad with the same
data and settings (K, common or gene-wise dispersion, zero inflation, X) and reports

* the wall time until zinbgrad's penalized log-likelihood first reaches R zinbwave's
  (``penalized_loglik_exact``, the same number recomputed without R's precision loss),
* the time, epochs and penalized log-likelihood at zinbgrad's own stopping rule (relative change
  < 1e-4, as zinbwave's ``stop.epsilon.optimize``),
* peak resident memory of the fitting process,

next to R zinbwave's own fit time (``fit_seconds``, 2-core machine, serial BiocParallel).
R itself cannot be installed from this machine's registries, so its numbers come from the
reference summaries; when ``Rscript -e 'library(zinbwave)'`` works they could be rerun with
``../shared/reference/make/02_fit_zinbwave.R``.

usage: python benchmarks/speed_vs_r.py [--shared ../shared] [--out results.json] [--dtype auto]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RUNS = [
    "seurat_pbmc_small_K2_commondisp_Xnone",
    "seurat_pbmc_small_K2_genewisedisp_Xbatch",
    "seurat_pbmc_small_K2_genewisedisp_Xnone_nb",
    "zeisel2015_descend_subset_K10_commondisp_Xnone",
    "pbmc8k_scvijl_200genes_K10_commondisp_Xnone",
]


def _one(shared: Path, name: str, dtype: str) -> dict:
    """Fit one reference configuration (runs inside a fresh subprocess)."""
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    import zinbgrad

    summ = json.loads((shared / "reference" / name / "summary.json").read_text())
    t_load = time.perf_counter()
    a = ad.read_h5ad(shared / "data" / f"{summ['dataset']}.h5ad")
    keep = np.asarray(sp.csr_matrix(a.X).sum(0)).ravel() > 0
    a = a[:, keep].copy()
    model = zinbgrad.ZINBWaVE(
        n_components=summ["K"],
        common_dispersion=summ["commondispersion"],
        zero_inflation=summ["zeroinflation"],
        dtype=dtype,
    )
    t0 = time.perf_counter()
    model.fit(a, batch_key="batch" if summ["X"] != "intercept" else None)
    total = time.perf_counter() - t0
    target = summ["penalized_loglik_exact"]
    reach = next((h for h in model.history_ if h["objective"] >= target), None)
    return {
        "run": name,
        "cells": int(a.n_obs),
        "genes": int(a.n_vars),
        "K": summ["K"],
        "r_seconds": summ["fit_seconds"],
        "r_penalized_loglik": target,
        "zinbgrad_seconds_to_reach_r": None if reach is None else reach["seconds"],
        "zinbgrad_epochs_to_reach_r": None if reach is None else reach["epoch"],
        "zinbgrad_seconds": total,
        "zinbgrad_epochs": model.n_iter_,
        "zinbgrad_penalized_loglik": model.objective_,
        "relative_gain": (model.objective_ - target) / abs(target),
        "load_seconds": t0 - t_load,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": __import__("torch").get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    p.add_argument("--out", default="benchmarks/results/speed_vs_r.json")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--runs", nargs="*", default=RUNS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shared = Path(args.shared)
    if args.child:
        print(json.dumps(_one(shared, args.child, args.dtype)))
        return 0
    if not (shared / "reference").is_dir():
        print(f"no R references under {shared}; nothing to compare", file=sys.stderr)
        return 1
    rows = []
    load = os.getloadavg()[0]
    for name in args.runs:
        cmd = [sys.executable, __file__, "--shared", str(shared), "--dtype", args.dtype]
        out = subprocess.run(cmd + ["--child", name], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        reach = row["zinbgrad_seconds_to_reach_r"]
        when = "never" if reach is None else f"{reach:.2f} s"
        speedup = "-" if reach is None else f"{row['r_seconds'] / reach:.0f}x"
        print(
            f"{name}: R {row['r_seconds']:.0f} s; zinbgrad reaches R's optimum in {when} "
            f"(speed-up {speedup}), "
            f"stops after {row['zinbgrad_seconds']:.2f} s / {row['zinbgrad_epochs']} epochs at "
            f"{row['zinbgrad_penalized_loglik']:.6g} vs R {row['r_penalized_loglik']:.6g} "
            f"({100 * row['relative_gain']:+.3f} %), peak RSS {row['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"load_average_at_start": load, "cpus": os.cpu_count(), "dtype": args.dtype}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
