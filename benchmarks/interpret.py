"""Issue 18: coverage of the latent uncertainty, choosing K, and denoising by molecular
cross-validation (zinbgrad vs PCA, and scVI when scvi-tools is installed).

usage:
  python benchmarks/interpret.py coverage [--out benchmarks/results/interpret/coverage.json]
  python benchmarks/interpret.py kselect  [--datasets zeisel,pbmc8k] [--ks 2,5,10,15,20]
  python benchmarks/interpret.py kcost    [--datasets zeisel,pbmc8k] [--ks 2,5,10,15,20]
                                          [--threads 1] [--warm] [--phases]
  python benchmarks/interpret.py mcv      [--datasets zeisel,pbmc8k] [--ks 2,5,10,15,20]
  python benchmarks/interpret.py report   (markdown tables of the JSON files)

Every part writes one JSON file (results, settings, date, machine load) under
benchmarks/results/interpret/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OUT = Path(__file__).resolve().parent / "results" / "interpret"


def _meta() -> dict:
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg": list(os.getloadavg()),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "command": "python " + " ".join(sys.argv),
    }


def _write(name: str, out: str | None, payload: dict) -> Path:
    path = Path(out) if out else OUT / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": _meta(), **payload}
    path.write_text(json.dumps(payload, indent=1, default=float))
    print(f"wrote {path}")
    return path


# --------------------------------------------------------------------------- coverage


def coverage(args) -> None:
    from scipy.stats import norm

    import zinbgrad
    from zinbgrad.planted import make_planted
    from zinbgrad.uncertainty import latent_uncertainty, loading_uncertainty, predictor_sd

    z = norm.ppf(0.95)
    configs = [
        (500, 200, 2, False),
        (500, 200, 3, True),
        (1000, 300, 4, True),
        (2000, 500, 6, True),
    ]
    rows = []
    for n, J, K, zi in configs:
        for tol in (1e-4, 1e-8):
            adata = make_planted(n, J, K, random_state=1, logit_pi=-2.0 if zi else None)
            t0 = time.perf_counter()
            m = zinbgrad.ZINBWaVE(K, zero_inflation=zi, tol=tol, max_epochs=500, verbose=False).fit(
                adata
            )
            t_fit = time.perf_counter() - t0
            t0 = time.perf_counter()
            lu = latent_uncertainty(m, adata)
            gu = loading_uncertainty(m, adata)
            t_unc = time.perf_counter() - t0
            s = np.sign(np.sum(adata.obsm["W_true"] * m.W_, 0))
            Wt, at = adata.obsm["W_true"], adata.varm["alpha_mu_true"].T

            def dc(M):
                return M - M.mean(0) - M.mean(1, keepdims=True) + M.mean()

            err = dc(m.W_ @ m.alpha_mu_) - dc(Wt @ at)
            ac = m.alpha_mu_ - m.alpha_mu_.mean(1, keepdims=True)
            sd_cell = predictor_sd(lu, ac)
            sd_both = predictor_sd(lu, ac, gu.cov[:, 1 : 1 + K, 1 : 1 + K])
            sim = m.sample(random_state=5)
            t0 = time.perf_counter()
            lp = latent_uncertainty(m, sim, new=True)
            t_proj = time.perf_counter() - t0
            row = {
                "n_cells": n,
                "n_genes": J,
                "K": K,
                "zero_inflation": zi,
                "tol": tol,
                "n_iter": m.n_iter_,
                "fit_s": t_fit,
                "uncertainty_s": t_unc,
                "project_with_uncertainty_s": t_proj,
                "cover_pred_cells_and_genes": float(np.mean(np.abs(err) <= z * sd_both)),
                "cover_pred_cells_only": float(np.mean(np.abs(err) <= z * sd_cell)),
                "cover_W": float(np.mean(np.abs(m.W_ * s - Wt) <= z * lu.sd)),
                "cover_alpha": float(
                    np.mean(np.abs(m.alpha_mu_ * s[:, None] - at) <= z * gu.alpha_mu_se)
                ),
                "cover_W_projected": float(np.mean(np.abs(lp.W - m.W_) <= z * lp.sd)),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            _write("coverage", args.out, {"rows": rows})


# --------------------------------------------------------------------------- data sets


def _datasets(names: list[str], max_cells: int | None):
    from benchmarks.datasets import find_data_dir, load_dataset
    from zinbgrad.planted import make_planted

    data_dir = find_data_dir()
    for name in names:
        if name.startswith("planted"):  # planted<K>
            K = int(name[len("planted") :])
            yield name, make_planted(500, 200, K, random_state=2), K
            continue
        if data_dir is None:
            print(f"skip {name}: shared data not found", file=sys.stderr)
            continue
        yield name, load_dataset(name, data_dir, max_cells=max_cells, seed=0), None


def kselect(args) -> None:
    import zinbgrad
    from zinbgrad.metrics import mcv_zinbwave

    rows = []
    for name, adata, planted in _datasets(args.datasets.split(","), args.max_cells):
        t0 = time.perf_counter()
        ks = [int(k) for k in args.ks.split(",")]
        if planted is not None:
            ks = [k for k in range(max(1, planted - 2), planted + 3)]
        df = zinbgrad.tl.select_n_components(adata, ks)
        u = adata.uns["zinbwave_n_components"]
        mcv = mcv_zinbwave(adata, ks) if args.with_mcv else None
        rec = {
            "dataset": name,
            "n_cells": adata.n_obs,
            "n_genes": adata.n_vars,
            "planted_K": planted,
            "table": df.to_dict(orient="list"),
            "recommended_by": u["recommended_by"],
            "seconds": time.perf_counter() - t0,
        }
        if mcv is not None:
            rec["mcv"] = mcv.to_dict(orient="list")
            rec["recommended_by"]["mcv_1se"] = mcv.attrs["recommended"]
            rec["recommended_by"]["mcv_lowest"] = mcv.attrs["lowest"]
        rows.append(rec)
        print(json.dumps({k: rec[k] for k in ("dataset", "recommended_by", "seconds")}), flush=True)
        _write("kselect" + (args.tag or ""), args.out, {"rows": rows})  # after each data set


#: the phases of a fit and of a K scan that ``kcost --phases`` times (cumulative seconds of
#: these functions under cProfile): module file, function name
_PHASES = {
    "init": ("optim/init.py", "initialize"),
    "dispersion start": ("optim/dispersion.py", "optimize_dispersion"),
    "sweeps": ("optim/solvers.py", "_sweep"),
    "scoring": ("zinbgrad/projection.py", "project"),
}


def _phase_seconds(fn, *args) -> dict:
    """Run ``fn(*args)`` under cProfile; seconds per :data:`_PHASES` entry, the total and the
    rest (data checks, the final log-likelihood, the bi-cross-validated sums)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(fn, *args)
    out = {"total": time.perf_counter() - t0}
    stats = pstats.Stats(prof).stats
    for name, (file, func) in _PHASES.items():
        out[name] = sum(v[3] for k, v in stats.items() if k[0].endswith(file) and k[2] == func)
    out["other"] = out["total"] - sum(out[name] for name in _PHASES)
    return out


