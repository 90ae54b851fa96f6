"""Write the model files that ``tests/test_persistence.py`` reads back.

They were written by zinbgrad at commit c20a91c (before the fitted state moved into
``zinbgrad.persistence``, issue 16), so that the test proves that files saved by older code
load identically. Rerunning this script overwrites them with the current code's output.

    python tests/data/persistence/make_fixtures.py
"""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

import zinbgrad
from zinbgrad.tl._zinbwave import store_model

HERE = Path(__file__).resolve().parent


def counts(n: int = 40, J: int = 16, seed: int = 0) -> ad.AnnData:
    """Small negative-binomial counts in two batches, with one all-zero gene."""
    rng = np.random.default_rng(seed)
    mu = np.exp(rng.normal(1.0, 0.8, (n, 1)) + rng.normal(0.0, 0.7, (1, J)))
    Y = rng.negative_binomial(2, 2 / (2 + mu)).astype(np.float32)
    Y[:, 3] = 0  # left out of the fit (gene_fitted_)
    Y[Y.sum(1) == 0, 0] = 1
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical(np.repeat(["a", "b"], n // 2)),
            "depth": rng.normal(0.0, 1.0, n),
        },
        index=[f"cell{i}" for i in range(n)],
    )
    return ad.AnnData(Y, obs=obs, var=pd.DataFrame(index=[f"gene{j}" for j in range(J)]))


def main() -> None:
    a = counts()
    batch = zinbgrad.ZINBWaVE(2, batch_loadings=True, solver="full", max_epochs=4, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the all-zero gene is left out, as intended
        batch.fit(a, batch_key="batch")
    batch.save(HERE / "batch_loadings.npz", overwrite=True)
    stored = a.copy()
    store_model(stored, batch)
    stored.write_h5ad(HERE / "batch_loadings.h5ad")

    b = counts(seed=1)[:, [j for j in range(16) if j != 3]].copy()
    offsets = zinbgrad.ZINBWaVE(
        3,
        zero_inflation=False,
        common_dispersion=False,
        epsilon=5.0,
        solver="full",
        max_epochs=3,
        random_state=7,
        verbose=False,
    )
    offsets.fit(b, covariate_keys=["depth"], O_mu=np.log(b.X.sum(1) / b.X.sum(1).mean()))
    offsets.save(HERE / "offsets.npz", overwrite=True)


if __name__ == "__main__":
    main()
