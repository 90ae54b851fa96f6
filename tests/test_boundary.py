"""The API boundary: what users pass in that is subtly wrong, and new cells' covariates.

Each test pins a case found in an audit of the user-facing API, where the library used to
give a wrong result silently or fail late and unclearly.
"""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import zinbgrad
from zinbgrad import ZINBWaVE
from zinbgrad.tl._zinbwave import model_from_anndata


@pytest.fixture(scope="module")
def pbmc():
    a = zinbgrad.datasets.pbmc_small()
    a.obs["b3"] = pd.Categorical(np.array(["A", "B", "C"])[np.arange(a.n_obs) % 3])
    return a


@pytest.fixture(scope="module")
def batch_model(pbmc):
    return ZINBWaVE(2, verbose=False).fit(pbmc, batch_key="b3")


def test_view_of_backed_anndata_fits_the_view_only(pbmc, tmp_path):
    path = tmp_path / "counts.h5ad"
    pbmc.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        m = ZINBWaVE(2, verbose=False).fit(backed[:50, :100])
        assert m.W_.shape == (50, 2) and m.alpha_mu_.shape == (2, 100)
        ref = ZINBWaVE(2, verbose=False).fit(pbmc[:50, :100].copy())
        np.testing.assert_allclose(m.W_, ref.W_)
        assert m.transform(backed[:10, :100]).shape == (10, 2)
    finally:
        backed.file.close()


def test_new_cells_are_encoded_against_the_fitted_batch_levels(pbmc, batch_model):
    m = batch_model
    assert m.X_columns_ == ["intercept", "b3[B]", "b3[C]"]
    W_all = m.transform(pbmc, batch_key="b3")
    # a query without the reference batch, and a query of one batch only: each cell keeps
    # its own batch's design, so its projection equals its row in the projection of all
    for keep in (["B", "C"], ["C"]):
        mask = pbmc.obs["b3"].isin(keep).to_numpy()
        W = m.transform(pbmc[mask].copy(), batch_key="b3")
        np.testing.assert_allclose(W, W_all[mask], atol=1e-8)
    # the batch matters: the same C cells projected as if in the reference batch differ
    mask = (pbmc.obs["b3"] == "C").to_numpy()
    assert np.abs(m.transform(pbmc[mask].copy(), reference_batch=True) - W_all[mask]).max() > 1e-3
    bad = pbmc[:6].copy()
    bad.obs["b3"] = ["A", "B", "D", "A", "B", "D"]
    with pytest.raises(ValueError, match=r"levels the model was not fitted with: D"):
        m.transform(bad, batch_key="b3")
    other = pbmc.copy()
    other.obs["lane"] = other.obs["b3"]
    with pytest.raises(ValueError, match="fitted with batch_key='b3'"):
        m.transform(other, batch_key="lane")


def test_integer_batch_codes_are_levels_not_a_number(pbmc):
    a = pbmc.copy()
    a.obs["b_int"] = np.arange(a.n_obs) % 3
    m = ZINBWaVE(2, verbose=False).fit(a, batch_key="b_int")
    assert m.X_columns_ == ["intercept", "b_int[1]", "b_int[2]"]
    assert m.batch_info_["levels"] == ["0", "1", "2"] and m.batch_info_["reference"] == "0"
    np.testing.assert_array_equal(m.X_[:, 2], (a.obs["b_int"] == 2).to_numpy())


def test_string_covariate_key_means_one_key(pbmc):
    a = ZINBWaVE(2, verbose=False).fit(pbmc, covariate_keys="b3")
    b = ZINBWaVE(2, verbose=False).fit(pbmc, covariate_keys=["b3"])
    assert a.X_columns_ == b.X_columns_ == ["intercept", "b3[B]", "b3[C]"]
    np.testing.assert_array_equal(a.W_, b.W_)