def _plain_fit(adata, K: int, rec: dict) -> float:
    """Seconds of one plain fit of ``K`` factors (its epochs into ``rec``)."""
    import zinbgrad

    t0 = time.perf_counter()
    big = zinbgrad.ZINBWaVE(K, random_state=0, verbose=False).fit(adata)
    rec["plain_epochs"] = int(big.n_iter_)
    return time.perf_counter() - t0


def kcost(args) -> None:
    """What the K scan costs against one plain fit at its largest K (all cells; the mean of
    one timed before and one after the scans), in one
    process with ``--threads`` torch threads (ratios; wall times are inflated by the load):
    the cold scan (the default), with ``--warm`` also the warm one, with ``--phases`` a
    second, profiled run of the plain fit and the cold scan timing their phases."""
    import torch

    import zinbgrad

    torch.set_num_threads(args.threads)
    rows = []
    ks = [int(k) for k in args.ks.split(",")]
    for name, adata, _ in _datasets(args.datasets.split(","), args.max_cells):
        rec = {"dataset": name, "n_cells": adata.n_obs, "n_genes": adata.n_vars, "ks": ks}
        rec["threads"] = args.threads
        rec["load_before"] = list(os.getloadavg())
        plain = [_plain_fit(adata, max(ks), rec)]  # and after the scans: the mean is the reference
        for warm in (False, True) if args.warm else (False,):
            t0 = time.perf_counter()
            df = zinbgrad.tl.select_n_components(adata, ks, warm_start=warm)
            scan = {
                "seconds": time.perf_counter() - t0,
                "table": df.to_dict(orient="list"),
                "recommended_by": adata.uns["zinbwave_n_components"]["recommended_by"],
            }
            rec["warm" if warm else "cold"] = scan
        plain.append(_plain_fit(adata, max(ks), rec))
        rec["plain_fit_runs_s"], rec["plain_fit_s"] = plain, float(np.mean(plain))
        if args.phases:
            rec["phases"] = {
                "plain": _phase_seconds(
                    zinbgrad.ZINBWaVE(max(ks), random_state=0, verbose=False).fit, adata
                ),
                "cold": _phase_seconds(zinbgrad.tl.select_n_components, adata, ks),
            }
        rec["load_after"] = list(os.getloadavg())
        rows.append(rec)
        print(json.dumps({k: rec[k] for k in ("dataset", "plain_fit_s")}), flush=True)
        _write("kcost" + (args.tag or ""), args.out, {"rows": rows})


