"""The per-machine cache of fused kernels compiled ahead of time (model/kernel_cache.py) and the
``fused`` rule of a fit (runtime.resolve_fused)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch

from test_likelihood import _extreme_block
from zinbgrad import runtime
from zinbgrad.model import kernel_cache, kernels
from zinbgrad.model.likelihood import _TERMS, entry_derivatives

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty kernel cache in ``tmp_path`` and a clean per-process registry."""
    monkeypatch.setenv("ZINBGRAD_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv("ZINBGRAD_FUSED", raising=False)
    monkeypatch.setattr(kernel_cache, "_loaded", {})
    monkeypatch.setattr(kernel_cache, "_requested", set())
    monkeypatch.setattr(kernel_cache, "_builder", [])
    monkeypatch.setattr(kernels, "_fused_failure", None)
    monkeypatch.setattr(kernels, "_compiled", {})
    d = kernel_cache.cache_dir()
    assert d is not None and d.parent == tmp_path
    return d


def test_resolve_fused_rule(monkeypatch, tmp_path):
    monkeypatch.delenv("ZINBGRAD_KERNEL_CACHE", raising=False)
    # without the opt-in cache, CPU fits below FUSED_MIN_ENTRIES run eagerly (bitwise as ever)
    assert runtime.resolve_fused("auto", CPU, runtime.FUSED_CACHED_MIN_ENTRIES) is False
    monkeypatch.setenv("ZINBGRAD_KERNEL_CACHE", str(tmp_path))
    small, mid, large = (
        runtime.FUSED_CACHED_MIN_ENTRIES - 1,
        runtime.FUSED_CACHED_MIN_ENTRIES,
        runtime.FUSED_MIN_ENTRIES,
    )
    assert runtime.resolve_fused("auto", CPU, small) is False
    assert runtime.resolve_fused("auto", CPU, mid) == kernels.CACHED
    assert runtime.resolve_fused("auto", CPU, large) is True
    gpu = torch.device("cuda")
    assert runtime.resolve_fused("auto", gpu, mid) is False  # the cache serves the CPU only
    assert runtime.resolve_fused("auto", gpu, large) is True
    assert runtime.resolve_fused(True, CPU, 10) is True
    assert runtime.resolve_fused(False, CPU, large) is False


def test_cache_dir_env(monkeypatch, tmp_path):
    # opt-in: unset, empty or off means no cache (no lookups, no builder)
    for value in ("off", "", "0"):
        monkeypatch.setenv("ZINBGRAD_KERNEL_CACHE", value)
        assert kernel_cache.cache_dir() is None
    monkeypatch.delenv("ZINBGRAD_KERNEL_CACHE")
    assert kernel_cache.cache_dir() is None
    monkeypatch.setenv("ZINBGRAD_KERNEL_CACHE", "on")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    d = kernel_cache.cache_dir()
    assert d.parent == tmp_path / "zinbgrad" / "kernels"
    assert d.name.startswith(f"torch-{torch.__version__}-")
    monkeypatch.setenv("ZINBGRAD_KERNEL_CACHE", str(tmp_path / "mine"))
    assert kernel_cache.cache_dir().parent == tmp_path / "mine"


class _FakeBuilder:
    started: list = []

    def __init__(self, args, **kw):
        self.args = args
        _FakeBuilder.started.append(self)

    def poll(self):
        return None  # still running


def test_cached_request_queues_one_build_and_evaluates_eagerly(cache, monkeypatch):
    """``fused="cached"`` without a built kernel: eager values, no torch.compile, the kernel
    queued once (a picklable spec that the builder can evaluate) and one builder started."""
    _FakeBuilder.started = []
    monkeypatch.setattr(subprocess, "Popen", _FakeBuilder)
    a, b, zeta, counts, _ = _extreme_block(torch.float32)
    ref = entry_derivatives(a, b, zeta, counts, order=2, fused=False)
    got = entry_derivatives(a, b, zeta, counts, order=2, fused="cached")
    got0 = entry_derivatives(a, b, zeta, counts, order=0, fused="cached")
    entry_derivatives(a, b, zeta, counts, order=2, fused="cached")  # asked once only
    for name in _TERMS:
        x, y = getattr(got, name), getattr(ref, name)
        assert (x is None and y is None) or torch.equal(x, y)
    assert torch.equal(got0.ll, ref.ll)
    assert kernels._compiled == {}  # nothing compiled in this process
    specs = sorted((cache / "queue").glob("*.pkl"))
    assert [p.stem.split("-")[0] for p in specs] == ["block_terms_zinb_o0", "block_terms_zinb_o2"]
    assert len(_FakeBuilder.started) == 1  # the running builder takes the second one too
    args = _FakeBuilder.started[0].args
    assert args[1:4] == ["-m", "zinbgrad.model.kernel_cache", str(cache)]
    assert args[4] == str(os.getpid())  # it waits until this process is idle or gone
    spec = pickle.loads(specs[1].read_bytes())
    dense, sparse = spec["fn"](
        a, b, zeta, counts.flat, counts.cols, counts.values, counts.lgamma_y1 * 0, None, None
    )
    assert spec["sig"][0] == ("float32", "cpu", "nJ") and spec["sig"][-1] is None
    assert dense[0].shape == a.shape and sparse[0].shape == counts.values.shape


def test_wait_until_idle_returns_for_an_idle_or_finished_process():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    kernel_cache.wait_until_idle(child.pid, window=0.2)  # idle (sleeping), then gone
    child.wait()
    kernel_cache.wait_until_idle(child.pid, window=0.2)  # gone
    kernel_cache.wait_until_idle(0)


def _tiny_kernel(x, y, z):
    """A kernel with ``None`` among its arguments and nested outputs, for the builder."""
    return (x * 2.0, None, (y.sum() + x, (z - 1.0) if z is not None else None))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from torch internals (inductor)
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_build_load_and_run_a_package(cache):
    """The builder's export + AOTInductor package of a small kernel: found by the lookup,
    loaded without torch.compile, run at sizes other than the export's, with its output's
    nesting and ``None`` entries restored."""
    if not kernels.fusion_available("cpu"):
        pytest.skip("no C++ compiler / inductor here")
    x, y = torch.rand(5, 3, dtype=torch.float64), torch.rand(7, dtype=torch.float64)
    sig = kernel_cache.signature((x, y, None), ("nJ", "k", None))
    assert kernel_cache.lookup("tiny", sig) is None
    kernel_cache.build(cache, "tiny", _tiny_kernel, sig)
    kernel_cache._loaded.clear()  # a new process
    kernel = kernel_cache.lookup("tiny", sig)
    for n, k in ((5, 7), (11, 2)):
        x, y = torch.rand(n, 3, dtype=torch.float64), torch.rand(k, dtype=torch.float64)
        got, want = kernel(x, y, None), _tiny_kernel(x, y, None)
        assert got[1] is None and got[2][1] is None
        torch.testing.assert_close(got[0], want[0], rtol=1e-15, atol=0)
        torch.testing.assert_close(got[2][0], want[2][0], rtol=1e-14, atol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from torch internals (inductor)
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_built_kernel_matches_eager_at_other_sizes(cache, monkeypatch):
    """A likelihood kernel built ahead of time (here in this process, as the background
    builder does) is found by the next lookup and agrees with eager evaluation on extreme
    values, on blocks of sizes other than those it was exported with (dynamic sizes).

    Builds the order-0 dispersion kernel (the series branch of theta k included): 12 s on 2
    idle CPU cores with inductor's cache warm, slower cold. ``ZINBGRAD_TEST_BUILD=0`` skips
    it."""
    if os.environ.get("ZINBGRAD_TEST_BUILD") == "0":
        pytest.skip("ZINBGRAD_TEST_BUILD=0: no likelihood kernel built")
    if not kernels.fusion_available("cpu"):
        pytest.skip("no C++ compiler / inductor here")
    monkeypatch.setattr(kernel_cache, "_start_builder", _FakeBuilder)
    a, b, zeta, counts, scale = _extreme_block(torch.float32)
    kw = dict(order=0, dispersion=True)
    entry_derivatives(a, b, zeta, counts, fused="cached", **kw)  # queues the build
    assert kernel_cache.build_queued(cache) == 1
    assert not list((cache / "queue").glob("*.pkl")) and not list(cache.glob("*.failed"))
    monkeypatch.setattr(kernel_cache, "_loaded", {})  # a new process
    for rows in (slice(None), slice(3, 29)):
        sub = _sub_block(a, b, counts, rows)
        got = entry_derivatives(sub[0], sub[1], zeta, sub[2], fused="cached", **kw)
        assert kernels._fused_failure is None and kernels._compiled == {}
        ref = entry_derivatives(sub[0], sub[1], zeta, sub[2], fused=False, **kw)
        for name in ("ll", "lz", "lzz"):
            e, f = getattr(ref, name).double(), getattr(got, name).double()
            fin = torch.isfinite(e)
            assert torch.equal(fin, torch.isfinite(f)), name
            err = (f - e).abs()[fin] / (e.abs() + scale[rows])[fin]
            assert float(err.max()) <= 1e-5, (name, float(err.max()))


def _sub_block(a, b, counts, rows):
    """Rows ``rows`` of a block and its counts."""
    from zinbgrad.model.likelihood import SparseCounts

    lo, hi = rows.start or 0, rows.stop or a.shape[0]
    keep = (counts.rows >= lo) & (counts.rows < hi)
    v = counts.values[keep]
    sub = SparseCounts(
        hi - lo, a.shape[1], counts.rows[keep] - lo, counts.cols[keep], v, counts.lgamma_y1[keep]
    )
    return a[lo:hi].contiguous(), b[lo:hi].contiguous(), sub
