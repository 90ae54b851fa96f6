"""float32 against float64 fits on the CPU: time, objective and the latent space (issue 20).

For each data set, fits K=10 with every other setting zinbgrad's default, in float64 and in
float32, for two seeds each (``random_state`` 0 and 1: the seed-to-seed spread is the yardstick
for "unchanged"). Each fit runs in a fresh subprocess (its own wall time and peak RSS). Recorded
per fit: wall time of ``fit``, epochs, the objective as the fit reports it and the objective
re-evaluated in float64 at the fitted parameters (``model.loglik(X) - penalty_``); per data set:

* relative objective difference float32 vs float64 (same seed), beside float64 seed 0 vs seed 1;
* the 15-NN overlap of the latent spaces (mean fraction of a cell's 15 nearest neighbours in
  ``W_`` shared by the two fits) for float32 vs float64 (same seed), float64 seed 0 vs 1 and
  float32 seed 0 vs 1;
* where the data have cell types: k-means ARI (k = number of types, 10 inits) and the 15-NN
  label purity (fraction of a cell's 15 neighbours with its type) of every fit;
* synthetic data: the 15-NN overlap with the planted latent factors ``obsm["W_true"]``.

Data sets: ``pbmc_small`` (80 x 230), ``zeisel``, ``pbmc8k``, ``brain10k`` (10k x 715 brain
slice, the scaling benchmark's reference data) and subsamples ``brainN`` of it (e.g.
``brain1000``), and ``synthetic100k`` (``python benchmarks/scaling.py --generate-only --sizes
100k`` writes it to ``--scratch``).

usage: python benchmarks/precision.py [--datasets zeisel,pbmc8k] [--seeds 0,1]
       [--out benchmarks/results/precision.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

SHARED = Path(os.environ.get("ZINBGRAD_SHARED", HERE.parents[1] / "shared"))
SCRATCH = Path("/tmp/zinbgrad_scaling")
FIT_KEYS = ("float64_s0", "float64_s1", "float32_s0", "float32_s1")

#: one fit in a fresh process: prints a JSON line, saves W to the given .npy
CHILD = r"""
import json, resource, sys, time
name, dtype, seed, w_out, scratch = sys.argv[1:6]
sys.path.insert(0, sys.argv[6])
from benchmarks.precision import load_counts
import zinbgrad
X, labels, W_true = load_counts(name, scratch)
t0 = time.perf_counter()
m = zinbgrad.ZINBWaVE(n_components=10, dtype=dtype, random_state=int(seed), verbose=False).fit(X)
dt = time.perf_counter() - t0
import numpy as np
np.save(w_out, np.asarray(m.W_, dtype=np.float64))
ll64 = m.loglik(X)
print(json.dumps({"seconds": dt, "epochs": int(m.n_iter_), "converged": bool(m.converged_),
                  "objective": float(m.objective_), "objective_f64": float(ll64 - m.penalty_),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "shape": list(X.shape)}))
"""


def load_counts(name: str, scratch: str | Path = SCRATCH):
    """``(counts CSR float64, cell-type labels or None, planted W or None)`` of a data set."""
    import anndata as ad
    import scipy.sparse as sp

    from benchmarks.datasets import filter_empty, load_dataset, subsample

    scratch = Path(scratch)
    if name == "pbmc_small":
        a = filter_empty(ad.read_h5ad(SHARED / "data" / "seurat_pbmc_small.h5ad"))
        return sp.csr_matrix(a.X, dtype=np.float64), None, None
    if name.startswith("synthetic"):
        a = ad.read_h5ad(scratch / f"{name.replace('synthetic', 'synthetic_')}.h5ad")
        W = a.obsm.get("W_true")
        return sp.csr_matrix(a.X, dtype=np.float64), None, None if W is None else np.asarray(W)
    if name.startswith("brain"):
        a = ad.read_h5ad(scratch / "brain10k_top_var.h5ad")
        n = name[len("brain") :]
        if n and n != "10k":
            a = filter_empty(subsample(a, int(n), 0))
        return sp.csr_matrix(a.X, dtype=np.float64), None, None
    a = load_dataset(name, SHARED / "data")
    key = next((k for k in ("label", "cell_type") if k in a.obs), None)
    labels = None if key is None else np.asarray(a.obs[key].astype(str))
    return sp.csr_matrix(a.X, dtype=np.float64), labels, None


def knn(W: np.ndarray, k: int = 15) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    return NearestNeighbors(n_neighbors=k + 1).fit(W).kneighbors(W, return_distance=False)[:, 1:]


def overlap(A: np.ndarray, B: np.ndarray, k: int = 15) -> float:
    """Mean fraction of a cell's ``k`` nearest neighbours shared by the latent spaces A, B."""
    a, b = knn(A, k), knn(B, k)
    shared = [np.intersect1d(x, y).size for x, y in zip(a, b, strict=True)]
    return float(np.mean(shared) / k)


def label_scores(W: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    types, codes = np.unique(labels, return_inverse=True)
    km = KMeans(len(types), n_init=10, random_state=seed).fit_predict(W)
    nb = knn(W)
    return {
        "kmeans_ari": float(adjusted_rand_score(codes, km)),
        "knn_purity": float(np.mean(codes[nb] == codes[:, None])),
    }


def run_fit(name: str, dtype: str, seed: int, w_out: Path, scratch: Path) -> dict:
    cmd = [sys.executable, "-c", CHILD, name, dtype, str(seed), str(w_out), str(scratch)]
    cmd.append(str(HERE.parent))
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:], "load": load}
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec["load_at_start"] = round(load, 2)
    return rec


