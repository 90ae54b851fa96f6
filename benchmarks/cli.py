"""Command line of the benchmark suite (``benchmarks/run.py``)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["git_commit", "machine_info", "main", "package_versions", "run_benchmarks"]

REPO = Path(__file__).resolve().parents[1]

INTRO = """## Benchmarks against scVI (and R zinbwave when installed)

The published comparison of the scVI paper (Lopez et al., Nature Methods 2018), reproduced side
by side: zinbgrad (K=10), scVI (scvi-tools 1.4.2), R zinbwave (only where
`Rscript -e 'library(zinbwave)'` works) and a PCA baseline run in the same run, on the same
subsamples, splits and corruptions. Everything below the *generated* marker is rewritten by
each run; the interpretation after it is written by hand for the run it names.

### Setup (scVI in its own venv, so the main one stays clean)

```bash
python -m venv /work/venv-bench && . /work/venv-bench/bin/activate
pip install torch==2.13.0          # the CPU wheel; never let pip pull a CUDA build
echo 'torch==2.13.0' > /tmp/c.txt
pip install -e '/work/main[bench]' -c /tmp/c.txt   # scvi-tools==1.4.2, umap-learn, psutil
```

### Reproduce every table and figure

```bash
. /work/venv-bench/bin/activate
python benchmarks/run.py --threads 1 --out benchmarks/results          # full mode
python benchmarks/run.py --quick --threads 1 --out benchmarks/results  # quick, a few minutes
```

