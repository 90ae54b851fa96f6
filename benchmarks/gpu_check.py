"""One prepared run of the CUDA checks and GPU timings of issue 5, for a lent GPU machine.

A session with a device (the ``device`` tool; ``status`` says whether this task has one) has
15 minutes of device time, machine start included, so everything runs in one command that
ends well inside 10 minutes and writes its results as it goes: a step that fails or is cut
off leaves the others' results. Here, once::

    bash benchmarks/device_wheels.sh       # anndata and its needs for the device's Python 3.12
    mkdir -p .device && cp /tmp/zinbgrad_scaling/brain10k_top_var_model.npz .device/
    # (the reference fit of benchmarks/scaling.py; `python benchmarks/scaling.py
    #  --generate-only --sizes 10k` makes it, ~1 min)

then the device call (``run``): ``command="bash benchmarks/gpu_check.sh"``,
``carry=[".whl", ".device"]``, ``timeout_s=590``. Results come back as
``$OUT/gpu_check.json`` and ``$OUT/gpu_check.log``.

Steps (each recorded under its name in the JSON, with ``seconds`` and an ``error`` if it
failed):

1. ``env``: torch, CUDA, the GPU, whether the fused (triton) kernels are available.
2. ``kernels``: :func:`~zinbgrad.model.likelihood.entry_derivatives` on the GPU, fused and
   eager, float32 and float64, against the eager float64 CPU values of the same block
   (order 2 and the dispersion derivatives; the largest error relative to each term's scale).
3. ``fit_parity``: the bundled pbmc_small fitted on the CPU and on the GPU (float64, same seed):
   objectives and the principal angles between the latent spaces; the same fit streamed from
   the ``.h5ad`` path on the GPU (pinned host memory, non-blocking copies).
4. ``syncs``: host-device synchronisations of a small GPU fit, counted per sweep with the
   lines of zinbgrad that cause them (``torch.cuda.set_sync_debug_mode``).
5. ``collectives``: zinbgrad's launcher (as ``zinbgrad fit --nproc``) starts one NCCL rank per
   GPU, and each drives zinbgrad's collective wrapper (all-reduce, broadcast, row gather,
   scalar sum) on CUDA tensors of its own GPU (on one GPU, one rank: NCCL needs a GPU per
   rank). On the CPU: two gloo ranks. It runs in a child process stopped after 150 s, so that
   a process group that hangs cannot take the timings' budget.
6. ``timing``: synthetic data drawn on the GPU from the reference fit (the model of
   :func:`zinbgrad.simulate.make_synthetic`, its counts sampled by torch), a warm-up fit
   (compiles the kernels), then the sizes of ``--sizes`` (default 100k and 1.3M cells x 715
   genes, K=10, float32, tol=1e-4) in memory, the 100k one at each of ``--block-entries``:
   end-to-end seconds, seconds per phase and per sweep, sweeps, objective per cell, cells/s,
   peak GPU memory. Each size of ``--stream-sizes`` is then also written to an ``.h5ad`` and
   fitted streamed from it (pinned host buffers, non-blocking copies). Fits that would not
   fit the remaining ``--budget`` are skipped.

``--device cpu`` runs the same steps on the CPU (small sizes) to test this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` and ``zinbgrad`` importable
    _repo = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(_repo), str(_repo / "src")]

import numpy as np  # noqa: E402

from benchmarks.datasets import filter_empty  # noqa: E402
from benchmarks.scaling import parse_size  # noqa: E402

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


class Results:
    """The JSON written after every step (atomically), so that a cut-off run keeps its results."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict = {"argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC")}

    def step(self, name: str, fn, *args, **kw):
        log(f"--- {name}")
        t = time.perf_counter()
        try:
            out = fn(*args, **kw)
            rec = out if isinstance(out, dict) else {"value": out}
        except Exception as exc:  # record it, go on with the next step
            traceback.print_exc()
            rec = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            out = None
        rec["seconds"] = round(time.perf_counter() - t, 3)
        self.data[name] = rec
        self.save()
        log(f"{name}: {json.dumps(_brief(rec))[:2000]}")
        return out

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


def _brief(rec):
    """``rec`` without the long parts (tracebacks, per-sweep lists), for the log."""
    if isinstance(rec, dict):
        return {k: _brief(v) for k, v in rec.items() if k not in ("traceback", "sweeps")}
    if isinstance(rec, list):
        return [_brief(v) for v in rec]
    return rec


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- steps
def step_env(device: str) -> dict:
    import torch

    from zinbgrad.model.likelihood import fusion_available

    rec = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "fusion_available": fusion_available(device),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rec.update(
            gpu=p.name,
            gpu_memory_gb=round(p.total_memory / 2**30, 1),
            gpus=torch.cuda.device_count(),
        )
        try:
            import triton

            rec["triton"] = triton.__version__
        except ImportError:
            rec["triton"] = None
    return rec


