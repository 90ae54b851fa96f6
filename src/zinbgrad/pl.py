"""Plots (matplotlib, scanpy style): each takes ``ax=``, ``show=``, ``save=`` and returns axes.

* :func:`history`: the objective per epoch, by phase of the fit;
* :func:`embedding`: the latent space coloured by an ``obs`` column, with each cell's
  uncertainty (:func:`zinbgrad.tl.latent_uncertainty`) as ellipses or marker size;
* :func:`n_components`: the K-selection curve of :func:`zinbgrad.tl.select_n_components`;
* :func:`loadings`: a heat map of the loadings of the top genes of each factor
  (:func:`zinbgrad.tl.top_genes`).

``show=None`` shows the figure only when matplotlib is interactive; ``save`` writes it to a
file (any format matplotlib knows, by the extension).
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

import numpy as np

from .fitted import check_fitted

__all__ = ["history", "embedding", "n_components", "loadings", "diagnostics"]

PHASE_COLORS = {
    "sketch": "tab:purple",
    "stochastic": "tab:orange",
    "extend": "tab:green",
    "full": "tab:blue",
    "fit": "tab:blue",
}


def _axes(ax, figsize=(5, 4)):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def _finish(ax, show: bool | None, save: str | PathLike | None):
    import matplotlib.pyplot as plt

    fig = ax.figure
    if save is not None:
        fig.savefig(save, dpi=150, bbox_inches="tight")
    if show or (show is None and plt.isinteractive()):
        plt.show()
    return ax


def _history_records(data, key: str) -> list[dict]:
    from .estimator import ZINBWaVE

    if isinstance(data, ZINBWaVE):
        check_fitted(data)
        return list(data.history_)
    if isinstance(data, list | tuple):
        return list(data)
    uns = getattr(data, "uns", None)
    if uns is None or key not in uns or "history" not in uns[key]:
        raise KeyError(f"no fit history under uns[{key!r}]; run zinbgrad.tl.zinbwave first")
    h = uns[key]["history"]
    recs = [{k: float(np.asarray(h[k])[i]) for k in h} for i in range(len(h["epoch"]))]
    phases = h.get("phase") if hasattr(h, "get") else None
    for i, r in enumerate(recs):
        r["phase"] = str(phases[i]) if phases is not None else "fit"
    return recs


def history(
    data,
    *,
    key: str = "X_zinbwave",
    relative: bool = True,
    ax=None,
    show: bool | None = None,
    save: str | PathLike | None = None,
):
    """The objective per epoch, one colour per phase of the fit.

    Parameters
    ----------
    data
        A fitted :class:`~zinbgrad.ZINBWaVE` (with the phases: sketch, stochastic, extend,
        full), an AnnData holding one under ``uns[key]``, or a list of history records.
    key
        Model key in ``adata.uns``.
    relative
        Plot the gap to the final objective, ``(f_final - f_epoch) / |f_final|``, on a log
        scale (shows the convergence rate); ``False``: the penalized log-likelihood itself.
    ax, show, save
        See the module docstring.
    """
    recs = _history_records(data, key)
    if not recs:
        raise ValueError("the fit history is empty (a model built from parameters?)")
    ax = _axes(ax)
    epoch = np.array([r["epoch"] for r in recs], dtype=float)
    obj = np.array([r["objective"] for r in recs], dtype=float)
    phase = np.array([str(r.get("phase", "fit")) for r in recs])
    if relative:
        best = obj.max()
        y = (best - obj) / abs(best)
        floor = y[y > 0].min() / 10 if np.any(y > 0) else 1e-16
        y = np.maximum(y, floor)
        ax.set_yscale("log")
        ax.set_ylabel("(best - objective) / |best|")
    else:
        y = obj
        ax.set_ylabel("penalized log-likelihood")
    ax.plot(epoch, y, color="0.7", lw=1, zorder=1)
    for ph in dict.fromkeys(phase):
        sel = phase == ph
        ax.scatter(epoch[sel], y[sel], s=16, color=PHASE_COLORS.get(ph, "k"), label=ph, zorder=2)
    ax.set_xlabel("epoch")
    ax.set_title("objective per epoch")
    ax.legend(frameon=False, title="phase")
    return _finish(ax, show, save)


def _ellipse_paths(cov2: np.ndarray, centers: np.ndarray, scale: float):
    """Ellipse patches (width, height, angle) of 2 x 2 covariances at ``scale`` sds."""
    from matplotlib.patches import Ellipse

    vals, vecs = np.linalg.eigh(cov2)
    vals = np.clip(vals, 0, None)
    angles = np.degrees(np.arctan2(vecs[:, 1, 1], vecs[:, 0, 1]))
    return [
        Ellipse(c, 2 * scale * np.sqrt(v[1]), 2 * scale * np.sqrt(v[0]), angle=a)
        for c, v, a in zip(centers, vals, angles, strict=True)
    ]


def embedding(
    adata,
    *,
    basis: str = "X_zinbwave",
    color: str | None = None,
    components: Sequence[int] = (0, 1),
    uncertainty: str | None = "ellipse",
    level: float = 0.9,
    size: float = 18.0,
    ax=None,
    show: bool | None = None,
    save: str | PathLike | None = None,
):
    """The latent space coloured by an ``obs`` column, with each cell's uncertainty.

    Parameters
    ----------
    adata
        AnnData with ``obsm[basis]`` (and, for the uncertainty, ``obsm[basis + "_cov"]`` or
        ``obsm[basis + "_sd"]`` from :func:`zinbgrad.tl.latent_uncertainty`).
    basis
        ``obsm`` key of the embedding.
    color
        ``obs`` column: categorical (one colour per level and a legend) or numeric (a colour
        bar); ``None``: one colour.
    components
        The two factors shown (0-based).
    uncertainty
        ``"ellipse"``: the ``level`` (e.g. 90 %) region of each cell's Gaussian (from the
        covariance; axis-aligned from the sds when only those are stored); ``"size"``: marker
        area proportional to the cell's precision (larger = more certain); ``None``: none.
    level
        Coverage of the ellipses.
    size
        Marker size (the mean size with ``uncertainty="size"``).
    ax, show, save
        See the module docstring.
    """
    if basis not in adata.obsm:
        raise KeyError(f"obsm[{basis!r}] not found; run zinbgrad.tl.zinbwave first")
    if uncertainty not in (None, "ellipse", "size"):
        raise ValueError(f"uncertainty must be 'ellipse', 'size' or None, got {uncertainty!r}")
    W = np.asarray(adata.obsm[basis])
    c0, c1 = (int(c) for c in components)
    if W.shape[1] <= max(c0, c1):
        raise ValueError(f"components {components} need at least {max(c0, c1) + 1} factors")
    xy = W[:, [c0, c1]]
    ax = _axes(ax, (5.5, 4.5))
    n = len(xy)
    colors, handles, values = _point_colors(adata, color, n)
    sizes = np.full(n, size)
    sd_key, cov_key = basis + "_sd", basis + "_cov"
    if uncertainty is not None and sd_key not in adata.obsm and cov_key not in adata.obsm:
        raise KeyError(
            f"obsm[{sd_key!r}] not found; run zinbgrad.tl.latent_uncertainty first "
            "(or pass uncertainty=None)"
        )
    if uncertainty == "size":
        sizes = _precision_sizes(np.asarray(adata.obsm[sd_key])[:, [c0, c1]], size)
    if uncertainty == "ellipse":
        _add_ellipses(ax, adata, basis, (c0, c1), xy, level, colors, values)
    if values is not None:
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=sizes, cmap="viridis", zorder=3)
        ax.figure.colorbar(sc, ax=ax, label=color)
    else:
        ax.scatter(xy[:, 0], xy[:, 1], c=list(colors), s=sizes, zorder=3)
    if handles:
        ax.legend(handles=handles, frameon=False, title=color, fontsize="small")
    ax.set_xlabel(f"{basis} {c0 + 1}")
    ax.set_ylabel(f"{basis} {c1 + 1}")
    title = "latent space"
    if uncertainty == "ellipse":
        title += f" ({int(round(100 * level))} % regions)"
    elif uncertainty == "size":
        title += " (marker area ~ precision)"
    ax.set_title(title)
    ax.autoscale_view()
    return _finish(ax, show, save)


def _point_colors(
    adata, color: str | None, n: int
) -> tuple[np.ndarray, list | None, np.ndarray | None]:
    """``(colors, legend handles, values)`` of the points: one color per category of
    ``obs[color]`` with a legend, or the numeric values (``values``, colored by viridis)."""
    import matplotlib.pyplot as plt

    colors = np.array(["tab:blue"] * n, dtype=object)
    if color is None:
        return colors, None, None
    if color not in adata.obs:
        raise KeyError(f"obs column {color!r} not found")
    col = adata.obs[color]
    if col.dtype.kind in "biuf":
        return colors, None, col.to_numpy(dtype=float)
    if hasattr(col, "cat"):
        levels = [str(c) for c in col.cat.categories if (col == c).any()]
    else:
        levels = sorted(set(col.astype(str)))
    cmap = plt.get_cmap("tab10" if len(levels) <= 10 else "tab20")
    lut = {lv: cmap(i % cmap.N) for i, lv in enumerate(levels)}
    colors = np.array([lut[v] for v in col.astype(str)], dtype=object)
    handles = [plt.Line2D([], [], marker="o", ls="", color=lut[lv], label=lv) for lv in levels]
    return colors, handles, None


def _precision_sizes(sd: np.ndarray, size: float) -> np.ndarray:
    """Marker areas proportional to the precision ``1 / (sd_0 sd_1)``, mean ``size``, clipped
    to ``[size / 10, 10 size]``."""
    prec = 1.0 / np.maximum(np.prod(sd, 1), 1e-300)
    sizes = size * prec / np.mean(prec)
    return np.clip(sizes, size / 10, size * 10)


def _add_ellipses(ax, adata, basis: str, comps, xy, level: float, colors, values) -> None:
    """Draw each cell's ``level`` credible ellipse from ``obsm[basis + "_cov"]`` (or the
    diagonal one from ``obsm[basis + "_sd"]``) in the plane of the components ``comps``."""
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from scipy.stats import chi2

    c0, c1 = comps
    sd_key, cov_key = basis + "_sd", basis + "_cov"
    if cov_key in adata.obsm:
        cov2 = np.asarray(adata.obsm[cov_key])[:, [c0, c1]][:, :, [c0, c1]]
    else:
        sd = np.asarray(adata.obsm[sd_key])[:, [c0, c1]]
        cov2 = np.zeros((len(xy), 2, 2))
        cov2[:, 0, 0], cov2[:, 1, 1] = sd[:, 0] ** 2, sd[:, 1] ** 2
    scale = float(np.sqrt(chi2.ppf(level, 2)))
    fc = (
        colors
        if values is None
        else plt.get_cmap("viridis")(
            (values - np.nanmin(values)) / max(np.nanmax(values) - np.nanmin(values), 1e-300)
        )
    )
    pc = PatchCollection(
        _ellipse_paths(cov2, xy, scale), facecolors=list(fc), alpha=0.15, edgecolors="none"
    )
    ax.add_collection(pc)


def n_components(
    adata,
    *,
    key: str = "zinbwave_n_components",
    ax=None,
    show: bool | None = None,
    save: str | PathLike | None = None,
):
    """The K-selection curve of :func:`zinbgrad.tl.select_n_components`.

    Held-out log-likelihood per cell (bi-cross-validated, with the standard error of its
    paired difference to the best K, and re-optimized) against K on the left axis, BIC on the
    right axis; a dashed line at the recommended K.
    """
    if key not in adata.uns:
        raise KeyError(f"uns[{key!r}] not found; run zinbgrad.tl.select_n_components first")
    u = adata.uns[key]
    t = {k: np.asarray(v) for k, v in u["table"].items()}
    ks = t["n_components"].astype(float)
    ax = _axes(ax)
    ax.errorbar(
        ks,
        t["bicross_loglik"],
        yerr=t["bicross_se"],
        marker="o",
        color="tab:blue",
        label="held-out (bi-cross-validated)",
        capsize=3,
    )
    ax.plot(
        ks,
        t["heldout_loglik"],
        marker="s",
        ls=":",
        color="tab:gray",
        label="held-out (re-optimized)",
    )
    ax.set_xticks(ks)
    ax.set_xlabel("number of factors K")
    ax.set_ylabel("held-out log-likelihood per cell")
    ax2 = ax.twinx()
    ax2.plot(ks, t["bic"], marker="^", ls="--", color="tab:red", label="BIC")
    ax2.set_ylabel("BIC (training cells)")
    rec = int(u["recommended"])
    ax.axvline(rec, color="k", ls="--", lw=1, label=f"recommended K = {rec}")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], frameon=False, fontsize="small")
    ax.set_title(f"choosing K ({u['criterion']})")
    return _finish(ax, show, save)


def loadings(
    adata,
    *,
    key: str = "X_zinbwave",
    n_genes: int = 5,
    component: str = "mu",
    ax=None,
    show: bool | None = None,
    save: str | PathLike | None = None,
):
    """Heat map of the loadings (genes x factors) of each factor's top genes.

    The genes are the ``n_genes`` largest positive and negative loadings of every factor
    (from ``uns[key + "_top_genes"]`` when :func:`zinbgrad.tl.top_genes` has stored it, else
    from ``varm``); cells show the loading, and a dot marks ``|loading / se| < 2`` where
    standard errors are available.
    """
    name = f"{key}_alpha_{component}"
    if name not in adata.varm:
        raise KeyError(f"varm[{name!r}] not found; run zinbgrad.tl.zinbwave first")
    alpha = np.asarray(adata.varm[name])
    genes_all = np.asarray(adata.var_names).astype(str)
    K = alpha.shape[1]
    chosen: list[int] = []
    for k in range(K):
        order = np.argsort(alpha[:, k])
        for j in list(order[::-1][:n_genes]) + list(order[:n_genes]):
            if j not in chosen:
                chosen.append(int(j))
    M = alpha[chosen]
    ax = _axes(ax, (1.2 + 0.6 * K, 1.0 + 0.22 * len(chosen)))
    lim = float(np.max(np.abs(M))) or 1.0
    im = ax.imshow(M, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.figure.colorbar(im, ax=ax, label=f"alpha_{component}")
    se_key = name + "_se"
    if se_key in adata.varm:
        z = M / np.asarray(adata.varm[se_key])[chosen]
        r, c = np.nonzero(np.abs(z) < 2)
        if r.size:
            ax.scatter(c, r, s=6, color="k", marker=".")
    ax.set_xticks(range(K), [str(k + 1) for k in range(K)])
    ax.set_yticks(range(len(chosen)), genes_all[chosen], fontsize="small")
    ax.set_xlabel("factor")
    ax.set_ylabel("gene")
    ax.set_title("top loadings")
    return _finish(ax, show, save)


def diagnostics(
    adata,
    model=None,
    *,
    key: str = "X_zinbwave",
    color: str | None = None,
    show: bool | None = None,
    save: str | PathLike | None = None,
):
    """All four panels in one figure (history, embedding with uncertainty, K selection when
    ``uns["zinbwave_n_components"]`` exists, loadings); returns the axes."""
    import matplotlib.pyplot as plt

    has_k = "zinbwave_n_components" in adata.uns
    fig, axs = plt.subplots(1, 4 if has_k else 3, figsize=(22 if has_k else 16, 5))
    history(model if model is not None else adata, key=key, ax=axs[0], show=False)
    unc = "ellipse" if (key + "_sd") in adata.obsm or (key + "_cov") in adata.obsm else None
    embedding(adata, basis=key, color=color, uncertainty=unc, ax=axs[1], show=False)
    if has_k:
        n_components(adata, ax=axs[2], show=False)
    loadings(adata, key=key, n_genes=4, ax=axs[-1], show=False)
    fig.tight_layout()
    _finish(axs[0], show, save)
    return axs