def _kcost_report(r: dict) -> None:
    print(
        "| data | scan | fits s | scoring s | scan s | plain fit at max K s | scan / plain "
        "| epochs per K | bi-cross K | BIC K |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    scans = [s for s in ("cold", "warm") if all(s in x for x in r["rows"])]
    for x in r["rows"]:
        for name in scans:
            s, t = x[name], x[name]["table"]
            fit, score = sum(t["fit_seconds"]), sum(t["score_seconds"])
            print(
                f"| {x['dataset']} | {name} | {fit:.1f} | {score:.1f} | {s['seconds']:.1f} | "
                f"{x['plain_fit_s']:.1f} ({x['plain_epochs']} epochs) | "
                f"{s['seconds'] / x['plain_fit_s']:.2f} | "
                f"{', '.join(str(e) for e in t['n_iter'])} | {s['recommended_by']['bicross']} | "
                f"{s['recommended_by']['bic']} |"
            )
    print()
    if any("phases" in x for x in r["rows"]):
        names = ["total", *_PHASES, "other"]
        print("| data | run | " + " | ".join(f"{n} s" for n in names) + " |")
        print("|---|---|" + "---|" * len(names))
        for x in r["rows"]:
            for run, ph in x.get("phases", {}).items():
                cells = " | ".join(f"{ph[n]:.1f}" for n in names)
                label = "plain fit" if run == "plain" else "cold scan"
                print(f"| {x['dataset']} | {label} | {cells} |")
        print()
    print(
        "| data | K | fit s | scoring s | epochs | train loglik | BIC | held-out loglik "
        "| bi-cross (se) |" + (" warm: train loglik / bi-cross |" if "warm" in scans else "")
    )
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if "warm" in scans else ""))
    for x in r["rows"]:
        c = x["cold"]["table"]
        for i, k in enumerate(c["n_components"]):
            line = (
                f"| {x['dataset']} | {k} | {c['fit_seconds'][i]:.1f} | {c['score_seconds'][i]:.1f} "
                f"| {c['n_iter'][i]} | {c['train_loglik'][i]:,.0f} | {c['bic'][i]:,.0f} | "
                f"{c['heldout_loglik'][i]:.2f} | {c['bicross_loglik'][i]:.2f} "
                f"({c['bicross_se'][i]:.2f}) |"
            )
            if "warm" in scans:
                w = x["warm"]["table"]
                line += f" {w['train_loglik'][i]:,.0f} / {w['bicross_loglik'][i]:.2f} |"
            print(line)
    print()


