"""Scaling benchmark of zinbgrad's fit in the number of cells (issue 5).

1. Fit zinbgrad (K=10) on the real 10x mouse-brain slice (720 top-variance genes, as scVI's
   BRAIN-LARGE; the 10k-cell slice has only 715 genes with a count, so all 715), once; the
   model is saved in the scratch folder and reused.
2. Generate synthetic datasets of the requested sizes from that fit with
   :func:`zinbgrad.simulate.make_synthetic` (CSR ``.h5ad`` written in chunks; skipped when the
   file exists).
3. Per size and mode (``stream``: the fit streams the ``.h5ad`` path from disk; ``memory``: the
   file is read into memory first, only for sizes <= ``--memory-max``), run the fit in a fresh
   subprocess and record: seconds per epoch (per phase), epochs, end-to-end seconds
   (load + validate + init + fit), a phase breakdown, peak RSS of that process
   (``os.wait4`` rusage, i.e. per child) and throughput in matrix entries per second per epoch.

Usage::

    python benchmarks/scaling.py --sizes 10k,100k --solver stochastic --batch-size 8192 \
        --dtype float32 --max-epochs 5 --out benchmarks/results/scaling.json

    python benchmarks/scaling.py report benchmarks/results/scaling.json [...] \
        --roofline benchmarks/results/roofline.json   # tables + extrapolation to 1.3M

The JSON holds one record per run (plus the machine's load average before each run); the
Markdown table printed at the end is the one in ``BENCHMARKS.md`` ("Scaling (issue 5)").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BRAIN = "/work/shared/data/brain1m_10x_first10k_cells_first1000_genes.h5ad"
N_GENES = 720  # scVI's BRAIN-LARGE selection (capped by the genes with a nonzero count)
REF_NAME = "brain10k_top_var"


# ----------------------------------------------------------------------------- helpers
def parse_size(s: str) -> int:
    s = s.strip().lower().replace("_", "")
    mult = 1
    if s.endswith("k"):
        s, mult = s[:-1], 1_000
    elif s.endswith("m"):
        s, mult = s[:-1], 1_000_000
    return int(round(float(s) * mult))


def size_label(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:g}M"
    if n >= 1_000:
        return f"{n / 1e3:g}k"
    return str(n)


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def log(msg: str) -> None:
    print(f"[scaling {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- reference fit
def reference_paths(scratch: Path) -> tuple[Path, Path]:
    return scratch / f"{REF_NAME}.h5ad", scratch / f"{REF_NAME}_model.npz"


def write_brain_slice(data_path: Path) -> None:
    """The brain slice's cells and top-variance genes (all 715 with a count) as ``.h5ad``."""
    import anndata as ad
    import numpy as np

    from zinbgrad.pp import select_top_variance_genes

    a = ad.read_h5ad(BRAIN)
    X = a.X.tocsr()
    a = a[np.asarray(X.getnnz(axis=1) > 0)].copy()
    a = a[:, np.asarray(a.X.getnnz(axis=0) > 0)].copy()
    # the slice has only 715 genes with a nonzero count: then all of them are kept
    a = select_top_variance_genes(a, min(N_GENES, a.n_vars))
    a = a[np.asarray(a.X.getnnz(axis=1) > 0)].copy()  # cells empty on the 720 genes
    a.write_h5ad(data_path)