def _block(n: int, J: int, seed: int):
    """A random block with ~10% nonzeros (counts up to ~50) and plausible predictors."""
    import torch

    from zinbgrad.model.likelihood import SparseCounts

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, J, generator=g, dtype=torch.float64) - 0.5
    b = torch.randn(n, J, generator=g, dtype=torch.float64) - 1.5
    zeta = torch.randn(J, generator=g, dtype=torch.float64)
    mask = torch.rand(n, J, generator=g) < 0.1
    y = torch.where(mask, torch.randint(1, 50, (n, J), generator=g), 0).to(torch.float64)
    rows, cols = y.nonzero(as_tuple=True)
    counts = SparseCounts(n, J, rows, cols, y[rows, cols], torch.lgamma(y[rows, cols] + 1))
    return a, b, zeta, counts


def step_kernels(device: str) -> dict:
    import torch

    from zinbgrad.model.likelihood import entry_derivatives

    a, b, zeta, counts = _block(1500, 700, 0)
    ref = entry_derivatives(a, b, zeta, counts, order=2, dispersion=True, fused=False)
    out: dict = {"block": [1500, 700], "nonzeros": int(counts.rows.numel())}
    for dt in (torch.float64, torch.float32):
        for fused in (False, True):
            args = [t.to(device, dt) for t in (a, b, zeta)]
            cd = counts.to(device)
            cd.values, cd.lgamma_y1 = cd.values.to(dt), cd.lgamma_y1.to(dt)
            d = entry_derivatives(*args, cd, order=2, dispersion=True, fused=fused)
            sync(device)
            t = time.perf_counter()
            for _ in range(5):
                entry_derivatives(*args, cd, order=2, dispersion=True, fused=fused)
            sync(device)
            errs = {}
            for k, v in vars(ref).items():
                if v is None:
                    continue
                got = getattr(d, k).double().cpu()
                errs[k] = float((got - v).abs().max() / v.abs().max().clamp(min=1e-300))
            key = f"{str(dt).split('.')[-1]}_{'fused' if fused else 'eager'}"
            out[key] = {"max_rel_error": errs, "ms_per_call": (time.perf_counter() - t) / 5 * 1e3}
    worst64 = max(max(out[k]["max_rel_error"].values()) for k in ("float64_eager", "float64_fused"))
    worst32 = max(max(out[k]["max_rel_error"].values()) for k in ("float32_eager", "float32_fused"))
    out["ok"] = bool(worst64 < 1e-10 and worst32 < 1e-4)
    return out


def _principal_cos(A: np.ndarray, B: np.ndarray) -> list[float]:
    qa, _ = np.linalg.qr(A - A.mean(0))
    qb, _ = np.linalg.qr(B - B.mean(0))
    return [float(s) for s in np.linalg.svd(qa.T @ qb, compute_uv=False)]


def _parity(cpu, dev) -> dict:
    """How a fit on the CPU and the same fit on the device compare."""
    return {
        "objective_cpu": cpu.objective_,
        "objective_device": dev.objective_,
        "rel_diff": abs(cpu.objective_ - dev.objective_) / abs(cpu.objective_),
        "epochs": [cpu.n_iter_, dev.n_iter_],
        "latent_cosines": _principal_cos(cpu.W_, dev.W_),
    }


