"""One adapter per method, all with the same interface.

Every adapter is fitted on an AnnData of raw counts (``X``, CSR) with optional
``obs["batch"]`` and then answers:

``latent()``
    The 10-dimensional representation of the training cells.
``train_nll()``
    Mean negative log-likelihood per training cell (``None`` for non-likelihood methods).
``heldout_nll(adata_new)``
    Mean negative log-likelihood per new cell (``None`` when unsupported).
``impute()``
    ``{variant: dense (cells x genes) expected counts}`` for the training cells.

Estimators of the likelihood differ by method (documented with each adapter and in the
report): ZINB-WaVE models (zinbgrad, R zinbwave) give the exact ZINB log-likelihood at point
estimates of all parameters, with the local parameters (W, gamma) of held-out cells re-optimized
and the gene parameters fixed; scVI gives its importance-sampling estimate of the marginal
log-likelihood, integrating over the latent z (``get_marginal_ll``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp

__all__ = [
    "METHODS",
    "HarmonyMethod",
    "Method",
    "PCABaseline",
    "RZinbwave",
    "SCVIMethod",
    "ZinbgradMethod",
    "make_method",
]

N_LATENT = 10


def _dense(X) -> np.ndarray:
    return X.toarray() if sp.issparse(X) else np.asarray(X)


class Method(ABC):
    """Common interface of the benchmarked methods.

    Parameters
    ----------
    seed
        Random seed of the method.
    options
        Method-specific settings (see each adapter).
    """

    name: str = ""
    label: str = ""
    supports_batch: bool = False
    is_likelihood_model: bool = False
    #: optional modules the method imports (from the bench extra); :meth:`available` checks them
    requires: tuple[str, ...] = ()

    def __init__(self, seed: int = 0, options: dict[str, Any] | None = None) -> None:
        self.seed = int(seed)
        self.options = dict(options or {})
        self.fit_seconds: float = float("nan")
        self.info: dict[str, Any] = {}

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Whether the method can run here, and why not (by default: whether every module of
        :attr:`requires` is importable)."""
        for module in cls.requires:
            if importlib.util.find_spec(module) is None:
                return False, f"{module} is not importable (install the bench extra)"
        return True, ""

    @classmethod
    def versions(cls) -> dict[str, str]:
        """Versions of the packages the method uses."""
        return {}

    def fit(self, adata: ad.AnnData, batch_key: str | None = None) -> Method:
        """Fit on ``adata`` (raw counts in ``X``); ``batch_key`` models ``obs[batch_key]``."""
        t0 = time.perf_counter()
        self._prepare()
        t1 = time.perf_counter()
        self._fit(adata, batch_key)
        self.fit_seconds = time.perf_counter() - t1
        if t1 - t0 > 1e-3:
            self.info["warmup_s"] = t1 - t0
        return self

    def _prepare(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """One-off work of a fresh process that is not the fit's (e.g. JIT compilation), done
        before the fit's clock starts; its time is recorded as ``info["warmup_s"]``."""

    @abstractmethod
    def _fit(self, adata: ad.AnnData, batch_key: str | None) -> None: ...

    @abstractmethod
    def latent(self) -> np.ndarray:
        """(n_cells, 10) latent representation of the training cells."""

    def train_nll(self) -> float | None:
        """Mean negative log-likelihood per training cell (``None``: not a likelihood model)."""
        return None

    def heldout_nll(self, adata_new: ad.AnnData) -> float | None:
        """Mean negative log-likelihood per held-out cell (``None``: unsupported)."""
        return None

    def impute(self) -> dict[str, np.ndarray]:
        """Imputed (expected) counts of the training cells, one matrix per variant."""
        return {}


# --------------------------------------------------------------------------- zinbgrad


class ZinbgradMethod(Method):
    """zinbgrad's :class:`~zinbgrad.ZINBWaVE` with K=10 and the package defaults.

    Options: any keyword of ``ZINBWaVE`` (e.g. ``max_epochs``, ``tol``, ``batch_size``);
    ``None`` values are dropped so that the package defaults (being tuned) apply.

    * train NLL: ``-loglik_ / n`` (exact ZINB log-likelihood at the fitted parameters);
    * held-out NLL: ``-score_samples(new).mean()`` (W and gamma of the new cells re-optimized,
      gene parameters fixed);
    * imputation: ``E[Y] = (1 - pi) * mu`` (the ZINB mean) and ``mu`` (the negative-binomial
      mean, comparable to scVI's ``px_rate``), from ``get_likelihood_params()`` or, in
      versions without it, from the fitted parameters (log mu = X beta_mu + (V gamma_mu)^T +
      W alpha_mu, logit pi likewise).
    """

    name = "zinbgrad"
    label = "zinbgrad"
    supports_batch = True
    is_likelihood_model = True

    @classmethod
    def versions(cls) -> dict[str, str]:
        import torch

        import zinbgrad

        return {
            "zinbgrad": zinbgrad.__version__,
            "zinbgrad_path": str(Path(zinbgrad.__file__).parent),
            "torch": torch.__version__,
        }

    def _fit(self, adata: ad.AnnData, batch_key: str | None) -> None:
        from zinbgrad import ZINBWaVE

        kw = {k: v for k, v in self.options.items() if v is not None}
        self.batch_key = batch_key
        self.model = ZINBWaVE(n_components=N_LATENT, random_state=self.seed, **kw)
        self.model.fit(adata, batch_key=batch_key)
        self.n_cells = adata.n_obs
        m = self.model
        self.info = {
            "n_iter": int(m.n_iter_),
            "converged": bool(m.converged_),
            "objective": float(m.objective_),
            "loglik": float(m.loglik_),
            "internal_fit_time": float(m.fit_time_),
            "history_seconds_last": float(m.history_[-1]["seconds"]) if m.history_ else None,
        }

    def latent(self) -> np.ndarray:
        return np.asarray(self.model.W_, dtype=np.float64)

    def train_nll(self) -> float:
        return -float(self.model.loglik_) / self.n_cells

    def heldout_nll(self, adata_new: ad.AnnData) -> float:
        ll = self.model.score_samples(adata_new, batch_key=self.batch_key)
        return -float(np.mean(ll))

    def _linear_predictors(self) -> tuple[np.ndarray, np.ndarray]:
        m = self.model
        X = m.X_
        # the design columns used by each part (all columns unless which_X_* was set)
        Xmu = X if m.which_X_mu is None else X[:, np.atleast_1d(m.which_X_mu)]
        Xpi = X if m.which_X_pi is None else X[:, np.atleast_1d(m.which_X_pi)]
        Vmu = m.V_ if m.which_V_mu is None else m.V_[:, np.atleast_1d(m.which_V_mu)]
        Vpi = m.V_ if m.which_V_pi is None else m.V_[:, np.atleast_1d(m.which_V_pi)]
        eta_mu = Xmu @ m.beta_mu_ + (Vmu @ m.gamma_mu_).T + m.W_ @ m.alpha_mu_
        eta_pi = Xpi @ m.beta_pi_ + (Vpi @ m.gamma_pi_).T + m.W_ @ m.alpha_pi_
        if getattr(m, "O_mu_", None) is not None:
            eta_mu = eta_mu + m.O_mu_
        if getattr(m, "O_pi_", None) is not None:
            eta_pi = eta_pi + m.O_pi_
        return eta_mu, eta_pi

    def impute(self) -> dict[str, np.ndarray]:
        # the package's accessor where it exists; the same formula by hand otherwise (the two
        # agree to 1e-14, checked on zeisel_thinned with and without the batch in X)
        if hasattr(self.model, "get_likelihood_params"):
            p = self.model.get_likelihood_params()
            mu, pi = np.asarray(p["mu"], dtype=np.float64), np.asarray(p["pi"], dtype=np.float64)
            return {"E[Y]": (1.0 - pi) * mu, "mu": mu}
        eta_mu, eta_pi = self._linear_predictors()
        mu = np.exp(eta_mu)
        if self.model.zero_inflation:
            pi = 1.0 / (1.0 + np.exp(-eta_pi))
        else:
            pi = np.zeros_like(mu)
        return {"E[Y]": (1.0 - pi) * mu, "mu": mu}


# --------------------------------------------------------------------------- scVI


class SCVIMethod(Method):
    """scvi-tools' ``SCVI`` with its documented defaults: ``n_latent=10``,
    ``gene_likelihood="zinb"``, ``max_epochs`` from ``get_max_epochs_heuristic`` (400 below
    20,000 cells), batch size 128, ``train_size`` 0.9 (scVI holds out 10% of the cells it is
    given for validation), seeded with ``scvi.settings.seed``.

    Options: ``max_epochs`` (``None``: the default rule), ``max_epochs_cap`` (train at most
    this many of the default rule's epochs: timing runs that extrapolate), ``n_mc_samples``
    (importance samples of ``get_marginal_ll``, default 1000 = scVI's default),
    ``n_mc_samples_per_pass`` (speed only), ``max_nll_cells`` (the training NLL is estimated
    on at most this many random training cells), ``impute_samples`` (posterior samples
    averaged by the imputation).

    * NLL: ``-get_marginal_ll`` (importance sampling over z with the observed library size);
    * latent: ``get_latent_representation()`` (posterior mean of z);
    * imputation: ``get_normalized_expression(library_size="latent", n_samples=s,
      return_mean=True)``, i.e. the posterior mean of the negative-binomial rate ``px_rate``
      (library x scale), without the zero-inflation factor, as scVI's published imputation.
    """

    name = "scvi"
    label = "scVI"
    supports_batch = True
    is_likelihood_model = True

    @classmethod
    def available(cls) -> tuple[bool, str]:
        if importlib.util.find_spec("scvi") is None:
            return False, (
                "scvi-tools is not importable in this interpreter; install the bench extra "
                "in a separate venv (see BENCHMARKS.md) and pass --scvi-python"
            )
        return True, ""

    @classmethod
    def versions(cls) -> dict[str, str]:
        import scvi
        import torch

        out = {"scvi-tools": scvi.__version__, "torch": torch.__version__}
        try:
            import lightning

            out["lightning"] = lightning.__version__
        except Exception:  # noqa: BLE001 - version reporting only
            pass
        return out

    def _fit(self, adata: ad.AnnData, batch_key: str | None) -> None:
        import logging

        import scvi

        scvi.settings.seed = self.seed
        scvi.settings.verbosity = logging.WARNING
        scvi.settings.dl_num_workers = 0
        warnings.filterwarnings("ignore")
        self.adata = adata.copy()
        self.batch_key = batch_key
        scvi.model.SCVI.setup_anndata(self.adata, batch_key=batch_key)
        self.model = scvi.model.SCVI(self.adata, n_latent=N_LATENT, gene_likelihood="zinb")
        from scvi.model._utils import get_max_epochs_heuristic

        default_epochs = int(get_max_epochs_heuristic(adata.n_obs))
        max_epochs = self.options.get("max_epochs")
        rule = "default heuristic" if max_epochs is None else "given"
        cap = self.options.get("max_epochs_cap")
        if max_epochs is None and cap is not None and int(cap) < default_epochs:
            max_epochs, rule = int(cap), f"capped at {int(cap)} (default {default_epochs})"
        t_train = time.perf_counter()
        self.model.train(
            max_epochs=max_epochs,
            accelerator="cpu",
            enable_progress_bar=False,
            logger=False,
            enable_checkpointing=False,
        )
        self.info = {
            "max_epochs": int(max_epochs) if max_epochs is not None else default_epochs,
            "max_epochs_rule": rule,
            "default_max_epochs": default_epochs,
            "train_s": time.perf_counter() - t_train,
        }
        hist = getattr(self.model, "history", None) or {}
        for key in ("elbo_train", "elbo_validation", "reconstruction_loss_train"):
            if key in hist and len(hist[key]):
                self.info[key + "_last"] = float(np.asarray(hist[key]).ravel()[-1])

    def latent(self) -> np.ndarray:
        return np.asarray(self.model.get_latent_representation(), dtype=np.float64)

    def _nll(self, adata: ad.AnnData) -> float:
        n_mc = int(self.options.get("n_mc_samples", 1000))
        per_pass = int(min(self.options.get("n_mc_samples_per_pass", 100), n_mc))
        ll = self.model.get_marginal_ll(
            adata, n_mc_samples=n_mc, n_mc_samples_per_pass=per_pass, return_mean=False
        )
        return -float(np.mean(np.asarray(ll, dtype=np.float64)))

    def train_nll(self) -> float:
        max_cells = self.options.get("max_nll_cells")
        adata = self.adata
        if max_cells is not None and adata.n_obs > int(max_cells):
            rng = np.random.default_rng(self.seed)
            idx = np.sort(rng.choice(adata.n_obs, size=int(max_cells), replace=False))
            adata = adata[idx].copy()
            self.info["train_nll_cells"] = int(max_cells)
        return self._nll(adata)

    def heldout_nll(self, adata_new: ad.AnnData) -> float:
        return self._nll(adata_new.copy())

    def impute(self) -> dict[str, np.ndarray]:
        s = int(self.options.get("impute_samples", 25))
        expr = self.model.get_normalized_expression(
            library_size="latent", n_samples=s, return_mean=True, return_numpy=True
        )
        return {"px_rate": np.asarray(expr, dtype=np.float64)}


# --------------------------------------------------------------------------- PCA


class PCABaseline(Method):
    """PCA (10 components) of ``log1p(counts / library size * median library size)``.

    Not a likelihood model (NLL: n/a) and no batch correction. Imputation: the rank-10
    reconstruction mapped back to counts, ``expm1(recon) * library / median library``,
    clipped at 0.
    """

    name = "pca"
    label = "PCA"

    @classmethod
    def versions(cls) -> dict[str, str]:
        import sklearn

        return {"scikit-learn": sklearn.__version__}

    def _fit(self, adata: ad.AnnData, batch_key: str | None) -> None:
        from sklearn.decomposition import PCA

        X = _dense(adata.X).astype(np.float64)
        lib = X.sum(axis=1, keepdims=True)
        lib[lib == 0] = 1.0
        self.scale = float(np.median(lib))
        self.lib = lib
        Xn = np.log1p(X / lib * self.scale)
        k = min(N_LATENT, min(Xn.shape) - 1)
        self.pca = PCA(n_components=k, random_state=self.seed, svd_solver="auto")
        self.scores = self.pca.fit_transform(Xn)

    def latent(self) -> np.ndarray:
        return np.asarray(self.scores, dtype=np.float64)

    def impute(self) -> dict[str, np.ndarray]:
        recon = self.pca.inverse_transform(self.scores)
        return {"reconstruction": np.clip(np.expm1(recon), 0.0, None) * self.lib / self.scale}


def run_harmony(scores: np.ndarray, obs, batch_key: str, seed: int, ncores: int = 1) -> np.ndarray:
    """harmonypy's ``run_harmony`` with its defaults, seeded: the corrected (cells x dims)
    ``scores`` of the cells of ``obs`` (their batches in ``obs[batch_key]``)."""
    import harmonypy

    ho = harmonypy.run_harmony(
        scores, obs[[batch_key]], [batch_key], random_state=seed, verbose=False, ncores=ncores
    )
    Z = np.asarray(ho.Z_corr, dtype=np.float64)
    # harmonypy < 0.1 returns (dims, cells), 2.x (cells, dims)
    return Z if Z.shape[0] == scores.shape[0] else Z.T


class HarmonyMethod(PCABaseline):
    """Harmony (harmonypy) on the 10 PCA components of :class:`PCABaseline`.

    The fast integration baseline of scanpy users (``sc.external.pp.harmony_integrate`` calls
    the same function): ``harmonypy.run_harmony(scores, obs, [batch_key])`` with its defaults,
    seeded. The fit time includes the PCA. Without ``batch_key`` it is plain PCA. Option:
    ``ncores`` (harmonypy's threads; default 1).
    """

    name = "harmony"
    label = "Harmony"
    supports_batch = True
    requires = ("harmonypy",)

    @classmethod
    def versions(cls) -> dict[str, str]:
        import importlib.metadata as md

        return {**super().versions(), "harmonypy": md.version("harmonypy")}

    def _fit(self, adata: ad.AnnData, batch_key: str | None) -> None:
        super()._fit(adata, batch_key)
        if batch_key is None:
            return
        self.scores = run_harmony(
            self.scores, adata.obs, batch_key, self.seed, int(self.options.get("ncores", 1))
        )

    def impute(self) -> dict[str, np.ndarray]:
        return {}


class ScanpyPCA(Method):
    """scanpy's everyday pipeline: ``sc.pp.normalize_total`` (to the median library size),
    ``sc.pp.log1p`` and ``sc.pp.pca(n_comps=10)`` on the sparse counts (scanpy's default
    solver for sparse data, no densification). Not a likelihood model; no batch model."""

    name = "scanpy"
    label = "scanpy PCA"
    requires = ("scanpy",)

    @classmethod
    def versions(cls) -> dict[str, str]:
        import scanpy

        return {"scanpy": scanpy.__version__}

    def _prepare(self) -> None:
        # the first call of these functions in a process compiles numba kernels (~10 s)
        self._pipeline(sp.random(200, 50, density=0.3, format="csr", random_state=0) * 10)

    def _fit(self, adata: ad.AnnData, batch_key: str | None) -> None:
        self.scores = self._pipeline(adata.X)

    def _pipeline(self, X) -> np.ndarray:
        import scanpy as sc

        a = ad.AnnData(sp.csr_matrix(X, dtype=np.float32))
        sc.pp.normalize_total(a)
        sc.pp.log1p(a)
        sc.pp.pca(a, n_comps=min(N_LATENT, min(a.shape) - 1), random_state=self.seed)
        return np.asarray(a.obsm["X_pca"], dtype=np.float64)

    def latent(self) -> np.ndarray:
        return self.scores


# --------------------------------------------------------------------------- R zinbwave


_R_SCRIPT = r"""
suppressMessages({library(zinbwave); library(Matrix)})
args <- commandArgs(trailingOnly = TRUE)
d <- args[1]; K <- as.integer(args[2]); seed <- as.integer(args[3])
set.seed(seed)
Y <- as.matrix(readMM(file.path(d, "counts.mtx")))   # cells x genes
storage.mode(Y) <- "integer"
Xf <- file.path(d, "X.csv")
if (file.exists(Xf)) {
  X <- as.matrix(read.csv(Xf, header = FALSE))
  fit <- zinbFit(t(Y), X = X, K = K, BPPARAM = BiocParallel::SerialParam())
} else {
  fit <- zinbFit(t(Y), K = K, BPPARAM = BiocParallel::SerialParam())
}
write.table(getW(fit), file.path(d, "W.csv"), sep = ",", row.names = FALSE, col.names = FALSE)
mu <- getMu(fit); pi <- getPi(fit)
write.table((1 - pi) * mu, file.path(d, "EY.csv"), sep = ",", row.names = FALSE,
            col.names = FALSE)
write.table(mu, file.path(d, "mu.csv"), sep = ",", row.names = FALSE, col.names = FALSE)
writeLines(format(zinbwave::loglik(fit, Y), digits = 17), file.path(d, "loglik.txt"))
"""


class RZinbwave(Method):
    """The reference R/Bioconductor ``zinbwave::zinbFit`` (K=10, its defaults), via Rscript.

    Used only when ``Rscript -e 'library(zinbwave)'`` works. Train NLL is ``-loglik / n``;
    held-out NLL is not computed (zinbwave has no projection of new cells with re-optimized
    local parameters in its API); imputation ``E[Y] = (1 - pi) mu`` and ``mu``. This adapter
    could not be exercised on the benchmark machine (no R there).
    """

    name = "zinbwave_r"
    label = "R zinbwave"
    supports_batch = True
    is_likelihood_model = True

    @classmethod
    def available(cls) -> tuple[bool, str]:
        rscript = shutil.which("Rscript")
        if rscript is None:
            return False, "Rscript not found on PATH (R zinbwave skipped)"
        try:
            proc = subprocess.run(
                [rscript, "-e", "suppressMessages(library(zinbwave))"],
                capture_output=True,
                text=True,
                timeout=120,
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            return False, f"Rscript -e 'library(zinbwave)' failed: {err}"
        if proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            return False, "Rscript -e 'library(zinbwave)' failed: " + (msg[-1] if msg else "")
        return True, ""

    @classmethod
    def versions(cls) -> dict[str, str]:
        try:
            out = subprocess.run(
                ["Rscript", "-e", "cat(as.character(packageVersion('zinbwave')))"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            return {"zinbwave (R)": out.stdout.strip()}
        except (OSError, subprocess.TimeoutExpired):
            return {}

    def _fit(self, adata: ad.AnnData, batch_key: str | None) -> None:
        from scipy.io import mmwrite

        tmp = Path(tempfile.mkdtemp(prefix="zinbwave_r_"))
        mmwrite(str(tmp / "counts.mtx"), sp.csr_matrix(adata.X).astype(np.int64))
        if batch_key is not None:
            levels = adata.obs[batch_key].astype("category")
            codes = levels.cat.codes.to_numpy()
            X = np.column_stack(
                [np.ones(adata.n_obs)]
                + [(codes == k).astype(float) for k in range(1, len(levels.cat.categories))]
            )
            np.savetxt(tmp / "X.csv", X, delimiter=",")
        subprocess.run(
            ["Rscript", "-e", _R_SCRIPT, str(tmp), str(N_LATENT), str(self.seed)],
            check=True,
            capture_output=True,
            env={**os.environ},
        )
        self.W = np.loadtxt(tmp / "W.csv", delimiter=",", ndmin=2)
        self.EY = np.loadtxt(tmp / "EY.csv", delimiter=",", ndmin=2)
        self.mu = np.loadtxt(tmp / "mu.csv", delimiter=",", ndmin=2)
        self.loglik = float((tmp / "loglik.txt").read_text().strip())
        self.n_cells = adata.n_obs
        shutil.rmtree(tmp, ignore_errors=True)

    def latent(self) -> np.ndarray:
        return self.W

    def train_nll(self) -> float:
        return -self.loglik / self.n_cells

    def impute(self) -> dict[str, np.ndarray]:
        return {"E[Y]": self.EY, "mu": self.mu}


METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (ZinbgradMethod, SCVIMethod, RZinbwave, PCABaseline, HarmonyMethod, ScanpyPCA)
}


def make_method(name: str, seed: int = 0, options: dict[str, Any] | None = None) -> Method:
    """Instantiate the adapter called ``name``."""
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name](seed=seed, options=options)
