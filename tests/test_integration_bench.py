"""The pure pieces of the integration benchmark (``benchmarks/integration.py``, issue 17).

Runs without the bench extra (no scib-metrics, scvi-tools or harmonypy) and without the shared
data: the protein marker rule on a constructed antibody table, the cell-type-dependent thinning
generator, the representations of a fitted W and the variant parser.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.datasets import (  # noqa: E402
    UNLABELLED,
    otsu_threshold,
    protein_cell_types,
    thin_by_cell_type,
)
from benchmarks.integration import (  # noqa: E402
    append_records,
    latent_representations,
    losses,
    parse_variant,
)

NAMES = [
    f"{n}_TotalSeqB"
    for n in ("CD3 CD4 CD8a CD14 CD15 CD16 CD56 CD19 CD25 CD45RA CD45RO PD-1 TIGIT CD127".split())
]

# cell kind -> its positive antibodies, expected label
KINDS = {
    "cd4t": (("CD3", "CD4"), "CD4 T"),
    "cd8t": (("CD3", "CD8a"), "CD8 T"),
    "b": (("CD19",), "B"),
    "mono": (("CD14", "CD4"), "CD14 monocyte"),  # monocytes are CD4-dim: still monocytes
    "nk": (("CD56", "CD16"), "NK"),
    "t_b_doublet": (("CD3", "CD4", "CD19"), UNLABELLED),
    "cd16only": (("CD16",), UNLABELLED),
}


def _protein_table(background: float, rng: np.random.Generator, n_per_kind: int = 12):
    short = [n.split("_")[0] for n in NAMES]
    rows, expected = [], []
    for pos, label in KINDS.values():
        for _ in range(n_per_kind):
            lam = np.full(len(short), background)
            for m in pos:
                lam[short.index(m)] = 40.0 * background
            rows.append(rng.poisson(lam))
            expected.append(label)
    return np.array(rows), np.array(expected, dtype=object)


def test_otsu_threshold_splits_two_groups() -> None:
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(0, 0.3, 200), rng.normal(5, 0.3, 50)])
    t = otsu_threshold(v)
    assert v[:200].max() <= t < v[200:].min()  # a cut in the gap between the groups
    with pytest.raises(ValueError, match="non-empty"):
        otsu_threshold(np.array([]))


def test_protein_rule_labels_constructed_cells_in_two_batches() -> None:
    rng = np.random.default_rng(1)
    # two batches with a 4-fold different antibody background: per-batch thresholds needed
    P1, e1 = _protein_table(5.0, rng)
    P2, e2 = _protein_table(20.0, rng)
    P = np.vstack([P1, P2])
    expected = np.concatenate([e1, e2])
    batches = np.repeat(["a", "b"], len(e1))
    got = protein_cell_types(P, NAMES, batches)
    np.testing.assert_array_equal(got, expected)
    # the result does not depend on the order of the cells
    perm = rng.permutation(len(expected))
    np.testing.assert_array_equal(protein_cell_types(P[perm], NAMES, batches[perm]), got[perm])


def test_protein_rule_rejects_bad_input() -> None:
    P = np.ones((4, len(NAMES)))
    with pytest.raises(ValueError, match="lacks the markers"):
        protein_cell_types(P[:, 1:], NAMES[1:])
    with pytest.raises(ValueError, match="non-negative"):
        protein_cell_types(-P, NAMES)
    with pytest.raises(ValueError, match="batches must have shape"):
        protein_cell_types(P, NAMES, np.zeros(3))


def _counts(n_cells=90, n_genes=40, value=None, seed=0):
    rng = np.random.default_rng(seed)
    X = (
        rng.poisson(3.0, size=(n_cells, n_genes))
        if value is None
        else np.full((n_cells, n_genes), value)
    )
    labels = np.array(["t0", "t1", "t2"])[np.arange(n_cells) % 3]
    return ad.AnnData(X=sp.csr_matrix(X.astype(np.float64))), labels


def test_thinning_rates_reproducible_from_seed_and_type_dependent() -> None:
    a, labels = _counts()
    r1 = thin_by_cell_type(a, labels, n_batches=3, seed=7)
    r2 = thin_by_cell_type(a, labels, n_batches=3, seed=7)
    r3 = thin_by_cell_type(a, labels, n_batches=3, seed=8)
    p1 = r1.uns["retention"]["rates"]
    assert p1.shape == (3, 3, a.n_vars)
    assert np.all((p1 > 0) & (p1 <= 1))
    np.testing.assert_array_equal(p1, r2.uns["retention"]["rates"])
    assert (r1.X != r2.X).nnz == 0
    np.testing.assert_array_equal(r1.obs["batch"], r2.obs["batch"])
    assert not np.allclose(p1, r3.uns["retention"]["rates"])
    # within a batch the rates of a gene differ between cell types
    for b in range(3):
        assert np.abs(p1[b, 0] - p1[b, 1]).max() > 0.05
    # without a type component they do not
    p0 = thin_by_cell_type(a, labels, type_sd=0.0, seed=7).uns["retention"]["rates"]
    np.testing.assert_allclose(p0[:, 0], p0[:, 2])
    # batches of sizes differing by at most one, every cell in one
    sizes = r1.obs["batch"].value_counts().to_numpy()
    assert sizes.sum() == a.n_obs and sizes.max() - sizes.min() <= 1


def test_thinning_only_decreases_counts_and_follows_the_rates() -> None:
    a, labels = _counts()
    out = thin_by_cell_type(a, labels, n_batches=2, seed=3)
    diff = (a.X - out.X).toarray()
    assert diff.min() >= 0
    np.testing.assert_array_equal(out.X.data, np.round(out.X.data))
    assert out.X.sum() < a.X.sum()
    # on large counts the thinned/original ratio is the rate of (batch, type, gene)
    big, labels = _counts(n_cells=60, n_genes=10, value=20000)
    out = thin_by_cell_type(big, labels, n_batches=2, seed=4)
    rates = out.uns["retention"]["rates"]
    types = out.uns["retention"]["types"]
    b = out.obs["batch"].astype(int).to_numpy()
    t = np.array([types.index(x) for x in labels])
    ratio = out.X.toarray() / 20000.0
    np.testing.assert_allclose(ratio, rates[b, t, :], atol=0.015)


def test_thinning_rejects_bad_input() -> None:
    a, labels = _counts()
    with pytest.raises(ValueError, match="n_batches"):
        thin_by_cell_type(a, labels, n_batches=1)
    with pytest.raises(ValueError, match="labels must have shape"):
        thin_by_cell_type(a, labels[:-1])
    a.X = a.X * 0.5
    with pytest.raises(ValueError, match="integer counts"):
        thin_by_cell_type(a, labels)


def test_representations_of_w() -> None:
    rng = np.random.default_rng(0)
    n, K, J = 50, 4, 30
    W = rng.normal(size=(n, K)) * np.array([3.0, 2.0, 1.0, 0.5]) + 1.0
    A = rng.normal(size=(K, J))
    reps = latent_representations(W, A, rng.normal(size=(K, J)))
    np.testing.assert_array_equal(reps["W"], W)
    # "sv": Euclidean distances of the rows of the centred W alpha_mu
    M = (W - W.mean(0)) @ A

    def dists(Z):
        return np.linalg.norm(Z[:, None, :] - Z[None, :, :], axis=-1)

    np.testing.assert_allclose(dists(reps["sv"]), dists(M), atol=1e-10)
    # "white": identity covariance
    np.testing.assert_allclose(np.cov(reps["white"], rowvar=False), np.eye(K), atol=1e-10)
    assert reps["sv_mupi"].shape == (n, K)
    assert "sv_mupi" not in latent_representations(W, A, np.zeros((K, J)))
    # "fisher": distances of the rows of the centred W alpha_mu diag(sqrt(w))
    w = rng.uniform(0.1, 5.0, size=J)
    fis = latent_representations(W, A, gene_weights=w)["fisher"]
    np.testing.assert_allclose(dists(fis), dists(M * np.sqrt(w)), atol=1e-10)
    assert "fisher" not in reps
    with pytest.raises(ValueError, match="gene_weights"):
        latent_representations(W, A, gene_weights=w[:-1])
    with pytest.raises(ValueError, match="do not match"):
        latent_representations(W, A.T)
    # "mnf": with noise N, the directions of S v = lam N v, scores shrunk by (lam - 1) / lam;
    # an N that is a multiple of the identity gives the principal scores of W, shrunk
    N = np.diag([0.5, 0.5, 0.5, 0.5])
    Z = latent_representations(W, A, noise_cov=N)["mnf"]
    lam = np.linalg.eigvalsh(np.cov(W, rowvar=False))[::-1] / 0.5
    assert lam[-1] < 1 < lam[-2]  # the weakest direction is below the noise: dropped
    expected = lam * (np.clip(lam - 1, 0, None) / lam) ** 2
    np.testing.assert_allclose(np.var(Z, axis=0, ddof=1), expected, rtol=1e-8, atol=1e-12)
    # noise correlated across factors: the scores are uncorrelated and N-whitened
    B = rng.normal(size=(K, K))
    N = B @ B.T + 0.1 * np.eye(K)
    Z = latent_representations(W, A, noise_cov=N)["mnf"]
    C = np.cov(Z, rowvar=False)
    np.testing.assert_allclose(C - np.diag(np.diag(C)), 0, atol=1e-8)
    assert "mnf" not in reps


def test_parse_variant() -> None:
    assert parse_variant('dz={"zi_batch": true, "eps": 0.5}') == (
        "dz",
        {"zi_batch": True, "eps": 0.5},
    )
    for bad in ('{"a": 1}', "x=[1, 2]", "x={oops}", "x"):
        with pytest.raises(ValueError):
            parse_variant(bad)


def test_append_records_adds_only_new_seeds_and_labels_variants() -> None:
    def rec(seed: int) -> dict:
        emb = {"zinbgrad": 1, "zinbgrad[gb]": 2, "zinbgrad[gb]/sv": 3, "scVI": 4}
        return {"dataset": "d", "seed": seed, "embeddings": dict(emb), "methods": {"scVI": 5}}

    records = [rec(0)]
    added = append_records(records, [rec(0), rec(3)], "x:1")
    assert added == ["d (seed 3)"] and len(records) == 2
    assert records[0]["embeddings"] == rec(0)["embeddings"]  # the run's own seed untouched
    assert set(records[1]["embeddings"]) == {
        "zinbgrad",
        "zinbgrad[gb] @x:1",
        "zinbgrad[gb] @x:1/sv",
        "scVI",
    }


def test_losses_judge_zinbgrad_without_harmony_on_top() -> None:
    """Harmony run on a zinbgrad embedding (/sv_harmony) is an extra row, never the best
    zinbgrad embedding that the targets are checked on."""

    def scores(total):
        keys = ("Total", "Bio conservation", "entropy", "celltype_ARI")
        return dict.fromkeys(keys, total)

    rec = {
        "dataset": "d",
        "seed": 0,
        "embeddings": {
            "zinbgrad": scores(0.70),
            "zinbgrad/sv": scores(0.75),
            "zinbgrad/sv_harmony": scores(0.95),
            "Harmony": scores(0.80),
            "scVI": scores(0.60),
        },
    }
    out = losses([rec])
    assert out and all("(zinbgrad/sv)" in line for line in out)
    assert any("Total of the best zinbgrad (zinbgrad/sv) 0.750 < Harmony 0.800" in x for x in out)