def measure(name: str, seeds: list[int], scratch: Path, wdir: Path, log=print) -> dict:
    fits: dict[str, dict] = {}
    for seed in seeds:
        for dtype in ("float64", "float32"):
            key = f"{dtype}_s{seed}"
            rec = run_fit(name, dtype, seed, wdir / f"{name}_{key}.npy", scratch)
            fits[key] = rec
            log(f"{name} {key}: {rec}")
    return score(name, fits, scratch, wdir)


def score(name: str, fits: dict, scratch: Path, wdir: Path) -> dict:
    """The comparisons of the fits' latent spaces (saved in ``wdir``) and objectives."""
    out: dict = {"fits": fits}
    W = {k: np.load(wdir / f"{name}_{k}.npy") for k, r in fits.items() if "error" not in r}
    _, labels, W_true = load_counts(name, scratch)
    pairs = [("float32_s0", "float64_s0"), ("float64_s1", "float64_s0")]
    pairs += [("float32_s1", "float32_s0"), ("float32_s1", "float64_s1")]
    out["overlap15"] = {f"{a} vs {b}": overlap(W[a], W[b]) for a, b in pairs if a in W and b in W}
    out["objective_rel_diff"] = {  # signed: > 0 where the first fit's objective is higher
        f"{a} vs {b}": (fits[a]["objective_f64"] - fits[b]["objective_f64"])
        / abs(fits[b]["objective_f64"])
        for a, b in pairs
        if a in W and b in W
    }
    if labels is not None:
        out["labels"] = {k: label_scores(w, labels) for k, w in W.items()}
    if W_true is not None:
        out["overlap15_planted"] = {k: overlap(w, W_true) for k, w in W.items()}
    return out


def _pair(d: dict, a: str, b: str, fmt: str) -> str:
    v = d.get(f"{a} vs {b}")
    return "n/a" if v is None else format(v, fmt)


def report(results: dict) -> str:
    """Markdown tables of the saved runs: time, objective and latent-space agreement."""
    rows = [
        "| data (cells x genes) | float64 fit (s), seeds 0 / 1 | float32 fit (s) | speed-up "
        "| objective (f32 - f64) / abs(f64), seed 0 / 1 | f64 (seed 1 - seed 0) "
        "| 15-NN overlap f32-f64 (seed 0 / 1) | f64 seed 0 vs 1 | f32 seed 0 vs 1 |",
        "|---|---|---|---:|---|---:|---|---:|---:|",
    ]
    labels = []
    for name, run in results["runs"].items():
        f = run["fits"]
        if any("seconds" not in f.get(k, {}) for k in ("float64_s0", "float32_s0")):
            continue
        n, J = f["float64_s0"]["shape"]
        t64 = [f[k]["seconds"] for k in ("float64_s0", "float64_s1") if "seconds" in f.get(k, {})]
        t32 = [f[k]["seconds"] for k in ("float32_s0", "float32_s1") if "seconds" in f.get(k, {})]
        ob, ov = run["objective_rel_diff"], run["overlap15"]
        rows.append(
            f"| {name} ({n:,} x {J:,}) | {' / '.join(f'{t:.1f}' for t in t64)} "
            f"| {' / '.join(f'{t:.1f}' for t in t32)} | {sum(t64) / sum(t32):.2f}x "
            f"| {_pair(ob, 'float32_s0', 'float64_s0', '+.1e')} / "
            f"{_pair(ob, 'float32_s1', 'float64_s1', '+.1e')} "
            f"| {_pair(ob, 'float64_s1', 'float64_s0', '+.1e')} "
            f"| {_pair(ov, 'float32_s0', 'float64_s0', '.2f')} / "
            f"{_pair(ov, 'float32_s1', 'float64_s1', '.2f')} "
            f"| {_pair(ov, 'float64_s1', 'float64_s0', '.2f')} "
            f"| {_pair(ov, 'float32_s1', 'float32_s0', '.2f')} |"
        )
        scored = (
            ("cell types", run.get("labels"), "{kmeans_ari:.3f} / {knn_purity:.3f}"),
            ("15-NN overlap with the planted W", run.get("overlap15_planted"), "{:.3f}"),
        )
        for kind, scores, fmt in scored:
            if scores:
                keys = [k for k in FIT_KEYS if k in scores]
                vals = [
                    fmt.format(**s) if isinstance(s := scores[k], dict) else fmt.format(s)
                    for k in keys
                ]
                labels.append(f"| {name} ({kind}) | {' | '.join(vals)} |")
    out = "\n".join(rows)
    if labels:
        out += (
            "\n\n| data (score) | float64 seed 0 | float64 seed 1 | float32 seed 0 "
            "| float32 seed 1 |\n|---|---|---|---|---|\n" + "\n".join(labels)
        )
    return out + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="pbmc_small,zeisel,pbmc8k,brain10k,synthetic100k")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--scratch", default=str(SCRATCH))
    p.add_argument("--out", default=str(HERE / "results" / "precision.json"))
    p.add_argument(
        "--rescore", action="store_true", help="recompute the comparisons from the saved fits"
    )
    p.add_argument("--report", action="store_true", help="print the tables of --out and exit")
    args = p.parse_args(argv)
    scratch = Path(args.scratch)
    wdir = scratch / "precision_W"
    wdir.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    results.setdefault("runs", {})
    if args.report:
        print(report(results))
        return 0
    for name in args.datasets.split(","):
        if args.rescore:
            old = results["runs"][name]
            new = score(name, old["fits"], scratch, wdir)
            results["runs"][name] = {**old, **new}
            out_path.write_text(json.dumps(results, indent=1))
            continue
        t0 = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        res = measure(name, [int(s) for s in args.seeds.split(",")], scratch, wdir)
        res["started"] = t0
        res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        results["runs"][name] = res
        out_path.write_text(json.dumps(results, indent=1))
        print(json.dumps({k: v for k, v in res.items() if k != "fits"}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