def prepare_reference(scratch: Path, max_epochs: int, dtype: str) -> dict:
    """Filtered 720-gene brain slice and a K=10 fit on it (both cached in ``scratch``)."""
    import zinbgrad

    data_path, model_path = reference_paths(scratch)
    info: dict = {"data": str(data_path), "model": str(model_path)}
    if not data_path.exists():
        write_brain_slice(data_path)
    if model_path.exists():
        model = zinbgrad.ZINBWaVE.load(model_path)
        info["cached"] = True
    else:
        log(f"reference fit on {data_path} (K=10, max_epochs={max_epochs}, dtype={dtype})")
        t0 = time.perf_counter()
        model = zinbgrad.ZINBWaVE(n_components=10, max_epochs=max_epochs, dtype=dtype)
        model.fit(str(data_path))
        info["fit_seconds"] = time.perf_counter() - t0
        model.save(model_path)
        info["cached"] = False
    info.update(
        n_cells=int(model.W_.shape[0]),
        n_genes=int(model.n_features_in_),
        n_iter=int(model.n_iter_),
        converged=bool(getattr(model, "converged_", False)),
        objective=float(model.objective_),
    )
    return info


def synthetic_path(scratch: Path, n: int) -> Path:
    return scratch / f"synthetic_{size_label(n)}.h5ad"


def drop_empty(path: Path) -> tuple[int, int]:
    """Remove the cells and genes without any nonzero count from a CSR ``.h5ad``, in place.

    ``make_synthetic`` can draw cells whose counts are all zero (about 0.05% here), and at 10k
    cells some genes that the real slice has a single count of stay at zero; the fit refuses
    both. Empty rows and columns own no stored entries, so ``data`` is untouched: ``indptr``
    and the shape change, ``indices`` are remapped (monotone, chunk by chunk) when genes are
    dropped, and ``obs``/``obsm``/``var``/``varm`` are subset. Returns (cells, genes) dropped.
    """
    import h5py
    import numpy as np

    try:
        from anndata.io import read_elem, write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem, write_elem

    step = 2**24
    with h5py.File(path, "r+") as f:
        X = f["X"]
        n, J = (int(v) for v in X.attrs["shape"])
        indptr = X["indptr"][:]
        nnz = int(indptr[-1])
        gene_nnz = np.zeros(J, dtype=np.int64)
        for lo in range(0, nnz, step):
            gene_nnz += np.bincount(X["indices"][lo : lo + step], minlength=J)
        keep_c, keep_g = np.diff(indptr) > 0, gene_nnz > 0
        n_drop, j_drop = int((~keep_c).sum()), int((~keep_g).sum())
        if n_drop:
            new_ptr = np.concatenate([[0], indptr[1:][keep_c]]).astype(indptr.dtype)
            del X["indptr"]
            X.create_dataset("indptr", data=new_ptr)
        if j_drop:
            remap = (np.cumsum(keep_g) - 1).astype(X["indices"].dtype)
            for lo in range(0, nnz, step):
                X["indices"][lo : lo + step] = remap[X["indices"][lo : lo + step]]
        X.attrs["shape"] = np.array([int(keep_c.sum()), int(keep_g.sum())], dtype=np.int64)
        for key, keep in (("obs", keep_c), ("obsm", keep_c), ("var", keep_g), ("varm", keep_g)):
            if key not in f or keep.all():
                continue
            elem = read_elem(f[key])
            if isinstance(elem, dict):
                elem = {k: np.asarray(v)[keep] for k, v in elem.items()}
            else:
                elem = elem.iloc[keep]
            del f[key]
            write_elem(f, key, elem)
    return n_drop, j_drop


def generate(scratch: Path, n: int, chunk_cells: int) -> dict:
    """``make_synthetic`` from the reference fit, streamed to an .h5ad (skipped if present);
    cells drawn without any count are then dropped (so a size is ``n`` minus a few)."""
    path = synthetic_path(scratch, n)
    rec = {"n_cells_requested": n, "path": str(path)}
    if path.exists():
        rec["generated"] = False
    else:
        import zinbgrad
        from zinbgrad.simulate import make_synthetic

        model = zinbgrad.ZINBWaVE.load(reference_paths(scratch)[1])
        log(f"generating {path.name} ({n} cells)")
        raw = path.with_name(path.stem + ".raw.h5ad")
        t0 = time.perf_counter()
        if not raw.exists():
            make_synthetic(model, n, path=raw, chunk_cells=chunk_cells, random_state=0)
        rec["seconds_make_synthetic"] = time.perf_counter() - t0
        rec["dropped_empty_cells"], rec["dropped_empty_genes"] = drop_empty(raw)
        os.replace(raw, path)
        rec["generated"] = True
        rec["seconds"] = time.perf_counter() - t0
    import h5py

    with h5py.File(path, "r") as f:
        rec["nnz"] = int(f["X/indptr"][-1])
        rec["shape"] = [int(v) for v in f["X"].attrs["shape"]]
    rec["bytes"] = path.stat().st_size
    return rec


