"""zinbgrad.pl: the plots render to files with the expected elements (issue 18)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PatchCollection  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402

import zinbgrad  # noqa: E402
from zinbgrad.planted import make_planted  # noqa: E402


@pytest.fixture(scope="module")
def fitted():
    adata = make_planted(200, 80, 2, random_state=4)
    adata.obs["group"] = pd.Categorical(np.where(adata.obsm["W_true"][:, 0] > 0, "b", "a"))
    model = zinbgrad.tl.zinbwave(adata, 2, verbose=False)
    zinbgrad.tl.latent_uncertainty(adata, store_cov=True)
    zinbgrad.tl.top_genes(adata, 3)
    zinbgrad.tl.select_n_components(adata, [1, 2, 3])
    return adata, model


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _saved(path):
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_history(fitted, tmp_path):
    adata, model = fitted
    ax = zinbgrad.pl.history(model, show=False, save=tmp_path / "h.png")
    _saved(tmp_path / "h.png")
    assert ax.get_xlabel() == "epoch" and ax.get_yscale() == "log"
    phases = list(dict.fromkeys(h["phase"] for h in model.history_))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == phases
    assert len(ax.collections) == len(phases)
    n_points = sum(len(c.get_offsets()) for c in ax.collections)
    assert n_points == len(model.history_)
    ax2 = zinbgrad.pl.history(adata, relative=False, show=False)  # from uns, no phases
    assert ax2.get_ylabel() == "penalized log-likelihood"
    np.testing.assert_allclose(ax2.lines[0].get_ydata(), [h["objective"] for h in model.history_])


def test_embedding_ellipses_and_sizes(fitted, tmp_path):
    adata, _ = fitted
    ax = zinbgrad.pl.embedding(adata, color="group", show=False, save=tmp_path / "e.png")
    _saved(tmp_path / "e.png")
    patches = [c for c in ax.collections if isinstance(c, PatchCollection)]
    assert len(patches) == 1 and len(patches[0].get_paths()) == adata.n_obs
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    assert ax.get_xlabel() == "X_zinbwave 1" and ax.get_ylabel() == "X_zinbwave 2"
    ax = zinbgrad.pl.embedding(adata, uncertainty="size", show=False)
    sizes = ax.collections[-1].get_sizes()
    sd = adata.obsm["X_zinbwave_sd"]
    # larger markers for more certain cells
    assert np.corrcoef(sizes, np.prod(sd, 1))[0, 1] < -0.5
    with pytest.raises(KeyError, match="latent_uncertainty"):
        del_sd = adata.copy()
        del del_sd.obsm["X_zinbwave_sd"], del_sd.obsm["X_zinbwave_cov"]
        zinbgrad.pl.embedding(del_sd, show=False)
    with pytest.raises(KeyError, match="obs column"):
        zinbgrad.pl.embedding(adata, color="nope", show=False)


def test_n_components_curve(fitted, tmp_path):
    adata, _ = fitted
    ax = zinbgrad.pl.n_components(adata, show=False, save=tmp_path / "k.png")
    _saved(tmp_path / "k.png")
    assert ax.get_xlabel() == "number of factors K"
    assert len(ax.figure.axes) == 2  # the BIC twin axis
    rec = adata.uns["zinbwave_n_components"]["recommended"]
    vlines = [ln for ln in ax.lines if np.allclose(ln.get_xdata(), rec)]
    assert vlines
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "BIC" in labels and f"recommended K = {rec}" in labels


def test_loadings_heatmap(fitted, tmp_path):
    adata, _ = fitted
    ax = zinbgrad.pl.loadings(adata, n_genes=3, show=False, save=tmp_path / "l.png")
    _saved(tmp_path / "l.png")
    (im,) = [a for a in ax.get_images() if isinstance(a, AxesImage)]
    n_rows, K = im.get_array().shape
    assert K == 2 and 6 <= n_rows <= 12
    shown = {t.get_text() for t in ax.get_yticklabels()}
    alpha = adata.varm["X_zinbwave_alpha_mu"]
    for k in range(2):  # the largest loadings of each factor are on the map
        assert adata.var_names[np.argmax(alpha[:, k])] in shown
        assert adata.var_names[np.argmin(alpha[:, k])] in shown


def test_diagnostics(fitted, tmp_path):
    adata, model = fitted
    axs = zinbgrad.pl.diagnostics(adata, model, color="group", save=tmp_path / "d.png", show=False)
    _saved(tmp_path / "d.png")
    assert len(axs) == 4
    assert [a.get_title() for a in axs][0] == "objective per epoch"
