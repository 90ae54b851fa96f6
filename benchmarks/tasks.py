"""Benchmark tasks, profiles and the job runner.

A *job* is one (task, method, dataset[, size]) combination. Each job runs in its own Python
subprocess by default, so that peak resident memory (``ru_maxrss``) and CPU time belong to one
method only; the parent records the machine-wide CPU use during the job (from ``/proc/stat``)
to report how busy the two cores were with other processes.

Tasks (definitions of the scVI paper, Lopez et al. 2018, where it has one):

``quality``
    Split the cells 90/10 (seeded); fit on the 90%; train NLL per cell, held-out NLL per cell
    on the 10%; K-means clustering scores (ARI, NMI; k = number of cell types, several seeds)
    and ASW of the training cells' 10-dim latent space.
``imputation``
    Zero out 10% of the non-zero counts uniformly (``corrupt_counts``), fit on the corrupted
    matrix, median L1 distance between original and imputed values on the corrupted entries.
``batch``
    Fit on all cells without and with the batch in the model; batch-mixing entropy of the
    latent space (50 neighbours, 100 pools of 100 cells) and K-means ARI on cell types where
    labels exist; latents saved for the UMAP figures.
``scaling``
    Fit on random subsamples of the brain slice of increasing size; fit time, end-to-end time,
    CPU time and peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "PROFILES",
    "Profile",
    "build_jobs",
    "run_job",
    "run_jobs",
    "worker_main",
]

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Profile:
    """Sizes and settings of one benchmark mode."""

    name: str
    methods: tuple[str, ...] = ("zinbgrad", "scvi", "zinbwave_r", "pca")
    quality_datasets: tuple[str, ...] = ("zeisel", "pbmc8k", "camp", "pbmc_protein")
    imputation_datasets: tuple[str, ...] = ("zeisel", "pbmc8k", "camp")
    batch_datasets: tuple[str, ...] = ("pbmc_protein", "zeisel_thinned")
    scaling_dataset: str = "brain10k"
    scaling_sizes: tuple[int, ...] = (1000, 2000, 5000, 10000)
    #: further scaling jobs as ``"dataset:cells"`` (e.g. ``"synthetic100k:100000"``)
    scaling_extra: tuple[str, ...] = ()
    #: scVI's epochs in the scaling jobs where its default rule would train more (``None``:
    #: the default rule); its fit time is then also extrapolated linearly to the default
    scvi_scaling_max_epochs: int | None = None
    max_cells: int | None = None
    max_genes: int | None = None
    test_fraction: float = 0.1
    corrupt_rate: float = 0.1
    kmeans_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    kmeans_n_init: int = 200
    silhouette_sample_size: int | None = None
    entropy_pools: int = 100
    entropy_cells_per_pool: int = 100
    entropy_neighbors: int = 50
    zinbgrad: dict[str, Any] = field(default_factory=dict)
    scvi: dict[str, Any] = field(
        default_factory=lambda: {
            "max_epochs": None,
            "n_mc_samples": 1000,
            "n_mc_samples_per_pass": 100,
            "max_nll_cells": 500,
            "impute_samples": 25,
        }
    )
    pca: dict[str, Any] = field(default_factory=dict)
    zinbwave_r: dict[str, Any] = field(default_factory=dict)
    job_timeout_s: int = 5400
    isolate: bool = True


PROFILES: dict[str, Profile] = {
    "full": Profile(name="full"),
    "quick": Profile(
        name="quick",
        quality_datasets=("zeisel", "pbmc8k", "camp"),
        imputation_datasets=("zeisel",),
        batch_datasets=("pbmc_protein", "zeisel_thinned"),
        scaling_sizes=(250, 500, 1000),
        max_cells=500,
        max_genes=300,
        kmeans_seeds=(0, 1),
        kmeans_n_init=10,
        entropy_pools=50,
        scvi={
            "max_epochs": 20,
            "n_mc_samples": 100,
            "n_mc_samples_per_pass": 100,
            "max_nll_cells": 500,
            "impute_samples": 10,
        },
        job_timeout_s=900,
    ),
    "tiny": Profile(
        name="tiny",
        methods=("zinbgrad", "pca"),
        quality_datasets=("zeisel",),
        imputation_datasets=("zeisel",),
        batch_datasets=("zeisel_thinned",),
        scaling_sizes=(100, 200),
        max_cells=150,
        max_genes=80,
        kmeans_seeds=(0,),
        kmeans_n_init=3,
        entropy_pools=10,
        entropy_cells_per_pool=50,
        entropy_neighbors=15,
        zinbgrad={"max_epochs": 15},
        scvi={
            "max_epochs": 2,
            "n_mc_samples": 10,
            "n_mc_samples_per_pass": 10,
            "max_nll_cells": 100,
            "impute_samples": 2,
        },
        job_timeout_s=300,
        isolate=False,
    ),
}


# --------------------------------------------------------------------------- jobs


def build_jobs(profile: Profile, methods: list[str], seed: int) -> list[dict[str, Any]]:
    """All jobs of a run, methods interleaved per dataset (so load changes hit all alike)."""
    jobs: list[dict[str, Any]] = []

    def add(task: str, dataset: str, size: int | None = None) -> None:
        for m in methods:
            jid = f"{task}__{dataset}" + (f"__n{size}" if size else "") + f"__{m}"
            jobs.append({"id": jid, "task": task, "dataset": dataset, "size": size, "method": m})

    for d in profile.quality_datasets:
        add("quality", d)
    for d in profile.imputation_datasets:
        add("imputation", d)
    for d in profile.batch_datasets:
        add("batch", d)
    for n in profile.scaling_sizes:
        add("scaling", profile.scaling_dataset, n)
    for spec in profile.scaling_extra:
        name, size = spec.rsplit(":", 1)
        add("scaling", name, int(size))
    for j in jobs:
        if j["method"] == "scvi" and j["task"] == "scaling" and profile.scvi_scaling_max_epochs:
            j["options"] = {"max_epochs_cap": int(profile.scvi_scaling_max_epochs)}
        j["seed"] = int(seed)
    return jobs


def _rss_now_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def _machine_busy() -> tuple[float, float] | None:
    """(busy seconds, total seconds) summed over all CPUs since boot, from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    vals = [float(v) for v in fields[:8]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = vals[3] + vals[4]
    return (sum(vals) - idle) / hz, sum(vals) / hz


def _clustering(latent: np.ndarray, labels: np.ndarray, profile: Profile) -> dict[str, Any]:
    from zinbgrad.metrics import clustering_scores

    ss = profile.silhouette_sample_size
    res = clustering_scores(
        latent,
        labels,
        seeds=profile.kmeans_seeds,
        n_init=profile.kmeans_n_init,
        silhouette_sample_size=ss,
    )
    return {k: res[k] for k in ("ari", "nmi", "asw", "ari_std", "nmi_std", "n_clusters")}


def _entropy(latent: np.ndarray, batches: np.ndarray, profile: Profile, seed: int) -> float:
    from zinbgrad.metrics import batch_mixing_entropy

    return batch_mixing_entropy(
        latent,
        batches,
        n_neighbors=profile.entropy_neighbors,
        n_pools=profile.entropy_pools,
        n_samples_per_pool=profile.entropy_cells_per_pool,
        random_state=seed,
    )


def _task_quality(job, profile, method_factory, data_dir, arrays_dir) -> dict[str, Any]:
    from benchmarks.datasets import filter_empty, load_dataset, train_test_split_cells

    seed = job["seed"]
    adata = load_dataset(
        job["dataset"],
        data_dir,
        max_cells=profile.max_cells,
        max_genes=profile.max_genes,
        seed=seed,
    )
    tr, te = train_test_split_cells(adata.n_obs, profile.test_fraction, seed)
    train = adata[tr].copy()
    keep_genes = np.asarray(train.X.sum(axis=0)).ravel() > 0
    train = filter_empty(train[:, keep_genes])
    test = adata[te][:, train.var_names].copy()
    m = method_factory()
    m.fit(train)
    out: dict[str, Any] = {
        "n_train": int(train.n_obs),
        "n_test": int(test.n_obs),
        "n_genes": int(train.n_vars),
        "fit_s": m.fit_seconds,
    }
    t = time.perf_counter()
    out["train_nll"] = m.train_nll()
    out["train_nll_s"] = time.perf_counter() - t
    t = time.perf_counter()
    out["heldout_nll"] = m.heldout_nll(test)
    out["heldout_nll_s"] = time.perf_counter() - t
    lat = m.latent()
    if "label" in train.obs:
        t = time.perf_counter()
        out.update(_clustering(lat, train.obs["label"].to_numpy(), profile))
        out["clustering_s"] = time.perf_counter() - t
    out["info"] = m.info
    return out


def _task_imputation(job, profile, method_factory, data_dir, arrays_dir) -> dict[str, Any]:
    import anndata as ad
    import scipy.sparse as sp

    from benchmarks.datasets import load_dataset
    from zinbgrad.metrics import corrupt_counts, imputation_error

    seed = job["seed"]
    adata = load_dataset(
        job["dataset"],
        data_dir,
        max_cells=profile.max_cells,
        max_genes=profile.max_genes,
        seed=seed,
    )
    cc = corrupt_counts(adata.X, rate=profile.corrupt_rate, random_state=seed)
    Xc = sp.csr_matrix(cc.X)
    # zinbgrad (and zinbwave) refuse all-zero cells/genes: drop those the corruption emptied,
    # for every method alike, with the corrupted entries they held
    keep_c = np.asarray(Xc.sum(axis=1)).ravel() > 0
    keep_g = np.asarray(Xc.sum(axis=0)).ravel() > 0
    new_row = np.cumsum(keep_c) - 1
    new_col = np.cumsum(keep_g) - 1
    ok = keep_c[cc.rows] & keep_g[cc.cols]
    rows, cols, vals = new_row[cc.rows[ok]], new_col[cc.cols[ok]], cc.values[ok]
    corrupted = ad.AnnData(
        X=Xc[keep_c][:, keep_g],
        obs=adata.obs.iloc[np.flatnonzero(keep_c)].copy(),
        var=adata.var.iloc[np.flatnonzero(keep_g)].copy(),
    )
    m = method_factory()
    m.fit(corrupted)
    t = time.perf_counter()
    imputed = m.impute()
    out: dict[str, Any] = {
        "n_cells": int(corrupted.n_obs),
        "n_genes": int(corrupted.n_vars),
        "n_corrupted": int(vals.size),
        "n_corrupted_dropped": int((~ok).sum()),
        "fit_s": m.fit_seconds,
        "impute_s": time.perf_counter() - t,
        "median_l1": {k: imputation_error(vals, v[rows, cols]) for k, v in imputed.items()},
        # reference: predicting 0 everywhere (the corrupted value) and the mean of the values
        "median_l1_zero": imputation_error(vals, np.zeros_like(vals, dtype=float)),
    }
    out["info"] = m.info
    return out


def _task_batch(job, profile, method_factory, data_dir, arrays_dir) -> dict[str, Any]:
    from benchmarks.datasets import load_dataset

    seed = job["seed"]
    adata = load_dataset(
        job["dataset"],
        data_dir,
        max_cells=profile.max_cells,
        max_genes=profile.max_genes,
        seed=seed,
    )
    batches = adata.obs["batch"].to_numpy()
    labels = adata.obs["label"].to_numpy() if "label" in adata.obs else None
    out: dict[str, Any] = {"n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars)}
    save: dict[str, np.ndarray] = {"batch": batches.astype(str)}
    if labels is not None:
        save["label"] = labels.astype(str)
    for variant, key in (("uncorrected", None), ("corrected", "batch")):
        m = method_factory()
        if key is not None and not m.supports_batch:
            out[variant] = None
            continue
        m.fit(adata, batch_key=key)
        lat = m.latent()
        res: dict[str, Any] = {
            "fit_s": m.fit_seconds,
            "entropy": _entropy(lat, batches, profile, seed),
        }
        if labels is not None:
            c = _clustering(lat, labels, profile)
            res.update(ari=c["ari"], nmi=c["nmi"], asw=c["asw"])
        res["info"] = m.info
        out[variant] = res
        save[f"latent_{variant}"] = lat
    path = arrays_dir / f"{job['id']}.npz"
    np.savez_compressed(path, **save)
    out["arrays"] = str(path)
    return out


def _task_scaling(job, profile, method_factory, data_dir, arrays_dir) -> dict[str, Any]:
    """Fit time and resources on a subsample. Harmony integrates a random split of the cells
    into two batches (the data have none; its time depends on having batches to mix). A
    scVI fit run for fewer epochs than its default rule also gets ``fit_s_extrapolated``:
    its set-up plus its training time scaled linearly to the default number of epochs."""
    from benchmarks.datasets import filter_empty, load_dataset, subsample

    t0 = time.perf_counter()
    full = load_dataset(job["dataset"], data_dir, max_genes=profile.max_genes, seed=job["seed"])
    adata = filter_empty(subsample(full, job["size"], job["seed"]))
    del full
    batch_key = None
    if job["method"] == "harmony":
        rng = np.random.default_rng(job["seed"])
        adata.obs["batch"] = np.where(rng.random(adata.n_obs) < 0.5, "a", "b")
        adata.obs["batch"] = adata.obs["batch"].astype("category")
        batch_key = "batch"
    t_load = time.perf_counter() - t0
    m = method_factory()
    m.fit(adata, batch_key=batch_key)
    t = time.perf_counter()
    lat = m.latent()
    t_lat = time.perf_counter() - t
    out = {
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "load_s": t_load,
        "fit_s": m.fit_seconds,
        "latent_s": t_lat,
        "in_process_e2e_s": time.perf_counter() - t0,
        "latent_finite": bool(np.isfinite(lat).all()),
        "info": m.info,
    }
    given, default = m.info.get("max_epochs"), m.info.get("default_max_epochs")
    if given and default and given < default:
        # the training loop scales with the epochs, the set-up before it does not (records
        # without train_s: the whole fit is scaled, an overestimate by the set-up's share)
        train = m.info.get("train_s", m.fit_seconds)
        out["fit_s_extrapolated"] = m.fit_seconds + train * (default / given - 1)
    return out


TASKS = {
    "quality": _task_quality,
    "imputation": _task_imputation,
    "batch": _task_batch,
    "scaling": _task_scaling,
}


def run_job(job: dict[str, Any], profile: Profile, data_dir: Path, out_dir: Path) -> dict:
    """Run one job in this process and return its record (never raises)."""
    import torch

    t_proc = time.perf_counter()
    threads = int(job.get("threads") or 0)
    threads_before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        return _run_job(job, profile, data_dir, out_dir, t_proc)
    finally:  # in-process runs (tests) leave the caller's thread count as it was
        torch.set_num_threads(threads_before)


def _run_job(
    job: dict[str, Any], profile: Profile, data_dir: Path, out_dir: Path, t_proc: float
) -> dict:
    import torch

    from benchmarks.methods import METHODS, make_method

    rec: dict[str, Any] = {"job": job, "status": "ok", "message": ""}
    cls = METHODS[job["method"]]
    ok, why = cls.available()
    if not ok:
        rec.update(status="skipped", message=why)
        return rec
    try:
        rec["versions"] = cls.versions()
    except Exception as err:  # noqa: BLE001 - versions are informative only
        rec["versions"] = {"error": repr(err)}
    options = {**(getattr(profile, job["method"], {}) or {}), **job.get("options", {})}
    arrays_dir = out_dir / "arrays"
    arrays_dir.mkdir(parents=True, exist_ok=True)
    rss0 = _rss_now_mib()
    cpu0 = _cpu_seconds()
    try:
        rec["metrics"] = TASKS[job["task"]](
            job,
            profile,
            lambda: make_method(job["method"], seed=job["seed"], options=options),
            data_dir,
            arrays_dir,
        )
    except Exception as err:  # noqa: BLE001 - a failed job is recorded, the run goes on
        rec.update(status="failed", message=f"{type(err).__name__}: {err}")
        rec["traceback"] = traceback.format_exc()[-4000:]
    rec["resources"] = {
        "rss_before_task_mib": rss0,
        "peak_rss_mib": _peak_rss_mib(),
        "task_cpu_s": _cpu_seconds() - cpu0,
        "task_wall_s": time.perf_counter() - t_proc,
        "torch_threads": torch.get_num_threads(),
    }
    return rec


def worker_main(job_file: str) -> int:
    """Subprocess entry: run the job described in ``job_file`` and write its record."""
    spec = json.loads(Path(job_file).read_text())
    prof_dict = spec["profile"]
    profile = Profile(**{k: tuple(v) if isinstance(v, list) else v for k, v in prof_dict.items()})
    rec = run_job(spec["job"], profile, Path(spec["data_dir"]), Path(spec["out_dir"]))
    Path(spec["result_file"]).write_text(json.dumps(rec, default=_json_default, indent=1))
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o)}")


