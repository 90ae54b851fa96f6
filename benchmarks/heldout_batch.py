"""Held-out log-likelihood of zinbgrad's batch options on cells of the SAME batches (issue 17).

::

    python benchmarks/heldout_batch.py --out benchmarks/results/integration/heldout_batch.json

Per dataset of the integration benchmark (800 cells, seeded), the cells are split at random
80 % / 20 % (both parts hold every batch); every variant (keywords of ``ZINBWaVE``, batch in X
by ``batch_key="batch"``) is fitted on the 80 % and scored by ``score_samples`` (W and gamma of
each cell re-optimized, gene parameters fixed; the cell's batch read from ``.obs``) on

* the 20 % held out (``test``): the held-out log-likelihood per cell;
* the 80 % it was fitted on (``train``, re-projected by the same estimator): with ``test`` the
  generalization gap (train - test) of each variant;
* ``fit``: the fit's own log-likelihood per training cell (``loglik_ / n``), against which
  ``train`` checks that the projection of new cells uses the model as the fit did (a
  projection that dropped, say, the loading offsets would score the training cells far below
  their fit).

A variant that fits the training cells better but scores the held-out cells worse than the
plain model overfits. Results: one JSON record per dataset and seed, with the variants'
numbers and fit times (machine load in the record: timings are ratios within one run).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_VARIANTS = {
    "plain": {},
    "bl_eps1": {"batch_loadings": True, "epsilon_delta": 1.0},
    "bl_eps10": {"batch_loadings": True, "epsilon_delta": 10.0},
    "bl_eps100": {"batch_loadings": True, "epsilon_delta": 100.0},
    "bl_eps1000": {"batch_loadings": True, "epsilon_delta": 1000.0},
    "bl_eps10000": {"batch_loadings": True, "epsilon_delta": 10000.0},
}


def score_variant(train, test, kw: dict, seed: int, threads: int) -> dict:
    """Fit ``ZINBWaVE(10, **kw)`` on ``train`` and score train and test cells per cell."""
    import torch

    from zinbgrad import ZINBWaVE

    torch.set_num_threads(threads)
    model = ZINBWaVE(n_components=10, random_state=seed, **kw)
    t0 = time.perf_counter()
    model.fit(train, batch_key="batch")
    fit_s = time.perf_counter() - t0
    ll_test = model.score_samples(test, batch_key="batch")
    ll_train = model.score_samples(train, batch_key="batch")
    return {
        "options": kw,
        "fit_s": fit_s,
        "converged": bool(model.converged_),
        "n_iter": int(getattr(model, "n_iter_", -1)),
        "fit_ll_per_cell": float(model.loglik_) / train.n_obs,
        "train_ll_per_cell": float(np.mean(ll_train)),
        "test_ll_per_cell": float(np.mean(ll_test)),
        "test_ll_sd": float(np.std(ll_test)),
        "test_ll_cells": [float(v) for v in ll_test],
    }


def run(args) -> list[dict]:
    from benchmarks.datasets import find_data_dir, load_dataset
    from benchmarks.integration import _split, parse_variant

    variants = dict(DEFAULT_VARIANTS) if not args.variant else {}
    for v in args.variant or []:
        name, kw = parse_variant(v)
        variants[name] = kw
    if args.only:
        keep = set(args.only.split(","))
        variants = {k: v for k, v in variants.items() if k in keep}
    data_dir = find_data_dir(args.data_dir)
    records = []
    for spec in args.datasets.split(","):
        name, _, seeds = spec.partition(":")
        for seed in [int(s) for s in (seeds or "0").split("+")]:
            adata = load_dataset(name, data_dir, max_cells=args.max_cells, seed=seed)
            train, test = _split(adata, seed, args.test_fraction)
            rec = {"dataset": name, "seed": seed, "n_train": train.n_obs, "n_test": test.n_obs}
            rec["n_genes"] = train.n_vars
            rec["load_start"] = os.getloadavg()
            rec["variants"] = {}
            for vname, kw in variants.items():
                r = score_variant(train, test, kw, seed, args.threads)
                rec["variants"][vname] = r
                print(
                    f"[{name} s{seed}] {vname:14s} fit {r['fit_s']:6.1f} s  "
                    f"fit/cell {r['fit_ll_per_cell']:10.2f}  train {r['train_ll_per_cell']:10.2f}"
                    f"  test {r['test_ll_per_cell']:10.2f}",
                    flush=True,
                )
            rec["load_end"] = os.getloadavg()
            records.append(rec)
            _save(records, args.out)
    return records


def _save(records: list[dict], out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else []
    keys = {(r["dataset"], r["seed"]) for r in records}
    merged = {(r["dataset"], r["seed"]): r for r in old}
    for r in records:  # new variants are added to an old record of the same cells
        prev = merged.get((r["dataset"], r["seed"]))
        if prev is not None and prev.get("n_train") == r["n_train"]:
            prev["variants"].update(r["variants"])
            prev["load_end"] = r["load_end"]
        else:
            merged[(r["dataset"], r["seed"])] = r
    del keys
    path.write_text(json.dumps(list(merged.values()), indent=1))


def table(path: str) -> str:
    """Markdown table: held-out (test) log-likelihood per cell, and train - test, per variant."""
    records = json.loads(Path(path).read_text())
    names: list[str] = []
    for r in records:
        names += [v for v in r["variants"] if v not in names]
    head = "| variant | " + " | ".join(f"{r['dataset']} s{r['seed']}" for r in records) + " |"
    lines = [head, "|---" * (len(records) + 1) + "|"]
    for v in names:
        cells = []
        for r in records:
            x = r["variants"].get(v)
            plain = r["variants"].get("plain")
            if x is None:
                cells.append("")
                continue
            d = "" if plain is None or v == "plain" else (
                f" ({x['test_ll_per_cell'] - plain['test_ll_per_cell']:+.1f})"
            )
            cells.append(f"{x['test_ll_per_cell']:.1f}{d}")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/integration/heldout_batch.json")
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--datasets",
        default="pbmc_pair:0,zeisel_thinned:0,zeisel_typethin:0+1+2",
        help="name:seed+seed,... (default: the integration benchmark's five sets)",
    )
    p.add_argument("--variant", action="append", help="name='{json keywords}' (repeatable)")
    p.add_argument("--only", default=None, help="comma-separated variant names to run")
    p.add_argument("--max-cells", type=int, default=800)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.out))
        return 0
    run(args)
    print(table(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
