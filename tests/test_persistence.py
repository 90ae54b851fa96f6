"""The fitted state round-trips through every way in and out (zinbgrad.persistence).

The files under tests/data/persistence were written by zinbgrad before the state moved into
``zinbgrad.persistence`` (make_fixtures.py says how): they must load identically, and what
the current code writes must hold the same arrays and metadata (so older zinbgrad reads it).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import zinbgrad
from zinbgrad import ZINBWaVE, persistence
from zinbgrad.persistence import FITTED_ATTRIBUTES, HISTORY_COLUMNS, PARAMETERS

DATA = Path(__file__).resolve().parent / "data" / "persistence"
FILES = ["batch_loadings.npz", "offsets.npz"]


def same(a, b) -> bool:
    """Equal values of the same types (arrays: same dtype and shape, NaN equal to NaN)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return type(a) is type(b) and a == b


#: hyper-parameters added after the fixture files were written, at their defaults: the current
#: code writes them too (issue 17: batch_dispersion), and nothing else differs
NEW_HYPERPARAMETERS = {"batch_dispersion": False}


def _as_before(params: dict) -> dict:
    """Hyper-parameters as written now, less :data:`NEW_HYPERPARAMETERS` (checked)."""
    params = dict(params)
    for k, v in NEW_HYPERPARAMETERS.items():
        assert params.pop(k) == v, k
    return params


def differing(m1, m2, names=FITTED_ATTRIBUTES) -> list[str]:
    """The fitted attributes (of ``names``) on which two models differ."""
    return [k for k in names if not same(getattr(m1, k), getattr(m2, k))]


def test_the_list_is_every_fitted_attribute():
    """FITTED_ATTRIBUTES is what fit sets (every attribute ending in "_"); each way in sets
    all of them, and a state without one of them is refused."""
    stored = ad.read_h5ad(DATA / "batch_loadings.h5ad")
    counts = ad.AnnData(stored.X[:, [0, 1, 2, 4, 5]], obs=stored.obs[["batch"]])
    fitted = ZINBWaVE(1, max_epochs=2, verbose=False).fit(counts, batch_key="batch")
    assert {k for k in vars(fitted) if k.endswith("_")} == set(FITTED_ATTRIBUTES)
    old = ZINBWaVE.load(DATA / "offsets.npz")
    built = ZINBWaVE.from_params(
        W=old.W_, alpha_mu=old.alpha_mu_, beta_mu=old.beta_mu_[:1], gamma_mu=old.gamma_mu_,
        zeta=old.zeta_,
    )  # fmt: skip
    for m in (old, zinbgrad.tl.model_from_anndata(stored), built):
        assert {k for k in vars(m) if k.endswith("_")} == set(FITTED_ATTRIBUTES)
    state = persistence.get_state(old)
    with pytest.raises(ValueError, match=r"missing \['zeta_'\]"):
        persistence.set_state(ZINBWaVE(3), {k: v for k, v in state.items() if k != "zeta_"})
    with pytest.raises(ValueError, match=r"unknown \['foo_'\]"):
        persistence.set_state(ZINBWaVE(3), state | {"foo_": 1})


@pytest.mark.parametrize("name", FILES)
def test_files_saved_before_load_identically_and_save_the_same(name, tmp_path):
    before = np.load(DATA / name, allow_pickle=False)
    meta = json.loads(str(before["metadata"]))
    model = ZINBWaVE.load(DATA / name)
    for k in (*PARAMETERS, "X", "V", "var_names", "obs_names", "delta_mu", "O_mu"):
        if k in before.files:  # every array is the file's
            assert same(getattr(model, k + "_"), before[k]), k
    assert model.get_params() == ZINBWaVE(**meta["hyperparameters"]).get_params()
    for k in ("X_columns", "batch_info", "penalty_params", "history", "loglik", "n_params"):
        assert same(getattr(model, k + "_"), meta[k]), k
    assert model.aic_ == 2.0 * meta["n_params"] - 2.0 * meta["loglik"]
    # what the current code writes: the same arrays, bitwise, and the same metadata
    after = np.load(model.save(tmp_path / name), allow_pickle=False)
    assert after.files == before.files
    changed = [k for k in before.files if not same(after[k], before[k])]
    assert changed in ([], ["metadata"])
    meta_now = json.loads(str(after["metadata"]))
    meta_now["hyperparameters"] = _as_before(meta_now["hyperparameters"])
    assert meta_now == meta
    # ... and it loads back identically
    assert differing(ZINBWaVE.load(tmp_path / name), model) == []


