"""A default fit on a busy machine: how much slower does it get beside other CPU-bound processes?

Runs the same fit (default: the Zeisel subset, K=10, every other setting zinbgrad's default) in
a fresh process for each thread behaviour below, beside 0, 1, 2 ... competing single-threaded
CPU-bound processes (``while True: pass``), and reports the wall time of the fit and its ratio
to the same behaviour on an otherwise idle machine:

* ``default``: ``import zinbgrad`` first, as a user does (zinbgrad sets ``OMP_WAIT_POLICY=PASSIVE``
  before torch loads libgomp, see ``zinbgrad.openmp``);
* ``torch-first``: ``import torch`` before zinbgrad, so libgomp's default spin-waiting stays (what
  every fit did before the passive policy);
* ``one-thread``: torch first, then ``torch.set_num_threads(1)``.

The processes run one after another; the competitors are restarted for every run. State the load
average the script prints: anything else running on the machine shifts every number.

usage: python benchmarks/contention.py [--competitors 0,1,2] [--repeats 1] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: the fit each child runs; it prints one JSON line with its wall time and objective
CHILD = r"""
import json, sys, time
mode, path, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode in ("torch-first", "one-thread"):
    import torch
    if mode == "one-thread":
        torch.set_num_threads(1)
import os
import anndata as ad
import numpy as np
import scipy.sparse as sp
import zinbgrad
import torch
X = sp.csr_matrix(ad.read_h5ad(path).X, dtype=np.float64)
t0 = time.perf_counter()
model = zinbgrad.ZINBWaVE(n_components=k, random_state=0).fit(X)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "objective": float(model.history_[-1]["objective"]),
                  "epochs": len(model.history_), "threads": torch.get_num_threads(),
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}))
"""

MODES = ("default", "torch-first", "one-thread")


def _spinner() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run_one(mode: str, data: Path, k: int, competitors: int) -> dict:
    """One fit in a fresh process beside ``competitors`` busy processes."""
    chosen = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    env = {key: v for key, v in os.environ.items() if key not in chosen}
    spinners = [_spinner() for _ in range(competitors)]
    try:
        time.sleep(0.5 if competitors else 0.0)
        out = subprocess.run(
            [sys.executable, "-c", CHILD, mode, str(data), str(k)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
    finally:
        for s in spinners:
            s.kill()
            s.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(HERE.parent))
    from benchmarks.datasets import DATASETS, find_data_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--competitors", default="0,1,2", help="comma list of competing processes")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    ap.add_argument("--dataset", default="zeisel", choices=sorted(DATASETS))
    ap.add_argument("--n-components", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    data_dir = find_data_dir(args.data_dir)
    if data_dir is None:
        raise SystemExit("error: shared/data not found (set ZINBGRAD_SHARED or --data-dir)")
    data = data_dir / DATASETS[args.dataset].file
    comps = [int(c) for c in args.competitors.split(",")]
    modes = args.modes.split(",")
    load_before = os.getloadavg()
    rows = []
    for c in comps:
        for mode in modes:
            for r in range(args.repeats):
                res = run_one(mode, data, args.n_components, c)
                res.update(mode=mode, competitors=c, repeat=r)
                rows.append(res)
                print(
                    f"competitors={c} mode={mode:<11} {res['seconds']:7.2f} s  "
                    f"epochs={res['epochs']} threads={res['threads']} "
                    f"objective={res['objective']:.2f}",
                    flush=True,
                )
    idle = {
        m: min(r["seconds"] for r in rows if r["mode"] == m and r["competitors"] == 0)
        for m in modes
        if any(r["mode"] == m and r["competitors"] == 0 for r in rows)
    }
    print("\n| competitors | " + " | ".join(modes) + " |")
    print("|---:|" + "---:|" * len(modes))
    for c in comps:
        cells = []
        for m in modes:
            t = min(r["seconds"] for r in rows if r["mode"] == m and r["competitors"] == c)
            ratio = f" ({t / idle[m]:.1f}x)" if m in idle else ""
            cells.append(f"{t:.1f} s{ratio}")
        print(f"| {c} | " + " | ".join(cells) + " |")
    info = {
        "dataset": args.dataset,
        "n_components": args.n_components,
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "rows": rows,
    }
    print(f"load average before {load_before}, after {info['loadavg_after']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
