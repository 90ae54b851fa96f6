"""Streaming from disk, checkpoints surviving SIGKILL, and data-parallel fits (gloo)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import zinbgrad
from zinbgrad import ZINBWaVE
from zinbgrad.cli import main


def _synthetic(n=1500, J=120, seed=0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(n, 2))
    A = rng.normal(scale=0.6, size=(2, J))
    mu = np.exp(rng.normal(0.5, 0.7, J)[None, :] + W @ A)
    Y = rng.negative_binomial(3.0, 3.0 / (3.0 + mu)) * (rng.random((n, J)) > 0.2)
    Y[:, Y.sum(0) == 0] = 1
    Y[Y.sum(1) == 0, 0] = 1
    a = ad.AnnData(sp.csr_matrix(Y.astype(np.float32)))
    a.obs_names = [f"c{i}" for i in range(n)]
    a.var_names = [f"g{j}" for j in range(J)]
    return a


@pytest.fixture(scope="module")
def h5(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scale") / "counts.h5ad"
    _synthetic().write_h5ad(path)
    return path


def test_streaming_from_disk_equals_in_memory(h5):
    mem = ZINBWaVE(n_components=2, max_epochs=6, block_entries=20_000).fit(ad.read_h5ad(h5))
    disk = ZINBWaVE(n_components=2, max_epochs=6, block_entries=20_000).fit(str(h5))
    backed = ZINBWaVE(n_components=2, max_epochs=6, block_entries=20_000).fit(
        ad.read_h5ad(h5, backed="r")
    )
    np.testing.assert_allclose(disk.W_, mem.W_, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(backed.objective_, mem.objective_, rtol=1e-12)
    assert list(disk.var_names_) == list(mem.var_names_)


@pytest.mark.parametrize("dtype", ["int32", "uint16", "float32", "float64", "int64"])
def test_streamed_blocks_equal_in_memory_blocks_for_any_stored_type(tmp_path, dtype):
    """Blocks are built from the CSR arrays as stored (on a GPU, on the device): every stored
    count type gives the in-memory blocks (rows, columns, values, lgamma(y + 1)) exactly."""
    import torch

    from zinbgrad.data.source import BackedCounts, InMemoryCounts

    a = _synthetic(n=300, J=40)
    X = a.X.copy()
    a.X = sp.csr_matrix((X.data.astype(dtype), X.indices, X.indptr), shape=X.shape)
    path = tmp_path / "typed.h5ad"
    a.write_h5ad(path)
    import h5py

    with h5py.File(path, "r+") as f:  # unsigned column indices (scipy would make them int32)
        idx = f["X/indices"][:]
        del f["X/indices"]
        f["X/indices"] = idx.astype(np.uint32 if dtype == "uint16" else np.int64)
        assert f["X/data"].dtype == np.dtype(dtype)
    for dt in (torch.float32, torch.float64):
        disk = BackedCounts(path, dtype=dt)
        mem = InMemoryCounts(sp.csr_matrix(X, dtype=np.float64), dtype=dt)
        try:
            for start, stop in [(0, 300), (17, 230), (299, 300)]:
                got, ref = disk.block(start, stop), mem.block(start, stop)
                assert got.n_rows == ref.n_rows and got.values.dtype == dt
                for k in ("rows", "cols", "values", "lgamma_y1", "flat"):
                    assert torch.equal(getattr(got, k), getattr(ref, k)), (dtype, dt, k)
        finally:
            disk.close()


def test_streaming_rejects_csc_and_dense(tmp_path):
    a = _synthetic(n=50, J=10)
    a.X = sp.csc_matrix(a.X)
    a.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(ValueError, match="CSR"):
        ZINBWaVE(n_components=1).fit(str(tmp_path / "csc.h5ad"))
    a.X = a.X.toarray()
    a.write_h5ad(tmp_path / "dense.h5ad")
    with pytest.raises(ValueError, match="dense"):
        ZINBWaVE(n_components=1).fit(str(tmp_path / "dense.h5ad"))
    with pytest.raises(FileNotFoundError):
        ZINBWaVE(n_components=1).fit(str(tmp_path / "missing.h5ad"))


_CHILD = """
import sys, zinbgrad
zinbgrad.ZINBWaVE(n_components=2, max_epochs=40, tol=0, block_entries=20_000, {extra}).fit(
    sys.argv[1], checkpoint=sys.argv[2])