def step_fit_parity(device: str) -> dict:
    import anndata as ad

    from zinbgrad import ZINBWaVE
    from zinbgrad.datasets import pbmc_small

    adata = pbmc_small()
    kw = {"n_components": 2, "dtype": "float64", "random_state": 0, "verbose": False}
    cpu = ZINBWaVE(device="cpu", **kw).fit(adata)
    dev = ZINBWaVE(device=device, **kw).fit(adata)
    rec = _parity(cpu, dev)
    # where the two paths part: the relative difference of the objective after each sweep
    rec["history_rel_diff"] = [
        abs(a["objective"] - b["objective"]) / abs(a["objective"])
        for a, b in zip(cpu.history_, dev.history_, strict=False)
    ]
    # both run on to a tight tolerance: the same optimum, whatever the paths
    tight = {**kw, "tol": 1e-8, "max_epochs": 1000}
    rec["tight"] = _parity(
        ZINBWaVE(device="cpu", **tight).fit(adata), ZINBWaVE(device=device, **tight).fit(adata)
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pbmc_small.h5ad"
        ad.AnnData(adata.X, obs=adata.obs[[]], var=adata.var[[]]).write_h5ad(path)
        streamed = ZINBWaVE(device=device, **kw).fit(str(path))
    rec["objective_streamed"] = streamed.objective_
    rec["streamed_rel_diff"] = abs(streamed.objective_ - dev.objective_) / abs(dev.objective_)
    rec["ok"] = bool(rec["rel_diff"] < 1e-6 and rec["streamed_rel_diff"] < 1e-6)
    return rec


def step_syncs(device: str) -> dict:
    """Host-device synchronisations in a GPU fit (``torch.cuda.set_sync_debug_mode("warn")``):
    how many per sweep, and from which lines of zinbgrad, after a warm-up fit that compiles."""
    import collections
    import traceback as tb
    import warnings

    import torch

    from zinbgrad import ZINBWaVE
    from zinbgrad.datasets import pbmc_small

    if torch.device(device).type != "cuda":
        return {"skipped": "not a CUDA device"}
    adata = pbmc_small()
    kw = {"n_components": 2, "dtype": "float32", "device": device, "verbose": False}
    ZINBWaVE(**kw, max_epochs=2).fit(adata)  # compile first
    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        for fr in reversed(tb.extract_stack()[:-1]):
            if "zinbgrad" in fr.filename and "gpu_check" not in fr.filename:
                sites[f"{Path(fr.filename).name}:{fr.lineno} {fr.line}"] += 1
                return
        sites["(outside zinbgrad)"] += 1

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():  # restores showwarning on exit
            warnings.simplefilter("always")
            warnings.showwarning = record
            m = ZINBWaVE(**kw, max_epochs=10, tol=0.0).fit(adata)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    total = sum(sites.values())
    return {
        "sweeps": m.n_iter_,
        "syncs": total,
        "syncs_per_sweep": total / max(m.n_iter_, 1),
        "top_sites": sites.most_common(25),
    }


def _collectives_body(out: str) -> None:
    """Run in every rank of :func:`zinbgrad.optim.distributed.launch`."""
    import torch
    import torch.distributed as dist

    from zinbgrad.optim.distributed import TorchComm, local_gpu

    rank, world = dist.get_rank(), dist.get_world_size()
    comm = TorchComm()
    dev = torch.device("cuda", local_gpu()) if dist.get_backend() == "nccl" else torch.device("cpu")
    x = torch.full((5, 3), float(rank + 1), device=dev)
    comm.all_reduce_(x)
    y = torch.arange(4.0, device=dev) * (rank + 1)
    comm.broadcast_(y)
    rows = torch.full((2 + rank, 2), float(rank), device=dev)
    gathered = comm.all_gather_rows(rows, sum(2 + r for r in range(world)))
    s = comm.sum(1.5)
    if rank == 0:
        rec = {
            "world_size": world,
            "backend": dist.get_backend(),
            "device_of_rank0": str(dev),
            "all_reduce_ok": bool((x == sum(r + 1 for r in range(world))).all()),
            "broadcast_ok": bool((y.cpu() == torch.arange(4.0)).all()),
            "gather_shape": list(gathered.shape),
            "sum_ok": s == 1.5 * world,
        }
        Path(out).write_text(json.dumps(rec))


def step_collectives_guarded(device: str, timeout: float = 150.0) -> dict:
    """:func:`step_collectives` in a child process stopped after ``timeout`` seconds: a
    process group that hangs (an NCCL set-up, say) must not take the timings' budget with it."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--device", device]
        cmd += ["--steps", "collectives", "--out", tmp]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, sys.path)))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"the process group did not finish in {timeout:.0f} s") from exc
        try:
            rec = json.loads((Path(tmp) / "gpu_check.json").read_text())["collectives"]
        except (OSError, KeyError, ValueError) as exc:
            raise RuntimeError(
                f"the child wrote no result (exit {proc.returncode}): {proc.stderr[-1500:]}"
            ) from exc
    if "error" in rec:
        raise RuntimeError(rec["error"])
    return rec


def step_collectives(device: str) -> dict:
    """zinbgrad's own launcher (as ``zinbgrad fit --nproc``): NCCL with one rank per GPU on
    CUDA, gloo with two ranks on the CPU."""
    import torch

    from zinbgrad.optim.distributed import launch

    cuda = torch.device(device).type == "cuda"
    world = torch.cuda.device_count() if cuda else 2
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "collectives.json")
        launch(_collectives_body, world, out, backend="nccl" if cuda else "gloo")
        rec = json.loads(Path(out).read_text())
    rec["ok"] = all(rec[k] for k in ("all_reduce_ok", "broadcast_ok", "sum_ok"))
    return rec


def synthetic(model, n: int, device: str, seed: int = 0):
    """``make_synthetic(model, n)`` in memory, with its ZINB counts drawn by torch on
    ``device`` (the numpy sampler is the slow part at a million cells)."""
    import torch

    import zinbgrad.simulate as sim

    gen = torch.Generator(device=device).manual_seed(seed)
    torch.manual_seed(seed)

    def sample_zinb(rng, a, b, zeta):
        A = torch.as_tensor(a, device=device)
        Z = torch.as_tensor(np.asarray(zeta, dtype=np.float64), device=device).expand_as(A)
        mu = A.exp()
        th = Z.exp().contiguous()
        # a Gamma(theta, mu/theta) mean for the Poisson draw (the NB as a mixture), skipped
        # where theta dwarfs mu as in zinbgrad.simulate.sample_zinb
        lam = torch.where(
            A - Z > sim._GAMMA_SKIP_LOG_RATIO, torch._standard_gamma(th) * (mu / th), mu
        )
        nb = torch.poisson(lam.clamp(max=1e12), generator=gen).to(torch.int64)
        if b is None:
            drop = torch.zeros_like(nb, dtype=torch.bool)
        else:
            drop = torch.rand(
                a.shape, device=device, generator=gen, dtype=torch.float64
            ) < torch.sigmoid(torch.as_tensor(b, device=device))
        return nb.cpu().numpy(), drop.cpu().numpy()

    orig = sim.sample_zinb
    sim.sample_zinb = sample_zinb
    try:
        adata = sim.make_synthetic(model, n, random_state=seed)
    finally:
        sim.sample_zinb = orig
    return filter_empty(adata)  # cells drawn without a count, genes that stayed at zero


def fit_timed(
    adata, device: str, block_entries, max_epochs: int, verbose: bool = True, path=None
) -> dict:
    """Time one fit of ``adata`` in memory, or streamed from ``path`` (its copy on disk)."""
    import torch

    from zinbgrad import ZINBWaVE

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    m = ZINBWaVE(
        n_components=10,
        dtype="float32",
        device=device,
        tol=1e-4,
        max_epochs=max_epochs,
        block_entries=block_entries,
        random_state=0,
        verbose=verbose,  # the progress bar goes to the log: a fit cut off still shows where
    )
    t = time.perf_counter()
    m.fit(adata if path is None else str(path))
    sync(device)
    T = time.perf_counter() - t
    n, J = adata.shape
    h = m.history_
    phases: dict = {}
    prev = 0.0
    sweeps = []
    for r in h:
        dt = r["seconds"] - prev
        prev = r["seconds"]
        phases.setdefault(r["phase"], []).append(dt)
        sweeps.append({"phase": r["phase"], "seconds": round(dt, 4), "objective": r["objective"]})
    rec = {
        "n_cells": n,
        "n_genes": J,
        "input": "memory" if path is None else "streamed from .h5ad",
        "block_entries": block_entries,
        "block_entries_used": m._block_entries(torch.device(device), torch.float32),
        "seconds": T,
        "epochs": m.n_iter_,
        "converged": m.converged_,
        "objective": m.objective_,
        "objective_per_cell": m.objective_ / n,
        "cells_per_second": n / T,
        "phase_seconds": {k: round(sum(v), 3) for k, v in phases.items()},
        "phase_sweeps": {k: len(v) for k, v in phases.items()},
        "seconds_per_full_sweep": float(np.mean(phases["full"])) if phases.get("full") else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "sweeps": sweeps,
    }
    if torch.device(device).type == "cuda":
        rec["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return rec


def parse_entries(s: str) -> int | None:
    """``"2**21"``, ``"2097152"`` or ``"default"`` (None: the estimator's default)."""
    s = s.strip()
    if s == "default":
        return None
    if "**" in s:
        base, exp = s.split("**")
        return int(base) ** int(exp)
    return int(s)


def step_timing(args, res: Results) -> dict:
    from zinbgrad import ZINBWaVE

    model = ZINBWaVE.load(args.model)
    out: dict = {"runs": []}
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    stream_sizes = {parse_size(s) for s in args.stream_sizes.split(",") if s.strip()}
    blocks = [parse_entries(b) for b in args.block_entries.split(",")]
    log(f"warm-up: {args.warmup_cells} cells (compiles the kernels)")
    t = time.perf_counter()
    warm = synthetic(model, args.warmup_cells, args.device)
    out["warmup_generate_seconds"] = time.perf_counter() - t
    out["warmup_fit"] = _brief(fit_timed(warm, args.device, blocks[0], 3, verbose=False))
    res.data["timing"] = out
    res.save()
    # the last size's fit, to keep within budget: its sketch (a fixed cost) and the rest,
    # linear in the cells, and its data generation (linear)
    last: tuple[int, float, float, float] | None = None
    for i, n in enumerate(sizes):
        left = args.budget - (time.perf_counter() - T0)
        if last is not None:
            n0, fixed, rest, gen = last
            expect = fixed + (rest + gen) * n / n0
            if expect > left:
                out["runs"].append(
                    {"n_cells": n, "skipped": f"expected ~{expect:.0f} s > {left:.0f} s left"}
                )
                continue
        t = time.perf_counter()
        adata = synthetic(model, n, args.device, seed=1 + i)
        gen_s = time.perf_counter() - t
        log(f"{n} cells generated in {gen_s:.1f} s ({adata.shape}, nnz {adata.X.nnz})")
        for be in blocks if i == 0 else [out.get("best_block_entries", blocks[0])]:
            rec = fit_timed(adata, args.device, be, args.max_epochs)
            rec["generate_seconds"] = gen_s
            _add_run(
                out,
                res,
                rec,
                f"  fit block_entries={be}: {rec['seconds']:.1f} s, {rec['epochs']} sweeps, "
                f"{rec['objective_per_cell']:.4f}/cell, phases {rec['phase_seconds']}",
            )
        done = [r for r in out["runs"] if r.get("n_cells") == adata.shape[0] and "seconds" in r]
        best = min(done, key=lambda r: r["seconds"])
        out["best_block_entries"] = best["block_entries"]
        fixed = best["phase_seconds"].get("sketch", 0.0)
        last = (adata.shape[0], fixed, best["seconds"] - fixed, gen_s)
        if sizes[i] in stream_sizes:
            _streamed(adata, args, out, res, best)
        del adata
    return out


def _streamed(adata, args, out: dict, res: Results, best: dict) -> None:
    """The fit of ``adata`` streamed from its copy on disk (pinned host buffers, non-blocking
    copies), if the budget allows about three times its in-memory fit."""
    left = args.budget - (time.perf_counter() - T0)
    expect = 3 * best["seconds"] + 10
    if expect > left:
        out["runs"].append(
            {
                "n_cells": adata.shape[0],
                "input": "streamed from .h5ad",
                "skipped": f"expected ~{expect:.0f} s > {left:.0f} s left",
            }
        )
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stream.h5ad"
        t = time.perf_counter()
        adata.write_h5ad(path)
        write_s = time.perf_counter() - t
        rec = fit_timed(adata, args.device, best["block_entries"], args.max_epochs, path=path)
    rec["write_seconds"] = write_s
    rec["objective_rel_diff_to_memory"] = abs(rec["objective"] - best["objective"]) / abs(
        best["objective"]
    )
    _add_run(
        out,
        res,
        rec,
        f"  streamed fit: {rec['seconds']:.1f} s, {rec['epochs']} sweeps, "
        f"{rec['objective_per_cell']:.4f}/cell (in memory {best['objective_per_cell']:.4f})",
    )


def _add_run(out: dict, res: Results, rec: dict, message: str) -> None:
    """Record one timed fit in the timing results, log it and save the JSON."""
    out["runs"].append(rec)
    log(message)
    res.data["timing"] = out
    res.save()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default=".device/brain10k_top_var_model.npz")
    p.add_argument("--sizes", default="100k,1.3M")
    p.add_argument("--warmup-cells", type=int, default=20_000)
    p.add_argument("--block-entries", default="2**21,2**24", help="tried at the first size")
    p.add_argument(
        "--stream-sizes", default="100k,1.3M", help="sizes also fitted streamed from disk"
    )
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run")
    p.add_argument("--steps", default="env,kernels,fit_parity,syncs,collectives,timing")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    args = p.parse_args(argv)
    res = Results(Path(args.out) / "gpu_check.json")
    steps = args.steps.split(",")
    for name in ("env", "kernels", "fit_parity", "syncs", "collectives"):
        if name in steps:
            fn = globals()[f"step_{name}"]
            if name == "collectives" and len(steps) > 1:  # alone: the guarded child itself
                fn = step_collectives_guarded
            res.step(name, fn, args.device)
    if "timing" in steps:
        res.step("timing", step_timing, args, res)
    log(f"done in {time.perf_counter() - T0:.1f} s -> {res.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