def test_numpy_integer_hyperparameters_save_and_store(pbmc, tmp_path):
    m = ZINBWaVE(np.int64(2), random_state=np.int64(1), verbose=False).fit(pbmc)
    back = ZINBWaVE.load(m.save(tmp_path / "m.npz"))
    assert back.n_components == 2 and back.random_state == 1
    a = pbmc.copy()
    zinbgrad.tl.zinbwave(a, n_components=np.int64(2), verbose=False)
    np.testing.assert_array_equal(model_from_anndata(a).W_, a.obsm["X_zinbwave"])


def test_failed_fit_leaves_no_fitted_state(pbmc):
    m = ZINBWaVE(2, verbose=False)
    with pytest.raises(ValueError, match="O_mu"):
        m.fit(pbmc, batch_key="b3", O_mu=np.ones(5))
    assert not hasattr(m, "batch_info_") and not hasattr(m, "W_")
    # a fitted model keeps its state when a refit fails on its input
    m.fit(pbmc, batch_key="b3")
    info, W = dict(m.batch_info_), m.W_.copy()
    with pytest.raises(ValueError, match="O_mu"):
        m.fit(pbmc, O_mu=np.ones(5))
    assert m.batch_info_ == info and m.X_columns_ == ["intercept", "b3[B]", "b3[C]"]
    np.testing.assert_array_equal(m.W_, W)


def test_reference_subset_to_fewer_genes_keeps_its_path(pbmc):
    a = pbmc.copy()
    model = zinbgrad.tl.zinbwave(a, n_components=2, verbose=False)
    sub = a[:, 30:].copy()
    back = model_from_anndata(sub)
    assert back.fit_path_["zeta"].shape[-1] == 200
    np.testing.assert_array_equal(back.fit_path_["alpha_mu"], model.fit_path_["alpha_mu"][..., 30:])
    q = pbmc[:20, 30:].copy()
    zinbgrad.tl.project(q, sub)
    assert q.obsm["X_zinbwave"].shape == (20, 2) and np.isfinite(q.obsm["X_zinbwave"]).all()


def _tamper(src, dst, **changes):
    z = dict(np.load(src, allow_pickle=False))
    meta = json.loads(str(z["metadata"]))
    for k, v in changes.items():
        if k == "meta":
            v(meta)
        elif v is None:
            del z[k]
        else:
            z[k] = v
    z["metadata"] = np.array(json.dumps(meta))
    np.savez(dst, **z)
    return dst


@pytest.mark.parametrize(
    "changes",
    [
        {"var_names": np.array(["g"] * 10)},
        {"W": np.zeros((80, 3))},
        {"zeta": np.full(230, np.nan)},
        {"zeta": np.zeros(5)},
        {"alpha_mu": None},
        {"meta": lambda m: m.pop("penalty_params")},
        {"meta": lambda m: m["hyperparameters"].update(bogus=1)},
    ],
    ids=["var_names", "W_K", "zeta_nan", "zeta_short", "missing_array", "missing_key", "param"],
)
def test_load_rejects_inconsistent_files(batch_model, tmp_path, changes):
    good = batch_model.save(tmp_path / "good.npz")
    bad = _tamper(good, tmp_path / "bad.npz", **changes)
    with pytest.raises(ValueError, match="not a valid zinbgrad model file"):
        ZINBWaVE.load(bad)


def test_load_rejects_a_non_integer_format_version(batch_model, tmp_path):
    good = batch_model.save(tmp_path / "good.npz")
    bad = _tamper(good, tmp_path / "bad.npz", meta=lambda m: m.update(format_version="x"))
    with pytest.raises(ValueError, match="not a valid zinbgrad model file"):
        ZINBWaVE.load(bad)


def test_score_rejects_unknown_keywords(batch_model, pbmc):
    with pytest.raises(TypeError, match="batch_keys"):
        batch_model.score(pbmc, batch_keys="b3")


def test_unnamed_arrays_must_have_the_model_genes(pbmc):
    m = ZINBWaVE(2, verbose=False).fit(pbmc)
    Y = pbmc.X.toarray()
    np.testing.assert_allclose(m.transform(Y), m.transform(pbmc))
    with pytest.raises(ValueError, match="235 columns but the model has 230 genes"):
        m.transform(np.hstack([Y, Y[:, :5]]))


