"""How much a fit moves with the seed and with tiny perturbations (issue 21, item 6).

``fit`` runs one fit and saves W (and, with ``--snap N``, W every N epochs), the objective,
epochs, convergence and, with ``--heldout N``, the held-out log-likelihood per cell of N random
cells left out of the fit. ``compare`` prints, against a reference fit, the 15-nearest-
neighbour overlap of W (the share of each cell's 15 neighbours kept), the ARI of Leiden
partitions (scanpy, igraph flavour, resolution 1, Leiden seed 0 for both) and, where the data
have ``obs["cell_type"]``, ARI/NMI of the partitions to the cell types; ``leiden`` prints the
ARI between Leiden seeds on one fit's graph (Leiden's own spread). Needs scanpy, leidenalg and
igraph (not dependencies of the package). The README's numbers::

    D=/work/shared/data/pbmc8k_scvijl_200genes.h5ad
    python benchmarks/stability.py fit $D out/base.npz --threads 1
    python benchmarks/stability.py fit $D out/jit.npz --threads 1 --jitter 1e-6
    python benchmarks/stability.py fit $D out/thr2.npz --threads 2
    python benchmarks/stability.py fit $D out/f32.npz --threads 1 --set dtype='"float32"'
    python benchmarks/stability.py fit $D out/tol6.npz --threads 1 --set tol=1e-6 \\
        --set max_epochs=300 --snap 10
    python benchmarks/stability.py compare $D out/base.npz out/jit.npz out/thr2.npz ...
    python benchmarks/stability.py fit $D out/h_api100.npz --heldout 1000 \\
        --set epsilon_alpha_pi=100   # and with --jitter 1e-6; likewise the other options
    python benchmarks/stability.py leiden $D out/base.npz

(the same with the Zeisel file ``zeisel2015_descend_subset.h5ad``). The plateau of optima
(README, "Converged fits are not one fit either"; BENCHMARKS.md, "Fewer sweeps, continued")::

    Z=/work/shared/data/zeisel2015_descend_subset.h5ad
    python benchmarks/stability.py fit $Z out/z_default.npz --heldout 200
    python benchmarks/stability.py fit $Z out/z_plain600.npz --heldout 200 \\
        --set tol=1e-10 --set max_epochs=600
    python benchmarks/stability.py fit $Z out/z_extrap400.npz --heldout 200 --extrapolate \\
        --set tol=1e-10 --set max_epochs=400
    python benchmarks/stability.py compare $Z out/z_extrap400.npz out/z_plain600.npz \\
        out/z_default.npz
    python benchmarks/stability.py fit $Z out/z64_plain.npz --heldout 200 --snap 100 \\
        --set dtype='"float64"' --set tol=1e-11 --set max_epochs=1500
    python benchmarks/stability.py fit $Z out/z64_x.npz --heldout 200 --snap 100 --extrapolate \\
        --set dtype='"float64"' --set tol=1e-11 --set max_epochs=800
    python benchmarks/stability.py compare $Z out/z64_plain.npz out/z64_x.npz out/z_plain600.npz \\
        out/z_extrap400.npz out/z_default.npz

``--extrapolate`` is an experiment, not a fitting option of the package: after every sweep, a
safeguarded extrapolation of all parameters along the sweep's own step (see
:func:`_extrapolate`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import time

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.neighbors import NearestNeighbors

import zinbgrad


def _jitter_start(rel: float) -> None:
    """Multiply every initial parameter by ``1 + rel * N(0, 1)`` (a fixed draw)."""
    solve = importlib.import_module("zinbgrad.optim.solve")
    orig = solve.initialize

    def jittered(*args, **kwargs):
        p = orig(*args, **kwargs)
        g = torch.Generator().manual_seed(7)
        for f in ("beta_mu", "beta_pi", "alpha_mu", "alpha_pi", "W", "gamma_mu", "gamma_pi"):
            t = getattr(p, f)
            noise = torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)
            setattr(p, f, t * (1 + rel * noise))
        return p

    solve.initialize = jittered


def _extrapolate() -> None:
    """After every full sweep, try ``theta + s * D`` along the sweep's step ``D`` (the previous
    state carried into the new W basis by the sweep's orthogonalization ``T``), for the cells
    and genes whose step points the same way as their previous one; keep the best of up to four
    doublings of ``s`` if it raises the penalized objective (one likelihood pass per try), else
    keep the sweep's point. Gene steps are checked in the sweep (``lagged_check`` off), so every
    accepted state is fully evaluated and the objective stays monotone."""
    solvers = importlib.import_module("zinbgrad.optim.solvers")
    sweep0, full0 = solvers.Solvers._sweep, solvers.Solvers.fit_full
    genes = ("beta_mu", "beta_pi", "alpha_mu", "alpha_pi")
    cells = ("W", "gamma_mu", "gamma_pi")

    def state(p) -> dict:
        return {k: getattr(p, k).clone() for k in genes + cells if getattr(p, k) is not None}

    def carry(d: dict, T, Ti) -> dict:  # into the basis the sweep's orthogonalization chose
        d = dict(d)
        d["W"] = d["W"] @ T
        for k in ("alpha_mu", "alpha_pi"):
            if k in d:
                d[k] = Ti @ d[k]
        return d

    def fit_full(self, *a, **k):
        self.opt.lagged_check = False
        self.xs, self.xd = 1.0, None
        return full0(self, *a, **k)

    def sweep(self, local_steps, path=None):
        prev, Ts, orth = state(self.params), [], type(self).orthogonalize

        def recording(eng):
            Ts.append(orth(eng))
            return Ts[-1]

        type(self).orthogonalize = recording
        try:
            ll, obj = sweep0(self, local_steps, path)
        finally:
            type(self).orthogonalize = orth
        if path is not None or not Ts or Ts[-1] is None:
            return ll, obj
        T = Ts[-1]
        Ti = torch.linalg.inv(T)
        cur = state(self.params)
        prev = carry(prev, T, Ti)
        D = {k: cur[k] - prev[k] for k in cur}
        Dp, self.xd = self.xd, dict(D)  # the ungated step (gating below makes new tensors)
        if Dp is not None:  # gate: the genes/cells whose step keeps its direction
            Dp = carry(Dp, T, Ti)
            g = (sum((D[k] * Dp[k]).sum(0) for k in genes if k in D) > 0).to(D["W"].dtype)
            c = (D["W"] * Dp["W"]).sum(1) + sum(
                (D[k] * Dp[k]).sum(0) for k in cells[1:] if k in D and D[k].numel()
            )
            c = (c > 0).to(D["W"].dtype)
            for k in genes:
                if k in D:
                    D[k] = D[k] * g
            D["W"] = D["W"] * c[:, None]
            for k in cells[1:]:
                if k in D and D[k].numel():
                    D[k] = D[k] * c[None, :]
        s, best, keep = self.xs, obj, None
        for _ in range(4):
            for k in cur:
                setattr(self.params, k, cur[k] + s * D[k])
            self.orthogonalize()
            f = self.penalized(self.loglik())
            if f <= best:
                break
            best, keep = f, (state(self.params), s)
            s *= 2
        for k, v in (keep[0] if keep else cur).items():
            setattr(self.params, k, v)
        self.xs = keep[1] * 1.5 if keep else max(0.5, s / 4)
        return ll - obj + best, best

    solvers.Solvers._sweep, solvers.Solvers.fit_full = sweep, fit_full


def _snapshots(every: int) -> dict:
    """Keep W every ``every`` epochs (a hook on the solver's epoch record)."""
    solvers = importlib.import_module("zinbgrad.optim.solvers")
    orig, snaps = solvers.Solvers._record, {}

    def record(self, history, rec):
        orig(self, history, rec)
        if len(history) % every == 0:
            snaps[f"W{len(history)}"] = self.params.W.detach().cpu().numpy().astype(np.float32)

    solvers.Solvers._record = record
    return snaps


def _read(path: str) -> ad.AnnData:
    a = ad.read_h5ad(path)
    a.X = sp.csr_matrix(a.X, dtype=np.float64)
    return a[:, np.asarray(a.X.sum(0)).ravel() > 0].copy()


def fit(args) -> None:
    torch.set_num_threads(args.threads)
    if args.jitter:
        _jitter_start(args.jitter)
    if args.extrapolate:
        _extrapolate()
    snaps = _snapshots(args.snap) if args.snap else {}
    a = _read(args.data)
    kw = {"verbose": False} | {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    test = None
    if args.heldout:
        perm = np.random.default_rng(1).permutation(a.n_obs)
        test, a = a[np.sort(perm[: args.heldout])].copy(), a[np.sort(perm[args.heldout :])].copy()
    t = time.perf_counter()
    m = zinbgrad.ZINBWaVE(args.K, **kw).fit(a)
    out = {
        "W": m.W_,
        "objective": m.objective_,
        "history": np.array([h["objective"] for h in m.history_]),
        "seconds": time.perf_counter() - t,
        "converged": m.converged_,
        "n_iter": m.n_iter_,
        **snaps,
    }
    if test is not None:
        out["heldout"] = m.score(test)
    np.savez(args.out, **out)
    print(args.out, {k: out[k] for k in ("objective", "n_iter", "converged", "seconds")}, end="")
    print(f" held-out {out['heldout']:.3f}" if test is not None else "")


def knn(W: np.ndarray, k: int = 15) -> np.ndarray:
    return NearestNeighbors(n_neighbors=k + 1).fit(W).kneighbors(W, return_distance=False)[:, 1:]


def overlap(A: np.ndarray, B: np.ndarray, k: int = 15) -> float:
    """Mean share of each cell's ``k`` nearest neighbours in A that are among those in B."""
    pairs = zip(knn(A, k), knn(B, k), strict=True)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in pairs]))


