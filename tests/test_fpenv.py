"""Flush-to-zero during fits: every compute thread, restored afterwards."""

import pytest
import torch

from zinbgrad.optim import fpenv


def _denormal_results(n_threads: int) -> int:
    """How many entries of a parallel elementwise product stay denormal (nonzero)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        x = torch.full((4_000_000,), 1e-37, dtype=torch.float32)
        return int(((x * 1e-3) != 0).sum())
    finally:
        torch.set_num_threads(before)


def test_flush_denormals_reaches_every_thread_and_is_restored():
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no flush-to-zero mode")
    fpenv.set_all_threads(False)
    assert _denormal_results(2) == 4_000_000  # denormals kept by default
    assert not fpenv.flushing()
    with fpenv.flush_denormals():
        assert fpenv.flushing()
        if fpenv._libgomp() is None:
            pytest.skip("torch does not use libgomp here: only the calling thread is set")
        assert _denormal_results(2) == 0  # every OpenMP thread flushes
    assert not fpenv.flushing()
    assert _denormal_results(2) == 4_000_000


def test_flush_denormals_can_be_disabled(monkeypatch):
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no flush-to-zero mode")
    monkeypatch.setenv("ZINBGRAD_FTZ", "0")
    with fpenv.flush_denormals():
        assert not fpenv.flushing()
    with fpenv.flush_denormals(enabled=False):
        assert not fpenv.flushing()
