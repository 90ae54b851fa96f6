"""Genes and cells without counts in the data at hand (issue 21, item 2).

Genes are left out of the fit by default (one warning, recorded, defined outputs); cells are
refused by default; both are named the same way on every path (in memory, streamed, --nproc).
"""

from __future__ import annotations

import sys
import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import zinbgrad
from zinbgrad import ZINBWaVE, tl
from zinbgrad.cli import main

EMPTY = [3, 10, 57]  # genes emptied in the test data


@pytest.fixture(scope="module")
def data():
    """pbmc_small with three genes emptied (as in a train/test split), and its filtered copy."""
    a = zinbgrad.datasets.pbmc_small()
    X = a.X.toarray()
    X[:, EMPTY] = 0
    a.X = sp.csr_matrix(X)
    keep = np.ones(a.n_vars, dtype=bool)
    keep[EMPTY] = False
    return a, keep


@pytest.fixture(scope="module")
def fits(data):
    a, keep = data
    with pytest.warns(UserWarning, match=r"^3 genes have only zero counts") as rec:
        m = ZINBWaVE(2, verbose=False).fit(a)
    assert len([w for w in rec if "zero counts" in str(w.message)]) == 1  # one warning
    ref = ZINBWaVE(2, verbose=False).fit(a[:, keep].copy())
    return m, ref


def test_genes_without_counts_are_left_out_exactly(data, fits):
    a, keep = data
    m, ref = fits
    # the fit of the other genes is the fit of the data with those genes removed
    np.testing.assert_array_equal(m.W_, ref.W_)
    assert m.objective_ == ref.objective_
    np.testing.assert_array_equal(m.gene_fitted_, keep)
    np.testing.assert_array_equal(m.var_names_, a.var_names[keep])
    np.testing.assert_array_equal(m.var_names_in_, a.var_names)
    assert m.cell_fitted_.all()
    with pytest.raises(ValueError, match=r"3 genes have only zero counts \(" + a.var_names[3]):
        ZINBWaVE(2, empty_genes="error").fit(a)


def test_genes_left_out_have_defined_outputs(data, fits, tmp_path):
    a, keep = data
    m, ref = fits
    b = a.copy()
    with pytest.warns(UserWarning, match="left out of the fit"):
        tl.zinbwave(b, 2, verbose=False)
    np.testing.assert_array_equal(b.var["X_zinbwave_fitted"], keep)
    assert np.isnan(b.varm["X_zinbwave_alpha_mu"][~keep]).all()
    assert np.isnan(b.var["X_zinbwave_zeta"][~keep]).all()
    np.testing.assert_array_equal(b.varm["X_zinbwave_alpha_mu"][keep], ref.alpha_mu_.T)
    tl.impute(b)
    tl.observational_weights(b)
    tl.normalize(b)
    r = ref.get_mu()  # the filtered fit's values on the fitted genes
    assert r.shape == (a.n_obs, keep.sum())
    np.testing.assert_array_equal(b.layers["zinbwave_imputed"][:, ~keep], 0)
    np.testing.assert_array_equal(b.layers["zinbwave_weights"][:, ~keep], 1)
    np.testing.assert_array_equal(b.layers["zinbwave_normalized"][:, ~keep], 0)
    ref_b = a[:, keep].copy()
    tl.observational_weights(ref_b, model=ref)
    np.testing.assert_array_equal(
        b.layers["zinbwave_weights"][:, keep], ref_b.layers["zinbwave_weights"]
    )
    # the model stored in the AnnData and a saved one are the fitted one
    back = tl._zinbwave.model_from_anndata(b)
    np.testing.assert_array_equal(back.gene_fitted_, keep)
    np.testing.assert_array_equal(back.transform(a), m.transform(a))
    loaded = ZINBWaVE.load(m.save(tmp_path / "m.npz"))
    np.testing.assert_array_equal(loaded.gene_fitted_, keep)
    np.testing.assert_array_equal(loaded.transform(a.X), m.transform(a))


def test_projection_ignores_the_genes_left_out(data, fits):
    a, keep = data
    m, _ = fits
    full = zinbgrad.datasets.pbmc_small()  # counts in the genes the fit left out
    assert (np.asarray(full.X[:, EMPTY].sum(0)) > 0).all()
    np.testing.assert_array_equal(m.transform(full), m.transform(full[:, keep].copy()))
    np.testing.assert_array_equal(m.score_samples(full), m.score_samples(full[:, keep].copy()))


