"""Smoothers and interpolants that reproduce R's: the FMM cubic spline behind edgeR's
``maximizeInterpolant``, locfit's local-constant smoother (edgeR's dispersion trend), R's
``lowess`` (zinbwave's independent filtering) and a natural-spline basis (limma's ``fitFDist``).

All are re-implemented from their published definitions (R's ``spline_coef`` "fmm",
``clowess``, locfit's adaptive evaluation tree) and checked against R through the golden tests.
"""

from __future__ import annotations

import numpy as np

from .utils import r_quantile


def fmm_spline(x: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Forsythe-Malcolm-Moler cubic spline coefficients for each row of ``yy`` (R's "fmm")."""
    n = x.size
    m = yy.shape[0]
    b = np.zeros((m, n))
    c = np.zeros((m, n))
    d = np.zeros((m, n))
    if n < 3:
        t = (yy[:, 1] - yy[:, 0]) / (x[1] - x[0])
        b[:, 0] = t
        b[:, 1] = t
        return b, c, d
    # 0-based translation of R's fmm_spline
    dx = np.zeros(n)
    dx[0] = x[1] - x[0]
    c[:, 1] = (yy[:, 1] - yy[:, 0]) / dx[0]
    bd = np.zeros(n)
    for i in range(1, n - 1):
        dx[i] = x[i + 1] - x[i]
        bd[i] = 2.0 * (dx[i - 1] + dx[i])
        c[:, i + 1] = (yy[:, i + 1] - yy[:, i]) / dx[i]
        c[:, i] = c[:, i + 1] - c[:, i]
    bd[0] = -dx[0]
    bd[n - 1] = -dx[n - 2]
    c[:, 0] = 0.0
    c[:, n - 1] = 0.0
    if n > 3:
        c[:, 0] = c[:, 2] / (x[3] - x[1]) - c[:, 1] / (x[2] - x[0])
        c[:, n - 1] = c[:, n - 2] / (x[n - 1] - x[n - 3]) - c[:, n - 3] / (x[n - 2] - x[n - 4])
        c[:, 0] = c[:, 0] * dx[0] * dx[0] / (x[3] - x[0])
        c[:, n - 1] = -c[:, n - 1] * dx[n - 2] * dx[n - 2] / (x[n - 1] - x[n - 4])
    bb = np.broadcast_to(bd, (m, n)).copy()
    for i in range(1, n):
        t = dx[i - 1] / bb[:, i - 1]
        bb[:, i] = bb[:, i] - t * dx[i - 1]
        c[:, i] = c[:, i] - t * c[:, i - 1]
    c[:, n - 1] = c[:, n - 1] / bb[:, n - 1]
    for i in range(n - 2, -1, -1):
        c[:, i] = (c[:, i] - dx[i] * c[:, i + 1]) / bb[:, i]
    b[:, n - 1] = (yy[:, n - 1] - yy[:, n - 2]) / dx[n - 2] + dx[n - 2] * (
        c[:, n - 2] + 2.0 * c[:, n - 1]
    )
    for i in range(n - 1):
        b[:, i] = (yy[:, i + 1] - yy[:, i]) / dx[i] - dx[i] * (c[:, i + 1] + 2.0 * c[:, i])
        d[:, i] = (c[:, i + 1] - c[:, i]) / dx[i]
        c[:, i] = 3.0 * c[:, i]
    c[:, n - 1] = 3.0 * c[:, n - 1]
    d[:, n - 1] = d[:, n - 2]
    return b, c, d


def maximize_interpolant(x: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Maximizer of the FMM spline through each row of ``yy`` (edgeR's ``maximizeInterpolant``).

    Starts from the grid maximum and checks the stationary points of the two neighbouring cubic
    segments.
    """
    yy = np.atleast_2d(np.asarray(yy, dtype=np.float64))
    m, n = yy.shape
    rows = np.arange(m)
    imax = np.argmax(yy, axis=1)
    best = yy[rows, imax].copy()
    xmax = x[imax].copy()
    b, c, d = fmm_spline(x, yy)
    with np.errstate(divide="ignore", invalid="ignore"):
        for side in (-1, 0):
            seg = imax + side
            ok = (seg >= 0) & (seg <= n - 2)
            segc = np.clip(seg, 0, n - 2)
            sd, sc, sb = d[rows, segc], c[rows, segc], b[rows, segc]
            delta = sc * sc - 3.0 * sd * sb
            sol = (-sc - np.sqrt(np.where(delta >= 0, delta, np.nan))) / (3.0 * sd)
            width = x[segc + 1] - x[segc]
            good = ok & (delta >= 0) & (sol > 0) & (sol < width)
            val = ((sd * sol + sc) * sol + sb) * sol + yy[rows, segc]
            upd = good & (val > best)
            best = np.where(upd, val, best)
            xmax = np.where(upd, sol + x[segc], xmax)
    return xmax


def locfit_deg0(x: np.ndarray, yy: np.ndarray, span: float, cut: float = 0.8) -> np.ndarray:
    """locfit's local-constant tricube smoother evaluated at the data (R ``locfit(deg=0)``).

    Reproduces R ``fitted(locfit(y ~ x, alpha=span, deg=0))``: nearest-neighbour bandwidth
    (distance to the ``floor(n * span)``-th nearest point), fits at the vertices of locfit's
    adaptive tree (cells on ``[min x, max x]`` halved while ``length / min(h) > cut``) and linear
    interpolation between vertices (degree 0 fits carry no derivative information).

    Parameters
    ----------
    x
        ``(n,)`` covariate.
    yy
        ``(n, k)`` responses; every column is smoothed with the same weights.
    span
        Nearest-neighbour fraction ``alpha``.
    cut
        Tree refinement parameter (locfit's default 0.8).
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    k = int(np.floor(n * span + 1e-12))

    def vertex_fit(v: float) -> tuple[float, np.ndarray]:
        dist = np.abs(x - v)
        if k <= 0:
            h = 0.0
        elif k < n:
            h = float(np.partition(dist, k - 1)[k - 1])
        else:
            h = float(dist.max()) * (k / n)
        if h > 0:
            u = dist / h
            wts = np.where(u < 1.0, (1.0 - u**3) ** 3, 0.0)
        else:
            wts = (dist == 0).astype(np.float64)
        return h, (wts @ yy) / wts.sum()

    lo, hi = float(x.min()), float(x.max())
    verts: dict[float, tuple[float, np.ndarray]] = {lo: vertex_fit(lo), hi: vertex_fit(hi)}
    cells: list[tuple[float, float]] = []
    stack = [(lo, hi)]
    while stack:
        a, b = stack.pop()
        ha, hb = verts[a][0], verts[b][0]
        hpos = [h for h in (ha, hb) if h > 0]
        hmin = min(hpos) if hpos else 0.0
        if hmin == 0.0:
            score = 2.0 * (b - a) / (hi - lo) if hi > lo else 0.0
        else:
            score = (b - a) / hmin
        if score > cut and b > a:
            mid = (a + b) / 2.0
            if mid not in verts:
                verts[mid] = vertex_fit(mid)
            stack.append((a, mid))
            stack.append((mid, b))
        else:
            cells.append((a, b))
    cells.sort()
    left = np.array([c[0] for c in cells])
    out = np.empty((n, yy.shape[1]))
    # descend: locfit puts a point exactly on a split into the right cell
    pos = np.searchsorted(left, x, side="right") - 1
    pos = np.clip(pos, 0, len(cells) - 1)
    for ci in np.unique(pos):
        a, b = cells[ci]
        sel = pos == ci
        fa, fb = verts[a][1], verts[b][1]
        if b == a:
            out[sel] = fa
            continue
        t = (x[sel] - a) / (b - a)
        out[sel] = (1.0 - t)[:, None] * fa[None, :] + t[:, None] * fb[None, :]
    return out


def ns_basis(x: np.ndarray, df: int) -> np.ndarray:
    """A basis of R's ``splines::ns(x, df, intercept=TRUE)`` column space.

    Natural cubic splines with boundary knots at ``range(x)`` and ``df - 2`` interior knots at
    equally spaced quantiles (truncated-power representation; only the column space matters for
    the least-squares fits it is used in).
    """
    n_int = df - 2
    probs = np.linspace(0.0, 1.0, n_int + 2)[1:-1]
    knots = np.concatenate([[x.min()], r_quantile(x, probs), [x.max()]])
    scale = max(float(x.max() - x.min()), 1e-12)
    z = (x - x.min()) / scale
    kz = (knots - x.min()) / scale
    cols = [np.ones_like(z), z]
    kk = kz.size

    def dk(j: int) -> np.ndarray:
        return (np.maximum(z - kz[j], 0.0) ** 3 - np.maximum(z - kz[-1], 0.0) ** 3) / (
            kz[-1] - kz[j]
        )

    last = dk(kk - 2)
    for j in range(kk - 2):
        cols.append(dk(j) - last)
    return np.column_stack(cols)


def _lowess_local_fit(
    x: np.ndarray,
    y: np.ndarray,
    rw: np.ndarray,
    xs: float,
    nleft: int,
    nright: int,
    userw: bool,
) -> tuple[float, bool]:
    """clowess's ``lowest``: the tricube-weighted local linear fit at ``xs`` from the points
    ``nleft..nright`` (times the robustness weights ``rw`` when ``userw``); ``False`` when all
    weights vanish."""
    n = x.size
    rng_x = x[-1] - x[0]
    h = max(xs - x[nleft], x[nright] - xs)
    h9, h1 = 0.999 * h, 0.001 * h
    wts = np.zeros(n)
    a = 0.0
    j = nleft
    while j < n:
        r = abs(x[j] - xs)
        if r <= h9:
            wj = 1.0 if r <= h1 else (1.0 - (r / h) ** 3) ** 3
            if userw:
                wj *= rw[j]
            wts[j] = wj
            a += wj
        elif x[j] > xs:
            break
        j += 1
    nrt = j - 1
    if a <= 0.0:
        return 0.0, False
    ww = wts[nleft : nrt + 1] / a
    xx = x[nleft : nrt + 1]
    if h > 0.0:
        aa = np.sum(ww * xx)
        b = xs - aa
        c = np.sum(ww * (xx - aa) ** 2)
        if np.sqrt(c) > 0.001 * rng_x:
            b /= c
            ww = ww * (b * (xx - aa) + 1.0)
    return float(np.sum(ww * y[nleft : nrt + 1])), True


def _lowess_pass(
    x: np.ndarray,
    y: np.ndarray,
    rw: np.ndarray,
    ys: np.ndarray,
    ns: int,
    delta: float,
    userw: bool,
) -> None:
    """One clowess smoothing pass: fits at points ``delta`` apart, linear interpolation in
    between, ties copied; writes the fitted values into ``ys``."""
    n = x.size
    nleft, nright, last, i = 0, ns - 1, -1, 0
    while True:
        if nright < n - 1:
            d1 = x[i] - x[nleft]
            d2 = x[nright + 1] - x[i]
            if d1 > d2:
                nleft += 1
                nright += 1
                continue
        val, ok = _lowess_local_fit(x, y, rw, x[i], nleft, nright, userw)
        ys[i] = val if ok else y[i]
        if last < i - 1:
            denom = x[i] - x[last]
            for j in range(last + 1, i):
                alpha = (x[j] - x[last]) / denom
                ys[j] = alpha * ys[i] + (1.0 - alpha) * ys[last]
        last = i
        cut = x[last] + delta
        i = last + 1
        while i < n:
            if x[i] > cut:
                break
            if x[i] == x[last]:
                ys[i] = ys[last]
                last = i
            i += 1
        i = max(last + 1, i - 1)
        if last >= n - 1:
            break


def lowess(x: np.ndarray, y: np.ndarray, f: float = 2.0 / 3.0, nsteps: int = 3) -> np.ndarray:
    """R's ``lowess`` (``clowess``) fitted values.

    Parameters
    ----------
    x
        ``(n,)`` covariate, sorted increasingly.
    y
        ``(n,)`` responses.
    f
        Smoother span (fraction of points in each local fit).
    nsteps
        Robustifying iterations (bisquare weights of the residuals).

    Returns
    -------
    numpy.ndarray
        ``(n,)`` fitted values.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.size
    if n < 2:
        return y.copy()
    delta = 0.01 * (x[-1] - x[0])
    ns = max(2, min(n, int(f * n + 1e-7)))
    ys = np.zeros(n)
    rw = np.ones(n)
    it = 1
    while it <= nsteps + 1:
        _lowess_pass(x, y, rw, ys, ns, delta, it > 1)
        res = y - ys
        sc = np.mean(np.abs(res))
        if it > nsteps:
            break
        cmad = 6.0 * np.median(np.abs(res))
        if cmad < 1e-7 * sc:
            break
        c9, c1 = 0.999 * cmad, 0.001 * cmad
        r = np.abs(res)
        rw = np.where(r <= c1, 1.0, np.where(r <= c9, (1.0 - (r / cmad) ** 2) ** 2, 0.0))
        it += 1
    return ys