"""


@pytest.mark.parametrize(
    "extra", [{}, {"solver": "sketch", "sketch_size": 300}], ids=["full", "sketch"]
)
def test_checkpoint_survives_sigkill_and_resume_matches(tmp_path, h5, extra):
    ckpt = tmp_path / "fit.npz"
    kw = ", ".join(f"{k}={v!r}" for k, v in extra.items())
    child = _CHILD.replace("{extra}", kw)
    proc = subprocess.Popen([sys.executable, "-c", child, str(h5), str(ckpt)])
    try:
        deadline = time.time() + 240
        while not ckpt.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert ckpt.exists(), "no checkpoint written before the kill"
    est = {"n_components": 2, "max_epochs": 40, "tol": 0, "block_entries": 20_000, **extra}
    resumed = ZINBWaVE(**est).fit(str(h5), checkpoint=ckpt, resume=ckpt)
    straight = ZINBWaVE(**est).fit(str(h5))
    own = [h for h in straight.history_ if h["phase"] != "sketch"]
    assert len(resumed.history_) == len(straight.history_) and len(own) == 40
    np.testing.assert_allclose(resumed.W_, straight.W_, rtol=1e-10, atol=1e-12)
    assert resumed.objective_ == pytest.approx(straight.objective_, rel=1e-12)
    # the path new cells follow survives the kill too (it is in the checkpoint)
    assert resumed.fit_path_.keys() == straight.fit_path_.keys()
    for k, v in straight.fit_path_.items():
        np.testing.assert_allclose(resumed.fit_path_[k], v, rtol=1e-10, atol=1e-12)
    # the checkpoint on disk is always a complete, loadable file
    np.load(ckpt, allow_pickle=False)["metadata"]


def test_resume_from_a_finished_fit_returns_that_fit(tmp_path):
    # a process killed after its last checkpoint (e.g. while writing its output) is resumed
    # from the converged state: no further sweeps, the same model
    a = _synthetic(n=300, J=40)
    ckpt = tmp_path / "done.npz"
    straight = ZINBWaVE(n_components=2, verbose=False).fit(a, checkpoint=ckpt)
    assert straight.converged_ and straight.n_iter_ < straight.max_epochs
    resumed = ZINBWaVE(n_components=2, verbose=False).fit(a, resume=ckpt)
    assert resumed.converged_ and resumed.n_iter_ == straight.n_iter_
    assert len(resumed.history_) == len(straight.history_)
    np.testing.assert_array_equal(resumed.W_, straight.W_)
    assert resumed.objective_ == straight.objective_


def test_resume_rejects_a_foreign_checkpoint(tmp_path, h5):
    ckpt = tmp_path / "k.npz"
    ZINBWaVE(n_components=2, max_epochs=2).fit(str(h5), checkpoint=ckpt)
    with pytest.raises(ValueError, match="does not match"):
        ZINBWaVE(n_components=3, max_epochs=2).fit(str(h5), resume=ckpt)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo test on Linux only")
def test_two_process_gloo_fit_matches_single_process(tmp_path, h5):
    single = ZINBWaVE(n_components=2, max_epochs=15).fit(str(h5))
    out = tmp_path / "dist.h5ad"
    env_before = dict(os.environ)
    assert (
        main(["fit", str(h5), "-o", str(out), "-k", "2", "--epochs", "15", "-q", "--nproc", "2"])
        == 0
    )
    assert os.environ == env_before
    res = ad.read_h5ad(out)
    W = res.obsm["X_zinbwave"]
    assert W.shape == (1500, 2) and np.isfinite(W).all()
    # same gene initialization, same exact Newton steps; only the order of floating-point sums
    # over cells differs between 1 and 2 processes
    assert res.uns["X_zinbwave"]["objective"] == pytest.approx(single.objective_, rel=1e-8)
    np.testing.assert_allclose(W, single.W_, rtol=1e-5, atol=1e-6)
    assert res.X.nnz == ad.read_h5ad(h5).X.nnz  # counts copied, untouched


@pytest.mark.skipif(sys.platform != "linux", reason="gloo test on Linux only")
def test_two_process_sketch_fit_matches_single_process(tmp_path, h5):
    kw = {"n_components": 2, "solver": "sketch", "sketch_size": 400}
    single = ZINBWaVE(**kw).fit(str(h5))
    out = tmp_path / "dist.h5ad"
    args = ["fit", str(h5), "-o", str(out), "-k", "2", "-q", "--nproc", "2"]
    args += ["--solver", "sketch", "--sketch-size", "400"]
    assert main(args) == 0
    res = ad.read_h5ad(out)
    # both ranks fit the same sketch; the extension and sweeps differ from one process only by
    # the order of floating-point sums over cells
    assert res.uns["X_zinbwave"]["objective"] == pytest.approx(single.objective_, rel=1e-7)
    np.testing.assert_allclose(res.obsm["X_zinbwave"], single.W_, rtol=1e-4, atol=1e-5)


def test_package_exports():
    assert callable(zinbgrad.ZINBWaVE)


def test_transform_and_score_stream_from_disk(h5):
    model = ZINBWaVE(n_components=2, max_epochs=5).fit(str(h5))
    mem = ad.read_h5ad(h5)
    np.testing.assert_allclose(model.transform(str(h5)), model.transform(mem), rtol=1e-10)
    assert model.score(str(h5)) == pytest.approx(model.score(mem), rel=1e-12)
    assert model.loglik(str(h5)) == pytest.approx(model.loglik(mem), rel=1e-12)


@pytest.mark.parametrize("cmd", [["normalize"], ["weights"], ["residuals", "--kind", "pearson"]])
def test_layer_commands_stream_into_chunks(tmp_path, h5, cmd):
    fitted = tmp_path / "fit.h5ad"
    assert main(["fit", str(h5), "-o", str(fitted), "-k", "2", "--epochs", "3", "-q"]) == 0
    mem, disk = tmp_path / "mem.h5ad", tmp_path / "disk.h5ad"
    assert main([*cmd, str(fitted), "-o", str(mem)]) == 0
    assert main([*cmd, str(fitted), "-o", str(disk), "--stream"]) == 0
    a, b = ad.read_h5ad(mem), ad.read_h5ad(disk)
    (key,) = list(b.layers.keys())
    np.testing.assert_allclose(b.layers[key], a.layers[key], rtol=1e-5, atol=1e-6)
    assert b.X.nnz == a.X.nnz


def test_each_rank_gets_its_own_gpu(monkeypatch):
    """A CUDA device without an index is the GPU of the process's LOCAL_RANK (modulo the GPUs
    visible) when it is one of several ranks, else the current device; an explicit index or
    the CPU is left alone. (Mocked CUDA: runs without a GPU.)"""
    import torch

    from zinbgrad.estimator import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_device("cuda") == torch.device("cuda", 2)
    assert resolve_device("auto") == torch.device("cuda", 2)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")  # a single process keeps the current device
    assert resolve_device("cuda") == torch.device("cuda", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_gpu_check_script_runs_on_cpu(tmp_path):
    """benchmarks/gpu_check.py (the prepared run for a lent GPU machine) works end to end on
    the CPU: its kernel and fit-parity checks pass and a tiny timing run is recorded."""
    import json

    repo = Path(__file__).resolve().parents[1]
    from zinbgrad.datasets import pbmc_small

    model_path = tmp_path / "model.npz"
    ZINBWaVE(n_components=2, random_state=0, verbose=False).fit(pbmc_small()).save(model_path)
    out = tmp_path / "out"
    args = ["--device", "cpu", "--model", str(model_path), "--sizes", "400", "--out", str(out)]
    args += ["--warmup-cells", "100", "--block-entries", "2**14,2**16", "--max-epochs", "5"]
    args += ["--stream-sizes", "400"]
    sys.path.insert(0, str(repo))  # also for the spawned ranks, which import the module
    try:
        from benchmarks import gpu_check

        assert gpu_check.main(args) == 0
    finally:
        sys.path.remove(str(repo))
    res = json.loads((out / "gpu_check.json").read_text())
    steps = ("env", "kernels", "fit_parity", "syncs", "collectives", "timing")
    assert all("error" not in res[k] for k in steps), res
    assert res["syncs"]["skipped"] == "not a CUDA device"
    assert res["collectives"]["ok"] and res["collectives"]["world_size"] == 2
    assert res["kernels"]["ok"] and res["fit_parity"]["ok"]
    runs = res["timing"]["runs"]
    assert [(r["input"], r["block_entries"]) for r in runs[:2]] == [
        ("memory", 2**14),
        ("memory", 2**16),
    ]
    assert all(r["n_cells"] > 350 and r["epochs"] >= 1 and r["seconds"] > 0 for r in runs)
    # the same size streamed from its .h5ad, at the faster block size, fits the same model
    assert len(runs) == 3 and runs[2]["input"] == "streamed from .h5ad"
    assert runs[2]["block_entries"] == res["timing"]["best_block_entries"]
    assert runs[2]["objective_rel_diff_to_memory"] < 1e-4


def test_backed_anndata_uses_its_own_annotations(h5):
    backed = ad.read_h5ad(h5, backed="r")
    try:
        backed.obs["grp"] = np.where(np.arange(backed.n_obs) < 700, "early", "late")
        backed.obs_names = [f"renamed{i}" for i in range(backed.n_obs)]
        m = ZINBWaVE(n_components=2, max_epochs=2, verbose=False).fit(backed, batch_key="grp")
    finally:
        backed.file.close()
    assert m.X_columns_ == ["intercept", "grp[late]"] and m.obs_names_[0] == "renamed0"


def test_streamed_fit_output_keeps_layers_and_adds_the_model(tmp_path):
    a = _synthetic(n=200, J=30)
    a.layers["dense"] = a.X.toarray()
    src, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    a.write_h5ad(src)
    argv = ["fit", str(src), "-o", str(out), "-k", "2", "-q", "--stream"]
    assert main(argv) == 0
    res = ad.read_h5ad(out)
    np.testing.assert_array_equal(res.layers["dense"], a.layers["dense"])
    assert res.obsm["X_zinbwave"].shape == (200, 2) and "X_zinbwave_zeta" in res.var
    ref = ZINBWaVE(n_components=2, verbose=False).fit(a)
    np.testing.assert_allclose(res.obsm["X_zinbwave"], ref.W_, atol=1e-8)
    back = zinbgrad.tl._zinbwave.model_from_anndata(res)
    np.testing.assert_allclose(back.transform(a), ref.transform(a), atol=1e-8)


def test_streamed_layers_check_the_cells_and_genes(tmp_path):
    from zinbgrad.cli.streaming import write_output_layer

    a = _synthetic(n=200, J=30)
    src = tmp_path / "in.h5ad"
    a.write_h5ad(src)
    model = ZINBWaVE(n_components=2, verbose=False).fit(a)
    out = write_output_layer(model, "weights", src, tmp_path / "w.h5ad", "w")
    assert ad.read_h5ad(out).uns["zinbgrad_outputs"]["w"]["output"] == "weights"
    for name, perm in (("genes", a[:, ::-1]), ("cells", a[::-1])):
        p = tmp_path / f"perm_{name}.h5ad"
        perm.copy().write_h5ad(p)
        with pytest.raises(ValueError, match=f"the {name} of"):
            write_output_layer(model, "weights", p, tmp_path / "x.h5ad", "w")
    assert not (tmp_path / "x.h5ad").exists()


def test_resume_refuses_other_data_or_settings(tmp_path, h5):
    ckpt = tmp_path / "k.npz"
    a = ad.read_h5ad(h5)
    a.obs["grp"] = np.where(np.arange(a.n_obs) % 2, "x", "y")
    ZINBWaVE(n_components=2, max_epochs=2).fit(a, batch_key="grp", checkpoint=ckpt)
    cases = [
        (a[::-1].copy(), {"batch_key": "grp"}, {}, "cells"),
        (a, {}, {}, "X_columns"),
        (a, {"batch_key": "grp"}, {"epsilon": 10.0}, "penalty"),
    ]
    for data, fit_kw, est_kw, what in cases:
        with pytest.raises(ValueError, match=f"other data or settings: its .*{what}"):
            ZINBWaVE(n_components=2, max_epochs=4, **est_kw).fit(data, resume=ckpt, **fit_kw)
    resumed = ZINBWaVE(n_components=2, max_epochs=4).fit(a, batch_key="grp", resume=ckpt)
    assert resumed.n_iter_ == 4


def test_files_of_old_anndata_stream_and_convert(tmp_path):
    import h5py

    from zinbgrad.data.convert import to_csr

    a = _synthetic(n=120, J=25)
    for fmt in ("csr", "csc"):
        b = a.copy()
        b.X = sp.csr_matrix(b.X) if fmt == "csr" else sp.csc_matrix(b.X)
        path = tmp_path / f"old_{fmt}.h5ad"
        b.write_h5ad(path)
        with h5py.File(path, "r+") as f:  # X as anndata < 0.7 wrote it
            g = f["X"]
            shape = g.attrs["shape"]
            for k in ("encoding-type", "encoding-version", "shape"):
                del g.attrs[k]
            g.attrs["h5sparse_format"] = fmt
            g.attrs["h5sparse_shape"] = shape
        if fmt == "csc":
            path = to_csr(path, tmp_path / "converted.h5ad")
        m = ZINBWaVE(n_components=2, verbose=False).fit(str(path))
        ref = ZINBWaVE(n_components=2, verbose=False).fit(a)
        np.testing.assert_allclose(m.W_, ref.W_, atol=1e-8)