def test_streamed_fit_leaves_out_the_same_genes(data, fits, tmp_path):
    a, keep = data
    m, _ = fits
    path = tmp_path / "empty.h5ad"
    a.write_h5ad(path)
    with pytest.warns(UserWarning, match=r"3 genes have only zero counts \(" + a.var_names[3]):
        s = ZINBWaVE(2, verbose=False).fit(str(path))
    np.testing.assert_array_equal(s.gene_fitted_, keep)
    np.testing.assert_allclose(s.W_, m.W_, atol=1e-8)
    # errors name the genes the same way on every path
    msgs = []
    for inp in (a, str(path)):
        with pytest.raises(ValueError) as err:
            ZINBWaVE(2, empty_genes="error").fit(inp)
        msgs.append(str(err.value).split(": ", 1)[-1] if isinstance(inp, str) else str(err.value))
    assert msgs[0] == msgs[1]
    # the CLI, streamed: the var column, and streamed output layers with defined values
    out = tmp_path / "fit.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["fit", str(path), "-o", str(out), "-k", "2", "-q", "--stream"]) == 0
    res = ad.read_h5ad(out)
    np.testing.assert_array_equal(res.var["X_zinbwave_fitted"], keep)
    w = tmp_path / "w.h5ad"
    assert main(["weights", str(out), "-o", str(w), "--stream"]) == 0
    streamed = ad.read_h5ad(w).layers["zinbwave_weights"]
    tl.observational_weights(res)
    np.testing.assert_allclose(streamed, res.layers["zinbwave_weights"], rtol=1e-12)
    np.testing.assert_array_equal(streamed[:, ~keep], 1)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo test on Linux only")
def test_nproc_fit_leaves_out_the_same_genes(data, fits, tmp_path):
    a, keep = data
    m, _ = fits
    path = tmp_path / "empty.h5ad"
    a.write_h5ad(path)
    out = tmp_path / "dist.h5ad"
    assert main(["fit", str(path), "-o", str(out), "-k", "2", "-q", "--nproc", "2"]) == 0
    res = ad.read_h5ad(out)
    np.testing.assert_array_equal(res.var["X_zinbwave_fitted"], keep)
    np.testing.assert_allclose(res.obsm["X_zinbwave"], m.W_, rtol=1e-5, atol=1e-6)
    with pytest.raises(SystemExit):
        main(
            ["fit", str(path), "-o", str(out) + "2", "-q", "--nproc", "2", "--empty-genes", "error"]
        )


def test_cells_without_counts(tmp_path):
    a = zinbgrad.datasets.pbmc_small()
    X = a.X.toarray()
    X[[4, 9]] = 0
    a.X = sp.csr_matrix(X)
    names = f"{a.obs_names[4]}, {a.obs_names[9]}"
    with pytest.raises(ValueError, match=r"^2 cells have only zero counts \(" + names + r"\)"):
        ZINBWaVE(2).fit(a)
    path = tmp_path / "cells.h5ad"
    a.write_h5ad(path)
    with pytest.raises(ValueError, match=r": 2 cells have only zero counts \(" + names + r"\)"):
        ZINBWaVE(2).fit(str(path))
    with pytest.raises(ValueError, match="cannot be left out of a streamed fit"):
        ZINBWaVE(2, empty_cells="exclude").fit(str(path))
    keep = np.ones(a.n_obs, dtype=bool)
    keep[[4, 9]] = False
    b = a.copy()
    with pytest.warns(UserWarning, match="2 cells have only zero counts"):
        m = tl.zinbwave(b, 2, empty_cells="exclude", verbose=False)
    ref = ZINBWaVE(2, verbose=False).fit(a[keep].copy())
    np.testing.assert_array_equal(m.W_, ref.W_)
    np.testing.assert_array_equal(m.cell_fitted_, keep)
    np.testing.assert_array_equal(b.obs["X_zinbwave_fitted"], keep)
    assert np.isnan(b.obsm["X_zinbwave"][~keep]).all()
    tl.impute(b)
    assert np.isnan(b.layers["zinbwave_imputed"][~keep]).all()
    assert np.isfinite(b.layers["zinbwave_imputed"][keep]).all()