def test_duplicate_gene_names_cannot_be_aligned(pbmc, batch_model):
    # fitting data with duplicate names is refused (issue 22, test_safety.py); new data with
    # them cannot be aligned by name
    a = pbmc.copy()
    a.var_names = list(a.var_names[:-1]) + [a.var_names[0]]
    with pytest.raises(ValueError, match="not unique"):
        batch_model.transform(a[:, ::-1].copy())


def test_offsets_of_more_than_two_dimensions(pbmc):
    with pytest.raises(ValueError, match="O_mu must have shape"):
        ZINBWaVE(2, verbose=False).fit(pbmc, O_mu=np.ones((80, 230, 1)))


def test_tl_functions_need_an_anndata(pbmc, tmp_path, batch_model):
    with pytest.raises(TypeError, match="must be an AnnData"):
        zinbgrad.tl.zinbwave(str(tmp_path / "x.h5ad"), 2)
    # a model path is accepted (issue 21, item 7): a missing one is named
    with pytest.raises(FileNotFoundError, match="model.npz"):
        zinbgrad.tl.project(pbmc.copy(), str(tmp_path / "model.npz"))
    with pytest.raises(TypeError, match="must be an AnnData"):
        zinbgrad.tl.project(pbmc.X, batch_model)
    with pytest.raises(TypeError, match="must be an AnnData"):
        zinbgrad.tl.normalize(pbmc.X, model=batch_model)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"n_components": True}, "n_components"),
        ({"epsilon": -5.0}, "epsilon must be a finite non-negative"),
        ({"epsilon_W": float("nan")}, "epsilon_W"),
        ({"epsilon_zeta": float("inf")}, "epsilon_zeta must be a finite"),
        ({"local_steps": 0}, "local_steps"),
        ({"solver": "stochastic", "batch_size": 0}, "batch_size"),
        ({"tol": "a"}, "tol"),
        ({"max_epochs": 2.5}, "max_epochs"),
        ({"device": "tpu"}, "device must be"),
        ({"random_state": "x"}, "random_state"),
    ],
)
def test_bad_hyperparameters_are_named(pbmc, params, match):
    with pytest.raises(ValueError, match=match):
        ZINBWaVE(**{"n_components": 2, "verbose": False, **params}).fit(pbmc)


def test_random_state_none_or_randomstate_as_in_sklearn(pbmc, tmp_path):
    a = ZINBWaVE(2, random_state=np.random.RandomState(3), verbose=False).fit(pbmc)
    b = ZINBWaVE(2, random_state=np.random.RandomState(3), verbose=False).fit(pbmc)
    np.testing.assert_array_equal(a.W_, b.W_)
    # None draws its seed from numpy's global state, which the user may seed (scikit-learn)
    fits = []
    for _ in range(2):
        np.random.seed(5)  # noqa: NPY002 - the global state is what None means
        fits.append(ZINBWaVE(2, random_state=None, verbose=False).fit(pbmc))
    np.testing.assert_array_equal(fits[0].W_, fits[1].W_)
    assert ZINBWaVE.load(a.save(tmp_path / "a.npz")).random_state is None


# ------------------------------------------------------------- new cells read the fit's keys
@pytest.fixture(scope="module")
def two_batch():
    """pbmc_small with its two-level ``batch`` column, fitted to convergence with it."""
    a = zinbgrad.datasets.pbmc_small()
    m = ZINBWaVE(2, tol=1e-8, max_epochs=2000, verbose=False).fit(a, batch_key="batch")
    return a, m


