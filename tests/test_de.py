"""Tests of zinbgrad.de: the weighted NB GLM and zinbwave/edgeR's glmWeightedF in Python."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import optimize, special, stats

from zinbgrad.de import (
    _bh,
    _locfit_deg0,
    _maximize_interpolant,
    calc_norm_factors,
    differential_expression,
    estimate_disp,
    glm_weighted_f,
    weighted_nb_glm,
)

# --------------------------------------------------------------------------- shared data


def _shared_dir() -> Path:
    env = os.environ.get("ZINBGRAD_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


GOLDEN = "reference/seurat_pbmc_small_de_edger_cell_type"


@pytest.fixture(scope="module")
def golden():
    """The R edgeR 3.40.2 + zinbwave glmWeightedF reference on seurat_pbmc_small."""
    root = _shared_dir()
    ref = root / GOLDEN
    h5ad = root / "data" / "seurat_pbmc_small.h5ad"
    if not (ref / "de_table.csv.gz").exists() or not h5ad.exists():
        pytest.skip(
            f"shared reference data not found under {root} "
            "(set ZINBGRAD_SHARED to the folder holding data/ and reference/)"
        )
    adata = ad.read_h5ad(h5ad)
    weights = np.loadtxt(ref / "observational_weights.csv.gz", delimiter=",")
    table = pd.read_csv(ref / "de_table.csv.gz")
    norm = pd.read_csv(ref / "norm_factors.csv.gz", index_col=0)
    summary = json.loads((ref / "summary.json").read_text())
    return adata, weights, table, norm, summary


# --------------------------------------------------------------------------- golden: R edgeR


def test_golden_tmm_norm_factors(golden):
    adata, _, _, norm, _ = golden
    assert list(norm.index) == list(adata.obs_names)
    nf = calc_norm_factors(adata.X)
    np.testing.assert_allclose(nf, norm["norm.factors"].to_numpy(), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(adata.X.sum(axis=1)).ravel(), norm["lib.size"])


def test_golden_glm_weighted_f_matches_edger(golden):
    adata, weights, table, _, summary = golden
    x_before = adata.X.copy()
    adata.layers["zinbwave_weights"] = weights
    res = differential_expression(
        adata,
        "cell_type",
        group="1",
        reference="0",
        weights_layer="zinbwave_weights",
    )
    # adata.X untouched, results stored
    assert (adata.X != x_before).nnz == 0
    assert adata.uns["zinbgrad_de"] is res
    params = adata.uns["zinbgrad_de_params"]
    assert params["design_columns"] == ["(Intercept)", "cell_type1", "cell_type2"]
    assert params["tested_coefficient"] == "cell_type1"
    assert list(res.index) == list(table["gene"]) == list(adata.var_names)

    # common dispersion (edgeR: 1.36343834049276); achieved ~5e-15 relative
    assert params["common_dispersion"] == pytest.approx(summary["common_dispersion"], rel=1e-10)
    # log fold changes (edgeR's prior-count shrunk coefficients); achieved 3e-11
    np.testing.assert_allclose(res["log2_fold_change"], table["logFC"], rtol=0, atol=1e-8)
    # average log-CPM; achieved 5e-14
    np.testing.assert_allclose(res["logCPM"], table["logCPM"], rtol=0, atol=1e-10)
    # likelihood ratio; achieved 3e-9 relative (Newton tolerance 1e-10 of the fits)
    np.testing.assert_allclose(res["statistic"], table["LR"], rtol=1e-7, atol=1e-8)
    # p-values and adjusted p-values; achieved 1.3e-8 relative
    np.testing.assert_allclose(res["pvalue"], table["PValue"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(res["padj"], table["FDR"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(res["padj_filter"], table["padjFilter"], rtol=1e-6, atol=0)
    # identical significant set: 114 genes at FDR < 0.05
    ours = set(res.index[res["padj"] < 0.05])
    theirs = set(table["gene"][table["FDR"] < 0.05])
    assert ours == theirs
    assert len(ours) == summary["n_significant_fdr05"] == 114


def test_golden_dispersion_estimate_and_sparse_input(golden):
    adata, weights, table, _, summary = golden
    lab = adata.obs["cell_type"].astype(str).to_numpy()
    design = np.column_stack([np.ones(adata.n_obs), lab == "1", lab == "2"]).astype(float)
    est = estimate_disp(adata.X, design, weights=weights)
    assert est.common == pytest.approx(summary["common_dispersion"], rel=1e-10)
    assert np.all(est.tagwise > 0) and est.trended is not None
    assert est.selected.sum() == 225  # 5 genes have fewer than 5 counts
    # the engine on a dense copy gives the same table as on the sparse matrix
    dense = glm_weighted_f(adata.X.toarray(), design, 1, weights=weights)
    sparse = glm_weighted_f(adata.X, design, 1, weights=weights)
    pd.testing.assert_frame_equal(dense, sparse)
    np.testing.assert_allclose(sparse["statistic"].to_numpy(), table["LR"], rtol=1e-7, atol=1e-8)


# --------------------------------------------------------------------------- IRLS vs reference


def _neg_loglik(beta, x, y, w, off, phi):
    mu = np.exp(x @ beta + off)
    r = 1.0 / phi
    return -np.sum(w * (special.xlogy(y, mu) - (y + r) * np.log(mu + r) + r * np.log(r)))


def _score(beta, x, y, w, off, phi):
    mu = np.exp(x @ beta + off)
    return -x.T @ (w * (y - mu) / (1.0 + phi * mu))


def _observed_info(beta, x, y, w, off, phi):
    mu = np.exp(x @ beta + off)
    return x.T @ ((w * mu * (1.0 + phi * y) / (1.0 + phi * mu) ** 2)[:, None] * x)


@pytest.mark.parametrize("layout", ["continuous", "oneway"])
def test_vectorized_irls_equals_per_gene_optimizer(layout):
    rng = np.random.default_rng(11)
    n, g = 60, 30
    if layout == "continuous":  # Levenberg-damped Fisher scoring path
        x = np.column_stack([np.ones(n), rng.normal(size=n), rng.integers(0, 2, n)])
    else:  # exact group-wise Newton path
        grp = np.repeat([0, 1, 2], n // 3)
        x = np.column_stack([np.ones(n), grp == 1, grp == 2]).astype(float)
    beta = np.column_stack([rng.normal(1.5, 0.5, g), rng.normal(0, 0.5, (g, x.shape[1] - 1))])
    lib = rng.uniform(0.5, 2.0, n)
    mu = np.exp(x @ beta.T + np.log(lib)[:, None])
    phi = rng.uniform(0.05, 1.0, g)
    y = rng.negative_binomial(1.0 / phi, 1.0 / (1.0 + mu * phi)).astype(float)
    w = np.where(y == 0, rng.uniform(0.01, 1.0, y.shape), 1.0)

    fit = weighted_nb_glm(y, x, weights=w, offset=np.log(lib), dispersion=phi)
    assert fit.method == ("levenberg" if layout == "continuous" else "oneway")
    assert fit.converged.all()
    assert fit.coefficients.shape == (g, x.shape[1]) and fit.fitted.shape == (n, g)
    np.testing.assert_allclose(fit.df_residual, w.sum(axis=0) - x.shape[1])
    for j in range(8):
        args = (x, y[:, j], w[:, j], np.log(lib), phi[j])
        ref = optimize.minimize(
            _neg_loglik,
            np.zeros(x.shape[1]),
            args=args,
            jac=_score,
            hess=_observed_info,
            method="trust-exact",
            options={"gtol": 1e-12},
        )
        b_ref = ref.x
        for _ in range(3):  # polish with full Newton steps on the observed information
            b_ref = b_ref - np.linalg.solve(_observed_info(b_ref, *args), _score(b_ref, *args))
        assert np.max(np.abs(_score(b_ref, *args))) < 1e-8
        np.testing.assert_allclose(fit.coefficients[j], b_ref, rtol=0, atol=2e-8)
        assert np.max(np.abs(_score(fit.coefficients[j], *args))) < 1e-6
        # weighted deviance = 2 * weighted (saturated - fitted) log-likelihood
        mu_j = fit.fitted[:, j]
        size = 1.0 / phi[j]
        ll_fit = stats.nbinom.logpmf(y[:, j], size, size / (size + mu_j))
        ll_sat = stats.nbinom.logpmf(y[:, j], size, size / (size + y[:, j]))
        dev = 2.0 * np.sum(w[:, j] * (ll_sat - ll_fit))
        assert fit.deviance[j] == pytest.approx(dev, rel=1e-6, abs=1e-6)


def test_unit_weights_equal_unweighted_fit():
    rng = np.random.default_rng(3)
    y = rng.poisson(4.0, size=(40, 12)).astype(float)
    x = np.column_stack([np.ones(40), rng.normal(size=40)])
    a = weighted_nb_glm(y, x, dispersion=0.2)
    b = weighted_nb_glm(y, x, weights=np.ones_like(y), dispersion=0.2)
    np.testing.assert_array_equal(a.coefficients, b.coefficients)
    np.testing.assert_array_equal(a.deviance, b.deviance)


# --------------------------------------------------------------------------- planted DE


def _simulate_zinb(seed: int, n_per: int = 100, n_genes: int = 1000, frac_de: float = 0.1):
    """Two groups, NB counts with planted log2 fold changes, then excess (dropout) zeros."""
    rng = np.random.default_rng(seed)
    n = 2 * n_per
    grp = np.repeat([0, 1], n_per)
    lib = rng.lognormal(0.0, 0.3, n)
    base = np.exp(rng.uniform(0.0, np.log(30.0), n_genes))
    phi = rng.uniform(0.05, 0.5, n_genes)
    lfc = np.zeros(n_genes)
    de_idx = rng.choice(n_genes, int(n_genes * frac_de), replace=False)
    lfc[de_idx] = rng.choice([-1.0, 1.0], de_idx.size) * rng.uniform(0.7, 1.5, de_idx.size)
    mu = lib[:, None] * base[None, :] * 2.0 ** (lfc[None, :] * grp[:, None])
    y = rng.negative_binomial(1.0 / phi, 1.0 / (1.0 + mu * phi)).astype(float)
    pi = np.broadcast_to(rng.uniform(0.1, 0.6, n_genes), (n, n_genes))
    y[rng.random((n, n_genes)) < pi] = 0.0
    nb0 = (1.0 + phi * mu) ** (-1.0 / phi)
    weights = np.where(y == 0, (1.0 - pi) * nb0 / (pi + (1.0 - pi) * nb0), 1.0)
    weights = np.maximum(weights, 1e-15)  # as zinbwave's computeObservationalWeights
    design = np.column_stack([np.ones(n), grp]).astype(float)
    return y, weights, design, lfc


def test_planted_de_fdr_power_and_fold_changes():
    y, weights, design, lfc = _simulate_zinb(seed=0)
    truth = lfc != 0
    weighted = glm_weighted_f(y, design, 1, weights=weights)
    unweighted = glm_weighted_f(y, design, 1)

    def fdr_power(res):
        sig = res["padj"].to_numpy() < 0.05
        return (sig & ~truth).sum() / max(sig.sum(), 1), (sig & truth).sum() / truth.sum()

    fdr_w, power_w = fdr_power(weighted)
    fdr_u, power_u = fdr_power(unweighted)
    # observed FDR of the weighted test is near the nominal 0.05 (0.031 here)
    assert fdr_w <= 0.08
    # the weights recover power lost to the excess zeros (0.93 vs 0.72 here)
    assert power_w >= power_u + 0.1
    assert power_w >= 0.85
    # null genes: weighted p-values are not anti-conservative
    null_p = weighted["pvalue"].to_numpy()[~truth]
    assert np.mean(null_p < 0.05) <= 0.08
    # planted log2 fold changes are recovered, better with the weights
    est_w = weighted["log2_fold_change"].to_numpy()
    est_u = unweighted["log2_fold_change"].to_numpy()
    err_w = np.abs(est_w[truth] - lfc[truth])
    err_u = np.abs(est_u[truth] - lfc[truth])
    assert np.corrcoef(est_w[truth], lfc[truth])[0, 1] > 0.97
    assert np.median(err_w) < 0.2
    assert np.median(err_w) < np.median(err_u)
    assert np.std(est_w[~truth]) < np.std(est_u[~truth])
    # F denominator df reflect the down-weighted zeros
    assert np.all(weighted["df_total"] < unweighted["df_total"] + 1e-9)


def test_common_dispersion_recovered_without_zero_inflation():
    rng = np.random.default_rng(5)
    n, g, phi = 120, 400, 0.3
    grp = np.repeat([0, 1], n // 2)
    mu = np.exp(rng.uniform(0.5, 3.5, g))[None, :] * rng.uniform(0.7, 1.4, n)[:, None]
    y = rng.negative_binomial(1.0 / phi, 1.0 / (1.0 + mu * phi))
    design = np.column_stack([np.ones(n), grp]).astype(float)
    est = estimate_disp(sp.csr_matrix(y), design)
    assert est.common == pytest.approx(phi, rel=0.1)
    assert np.median(est.tagwise) == pytest.approx(phi, rel=0.2)


# --------------------------------------------------------------------------- helpers


def test_benjamini_hochberg_matches_scipy():
    p = np.random.default_rng(0).uniform(size=200) ** 3
    np.testing.assert_allclose(_bh(p), stats.false_discovery_control(p, method="bh"))


def test_maximize_interpolant_is_exact_for_cubics():
    pts = np.linspace(-10, 10, 21)
    a = np.array([-3.3, 0.0, 2.71, 7.9])
    yy = -((pts[None, :] - a[:, None]) ** 2) + 0.01 * (pts[None, :] - a[:, None]) ** 3 / 10
    # a cubic with a local maximum at a (derivative -2(x-a) + 0.003 (x-a)^2 vanishes at a)
    np.testing.assert_allclose(_maximize_interpolant(pts, yy), a, atol=1e-10)


def test_locfit_smoother_reproduces_constants_and_is_local():
    x = np.sort(np.random.default_rng(2).uniform(0, 10, 150))
    const = np.full((150, 2), 4.2)
    np.testing.assert_allclose(_locfit_deg0(x, const, span=0.3), const)
    step = (x > 5).astype(float)[:, None]
    fit = _locfit_deg0(x, step, span=0.2)[:, 0]
    assert fit[x < 2].max() < 1e-12 and fit[x > 8].min() > 1 - 1e-12
    assert np.all(np.diff(fit) >= -1e-12)  # monotone input gives a monotone smooth


# --------------------------------------------------------------------------- validation


@pytest.fixture()
def small_adata():
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, size=(30, 8)).astype(np.float32)
    obs = pd.DataFrame(
        {
            "grp": pd.Categorical(["a"] * 15 + ["b"] * 15, categories=["a", "b", "c"]),
            "batch": ["x", "y"] * 15,
            "size": rng.normal(size=30),
        },
        index=[f"c{i}" for i in range(30)],
    )
    adata = ad.AnnData(X=counts, obs=obs)
    adata.var_names = [f"g{i}" for i in range(8)]
    adata.layers["w"] = np.where(counts == 0, 0.5, 1.0)
    return adata


def test_wrapper_defaults_covariates_and_copy(small_adata, tmp_path):
    x_before = small_adata.X.copy()
    res, out = differential_expression(
        small_adata, "grp", covariates=["batch", "size"], weights_layer="w", copy=True
    )
    np.testing.assert_array_equal(small_adata.X, x_before)
    assert "zinbgrad_de" not in small_adata.uns and "zinbgrad_de" in out.uns
    params = out.uns["zinbgrad_de_params"]
    assert params["group"] == "b" and params["reference"] == "a"
    assert params["design_columns"] == ["(Intercept)", "grpb", "batchy", "size"]
    for col in ["log2_fold_change", "logCPM", "statistic", "pvalue", "padj"]:
        assert col in res.columns and res[col].notna().all()
    assert list(res.index) == list(small_adata.var_names)
    assert ((res["pvalue"] >= 0) & (res["pvalue"] <= 1)).all()
    # a fixed dispersion is honoured
    fixed = differential_expression(small_adata, "grp", dispersion=0.1, key_added="fixed")
    np.testing.assert_allclose(fixed["dispersion"], 0.1)
    assert "fixed" in small_adata.uns
    # results survive an h5ad round trip
    out.write_h5ad(tmp_path / "de.h5ad")
    back = ad.read_h5ad(tmp_path / "de.h5ad")
    pd.testing.assert_frame_equal(back.uns["zinbgrad_de"], res, check_names=False)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"groupby": "nope"}, KeyError, "groupby"),
        ({"groupby": "grp", "layer": "nope"}, KeyError, "layer"),
        ({"groupby": "grp", "weights_layer": "nope"}, KeyError, "weights layer"),
        ({"groupby": "grp", "covariates": ["nope"]}, KeyError, "covariate"),
        ({"groupby": "grp", "group": "z"}, ValueError, "not a level"),
        ({"groupby": "grp", "reference": "z"}, ValueError, "not a level"),
        ({"groupby": "grp", "group": "c"}, ValueError, "no cells"),
        ({"groupby": "grp", "group": "a", "reference": "a"}, ValueError, "differ"),
    ],
)
def test_wrapper_rejects_bad_keys_and_levels(small_adata, kwargs, error, match):
    with pytest.raises(error, match=match):
        differential_expression(small_adata, **kwargs)


def test_wrapper_requires_group_with_many_levels(small_adata):
    small_adata.obs["grp"] = pd.Categorical(["a"] * 10 + ["b"] * 10 + ["c"] * 10)
    with pytest.raises(ValueError, match="pass `group`"):
        differential_expression(small_adata, "grp")


@pytest.mark.parametrize(
    ("value", "match"),
    [(0.0, r"\(0, 1\]"), (1.5, r"\(0, 1\]"), (-0.2, r"\(0, 1\]"), (np.nan, "NaN")],
)
def test_wrapper_rejects_bad_weights(small_adata, value, match):
    bad = np.ones(small_adata.shape)
    bad[2, 3] = value
    small_adata.layers["bad"] = bad
    with pytest.raises(ValueError, match=match):
        differential_expression(small_adata, "grp", weights_layer="bad")


def test_engine_rejects_weights_of_wrong_shape(small_adata):
    design = np.column_stack([np.ones(30), np.arange(30) % 2])
    with pytest.raises(ValueError, match="shape"):
        glm_weighted_f(small_adata.X, design, 1, weights=np.ones((30, 7)))
    with pytest.raises(ValueError, match="shape"):
        weighted_nb_glm(small_adata.X, design, weights=np.ones((8, 30)), dispersion=0.1)


@pytest.mark.parametrize(
    ("value", "match"),
    [(-1.0, "negative"), (0.5, "integer"), (np.nan, "NaN")],
)
def test_wrapper_rejects_bad_counts(small_adata, value, match):
    small_adata.X[0, 0] = value
    with pytest.raises(ValueError, match=match):
        differential_expression(small_adata, "grp")


def test_wrapper_rejects_empty_cells(small_adata):
    small_adata.X[3, :] = 0
    with pytest.raises(ValueError, match="zero total counts"):
        differential_expression(small_adata, "grp")


def test_engine_input_checks():
    y = np.ones((10, 3))
    x = np.column_stack([np.ones(10), np.arange(10) % 2])
    with pytest.raises(ValueError, match="full column rank"):
        weighted_nb_glm(y, np.column_stack([x, x[:, 1]]), dispersion=0.1)
    with pytest.raises(ValueError, match="rows"):
        weighted_nb_glm(y, x[:5], dispersion=0.1)
    with pytest.raises(ValueError, match="coef"):
        glm_weighted_f(y, x, 5, dispersion=0.1)
    with pytest.raises(ValueError, match="dispersion"):
        weighted_nb_glm(y, x, dispersion=-1.0)


def test_wrapper_input_edge_cases(small_adata, tmp_path):
    # a string covariate is one covariate, not its characters
    a = differential_expression(small_adata, "grp", covariates="batch", key_added="s")
    b = differential_expression(small_adata, "grp", covariates=["batch"], key_added="l")
    pd.testing.assert_frame_equal(a, b)
    # a backed AnnData is read into memory for the test (the counts are needed whole)
    path = tmp_path / "de.h5ad"
    small_adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        res = differential_expression(backed, "grp", key_added="b")
        res_copy, _ = differential_expression(backed, "grp", key_added="b", copy=True)
    finally:
        backed.file.close()
    ref = differential_expression(small_adata, "grp", key_added="m")
    pd.testing.assert_frame_equal(res, ref)
    pd.testing.assert_frame_equal(res_copy, ref)
    # levels that coincide as text are refused with a message that says so
    mixed = small_adata.copy()
    mixed.obs["grp"] = pd.Categorical([0] * 10 + [1] * 10 + ["1"] * 10, categories=[0, 1, "1"])
    with pytest.raises(ValueError, match="coincide as text"):
        differential_expression(mixed, "grp", group="1", reference="0")
    with pytest.raises(ValueError, match="prior_df"):
        differential_expression(small_adata, "grp", prior_df=-5.0)
    with pytest.raises(ValueError, match="one per gene"):
        differential_expression(small_adata, "grp", dispersion=np.full(3, 0.1))
