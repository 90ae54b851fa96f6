"""Held-out log-likelihood of new cells: projection along the fit's path vs a cold solve.

On the quality splits of ``benchmarks/run.py`` (same datasets, gene selection, 90/10 split,
seed), fit ``ZINBWaVE(n_components=10)`` on the training cells and score the held-out cells
twice: as ``score_samples`` does (new cells start at zero and follow the fit's recorded path,
``fit_path_``, before their local problems are solved at the fitted genes), and cold (the
path removed: zinbwave's initialization, then the same solve).

Usage::

    python benchmarks/projection.py --out benchmarks/results/projection.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.datasets import (  # noqa: E402
    filter_empty,
    find_data_dir,
    load_dataset,
    train_test_split_cells,
)
from zinbgrad import ZINBWaVE  # noqa: E402


def run(name: str, data_dir: Path, seed: int) -> dict:
    adata = load_dataset(name, data_dir, seed=seed)
    tr, te = train_test_split_cells(adata.n_obs, 0.1, seed)
    train = adata[tr].copy()
    train = filter_empty(train[:, np.asarray(train.X.sum(axis=0)).ravel() > 0])
    test = adata[te][:, train.var_names].copy()
    t0 = time.perf_counter()
    model = ZINBWaVE(n_components=10, verbose=False, random_state=seed).fit(train)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    path_ll = model.score_samples(test)
    path_s = time.perf_counter() - t0
    steps = len(model.fit_path_["n_newton"])
    model.fit_path_ = None
    t0 = time.perf_counter()
    cold_ll = model.score_samples(test)
    cold_s = time.perf_counter() - t0
    return {
        "dataset": name,
        "train_cells": int(train.n_obs),
        "test_cells": int(test.n_obs),
        "genes": int(train.n_vars),
        "path_steps": steps,
        "train_nll": -model.loglik_ / train.n_obs,
        "heldout_nll_path": float(-path_ll.mean()),
        "heldout_nll_cold": float(-cold_ll.mean()),
        "cells_better": float((path_ll > cold_ll + 1e-6).mean()),
        "cells_worse": float((path_ll < cold_ll - 1e-6).mean()),
        "fit_seconds": fit_s,
        "score_seconds_path": path_s,
        "score_seconds_cold": cold_s,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="zeisel,pbmc8k,camp,pbmc_protein")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/projection.json")
    args = p.parse_args(argv)
    data_dir = find_data_dir(args.data_dir)
    if data_dir is None:
        print("shared data not found (set ZINBGRAD_SHARED or --data-dir)", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    rows = []
    print(
        "| dataset | cells (train + test) x genes | train NLL | held-out NLL, path | cold |"
        " cells better / worse |"
    )
    print("|---|---|---|---|---|---|")
    for name in args.datasets.split(","):
        r = run(name.strip(), data_dir, args.seed)
        rows.append(r)
        print(
            f"| {r['dataset']} | {r['train_cells']} + {r['test_cells']} x {r['genes']} | "
            f"{r['train_nll']:,.1f} | {r['heldout_nll_path']:,.2f} | "
            f"{r['heldout_nll_cold']:,.2f} | {r['cells_better']:.0%} / {r['cells_worse']:.0%} |",
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"argv": sys.argv, "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