def test_new_cells_are_encoded_with_the_fits_batch_by_default(two_batch):
    a, m = two_batch
    W = m.transform(a)
    np.testing.assert_array_equal(W, m.transform(a, batch_key="batch"))
    # the training cells re-projected land on their fitted W (the fit converged to 1e-8:
    # measured 7.6e-4), not where the reference-batch encoding puts them (measured 0.14)
    assert np.abs(W - m.W_).max() < 5e-3
    assert np.abs(m.transform(a, reference_batch=True) - m.W_).max() > 0.05
    per_cell = m.score_samples(a)
    assert per_cell.shape == (a.n_obs,)
    assert m.score(a) == pytest.approx(per_cell.mean(), rel=1e-12)
    assert m.score(a) == m.score(a, batch_key="batch")
    # the fit's own design: the held-out likelihood of the training cells is their fitted one
    assert m.score(a) > m.score(a, reference_batch=True)
    # every output for other cells reads the batch the same way
    q = a[a.obs["batch"] == "g2"].copy()
    assert q.n_obs and (m.X_[(a.obs["batch"] == "g2").to_numpy(), 1] == 1).all()
    np.testing.assert_allclose(m.get_mu(q), m.get_mu(q, batch_key="batch"))
    assert np.abs(m.get_mu(q) - m.get_mu(q, reference_batch=True)).max() > 1e-3


def test_new_cells_without_the_fits_columns_are_refused(two_batch):
    a, m = two_batch
    no_batch = a.copy()
    del no_batch.obs["batch"]
    with pytest.raises(KeyError, match=r"\['batch'\].*reference_batch=True"):
        m.transform(no_batch)
    with pytest.raises(ValueError, match=r"obs columns \['batch'\]"):
        m.transform(a.X)  # a bare matrix has no .obs
    np.testing.assert_array_equal(
        m.transform(no_batch, reference_batch=True), m.transform(a, reference_batch=True)
    )
    Xq = m.X_[:5]  # an explicit X is the other explicit request
    np.testing.assert_array_equal(m.transform(a.X[:5], X=Xq), m.transform(a[:5].copy()))
    with pytest.raises(ValueError, match="not both"):
        m.transform(a, X=m.X_, reference_batch=True)


def test_a_model_without_batch_ignores_a_batch_column(pbmc):
    m = ZINBWaVE(2, verbose=False).fit(pbmc)
    shuffled = pbmc.copy()
    shuffled.obs["batch"] = shuffled.obs["batch"].to_numpy()[::-1]
    np.testing.assert_array_equal(m.transform(pbmc), m.transform(shuffled))
    assert m.fit_keys() == (None, [])


def test_covariates_of_the_fit_are_read_from_new_cells(pbmc):
    a = pbmc.copy()
    a.obs["depth"] = np.log(np.asarray(a.X.sum(1)).ravel())
    m = ZINBWaVE(2, verbose=False).fit(a, batch_key="b3", covariate_keys=["depth"])
    assert m.fit_keys() == ("b3", ["depth"])
    Xq = m.encode_cells(a.obs, a.n_obs)
    np.testing.assert_array_equal(Xq, m.X_)  # the training cells' own design back
    zero = a.copy()
    zero.obs["depth"] = 0.0
    assert np.abs(m.transform(a) - m.transform(zero)).max() > 1e-3
    with pytest.raises(ValueError, match="covariate_keys=\\['other'\\]"):
        m.transform(a, covariate_keys=["other"])
    # a model file written before the keys were recorded: they are read off its columns
    m.batch_info_ = {k: v for k, v in m.batch_info_.items() if k != "covariate_keys"}
    assert m.fit_keys() == ("b3", ["depth"])


def test_stored_and_saved_models_project_with_the_fits_batch(two_batch, tmp_path):
    a, m = two_batch
    ref = a.copy()
    zinbgrad.tl._zinbwave.store_model(ref, m)
    q = a[:30].copy()
    zinbgrad.tl.project(q, ref)
    np.testing.assert_allclose(q.obsm["X_zinbwave"], m.transform(a[:30].copy()))
    path = m.save(tmp_path / "m.npz")
    q2 = a[:30].copy()
    zinbgrad.tl.project(q2, str(path))  # a model path, as on the command line
    np.testing.assert_array_equal(q2.obsm["X_zinbwave"], q.obsm["X_zinbwave"])
    q3 = a[:30].copy()
    zinbgrad.tl.project(q3, path, reference_batch=True)
    assert q3.uns["zinbgrad_outputs"]["X_zinbwave"]["reference_batch"]
    assert np.abs(q3.obsm["X_zinbwave"] - q.obsm["X_zinbwave"]).max() > 1e-3
