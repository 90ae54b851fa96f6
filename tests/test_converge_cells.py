"""The projection's Newton steps with converged cells set aside (``Engine.converge_cells``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import zinbgrad
from zinbgrad.data.counts import SparseCounts
from zinbgrad.planted import make_planted
from zinbgrad.projection import project


def test_take_rows_is_the_row_subset():
    rng = np.random.default_rng(0)
    Y = sp.random(30, 12, density=0.3, random_state=1, format="csr") * 9
    Y.data = np.ceil(Y.data)
    t = torch.as_tensor
    c = SparseCounts.from_csr(
        t(Y.indptr.astype(np.int64)), t(Y.indices.astype(np.int64)), t(Y.data), 12, torch.float64
    )
    keep = t(rng.random(30) < 0.5)
    sub, entries = c.take_rows(keep)
    dense = torch.zeros(sub.n_rows, 12, dtype=torch.float64)
    dense[sub.rows, sub.cols] = sub.values
    np.testing.assert_array_equal(dense.numpy(), Y.toarray()[keep.numpy()])
    torch.testing.assert_close(sub.lgamma_y1, torch.lgamma(sub.values + 1))
    torch.testing.assert_close(c.values[entries], sub.values)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"zero_inflation": False},
        # batch-specific loadings (per-batch cell groups) and a dispersion per batch
        # (per-cell rows of zeta): the parts of the cells' state that are subset
        {"batch_loadings": True, "batch_dispersion": True, "common_dispersion": False},
    ],
)
def test_converge_cells_reaches_the_fully_converged_cells(kw, monkeypatch):
    """Setting converged cells aside ends where plain Newton steps on every cell, many more
    than needed, end (the cells' optimum), and it does set cells aside."""
    adata = make_planted(260, 60, 3, random_state=5, logit_pi=-2.0)
    adata.obs["batch"] = pd.Categorical(np.where(np.arange(260) % 3 == 0, "a", "b"))
    train, new = adata[:200].copy(), adata[200:].copy()
    model = zinbgrad.ZINBWaVE(3, verbose=False, **kw).fit(train, batch_key="batch")
    taken = []
    take_rows = SparseCounts.take_rows

    def spy(self, keep):
        taken.append(int(keep.numel() - keep.sum()))
        return take_rows(self, keep)

    monkeypatch.setattr(SparseCounts, "take_rows", spy)
    params, ll, _ = project(model, new)
    assert sum(taken) > 0  # cells were set aside before the block stopped
    monkeypatch.undo()
    # the reference: the path-followed start, then 60 plain Newton steps on every cell
    _, _, ref = project(model, new, max_steps=0)
    ref_ll = torch.zeros(ref.n, dtype=torch.float64)
    for start, stop, counts in ref.source.iter_blocks(ref.bounds):
        d, _, _ = ref.cell_newton(slice(start, stop), counts, 60)
        ref_ll[start:stop] = d.ll.sum(1)
    np.testing.assert_allclose(ll, ref_ll.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(params.W.numpy(), ref.params.W.numpy(), rtol=0, atol=1e-5)