def profile_to_dict(profile: Profile) -> dict[str, Any]:
    """The profile as plain JSON types."""
    return json.loads(json.dumps(asdict(profile), default=_json_default))


def run_jobs(
    jobs: list[dict[str, Any]],
    profile: Profile,
    data_dir: Path,
    out_dir: Path,
    *,
    python_for: dict[str, str],
    threads: int,
    log=print,
    pythonpath: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run every job (in subprocesses if ``profile.isolate``) and return their records.

    Parameters
    ----------
    python_for
        Interpreter per method (e.g. scVI from a separate venv); default ``sys.executable``.
    threads
        Threads per job (``torch.set_num_threads`` and ``OMP_NUM_THREADS``).
    pythonpath
        Directories put first on the jobs' ``PYTHONPATH`` (e.g. a snapshot of zinbgrad).
    """
    jobs_dir = out_dir / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i, job in enumerate(jobs, 1):
        job = {**job, "threads": threads}
        load0 = os.getloadavg()
        busy0 = _machine_busy()
        t0 = time.perf_counter()
        if profile.isolate:
            rec = _run_isolated(
                job, profile, data_dir, out_dir, jobs_dir, python_for, threads, pythonpath or []
            )
        else:
            rec = run_job(job, profile, data_dir, out_dir)
        wall = time.perf_counter() - t0
        busy1 = _machine_busy()
        rec.setdefault("resources", {})
        rec["resources"].update(
            process_wall_s=wall,
            isolated=profile.isolate,
            loadavg_start=list(load0),
            loadavg_end=list(os.getloadavg()),
        )
        if busy0 and busy1 and wall > 0:
            busy = busy1[0] - busy0[0]
            own = rec["resources"].get("process_cpu_s")
            if own is None:
                own = rec["resources"].get("task_cpu_s")
            rec["resources"]["machine_busy_cores"] = busy / wall
            if own is not None:
                rec["resources"]["other_busy_cores"] = max(0.0, (busy - own) / wall)
        (jobs_dir / f"{job['id']}.json").write_text(
            json.dumps(rec, default=_json_default, indent=1)
        )
        status = rec["status"] + (f" ({rec['message']})" if rec["message"] else "")
        log(f"[{i}/{len(jobs)}] {job['id']}: {status} in {wall:.1f} s")
        records.append(rec)
    return records


def _run_isolated(
    job, profile, data_dir, out_dir, jobs_dir, python_for, threads, pythonpath
) -> dict:
    spec_file = jobs_dir / f"{job['id']}.spec.json"
    result_file = jobs_dir / f"{job['id']}.result.json"
    result_file.unlink(missing_ok=True)
    spec_file.write_text(
        json.dumps(
            {
                "job": job,
                "profile": profile_to_dict(profile),
                "data_dir": str(data_dir),
                "out_dir": str(out_dir),
                "result_file": str(result_file),
            },
            indent=1,
        )
    )
    py = python_for.get(job["method"], sys.executable)
    env = {**os.environ}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([*pythonpath, str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("MPLBACKEND", "Agg")
    cmd = [py, str(REPO / "benchmarks" / "run.py"), "--worker", str(spec_file)]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    log_file = jobs_dir / f"{job['id']}.log"
    try:
        with open(log_file, "w") as fh:
            proc = subprocess.run(
                cmd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(jobs_dir),
                timeout=profile.job_timeout_s,
            )
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = None
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    process_cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (
        cpu_after.ru_stime - cpu_before.ru_stime
    )
    if result_file.exists():
        rec = json.loads(result_file.read_text())
    else:
        tail = log_file.read_text()[-2000:] if log_file.exists() else ""
        why = "timed out" if rc is None else f"worker exited with code {rc}"
        rec = {"job": job, "status": "failed", "message": why, "traceback": tail}
    rec.setdefault("resources", {})["process_cpu_s"] = process_cpu
    return rec


def profile_with(profile: Profile, **changes: Any) -> Profile:
    """A copy of ``profile`` with some fields changed."""
    return replace(profile, **changes)