From the main venv (no scVI there), the scVI jobs use `--scvi-python /work/venv-bench/bin/python`
(or `$ZINBGRAD_BENCH_PYTHON`) and are skipped with a message when no interpreter has scvi-tools;
the UMAP figures fall back to a 2-D PCA of the latent space without umap-learn. Useful options:
`--tasks quality,imputation,batch,scaling`, `--datasets`, `--methods`, `--scaling-sizes`,
`--scvi-max-epochs`, `--report-only` (rebuild tables and figures from the saved job records).
Full mode writes the figures to `benchmarks/figures/`, the raw results (`results.json`,
`results.csv`, per-job logs) to `benchmarks/results/full/`, and this section; quick mode writes
only to `benchmarks/results/quick/` (`report.md` there). Tests: `tests/test_benchmarks.py`
runs a tiny in-process version (zinbgrad + PCA).
"""


def _csv_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="zinbgrad vs scVI / R zinbwave / PCA: every table and figure of "
        "BENCHMARKS.md in one run.",
    )
    p.add_argument("--quick", action="store_true", help="the quick profile (a few minutes)")
    p.add_argument(
        "--profile",
        choices=["tiny", "quick", "full"],
        default=None,
        help="profile (default full; --quick = quick; tiny is for the tests)",
    )
    p.add_argument(
        "--out",
        default=str(REPO / "benchmarks" / "results"),
        help="output root; the run goes to OUT/<profile>/",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="directory with the .h5ad files "
        "(default: $ZINBGRAD_SHARED/data or <repo>/../shared/data)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma list among zinbgrad,scvi,zinbwave_r,pca,scanpy,harmony "
        "(default: the profile's)",
    )
    p.add_argument(
        "--tasks",
        default=None,
        help="comma list among quality,imputation,batch,scaling (default: all)",
    )
    p.add_argument("--datasets", default=None, help="comma list: keep only these datasets")
    p.add_argument("--scaling-sizes", default=None, help="comma list of cell numbers")
    p.add_argument(
        "--scaling-extra",
        default=None,
        help="further scaling jobs, comma list of dataset:cells (e.g. synthetic100k:100000)",
    )
    p.add_argument(
        "--scvi-scaling-epochs",
        type=int,
        default=None,
        help="scVI's epochs in the scaling jobs where its default rule trains more (its fit "
        "time is then also extrapolated linearly to the default); default: the default rule",
    )
    p.add_argument("--max-cells", type=int, default=None, help="subsample datasets to this")
    p.add_argument("--max-genes", type=int, default=None, help="at most this many genes")
    p.add_argument(
        "--scvi-max-epochs", default=None, help="'default' (scvi-tools' rule) or an integer"
    )
    p.add_argument(
        "--scvi-mc-samples",
        type=int,
        default=None,
        help="importance samples of scVI's marginal likelihood",
    )
    p.add_argument("--zinbgrad-max-epochs", type=int, default=None)
    p.add_argument(
        "--scvi-python",
        default=None,
        help="interpreter with scvi-tools for the scVI jobs (default: "
        "$ZINBGRAD_BENCH_PYTHON, else this interpreter)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="threads per job (torch / OpenMP); default: all cores",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--figures-dir",
        default=None,
        help="default: benchmarks/figures in full mode, else OUT/<profile>/figures",
    )
    p.add_argument(
        "--update-md",
        dest="update_md",
        action="store_true",
        default=None,
        help="update BENCHMARKS.md (default only in full mode)",
    )
    p.add_argument("--no-update-md", dest="update_md", action="store_false")
    p.add_argument("--md-path", default=str(REPO / "BENCHMARKS.md"))
    p.add_argument(
        "--no-snapshot",
        action="store_true",
        help="let the jobs import the live zinbgrad tree instead of a copy taken "
        "at the start (the copy keeps one run on one version while others edit)",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run the jobs in this process (no per-method memory isolation)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild tables and figures from OUT/<profile>/jobs/*.json",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def machine_info(loadavg_start: tuple[float, ...]) -> dict[str, Any]:
    info: dict[str, Any] = {"nproc": os.cpu_count(), "platform": platform.platform()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_gib"] = round(float(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info["loadavg_start"] = [round(x, 2) for x in loadavg_start]
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return info


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Python's and the installed versions of the benchmark's packages (and ``extra``)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in (
        "numpy",
        "scipy",
        "scikit-learn",
        "anndata",
        "torch",
        "matplotlib",
        "umap-learn",
        "zinbgrad",
        *extra,
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    """The checked-out commit, read from .git (no git command is run)."""
    git = REPO / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head[:12]
        ref = head.split(" ", 1)[1]
        p = git / ref
        if p.exists():
            return p.read_text().strip()[:12]
        packed = git / "packed-refs"
        if packed.exists():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0][:12]
    except OSError:
        pass
    return None


def _python_has(python: str, module: str) -> bool:
    code = f"import importlib.util,sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    try:
        return subprocess.run([python, "-c", code], timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _snapshot_source(run_dir: Path, python: str, log) -> tuple[Path, str]:
    """Copy ``src/zinbgrad`` into the run directory and check that it imports and fits.

    Other engineers edit the tree during a run; the copy keeps every job of the run on the
    same code. Retries a few times when the copy catches the tree mid-edit.
    """
    import hashlib
    import shutil

    snap = run_dir / "zinbgrad_src"
    smoke = (
        "import numpy as np, zinbgrad; "
        "zinbgrad.ZINBWaVE(n_components=2, max_epochs=3).fit("
        "np.random.default_rng(0).poisson(2.0, (40, 15)))"
    )
    err = ""
    for attempt in range(6):
        if snap.exists():
            shutil.rmtree(snap)
        shutil.copytree(
            REPO / "src" / "zinbgrad",
            snap / "zinbgrad",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        env = {**os.environ, "PYTHONPATH": str(snap) + os.pathsep + str(REPO)}
        proc = subprocess.run(
            [python, "-c", smoke], env=env, capture_output=True, text=True, timeout=300
        )
        if proc.returncode == 0:
            h = hashlib.sha256()
            for f in sorted((snap / "zinbgrad").rglob("*")):
                if f.is_file():
                    h.update(str(f.relative_to(snap)).encode())
                    h.update(f.read_bytes())
            return snap, h.hexdigest()[:12]
        err = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        log(f"zinbgrad snapshot attempt {attempt + 1} failed ({err[0]}); retrying in 20 s")
        time.sleep(20)
    raise SystemExit(f"could not take a working snapshot of src/zinbgrad: {err}")


def _skip_record(job: dict, why: str) -> dict:
    return {"job": job, "status": "skipped", "message": why}


def run_benchmarks(argv: list[str] | None = None, log=print) -> dict[str, Any]:
    """Run the suite (the CLI without ``sys.exit``); returns the run's metadata."""
    from benchmarks import report
    from benchmarks.datasets import DATASETS, find_data_dir
    from benchmarks.methods import METHODS
    from benchmarks.tasks import PROFILES, build_jobs, profile_to_dict, run_jobs

    args = _parser().parse_args(argv)
    name = args.profile or ("quick" if args.quick else "full")
    profile = PROFILES[name]
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    commit_at_start = git_commit()

    # ---- profile overrides
    changes: dict[str, Any] = {}
    if args.methods:
        changes["methods"] = tuple(_csv_list(args.methods) or ())
    if args.scaling_sizes:
        changes["scaling_sizes"] = tuple(int(x) for x in _csv_list(args.scaling_sizes) or ())
    if args.scaling_extra:
        changes["scaling_extra"] = tuple(_csv_list(args.scaling_extra) or ())
    if args.scvi_scaling_epochs is not None:
        changes["scvi_scaling_max_epochs"] = args.scvi_scaling_epochs
    if args.max_cells is not None:
        changes["max_cells"] = args.max_cells
    if args.max_genes is not None:
        changes["max_genes"] = args.max_genes
    if args.in_process:
        changes["isolate"] = False
    if args.datasets:
        keep = set(_csv_list(args.datasets) or ())
        unknown = keep - set(DATASETS)
        if unknown:
            raise SystemExit(f"unknown datasets: {sorted(unknown)}")
        for f in ("quality_datasets", "imputation_datasets", "batch_datasets"):
            changes[f] = tuple(d for d in getattr(profile, f) if d in keep)
        if profile.scaling_dataset not in keep:
            changes["scaling_sizes"] = ()
        extra = changes.get("scaling_extra", profile.scaling_extra)
        changes["scaling_extra"] = tuple(e for e in extra if e.rsplit(":", 1)[0] in keep)
    if args.tasks:
        tasks = set(_csv_list(args.tasks) or ())
        for t, f in (
            ("quality", "quality_datasets"),
            ("imputation", "imputation_datasets"),
            ("batch", "batch_datasets"),
            ("scaling", "scaling_sizes"),
        ):
            if t not in tasks:
                changes[f] = ()
                if t == "scaling":
                    changes["scaling_extra"] = ()
    scvi_opts = dict(profile.scvi)
    if args.scvi_max_epochs is not None:
        scvi_opts["max_epochs"] = (
            None if args.scvi_max_epochs == "default" else int(args.scvi_max_epochs)
        )
    if args.scvi_mc_samples is not None:
        scvi_opts["n_mc_samples"] = args.scvi_mc_samples
    changes["scvi"] = scvi_opts
    if args.zinbgrad_max_epochs is not None:
        changes["zinbgrad"] = {**profile.zinbgrad, "max_epochs": args.zinbgrad_max_epochs}
    profile = replace(profile, **changes)
    unknown_m = set(profile.methods) - set(METHODS)
    if unknown_m:
        raise SystemExit(f"unknown methods: {sorted(unknown_m)}")

    out_root = Path(args.out).resolve()
    run_dir = out_root / name
    fig_dir = (
        Path(args.figures_dir).resolve()
        if args.figures_dir
        else (REPO / "benchmarks" / "figures" if name == "full" else run_dir / "figures")
    )
    update_md = args.update_md if args.update_md is not None else (name == "full")
    md_path = Path(args.md_path).resolve()

    data_dir = find_data_dir(args.data_dir)
    if data_dir is None:
        raise SystemExit("shared/data not found: pass --data-dir or set ZINBGRAD_SHARED")

    methods = list(profile.methods)
    jobs = build_jobs(profile, methods, args.seed)

    if args.report_only:
        records = []
        for j in jobs:
            f = run_dir / "jobs" / f"{j['id']}.json"
            if f.exists():
                records.append(json.loads(f.read_text()))
        old = run_dir / "results.json"
        meta = json.loads(old.read_text())["meta"] if old.exists() else {}
    else:
        # ---- which interpreter runs which method; skip what cannot run
        python_for: dict[str, str] = {}
        unavailable: dict[str, str] = {}
        for m in methods:
            if m == "scvi" and profile.isolate:
                cands = [args.scvi_python, os.environ.get("ZINBGRAD_BENCH_PYTHON"), sys.executable]
                py = next((c for c in cands if c and _python_has(c, "scvi")), None)
                if py is None:
                    unavailable[m] = (
                        "scvi-tools not importable (tried --scvi-python, "
                        "$ZINBGRAD_BENCH_PYTHON and this interpreter); install "
                        "'.[bench]' in a separate venv, see BENCHMARKS.md"
                    )
                else:
                    python_for[m] = py
                    if not _python_has(py, "zinbgrad"):
                        unavailable[m] = f"{py} cannot import zinbgrad (needed by the worker)"
            else:
                ok, why = METHODS[m].available()
                if not ok:
                    unavailable[m] = why
        for m, why in unavailable.items():
            log(f"skipping {METHODS[m].label}: {why}")
        runnable = [j for j in jobs if j["method"] not in unavailable]
        run_dir.mkdir(parents=True, exist_ok=True)
        snapshot, snapshot_hash = None, None
        if profile.isolate and not args.no_snapshot:
            snapshot, snapshot_hash = _snapshot_source(run_dir, sys.executable, log)
            log(f"zinbgrad source snapshot {snapshot} (sha256 {snapshot_hash})")
        log(f"{len(runnable)} jobs ({name} mode), data {data_dir}, output {run_dir}")
        run_dir.mkdir(parents=True, exist_ok=True)
        records_run = run_jobs(
            runnable,
            profile,
            data_dir,
            run_dir,
            python_for=python_for,
            threads=args.threads,
            log=log,
            pythonpath=[str(snapshot)] if snapshot else [],
        )
        by_id = {r["job"]["id"]: r for r in records_run}
        records = [
            by_id.get(j["id"]) or _skip_record(j, unavailable.get(j["method"], "")) for j in jobs
        ]
        argv_shown = argv if argv is not None else sys.argv[1:]
        meta = {
            "profile_name": name,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python benchmarks/run.py " + shlex.join(argv_shown),
            "seed": args.seed,
            "threads": args.threads,
            "python_for": python_for,
            "zinbgrad_snapshot_sha256": snapshot_hash,
            "commit": commit_at_start,
        }
        meta["total_wall_s"] = time.perf_counter() - t_start
        meta["machine"] = machine_info(load0)

    meta["profile"] = profile_to_dict(profile)
    versions = dict(meta.get("versions") or package_versions())  # report-only keeps the run's
    for r in records:
        for k, v in (r.get("versions") or {}).items():
            versions.setdefault(k, v)
    meta["versions"] = versions
    meta.setdefault("commit", commit_at_start)
    meta["mean_other_busy_cores"], meta["max_other_busy_cores"] = report.mean_other_load(records)
    try:
        meta["run_dir_display"] = str(run_dir.relative_to(REPO))
    except ValueError:
        meta["run_dir_display"] = str(run_dir)

    fig_paths = report.make_figures(records, fig_dir, seed=args.seed, log=log)
    report.write_outputs(records, meta, run_dir)
    block = report.render_markdown(records, meta, fig_paths, run_dir)
    (run_dir / "report.md").write_text(block)
    if update_md:
        md_block = report.render_markdown(records, meta, fig_paths, md_path.parent)
        report.update_benchmarks_md(md_path, md_block, INTRO)
        log(f"updated {md_path}")
    log(
        f"report: {run_dir / 'report.md'}; figures: {fig_dir}; "
        f"total {time.perf_counter() - t_start:.1f} s"
    )
    meta["run_dir"] = str(run_dir)
    meta["fig_dir"] = str(fig_dir)
    meta["n_failed"] = sum(1 for r in records if r.get("status") == "failed")
    return meta


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit code 1 when a job failed."""
    args_list = sys.argv[1:] if argv is None else argv
    if "--worker" in args_list:
        from benchmarks.tasks import worker_main

        return worker_main(args_list[args_list.index("--worker") + 1])
    meta = run_benchmarks(argv)
    return 1 if meta.get("n_failed") else 0


if __name__ == "__main__":
    sys.exit(main())
