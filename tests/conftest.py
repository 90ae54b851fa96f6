"""Shared fixtures: the ../shared data and R references (tests skip cleanly without them)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# tests never read or build the user's per-machine kernel cache (tests of the cache set their
# own directory); fits of >= 1e6 entries would otherwise start a background builder
os.environ["ZINBGRAD_KERNEL_CACHE"] = "off"


def shared_dir() -> Path:
    env = os.environ.get("ZINBGRAD_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    d = shared_dir()
    if not (d / "data").is_dir():
        pytest.skip(f"shared data directory not found at {d} (set ZINBGRAD_SHARED)")
    return d


def load_reference(shared: Path, name: str) -> dict:
    """An R zinbwave reference run: summary, parameters and the counts it was fitted on."""
    import anndata as ad
    import scipy.sparse as sp

    d = shared / "reference" / name
    if not d.is_dir():
        pytest.skip(f"R reference {name} not found under {shared / 'reference'}")
    summ = json.loads((d / "summary.json").read_text())
    a = ad.read_h5ad(shared / "data" / f"{summ['dataset']}.h5ad")
    X = sp.csr_matrix(a.X)
    keep = np.asarray(X.sum(0)).ravel() > 0
    a = a[:, keep].copy()

    def rd(f: str) -> np.ndarray:
        return np.loadtxt(d / f"{f}.csv.gz", delimiter=",", ndmin=2)

    params = {
        k: rd(k)
        for k in ("W", "alpha_mu", "alpha_pi", "beta_mu", "beta_pi", "gamma_mu", "gamma_pi", "X")
    }
    params["zeta"] = rd("zeta").ravel()
    return {"summary": summ, "adata": a, "params": params, "dir": d}


REFERENCES = [
    "seurat_pbmc_small_K2_commondisp_Xnone",
    "seurat_pbmc_small_K2_genewisedisp_Xbatch",
    "seurat_pbmc_small_K2_genewisedisp_Xnone_nb",
    "zeisel2015_descend_subset_K10_commondisp_Xnone",
    "pbmc8k_scvijl_200genes_K10_commondisp_Xnone",
]
