"""Query mapping of an unseen batch (issue 17): fit on one batch of the PBMC pair, map the other.

::

    python benchmarks/integration.py mapping --out benchmarks/results/integration

For each zinbgrad variant (plain: batch in X; ``bl``: ``batch_loadings=True``) and each
direction (reference batch R, query batch Q):

* **joint**: ``ZINBWaVE(n_components=10, **variant)`` fitted on both batches with
  ``batch_key="batch"`` (the reference result);
* **mapped**: ``ZINBWaVE(n_components=10)`` fitted on R alone (one batch: no ``batch_key``),
  then ``map_query(Q, batch_key="batch", batch_loadings=...)``: Q's X column effects (and, for
  ``bl``, its loading offsets) estimated from Q's cells with every fitted gene parameter fixed,
  then Q's W. The latent space of all cells is R's fitted W with Q's mapped W;
* **projected** (baseline, plain only): the same R-only model, Q's W by plain ``transform``
  (no batch coefficients: Q treated as R, zinbwave's projection).

Genes: those with counts in each half of each batch (985 of the 1000 at seed 0; a fit leaves
out genes with no counts in its cells). Every latent space (all 400 cells) is scored by the
harness's ``scib_scores`` (scib-metrics' ``Benchmarker``, every default metric, unscaled,
exact k-NN; labelled cells) and ``extra_scores``, as ``W`` and as ``sv``
(:func:`benchmarks.integration.latent_representations` with the model's ``alpha_mu_``).
Log-likelihood per query cell: the mapped model's ``map_query(...).loglik`` (Q's cells never
seen by the gene parameters; Q's batch coefficients are estimated from these same cells)
against the joint model's ``score_samples(Q)`` (W and gamma of Q's cells re-optimized with the
joint fit's gene parameters, which were fitted with Q's cells: in-sample, an upper reference)
and the projected baseline's ``score_samples(Q)`` (no batch term). Half held out: Q split at
random in two (seeded); the joint model refitted on R + Q's first half scores Q's second half
(cells unseen, batch coefficients from the first half), against that second half mapped by the
R-only model (cells unseen by the gene parameters, batch coefficients from these cells).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "run_mapping"]

VARIANTS: dict[str, dict[str, Any]] = {"plain": {}, "bl": {"batch_loadings": True}}
N_LATENT = 10


def _fit(adata, seed: int, batch_key: str | None, **kw):
    from zinbgrad import ZINBWaVE

    t0 = time.perf_counter()
    model = ZINBWaVE(n_components=N_LATENT, random_state=seed, **kw).fit(adata, batch_key=batch_key)
    return model, time.perf_counter() - t0


def _stack(adata, parts: dict[str, np.ndarray]) -> np.ndarray:
    """Rows of every batch's W put back in the cells' order of ``adata``."""
    batch = adata.obs["batch"].to_numpy().astype(str)
    out = np.zeros((adata.n_obs, N_LATENT))
    for level, W in parts.items():
        out[batch == level] = W
    return out


def _common_genes(adata, batch: np.ndarray, levels: list[str], seed: int):
    """``adata`` restricted to the genes with counts in each random half of each batch, and
    the halves (True: first half; seeded).

    A fit leaves out the genes without counts in its cells, and the per-cell
    log-likelihoods compared must sum over the same genes.
    """
    half = np.zeros(adata.n_obs, dtype=bool)
    rng = np.random.default_rng(seed)
    for lv in levels:
        idx = rng.permutation(np.flatnonzero(batch == lv))
        half[idx[: len(idx) // 2]] = True
    both = np.ones(adata.n_vars, dtype=bool)
    for lv in levels:
        for h in (True, False):
            both &= np.asarray(adata[(batch == lv) & (half == h)].X.sum(axis=0)).ravel() > 0
    return adata[:, both].copy(), half


def run_mapping(adata, seed: int, variants: dict[str, dict[str, Any]], log=print) -> dict:
    """Joint fits, one-batch fits and mapped query batches of ``adata`` (two batches in
    ``obs["batch"]``, labels in ``obs["label"]``); every latent space scored."""
    from benchmarks.datasets import UNLABELLED
    from benchmarks.integration import extra_scores, latent_representations, scib_scores
    from benchmarks.methods import make_method

    levels = [str(x) for x in adata.obs["batch"].cat.categories]
    if len(levels) != 2:
        raise ValueError(f"query mapping needs two batches, got {levels}")
    batch = adata.obs["batch"].to_numpy().astype(str)
    adata, half = _common_genes(adata, batch, levels, seed)
    sub = {lv: adata[batch == lv].copy() for lv in levels}
    rec: dict[str, Any] = {"levels": levels, "n_cells": int(adata.n_obs), "fits": {}, "ll": {}}
    rec["n_genes"] = int(adata.n_vars)
    spaces: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (W of all cells, alpha_mu)
    for v, kw in variants.items():
        joint, t = _fit(adata, seed, "batch", **kw)
        rec["fits"][f"joint {v}"] = {"fit_s": t, "n_iter": int(joint.n_iter_)}
        spaces[f"joint {v}"] = (np.asarray(joint.W_), joint.alpha_mu_)
        log(f"joint {v}: {t:.1f} s")
        for r, q in (levels, levels[::-1]):
            d = "->".join(x.split("_")[1] if x.startswith("pbmc_") else x for x in (r, q))
            ref, t_ref = _fit(sub[r], seed, None)
            t0 = time.perf_counter()
            m = ref.map_query(sub[q], batch_key="batch", batch_loadings=bool(kw))
            t_map = time.perf_counter() - t0
            t0 = time.perf_counter()
            ll_joint = joint.score_samples(sub[q])
            t_joint_ll = time.perf_counter() - t0
            rec["fits"][f"mapped {v} {d}"] = {
                "fit_ref_s": t_ref,
                "map_s": t_map,
                "map_n_iter": int(m.n_iter),
                "map_converged": bool(m.converged),
                "joint_score_samples_s": t_joint_ll,
            }
            rec["ll"][f"{v} {d}"] = {
                "mapped": float(np.mean(m.loglik)),
                "joint": float(np.mean(ll_joint)),
                "n_query": int(sub[q].n_obs),
            }
            # both held out: joint fit on R + half of Q, scored on Q's other half (its
            # batch coefficients from the first half), against that half mapped
            in_r, q1, q2 = batch == r, (batch == q) & half, (batch == q) & ~half
            joint_h, _ = _fit(adata[in_r | q1].copy(), seed, "batch", **kw)
            m_h = ref.map_query(adata[q2].copy(), batch_key="batch", batch_loadings=bool(kw))
            rec["ll"][f"{v} {d}"]["half_joint"] = float(np.mean(joint_h.score_samples(adata[q2])))
            rec["ll"][f"{v} {d}"]["half_mapped"] = float(np.mean(m_h.loglik))
            rec["ll"][f"{v} {d}"]["n_half"] = int(q2.sum())
            spaces[f"mapped {v} {d}"] = (_stack(adata, {r: ref.W_, q: m.W}), ref.alpha_mu_)
            if not kw:
                t0 = time.perf_counter()
                Wq = ref.transform(sub[q])
                ll_p = ref.score_samples(sub[q])
                rec["fits"][f"projected {d}"] = {"transform_s": time.perf_counter() - t0}
                rec["ll"][f"{v} {d}"]["projected"] = float(np.mean(ll_p))
                spaces[f"projected {d}"] = (_stack(adata, {r: ref.W_, q: Wq}), ref.alpha_mu_)
            log(f"  {d}: ref fit {t_ref:.1f} s, map {t_map:.1f} s; {rec['ll'][f'{v} {d}']}")
    embeddings = {}
    for name, (W, A) in spaces.items():
        reps = latent_representations(W, A)
        embeddings[name] = reps["W"]
        embeddings[f"{name}/sv"] = reps["sv"]
    labels = adata.obs["label"].to_numpy().astype(str)
    lab = labels != UNLABELLED
    pca = make_method("pca", seed=seed).fit(adata).latent()
    t0 = time.perf_counter()
    scib = scib_scores(
        {k: e[lab] for k, e in embeddings.items()}, batch[lab], labels[lab], pca[lab]
    )
    rec["scib_s"] = time.perf_counter() - t0
    rec["embeddings"] = {
        k: {**scib[k], **extra_scores(e, batch, labels, seed)} for k, e in embeddings.items()
    }
    return rec


COLS = ("Bio conservation", "Batch correction", "Total", "entropy", "celltype_ARI")


def render_markdown(rec: dict[str, Any]) -> str:
    """The tables of :func:`run_mapping`'s record."""
    lines = [
        "| latent space (all 400 cells) | " + " | ".join(COLS) + " |",
        "|---" * (len(COLS) + 1) + "|",
    ]
    for k, e in rec["embeddings"].items():
        lines.append(f"| {k} | " + " | ".join(f"{e[c]:.3f}" for c in COLS) + " |")
    lines += [
        "",
        "| variant, direction | query cells | mapped | joint (in-sample) | mapped - joint | "
        "projected, no batch term | half: cells | half: mapped | half: joint (held out) | "
        "half: mapped - joint |",
        "|---" * 10 + "|",
    ]
    for k, ll in rec["ll"].items():
        p = f"{ll['projected']:.1f}" if "projected" in ll else "-"
        lines.append(
            f"| {k} | {ll['n_query']} | {ll['mapped']:.1f} | {ll['joint']:.1f} | "
            f"{ll['mapped'] - ll['joint']:+.1f} | {p} | {ll['n_half']} | "
            f"{ll['half_mapped']:.1f} | {ll['half_joint']:.1f} | "
            f"{ll['half_mapped'] - ll['half_joint']:+.1f} |"
        )
    lines += ["", "| fit | seconds |", "|---|---|"]
    for k, f in rec["fits"].items():
        lines.append(
            f"| {k} | "
            + ", ".join(f"{a} {b:.2f}" for a, b in f.items() if isinstance(b, float))
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.datasets import find_data_dir, load_dataset

    p = argparse.ArgumentParser(prog="integration.py mapping", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/integration", help="results folder")
    p.add_argument("--data-dir", default=None, help="shared/data (default: found)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="plain,bl", help=f"of {sorted(VARIANTS)}")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--tag", default="mapping", help="JSON file name (without .json)")
    args = p.parse_args(argv)
    variants = {v: VARIANTS[v] for v in args.variants.split(",") if v}
    data_dir = find_data_dir(args.data_dir)
    if data_dir is None:
        raise SystemExit("shared/data not found (give --data-dir or set ZINBGRAD_SHARED)")
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    adata = load_dataset("pbmc_pair", data_dir, seed=args.seed)
    rec = run_mapping(adata, args.seed, variants)
    meta = {
        "command": "python benchmarks/integration.py mapping " + " ".join(argv or []),
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": time.perf_counter() - t0,
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg(),
        "seed": args.seed,
        "variants": variants,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(
        json.dumps({"meta": meta, "record": rec}, indent=1, default=float)
    )
    print(json.dumps(meta, default=float))
    print(render_markdown(rec))
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