# --------------------------------------------------------------------------- MCV denoising


def pca_denoise(train, k: int, target: float = 1e4) -> np.ndarray:
    """Rank-k PCA of log1p(CP10k) of the training counts, mapped back to counts (expm1, then
    each cell's training library size): the PCA baseline of Batson et al."""
    X = np.asarray(train.toarray(), dtype=np.float64)
    lib = X.sum(1, keepdims=True)
    lib[lib == 0] = 1.0
    L = np.log1p(X / lib * target)
    mean = L.mean(0)
    U, S, Vt = np.linalg.svd(L - mean, full_matrices=False)
    R = (U[:, :k] * S[:k]) @ Vt[:k] + mean
    return np.clip(np.expm1(R), 0, None) / target * lib


def scvi_denoise(
    train, n_latent: int, seed: int, max_epochs: int | None, n_samples: int = 25
) -> tuple[dict[str, np.ndarray], dict]:
    """scVI (ZINB likelihood, its defaults) fitted to the training counts; its denoised counts
    at the training depth, averaged over ``n_samples`` posterior draws of z:

    * ``"EY"``: the expected count of its ZINB, ``(1 - dropout) * mu`` (what zinbgrad's
      ``E[Y] = (1 - pi) mu`` is compared with);
    * ``"mu"``: the mean of its NB component, ``get_normalized_expression(library_size=
      "latent")``, the usual "denoised expression" of scVI.
    """
    import anndata as ad
    import scvi

    scvi.settings.seed = seed
    a = ad.AnnData(train.astype(np.float32))
    scvi.model.SCVI.setup_anndata(a)
    model = scvi.model.SCVI(a, n_latent=n_latent)
    t0 = time.perf_counter()
    model.train(max_epochs=max_epochs, enable_progress_bar=False)
    info = {
        "train_s": time.perf_counter() - t0,
        "epochs": int(len(model.history["elbo_train"])),
        "n_samples": n_samples,
    }
    mu = np.zeros(a.shape)
    ey = np.zeros(a.shape)
    for _ in range(n_samples):  # one draw of z per cell per pass
        p = model.get_likelihood_parameters(n_samples=1)
        mu += p["mean"]
        ey += (1.0 - p["dropout"]) * p["mean"]
    return {"EY": ey / n_samples, "mu": mu / n_samples}, info