def _elements(adata: ad.AnnData) -> dict:
    """Every element of an AnnData, as plain values (``uns`` entries as dicts)."""
    return {
        "obsm": dict(adata.obsm),
        "varm": dict(adata.varm),
        "uns": {k: dict(v) for k, v in adata.uns.items()},
        "obs": {k: np.asarray(v) for k, v in adata.obs.items()},
        "var": {k: np.asarray(v) for k, v in adata.var.items()},
    }


def test_anndata_stored_before_loads_identically_and_stores_the_same(tmp_path):
    stored = ad.read_h5ad(DATA / "batch_loadings.h5ad")
    model = zinbgrad.tl.model_from_anndata(stored)
    from_file = ZINBWaVE.load(DATA / "batch_loadings.npz")  # the same fit
    # an AnnData holds the main columns of the history only
    assert differing(model, from_file, [k for k in FITTED_ATTRIBUTES if k != "history_"]) == []
    assert model.history_ == [{k: h[k] for k in HISTORY_COLUMNS} for h in from_file.history_]
    # the current code writes the same elements into the same file layout, from either
    for m in (from_file, model):
        fresh = ad.AnnData(stored.X, obs=stored.obs[["batch", "depth"]], var=stored.var[[]])
        persistence.store_model(fresh, m)
        fresh.write_h5ad(tmp_path / "now.h5ad")
        now = ad.read_h5ad(tmp_path / "now.h5ad")
        elements, before = _elements(now), _elements(stored)
        for el in (elements, before):
            el["uns"]["X_zinbwave"]["params"] = json.loads(el["uns"]["X_zinbwave"]["params"])
        elements["uns"]["X_zinbwave"]["params"] = _as_before(
            elements["uns"]["X_zinbwave"]["params"]
        )
        assert same(elements, before)
        assert differing(zinbgrad.tl.model_from_anndata(now), model) == []


@pytest.mark.parametrize("name", FILES)
def test_from_params_rebuilds_a_saved_model(name, tmp_path):
    """from_params with a saved model's parameters and design gives its parameters, design
    and penalties (zinbwave's model: without loading offsets); the model it builds
    round-trips through a file and an AnnData."""
    m = ZINBWaVE.load(DATA / name)
    built = ZINBWaVE.from_params(
        **{k: getattr(m, k + "_") for k in PARAMETERS},
        X=m.X_, V=m.V_, X_columns=m.X_columns_, var_names=m.var_names_, obs_names=m.obs_names_,
        **persistence.hyperparameters(m) | {"batch_loadings": False},
    )  # fmt: skip
    given = [k + "_" for k in (*PARAMETERS, "X", "V", "X_columns", "var_names", "obs_names")]
    assert differing(built, m, [*given, "n_features_in_"]) == []
    no_delta = {k: v for k, v in m.penalty_params_.items() if k != "epsilon_delta"}
    assert built.penalty_params_ == no_delta
    extra = 0 if m.delta_mu_ is None else m.delta_mu_.size
    assert built.n_params_ == m.n_params_ - extra
    assert np.isnan(built.loglik_) and np.isnan(built.aic_) and built.history_ == []
    assert differing(ZINBWaVE.load(built.save(tmp_path / "built")), built) == []
    a = ad.AnnData(np.zeros((len(built.obs_names_), len(built.var_names_)), dtype=np.float32))
    a.obs_names, a.var_names = built.obs_names_, built.var_names_
    persistence.store_model(a, built)
    back = zinbgrad.tl.model_from_anndata(a)
    # an AnnData holds no offsets
    assert differing(back, built, [k for k in FITTED_ATTRIBUTES if k[:2] != "O_"]) == []


def test_a_stale_fit_path_is_dropped_with_a_warning():
    """Genes subset after the fit but not in the stored path: the model is rebuilt without
    its fit path (new cells then start from zinbwave's initialization)."""
    stored = ad.read_h5ad(DATA / "batch_loadings.h5ad")
    stored.uns["X_zinbwave"]["fit_path_var_names"] = np.array(["x"] * 15)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = zinbgrad.tl.model_from_anndata(stored)
    assert model.fit_path_ is None
    assert any("not a subset of the fitted genes" in str(w.message) for w in caught)