# ----------------------------------------------------------------------------- child process
class _Timer:
    """Wall-clock totals of wrapped zinbgrad functions (a phase profile of one fit)."""

    def __init__(self) -> None:
        self.t_start = time.perf_counter()
        self.totals: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.epoch_stamps: list[float] = []
        self.solver_start: float | None = None
        self.sweeps: list[dict] = []

    def event(self, name: str, t: float) -> None:
        """Progress line for the parent (kept when the run is killed at its timeout)."""
        print(f"EVENT {name} {t - self.t_start:.3f}", flush=True)

    def wrap(self, owner, attr: str, name: str, on_exit=None, event: bool = False) -> None:
        fn = getattr(owner, attr, None)
        if fn is None:
            return

        def wrapped(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                t1 = time.perf_counter()
                self.totals[name] = self.totals.get(name, 0.0) + t1 - t0
                self.calls[name] = self.calls.get(name, 0) + 1
                if on_exit is not None:
                    on_exit(t1)
                if event:
                    self.event(name, t1)

        setattr(owner, attr, wrapped)


def child_main(args: argparse.Namespace) -> int:
    """One fit, in its own process; prints one JSON line (prefixed ``RESULT``)."""
    import resource

    t_proc = time.perf_counter()
    import numpy as np
    import torch

    import zinbgrad
    import zinbgrad.estimator as est
    from zinbgrad.optim import engine as eng
    from zinbgrad.optim import solve as solve_mod

    t_imported = time.perf_counter()
    timer = _Timer()
    timer.wrap(est, "open_counts", "open+validate", event=True)
    timer.wrap(solve_mod, "initialize", "initialize", event=True)

    def after_dispersion(t: float) -> None:
        timer.solver_start = t

    timer.wrap(eng.Engine, "optimize_dispersion", "optimize_dispersion", after_dispersion, True)
    timer.wrap(eng.Engine, "fit_stochastic", "stochastic_epochs")
    timer.wrap(eng.Engine, "loglik", "final_loglik", event=True)
    # nested, for the profile: the element-wise kernel, the Newton/contraction steps, reads
    timer.wrap(eng, "entry_derivatives", "kernel:entry_derivatives")
    timer.wrap(eng.Engine, "cell_newton", "cell_newton(incl. kernel)")
    timer.wrap(eng.Engine, "accumulate", "accumulate(incl. kernel)")
    timer.wrap(eng.Engine, "_eval_ll", "eval_ll_pass")
    from zinbgrad.data import source as src_mod

    timer.wrap(src_mod.BackedCounts, "block", "read_block(prefetch thread)")
    timer.wrap(src_mod.InMemoryCounts, "block", "memory_block")
    from zinbgrad.optim import init as init_mod

    for name in ("_soft_impute", "init_local_mean", "init_local_zi", "_logistic_newton"):
        timer.wrap(init_mod, name, f"init:{name}")
    rec_fn = eng.Engine._record

    def record(self, history, rec):
        timer.epoch_stamps.append(time.perf_counter())
        timer.event(f"epoch{len(history) + 1}:{rec.get('phase')}", timer.epoch_stamps[-1])
        return rec_fn(self, history, rec)

    eng.Engine._record = record

    # per sweep: its seconds, whether its gene step was checked lagged or in a pass of its own,
    # whether it moved the dispersion, and the rejection rate of the gene steps
    sweep_fn, due_fn = eng.Engine._sweep, eng.Engine._zeta_due

    def zeta_due(self):
        due = due_fn(self)
        self._bench_due = due
        return due

    def sweep(self, *a, **kw):
        t0, passes = time.perf_counter(), timer.calls.get("eval_ll_pass", 0)
        lagged = self.proposal is not None
        out = sweep_fn(self, *a, **kw)
        timer.sweeps.append(
            {
                "seconds": round(time.perf_counter() - t0, 3),
                "lagged": lagged,
                "dispersion": bool(getattr(self, "_bench_due", False)),
                "check_passes": timer.calls.get("eval_ll_pass", 0) - passes,
                "rejected": round(float(self.gene_rejected), 5),
                "zeta_gain": float(getattr(self, "zeta_gain", float("nan"))),
                "n": self.n,
            }
        )
        return out

    eng.Engine._sweep, eng.Engine._zeta_due = sweep, zeta_due

    t0 = time.perf_counter()
    if args.mode == "memory":
        import anndata as ad

        data = ad.read_h5ad(args.path)
    else:
        data = args.path
    t_loaded = time.perf_counter()
    model = zinbgrad.ZINBWaVE(
        n_components=args.k,
        solver=args.solver,
        sketch_size=args.sketch_size,
        batch_size=args.batch_size,
        max_epochs=args.max_epochs,
        tol=args.tol,
        dtype=args.dtype,
        device="cpu",
        **({"block_entries": args.block_entries} if args.block_entries else {}),
    )
    model.fit(data)
    t_end = time.perf_counter()
    n, J = model.W_.shape[0], int(model.n_features_in_)
    hist = model.history_
    start = timer.solver_start if timer.solver_start is not None else t_loaded
    stamps = [start] + timer.epoch_stamps
    per_epoch = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=False)]
    phases = [h["phase"] for h in hist]
    by_phase: dict[str, list[float]] = {}
    for ph, s in zip(phases, per_epoch, strict=False):
        by_phase.setdefault(ph, []).append(s)
    # epochs over all cells (a sketch's epochs cover a subsample; see by_phase for them)
    own = [s for ph, s in zip(phases, per_epoch, strict=False) if ph != "sketch"]
    mean_epoch = float(np.mean(own)) if own else float("nan")
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out = {
        "n_cells": n,
        "n_genes": J,
        "mode": args.mode,
        "solver": args.solver,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "k": args.k,
        "max_epochs": args.max_epochs,
        "tol": args.tol,
        "torch_threads": torch.get_num_threads(),
        "epochs": int(model.n_iter_),
        "converged": bool(model.converged_),
        "epoch_seconds": per_epoch,
        "epoch_phases": phases,
        "seconds_per_epoch": mean_epoch,
        "seconds_per_epoch_by_phase": {k: float(np.mean(v)) for k, v in by_phase.items()},
        "us_per_cell_epoch": mean_epoch / n * 1e6,
        "entries_per_second": n * J / mean_epoch,
        "entries_per_second_by_phase": {k: n * J / float(np.mean(v)) for k, v in by_phase.items()},
        "import_seconds": t_imported - t_proc,
        "load_seconds": t_loaded - t0,
        "fit_seconds": t_end - t_loaded,
        "end_to_end_seconds": t_end - t0,
        "phase_seconds": timer.totals,
        "phase_calls": timer.calls,
        "sweeps": timer.sweeps,
        "objective": float(model.objective_),
        "loglik_history": [float(h["loglik"]) for h in hist],
        "objective_history": [float(h["objective"]) for h in hist],
        "self_maxrss_mb": ru.ru_maxrss / 1024.0,
        "user_seconds": ru.ru_utime,
        "system_seconds": ru.ru_stime,
    }
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def _vm_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def run_child(path: Path, mode: str, args: argparse.Namespace, timeout: float | None) -> dict:
    """Run one fit in a fresh subprocess; peak RSS from that child's own rusage (wait4)."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_child",
        "--path",
        str(path),
        "--mode",
        mode,
        "--solver",
        args.solver,
        "--dtype",
        args.dtype,
        "--max-epochs",
        str(args.max_epochs),
        "--tol",
        str(args.tol),
        "-k",
        str(args.k),
    ]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if getattr(args, "sketch_size", None):
        cmd += ["--sketch-size", str(args.sketch_size)]
    if getattr(args, "block_entries", None):
        cmd += ["--block-entries", str(args.block_entries)]
    load_before = loadavg()
    t0 = time.perf_counter()
    log_out, log_err = path.with_suffix(f".{mode}.stdout"), path.with_suffix(f".{mode}.stderr")
    with open(log_out, "w") as fo, open(log_err, "w") as fe:  # files: no pipe can fill up
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True)
    deadline = None if timeout is None else t0 + timeout
    status, ru, timed_out = None, None, False
    rss_trace: list[list[float]] = []  # [seconds, VmRSS MB], about once a second
    next_sample = 0.0
    while True:  # poll with wait4 (per-child rusage), killing the child at the deadline
        pid, st, r = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            status, ru = st, r
            break
        if deadline is not None and time.perf_counter() > deadline:
            proc.kill()
            timed_out = True
            _, status, ru = os.wait4(proc.pid, 0)
            break
        now = time.perf_counter() - t0
        if now >= next_sample:
            rss = _vm_rss_mb(proc.pid)
            if rss is not None:
                rss_trace.append([round(now, 1), round(rss, 1)])
            next_sample = now + 1.0
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    stdout, stderr = log_out.read_text(), log_err.read_text()
    rec: dict = {}
    events = []
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            rec = json.loads(line[len("RESULT ") :])
        elif line.startswith("EVENT "):
            _, name, t = line.split()
            events.append([name, float(t)])
    rec["events"] = events  # seconds since the child's start (imports included)
    rec.update(
        mode=mode,
        path=str(path),
        command=" ".join(cmd),
        returncode=proc.returncode,
        timed_out=timed_out,
        process_wall_seconds=wall,
        peak_rss_mb=ru.ru_maxrss / 1024.0,  # Linux: KiB
        rss_trace=rss_trace,
        load_before=load_before,
        load_after=loadavg(),
    )
    if proc.returncode != 0:
        rec["stderr_tail"] = stderr[-4000:]
    return rec


# ----------------------------------------------------------------------------- report
def markdown_table(runs: list[dict], roofline: dict | None) -> str:
    head = (
        "| cells | genes | mode | epochs (phases) | s/epoch | us/cell/epoch | end-to-end s "
        "| peak RSS MB | entries/s | roofline entries/s |\n"
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"
    )
    roof = roofline.get("log_zinb_fwd_bwd_entries_per_second") if roofline else None
    rows = [head]
    for r in runs:
        if "epochs" not in r:
            last = r.get("events") or [["start", 0.0]]
            rows.append(
                f"| {Path(r['path']).stem} | | {r['mode']} | not finished (rc={r['returncode']}, "
                f"timed out={r.get('timed_out')}, last phase {last[-1][0]} at {last[-1][1]:.0f} s) "
                f"| | | | {r['peak_rss_mb']:.0f} | | |"
            )
            continue
        ph = r.get("epoch_phases", [])
        phs = " + ".join(f"{ph.count(k)} {k}" for k in dict.fromkeys(ph))
        rows.append(
            f"| {r['n_cells']:,} | {r['n_genes']} | {r['mode']} | {r['epochs']} ({phs}) "
            f"| {r['seconds_per_epoch']:.2f} | {r['us_per_cell_epoch']:.1f} "
            f"| {r['end_to_end_seconds']:.1f} | {r['peak_rss_mb']:.0f} "
            f"| {r['entries_per_second']:.3g} | {'' if roof is None else f'{roof:.3g}'} |"
        )
    return "\n".join(rows)


def _components(r: dict) -> dict[str, float]:
    """Wall seconds of one run split into the parts that scale differently."""
    ph = r["phase_seconds"]
    by = r.get("seconds_per_epoch_by_phase", {})
    return {
        "load+open+validate": r["load_seconds"] + ph.get("open+validate", 0.0),
        "initialize": ph.get("initialize", 0.0),
        "optimize_dispersion": ph.get("optimize_dispersion", 0.0),
        "stochastic_epoch": by.get("stochastic", float("nan")),
        "full_epoch": by.get("full", float("nan")),
        "final_loglik": ph.get("final_loglik", 0.0),
    }


def extrapolate(runs: list[dict], n_target: int, n_sto: int, n_full: int) -> dict:
    """Per component ``t = a + b n`` through the measured sizes (least squares), at n_target.

    Returns the components and the end-to-end estimate for ``n_sto`` stochastic and
    ``n_full`` full epochs. Labelled an extrapolation wherever it is reported.
    """
    import numpy as np

    ok = sorted((r for r in runs if "phase_seconds" in r), key=lambda r: r["n_cells"])
    ns = np.array([r["n_cells"] for r in ok], dtype=float)
    comps = [_components(r) for r in ok]
    out: dict = {"n_cells": n_target, "from_sizes": ns.astype(int).tolist(), "components": {}}
    for key in comps[0]:
        t = np.array([c[key] for c in comps])
        if len(ns) >= 2:
            b, a = np.polyfit(ns, t, 1)
        else:
            a, b = 0.0, t[0] / ns[0]
        out["components"][key] = {
            "intercept_s": float(a),
            "per_cell_us": float(b * 1e6),
            "at_target_s": float(a + b * n_target),
        }
    c = {k: v["at_target_s"] for k, v in out["components"].items()}
    out["epochs"] = {"stochastic": n_sto, "full": n_full}
    out["end_to_end_s"] = (
        c["load+open+validate"]
        + c["initialize"]
        + c["optimize_dispersion"]
        + n_sto * c["stochastic_epoch"]
        + n_full * c["full_epoch"]
        + c["final_loglik"]
    )
    return out


def report(
    paths: list[str], target: int, n_sto: int, n_full: int, roofline: str | None = None
) -> None:
    """Markdown tables (measured runs, phase breakdown, extrapolation) from result JSONs."""
    runs, roof = [], None
    if roofline:
        roof = json.loads(Path(roofline).read_text())
    for p in paths:
        res = json.loads(Path(p).read_text())
        runs += res.get("runs", [])
        roof = roof or res.get("roofline")
    print(markdown_table(runs, roof))
    print()
    print("| cells | mode | load+open s | init s | dispersion s | sto epoch s | full epoch s |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in runs:
        if "phase_seconds" not in r:
            continue
        c = _components(r)
        print(
            f"| {r['n_cells']:,} | {r['mode']} | {c['load+open+validate']:.1f} "
            f"| {c['initialize']:.1f} | {c['optimize_dispersion']:.1f} "
            f"| {c['stochastic_epoch']:.2f} | {c['full_epoch']:.2f} |"
        )
    stream = [r for r in runs if r.get("mode") == "stream" and "phase_seconds" in r]
    if stream:
        ex = extrapolate(stream, target, n_sto, n_full)
        print()
        print(f"EXTRAPOLATED to {target:,} cells (stream), from {ex['from_sizes']}:")
        for k, v in ex["components"].items():
            print(
                f"  {k}: {v['intercept_s']:.1f} s + {v['per_cell_us']:.1f} us/cell "
                f"-> {v['at_target_s']:.0f} s"
            )
        print(f"  end to end ({n_sto} sto + {n_full} full epochs): {ex['end_to_end_s']:.0f} s")


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10k,100k,1M,1.3M", help="comma-separated cell counts")
    p.add_argument("--modes", default="stream,memory", help="stream and/or memory")
    p.add_argument("--memory-max", default="100k", help="largest size also fitted in memory")
    p.add_argument(
        "--solver", default="stochastic", choices=["auto", "full", "sketch", "stochastic"]
    )
    p.add_argument("--sketch-size", type=int, default=None, help="cells in the sketch")
    p.add_argument(
        "--block-entries", type=int, default=None, help="entries per block (estimator default)"
    )
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "float64"])
    p.add_argument("--max-epochs", type=int, default=5)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--scratch", default="/tmp/zinbgrad_scaling")
    p.add_argument("--chunk-cells", type=int, default=50_000)
    p.add_argument("--ref-max-epochs", type=int, default=30, help="epochs of the reference fit")
    p.add_argument("--ref-dtype", default="float64", choices=["auto", "float32", "float64"])
    p.add_argument("--timeout", type=float, default=None, help="seconds per fit (then killed)")
    p.add_argument("--generate-only", action="store_true")
    p.add_argument("--roofline", default=None, help="roofline JSON (benchmarks/roofline.py)")
    p.add_argument("--out", default="benchmarks/results/scaling.json", help="results JSON")
    return p


def build_child_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scaling.py _child")
    p.add_argument("--path", required=True)
    p.add_argument("--mode", choices=["stream", "memory"], required=True)
    p.add_argument("--solver", default="stochastic")
    p.add_argument("--sketch-size", type=int, default=None)
    p.add_argument("--block-entries", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-epochs", type=int, default=5)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("-k", type=int, default=10)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        return child_main(build_child_parser().parse_args(argv[1:]))
    if argv and argv[0] == "report":
        rp = argparse.ArgumentParser(prog="scaling.py report")
        rp.add_argument("json", nargs="+", help="result JSONs of this script")
        rp.add_argument("--target", default="1.3M", help="size to extrapolate to")
        rp.add_argument("--stochastic-epochs", type=int, default=3)
        rp.add_argument("--full-epochs", type=int, default=1)
        rp.add_argument("--roofline", default=None, help="roofline JSON (overrides the runs')")
        ra = rp.parse_args(argv[1:])
        report(ra.json, parse_size(ra.target), ra.stochastic_epochs, ra.full_epochs, ra.roofline)
        return 0
    args = build_parser().parse_args(argv)
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    mem_max = parse_size(args.memory_max)
    out = Path(args.out)
    results: dict = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
        },
        "argv": [sys.executable, __file__, *argv],
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_at_start": loadavg(),
    }
    results["reference"] = prepare_reference(scratch, args.ref_max_epochs, args.ref_dtype)
    log(f"reference: {results['reference']}")
    results["datasets"] = []
    for n in sizes:
        results["datasets"].append(generate(scratch, n, args.chunk_cells))
        log(f"dataset: {results['datasets'][-1]}")
    if args.generate_only:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        return 0
    roof = None
    if args.roofline and Path(args.roofline).exists():
        roof = json.loads(Path(args.roofline).read_text())
        results["roofline"] = roof
    results["runs"] = []
    for n in sizes:
        for mode in modes:
            if mode == "memory" and n > mem_max:
                continue
            log(f"fit {size_label(n)} {mode} (load {loadavg()})")
            rec = run_child(synthetic_path(scratch, n), mode, args, args.timeout)
            results["runs"].append(rec)
            keys = ("epochs", "seconds_per_epoch", "end_to_end_seconds", "peak_rss_mb")
            log(f"  -> rc={rec['returncode']} " + ", ".join(f"{k}={rec.get(k)}" for k in keys))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))
    print(markdown_table(results["runs"], roof))
    return 0


if __name__ == "__main__":
    sys.exit(main())