def mcv(args) -> None:
    from zinbgrad.metrics import mcv_loss, mcv_zinbwave, molecular_split

    try:
        import scvi  # noqa: F401

        have_scvi = True
    except ImportError:
        have_scvi = False
    ks = [int(k) for k in args.ks.split(",")]
    rows = []
    for name, adata, _planted in _datasets(args.datasets.split(","), args.max_cells):
        train, test = molecular_split(adata.X, 0.9, random_state=0)
        res = {"dataset": name, "n_cells": adata.n_obs, "n_genes": adata.n_vars}
        t0 = time.perf_counter()
        zdf = mcv_zinbwave(adata, ks)
        res["zinbgrad"] = zdf.to_dict(orient="list")
        res["zinbgrad_K_1se"] = zdf.attrs["recommended"]
        res["zinbgrad_K_lowest"] = zdf.attrs["lowest"]
        res["zinbgrad_s"] = time.perf_counter() - t0
        prow = []
        for k in [int(x) for x in args.pca_ks.split(",")]:
            t0 = time.perf_counter()
            sc = mcv_loss(train, test, pca_denoise(train, k))
            prow.append({"k": k, **sc, "seconds": time.perf_counter() - t0})
        res["pca"] = prow
        res["raw"] = mcv_loss(train, test, train.toarray())
        if have_scvi and not args.no_scvi:
            srow = []
            for k in [int(x) for x in args.scvi_ks.split(",")]:
                t0 = time.perf_counter()
                d, info = scvi_denoise(train, k, 0, args.scvi_epochs)
                for out, D in d.items():
                    srow.append(
                        {
                            "n_latent": k,
                            "output": out,
                            **mcv_loss(train, test, D),
                            **info,
                            "seconds": time.perf_counter() - t0,
                        }
                    )
                print(json.dumps({"dataset": name, "scvi": srow[-len(d) :]}), flush=True)
            res["scvi"] = srow
        rows.append(res)
        print(json.dumps({k: v for k, v in res.items() if k not in ("zinbgrad",)}), flush=True)
        _write("mcv" + (args.tag or ""), args.out, {"have_scvi": have_scvi, "rows": rows})


# --------------------------------------------------------------------------- report