def leiden(W: np.ndarray, seed: int = 0) -> np.ndarray:
    import scanpy as sc

    b = ad.AnnData(np.zeros((W.shape[0], 1), dtype=np.float32))
    b.obsm["W"] = W
    sc.pp.neighbors(b, use_rep="W", n_neighbors=15, random_state=0)
    sc.tl.leiden(b, random_state=seed, flavor="igraph", n_iterations=-1, directed=False)
    return b.obs["leiden"].to_numpy()


def compare(args) -> None:
    types = ad.read_h5ad(args.data, backed="r").obs.get("cell_type")
    ref = np.load(args.ref)
    lab_ref = leiden(ref["W"])
    for path in [args.ref, *args.others]:
        d = np.load(path)
        lab = leiden(d["W"])
        line = f"{path}: objective {float(d['objective']):.1f}, {int(d['n_iter'])} epochs"
        if "heldout" in d:
            line += f", held-out {float(d['heldout']):.3f}"
        if types is not None and len(types) == len(lab):
            line += f", ARI/NMI to types {adjusted_rand_score(types, lab):.3f}"
            line += f"/{normalized_mutual_info_score(types, lab):.3f}"
        if path != args.ref:
            line += f"; vs {args.ref}: 15-NN overlap {overlap(ref['W'], d['W']):.3f}"
            line += f", Leiden ARI {adjusted_rand_score(lab_ref, lab):.3f}"
        print(line, flush=True)
        snaps = [k for k in d.files if k[:1] == "W" and k[1:].isdigit()]
        for key in sorted(snaps, key=lambda k: int(k[1:])):
            ov = overlap(d[key], d["W"])
            print(f"  epoch {key[1:]}: 15-NN overlap with the final W {ov:.3f}")


def leiden_spread(args) -> None:
    W = np.load(args.fit)["W"]
    labels = [leiden(W, seed) for seed in range(4)]
    print([round(adjusted_rand_score(labels[0], x), 3) for x in labels[1:]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit")
    f.add_argument("data")
    f.add_argument("out")
    f.add_argument("--K", type=int, default=10)
    f.add_argument("--threads", type=int, default=1)
    f.add_argument("--jitter", type=float, default=0.0)
    f.add_argument("--heldout", type=int, default=0)
    f.add_argument("--snap", type=int, default=0)
    f.add_argument("--extrapolate", action="store_true", help="the sweep extrapolation experiment")
    f.add_argument("--set", action="append", default=[], help="KEY=JSON ZINBWaVE keyword")
    c = sub.add_parser("compare")
    c.add_argument("data")
    c.add_argument("ref")
    c.add_argument("others", nargs="*")
    s = sub.add_parser("leiden")
    s.add_argument("data")
    s.add_argument("fit")
    args = p.parse_args()
    {"fit": fit, "compare": compare, "leiden": leiden_spread}[args.cmd](args)


if __name__ == "__main__":
    main()