def _kselect_detail(x: dict) -> None:
    """Per-K values behind one data set's recommendations (log-likelihoods per cell)."""
    t, m = x["table"], x.get("mcv")
    print(f"{x['dataset']} ({x['n_cells']} x {x['n_genes']}), per K:\n")
    print(
        "| K | bi-cross loglik (se) | held-out loglik | AIC | BIC | epochs | "
        "MCV Poisson (se) | MCV MSE |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for i, k in enumerate(t["n_components"]):
        mc = "- | -"
        if m is not None and k in m["n_components"]:
            j = m["n_components"].index(k)
            mc = f"{m['poisson'][j]:.5f} ({m['poisson_se'][j]:.5f}) | {m['mse'][j]:.5f}"
        print(
            f"| {k} | {t['bicross_loglik'][i]:.2f} ({t['bicross_se'][i]:.2f}) | "
            f"{t['heldout_loglik'][i]:.2f} | {t['aic'][i]:.4g} | {t['bic'][i]:.4g} | "
            f"{t['n_iter'][i]} | {mc} |"
        )
    print()


def _runs(d: Path, pattern: str):
    """``(file name, results)`` of the result files in ``d`` matching ``pattern``, sorted."""
    for p in sorted(d.glob(pattern)):
        yield p.name, json.loads(p.read_text())


def _heading(title: str, r: dict, name: str | None = None, note: str = "") -> None:
    """A table's heading: what, from which file, when and at what load."""
    where = "" if name is None else f"{name}, "
    load = r["meta"]["loadavg"][0]
    print(f"{title} ({where}{r['meta']['date_utc']}, load {load:.1f}{note})\n")


def report(args) -> None:
    d = Path(args.dir) if args.dir else OUT
    p = d / "coverage.json"
    if p.exists():
        r = json.loads(p.read_text())
        _heading("Coverage of nominal 90 % intervals", r)
        print(
            "| cells x genes | K | ZI | tol | epochs | W_i.alpha_j (cells+genes) | "
            "W_i.alpha_j (cells only) | W | alpha | W, projected cells | fit s | "
            "uncertainty s |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for x in r["rows"]:
            print(
                f"| {x['n_cells']} x {x['n_genes']} | {x['K']} | "
                f"{'yes' if x['zero_inflation'] else 'no'} "
                f"| {x['tol']:g} | {x['n_iter']} | {x['cover_pred_cells_and_genes']:.3f} | "
                f"{x['cover_pred_cells_only']:.3f} | {x['cover_W']:.3f} | {x['cover_alpha']:.3f} "
                f"| {x['cover_W_projected']:.3f} | {x['fit_s']:.1f} | {x['uncertainty_s']:.2f} |"
            )
        print()
    for name, r in _runs(d, "kselect*.json"):
        _heading("K selection", r, name)
        print(
            "| data | cells x genes | planted K | K grid | bi-cross | held-out (re-opt.) | "
            "AIC | BIC | MCV 1-SE | MCV lowest | s |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for x in r["rows"]:
            rb = x["recommended_by"]
            print(
                f"| {x['dataset']} | {x['n_cells']} x {x['n_genes']} | {x['planted_K'] or '-'} | "
                f"{','.join(str(k) for k in x['table']['n_components'])} | {rb['bicross']} | "
                f"{rb['heldout']} | {rb['aic']} | {rb['bic']} | {rb.get('mcv_1se', '-')} | "
                f"{rb.get('mcv_lowest', '-')} | {x['seconds']:.0f} |"
            )
        print()
        for x in r["rows"]:
            _kselect_detail(x)

    for name, r in _runs(d, "kcost*.json"):
        _heading("Cost of the K scan", r, name)
        _kcost_report(r)

    for name, r in _runs(d, "mcv*.json"):
        note = "; Poisson loss / MSE of log1p-normalized, lower is better"
        _heading("MCV denoising", r, name, note)
        print("| data | method | K | Poisson | MSE | s |")
        print("|---|---|---|---|---|---|")
        for x in r["rows"]:
            z = x["zinbgrad"]
            for i, k in enumerate(z["n_components"]):
                mark = " (1-SE)" if k == x["zinbgrad_K_1se"] else ""
                print(
                    f"| {x['dataset']} | zinbgrad | {k}{mark} | {z['poisson'][i]:.5f} | "
                    f"{z['mse'][i]:.5f} | {z['seconds'][i]:.1f} |"
                )
            for y in x["pca"]:
                print(
                    f"| {x['dataset']} | PCA (log1p CP10k) | {y['k']} | {y['poisson']:.5f} | "
                    f"{y['mse']:.5f} | {y['seconds']:.1f} |"
                )
            for y in x.get("scvi", []):
                out = {"EY": " E[Y] = (1-pi) mu", "mu": " mu (normalized expr.)"}
                print(
                    f"| {x['dataset']} | scVI{out.get(y.get('output'), '')} | {y['n_latent']} | "
                    f"{y['poisson']:.5f} | {y['mse']:.5f} | {y['seconds']:.1f} |"
                )
            print(
                f"| {x['dataset']} | raw train counts | - | {x['raw']['poisson']:.5f} | "
                f"{x['raw']['mse']:.5f} | - |"
            )
        print()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="part", required=True)
    c = sub.add_parser("coverage")
    c.add_argument("--out")
    for name in ("kselect", "kcost", "mcv"):
        s = sub.add_parser(name)
        s.add_argument("--datasets", default="planted3,planted6,zeisel,pbmc8k")
        s.add_argument("--ks", default="2,5,10,15,20")
        s.add_argument("--max-cells", type=int, default=None)
        s.add_argument("--out")
        s.add_argument("--tag", default="")
        if name == "kselect":
            s.add_argument("--with-mcv", action="store_true", help="also choose K by MCV")
        elif name == "kcost":
            s.add_argument("--threads", type=int, default=1, help="torch threads")
            s.add_argument("--warm", action="store_true", help="also time the warm scan")
            s.add_argument("--phases", action="store_true", help="also a profiled run")
        else:
            s.add_argument("--no-scvi", action="store_true")
            s.add_argument("--pca-ks", default="2,5,10,15,20,30,50")
            s.add_argument("--scvi-ks", default="10")
            s.add_argument("--scvi-epochs", type=int, default=None)
    r = sub.add_parser("report")
    r.add_argument("--dir")
    args = p.parse_args(argv)
    parts = {"coverage": coverage, "kselect": kselect, "kcost": kcost, "mcv": mcv}
    {**parts, "report": report}[args.part](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
