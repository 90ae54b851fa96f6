"""The user-facing estimator: :class:`ZINBWaVE`, in scikit-learn style.

The estimator holds the hyper-parameters and the fitted state and delegates: runtime policy to
:mod:`zinbgrad.runtime`, design encoding to :mod:`zinbgrad.encoding`, penalties to
:mod:`zinbgrad.penalties`, fit support to :mod:`zinbgrad.fitting`, new cells to
:mod:`zinbgrad.projection` and :mod:`zinbgrad.query`, the optimization to :mod:`zinbgrad.optim`.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin

from . import persistence
from .data.open import open_counts
from .data.validate import check_unique_names
from .encoding import (
    encode_cells,
    fit_keys,
    make_design,
    training_design,
    training_inputs,
)
from .fitted import fitted_masks, gene_information, latent_scores, model_params
from .fitting import (
    check_hyperparameters,
    checkpoint_tag,
    fit_seed,
    leave_out_empty,
    progress_bar,
    set_criteria,
    store_params,
    store_result,
    warm_start,
)
from .model.outputs import compute_output
from .model.params import Design, Params, Penalty, block_zeta
from .optim.checkpoint import check_checkpoint_paths
from .optim.distributed import current_comm, shard_bounds
from .optim.engine import FitOptions
from .optim.fpenv import flush_denormals
from .optim.sketch import sketch_size
from .optim.solve import solve
from .optim.solvers import resolve_solver
from .optim.state import Problem
from .penalties import DELTA_RATIO as DELTA_RATIO
from .penalties import default_penalty, fitted_penalty, penalty_params
from .persistence import model_file as model_file  # the CLI's import
from .projection import likelihood_tensors, project, training_loglik
from .query import map_query
from .runtime import CPU_BLOCK_ENTRIES as CPU_BLOCK_ENTRIES
from .runtime import GPU_BLOCK_ENTRIES as GPU_BLOCK_ENTRIES
from .runtime import GPU_FLOATS_PER_ENTRY as GPU_FLOATS_PER_ENTRY
from .runtime import GPU_MEMORY_SHARE as GPU_MEMORY_SHARE
from .runtime import (
    block_entries,
    cpu_threads,
    keep_heap,
    resolve_device,
    resolve_dtype,
    resolve_fused,
    torch_setup,
)
from .runtime import gpu_block_entries as gpu_block_entries

__all__ = ["ZINBWaVE", "resolve_device"]


class ZINBWaVE(TransformerMixin, BaseEstimator, auto_wrap_output_keys=None):
    """ZINB-WaVE (Risso et al. 2018) fitted by batched second-order optimization in PyTorch.

    ``Y[i, j] ~ ZINB(mu, theta, pi)`` with ``log mu = X beta_mu + (V gamma_mu)^T + W alpha_mu +
    O_mu``, ``logit pi = X beta_pi + (V gamma_pi)^T + W alpha_pi + O_pi`` and ``theta =
    exp(zeta)``, maximizing zinbwave's penalized log-likelihood (same penalty, defaults and
    orthogonalized W).

    Parameters
    ----------
    n_components
        K, the number of latent factors (0 allowed).
    zero_inflation
        ``False`` fits a plain negative binomial model.
    common_dispersion
        One dispersion for all genes (zinbwave's default) or one per gene.
    epsilon
        Global penalty scale (default: the number of genes J); the specific ones below
        default to zinbwave's ``epsilon/J`` (beta, alpha), ``epsilon/n`` (gamma, W) and
        ``epsilon`` (zeta).
    epsilon_beta, epsilon_gamma, epsilon_W, epsilon_alpha, epsilon_zeta, epsilon_min_logit
        Override single penalties; ``epsilon_min_logit`` is the zero-inflation intercepts'.
    epsilon_alpha_pi
        Ridge weight of the zero-inflation loadings ``alpha_pi`` alone (default ``None``:
        ``epsilon_alpha``, zinbwave's model). Not in zinbwave: a larger weight keeps genes
        whose zeros W nearly separates from spending factors on it (see the README,
        "How much a fit moves with the seed").
    batch_loadings
        Batch-specific loadings (needs ``batch_key`` at fit): a cell of batch b has mean
        loadings ``alpha_mu + delta_b``, with the offsets ``delta_b`` (K x genes, one per
        batch) ridge-penalized toward 0 by ``epsilon_delta`` and W shared by all batches, so
        that a batch effect may differ between cell types (``W_i delta_b``), not only shift
        each gene (the batch columns of X). ``W_`` stays the batch-free latent space.
        ``False`` (the default) is zinbwave's model.
    epsilon_delta
        Ridge weight of the offsets ``delta_b`` (default: ``30 * epsilon_alpha``, 30 at
        zinbwave's defaults: against 10, better batch correction and held-out likelihood on
        every benchmark set of issue 17, BENCHMARKS.md section 4; larger values pull the
        batches' loadings together, and held-out log-likelihood alone prefers 1000 and more,
        about no offsets).
    batch_dispersion
        A dispersion per gene and batch level (scVI's ``dispersion="gene-batch"``; needs
        ``batch_key`` at fit and ``common_dispersion=False``): a cell of batch b has
        ``theta = exp(zeta_batch_[b])``. zinbwave's ``epsilon_zeta`` then penalizes the
        variance of all the batches' and genes' log dispersions together. New cells
        (``transform``, ``score_samples``, ...) use their batch's dispersion (their batch read
        from ``.obs[batch_key]``, a level the fit saw). ``False`` (the default) is
        zinbwave's model.
    which_X_mu, which_X_pi, which_V_mu, which_V_pi
        Column indices of X / V used in the mean and zero-inflation models (default: all).
        With ``batch_key`` the batch is in both (a batch-specific zero-inflation intercept).
    max_epochs
        Maximum number of epochs (full sweeps over the cells). The sketch's own fit
        (``solver="sketch"``) is not counted; it stops at ``tol`` or after 100 epochs.
    tol
        Stop when the relative change of the penalized log-likelihood between epochs is below
        this (zinbwave's ``stop.epsilon.optimize``).
    solver
        ``"full"`` (block Newton sweeps over all cells from zinbwave's initialization),
        ``"sketch"`` (fit a subsample of ``sketch_size`` cells to convergence, then solve every
        cell with those gene parameters and continue with full sweeps: the tens of sweeps that
        the W/alpha coupling needs are paid on the subsample only), ``"stochastic"``
        (minibatch epochs, then full sweeps) or ``"auto"`` (``"sketch"`` when the sketch is at
        most half of the cells, else ``"full"``).
    sketch_size
        Cells in the sketch (default: max(20,000, 2^25 / n_genes), about 47,000 cells for 715
        genes).
    batch_size
        Cells per minibatch for the stochastic solver.
    local_steps
        Newton steps on the cells' local parameters per epoch.
    block_entries
        Cells are processed in blocks of about this many matrix entries (bounds memory: a
        block's working arrays take ~20 x ``block_entries`` floats with the fused kernels, up
        to ~60 x with the eager ones). ``None``: 2^21 on the CPU
        (larger blocks leave the cache, smaller ones pay per-block overhead; see
        BENCHMARKS.md); on a GPU the largest power of two up to 2^27 whose working arrays
        take at most a quarter of the free GPU memory (fewer, larger kernels: 2^27 fitted
        1.3M cells 2.7 times faster than 2^24 on an H200, with ~15 GB of working arrays in
        float32; 2^25 on a 16 GB GPU).
    device
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    fused
        Evaluate the likelihood derivatives with kernels fused by ``torch.compile`` (several
        times faster; needs a C++ compiler on CPU, Triton on GPU; falls back to plain torch
        with a warning where compiling fails). ``"auto"``: from ``5e7`` matrix entries, and
        on a GPU, compiled in the process by ``torch.compile`` (seconds per process). With
        the opt-in kernel cache (``ZINBGRAD_KERNEL_CACHE=on`` or a directory in the
        environment), also on the CPU from ``1e6`` entries: the kernels compiled ahead of
        time into this machine's cache (``~/.cache/zinbgrad/kernels``; loaded in
        milliseconds); where they are missing the fit runs unfused and a background process
        builds them for later fits once this process is idle (about half a minute of one
        CPU, once per machine and version). Fused and unfused results agree to float
        rounding, not bitwise. ``ZINBGRAD_FUSED=0`` turns it off.
    dtype
        ``"auto"`` (the default): float32 on a GPU; on the CPU float32 for fits of at least
        a million matrix entries (cells x genes, ``runtime.CPU_FLOAT32_MIN_ENTRIES``), float64
        below. From that size float32 fits took 1.8-4x less time on 2 CPU cores and agreed
        with float64 fits within the seed-to-seed spread of a fit (objective, neighbourhoods,
        cell-type scores; BENCHMARKS.md, section 7); on tiny data float32 saves nothing and
        its optima spread more.
        ``"float32"`` or ``"float64"``: always that dtype. New cells (:meth:`transform`,
        :meth:`score_samples`) follow the same rule on their own size.
    allow_non_integer
        Accept non-integer counts (with a warning), e.g. ambient-corrected data.
    empty_genes
        Genes without a non-zero count in the data at hand (a train/test split, a cluster, one
        sample of a study): ``"exclude"`` (default) leaves them out of the fit with one
        warning that counts them (their parameters are not identified: the likelihood grows
        without bound as their mean goes to 0); ``"error"`` refuses the data, naming them.
        The fit on the other genes is exactly the fit of the data with those genes removed.
        ``gene_fitted_`` records which genes were fitted; in an AnnData,
        ``var[key_added + "_fitted"]``. Outputs for them: NaN loadings, intercepts and
        dispersion; for the training cells (all zeros there) the model of a point mass at 0:
        mu = 0, pi = 0, expected and imputed counts 0, residuals 0, observational weight 1,
        log mu = -inf. New cells are projected on the fitted genes only (counts they have in
        the excluded genes are ignored).
    empty_cells
        Cells without a non-zero count (they have no latent position): ``"error"``
        (default) refuses the data, naming them; ``"exclude"`` leaves them out of the fit
        (in-memory data only), recorded in ``cell_fitted_`` (in an AnnData,
        ``obs[key_added + "_fitted"]``); their rows of W and of every per-cell output are
        NaN.
    random_state
        Seed of the sketch's cells (``solver="sketch"``, taken by ``"auto"`` on large data)
        and of the minibatch order (``solver="stochastic"``): an integer (the default 0
        makes fits reproducible), or ``None`` / a numpy ``RandomState`` to draw the seed from
        numpy's random state, as in scikit-learn. The initialization is deterministic, so a
        full-batch fit does not depend on it.
    verbose
        Show a progress bar (tqdm) on fits that take longer than two seconds. It names the
        phase (initialization, sketch, extension, sweeps, minibatch epochs) and counts the
        epochs of each; phases that stop at ``tol`` show no total (and so no ETA).

    Attributes
    ----------
    W_ : ndarray (n_cells, K)
        Latent factors of the training cells (orthogonal columns).
    alpha_mu_, alpha_pi_ : ndarray (K, n_genes)
    beta_mu_, beta_pi_ : ndarray (M_mu, n_genes), (M_pi, n_genes)
    gamma_mu_, gamma_pi_ : ndarray (L_mu, n_cells), (L_pi, n_cells)
    delta_mu_ : ndarray (n_batches, K, n_genes) or None
        Batch-specific loading offsets (``batch_loadings=True``; batches in the order of
        ``batch_info_["levels"]``), else ``None``.
    zeta_ : ndarray (n_genes,)
        Log inverse dispersion (``theta = exp(zeta)``); ``theta_`` is a property. With
        ``batch_dispersion``, the mean over the batch levels of ``zeta_batch_`` (a summary:
        the model uses ``zeta_batch_``).
    zeta_batch_ : ndarray (n_batches, n_genes) or None
        Log inverse dispersion per batch level (``batch_dispersion=True``; batches in the
        order of ``batch_info_["levels"]``), else ``None``.
    loglik_, penalty_, objective_ : float
        Log-likelihood, penalty and penalized log-likelihood at the fitted parameters.
    history_ : list of dict
        Per epoch: ``epoch``, ``loglik``, ``objective``, ``seconds``, ``phase``. ``loglik`` and
        ``objective`` are those of one parameter state the epoch passed through: after the
        gene step, or (when the gene step is checked in the next epoch) the epoch's new cell
        values with the gene values they were fitted to.
    n_iter_ : int
    converged_ : bool
        Whether the stopping rule (``tol``) was met; ``False`` when ``max_epochs`` stopped
        the fit first (with a ``sklearn.exceptions.ConvergenceWarning``). The rule watches the
        objective only: where it stops, W may still move (README, "How much a fit moves with
        the seed").
    n_params_, aic_, bic_ : as zinbwave's ``nParams``, ``zinbAIC``, ``zinbBIC``.
    X_ : ndarray (n_cells, M)
        The full cell design used (``X_columns_`` names its columns).
    V_ : ndarray (n_genes, L)
    var_names_ : ndarray
        Names of the fitted genes (new data is aligned on them).
    var_names_in_ : ndarray
        Gene names of the data passed to :meth:`fit` (those left out included).
    gene_fitted_ : ndarray of bool (len(var_names_in_),)
        Which genes of the data were fitted (see ``empty_genes``).
    cell_fitted_ : ndarray of bool (cells of the data,)
        Which cells of the data were fitted (see ``empty_cells``); ``W_`` and the
        per-cell arrays hold the fitted cells.
    batch_info_ : dict
        ``categories``: the levels (reference first) of every categorical ``obs`` column in
        X, against which new cells are encoded; with a ``batch_key`` also ``batch_key``, its
        ``levels`` and ``reference``.
    penalty_params_ : dict
        Every epsilon as used.
    fit_path_ : dict of ndarray or None
        The gene parameters the fit passed through (at most 24 of its sweeps, float32, see
        :class:`zinbgrad.optim.engine.FitPath`). :meth:`transform` and :meth:`score` take new
        cells along it from zero before solving their local problems at the fitted genes: the
        local problems are not concave, and a cold solve lands in poorer local optima. ``None``
        for models built by :meth:`from_params` or fitted with ``solver="stochastic"`` (then
        zinbwave's initialization is the starting point).
    """

    def __init__(
        self,
        n_components: int = 10,
        *,
        zero_inflation: bool = True,
        common_dispersion: bool = True,
        epsilon: float | None = None,
        epsilon_beta: float | None = None,
        epsilon_gamma: float | None = None,
        epsilon_W: float | None = None,
        epsilon_alpha: float | None = None,
        epsilon_zeta: float | None = None,
        epsilon_min_logit: float = 1e-3,
        epsilon_alpha_pi: float | None = None,
        batch_loadings: bool = False,
        epsilon_delta: float | None = None,
        batch_dispersion: bool = False,
        which_X_mu=None,
        which_X_pi=None,
        which_V_mu=None,
        which_V_pi=None,
        max_epochs: int = 100,
        tol: float = 1e-4,
        solver: str = "auto",
        sketch_size: int | None = None,
        batch_size: int | None = None,
        local_steps: int = 1,
        block_entries: int | None = None,
        device: str = "auto",
        fused: bool | str = "auto",
        dtype: str = "auto",
        allow_non_integer: bool = False,
        empty_genes: str = "exclude",
        empty_cells: str = "error",
        random_state: int | np.random.RandomState | None = 0,
        verbose: bool = True,
    ) -> None:
        self.n_components = n_components
        self.zero_inflation = zero_inflation
        self.common_dispersion = common_dispersion
        self.epsilon = epsilon
        self.epsilon_beta = epsilon_beta
        self.epsilon_gamma = epsilon_gamma
        self.epsilon_W = epsilon_W
        self.epsilon_alpha = epsilon_alpha
        self.epsilon_zeta = epsilon_zeta
        self.epsilon_min_logit = epsilon_min_logit
        self.epsilon_alpha_pi = epsilon_alpha_pi
        self.batch_loadings = batch_loadings
        self.epsilon_delta = epsilon_delta
        self.batch_dispersion = batch_dispersion
        self.which_X_mu = which_X_mu
        self.which_X_pi = which_X_pi
        self.which_V_mu = which_V_mu
        self.which_V_pi = which_V_pi
        self.max_epochs = max_epochs
        self.tol = tol
        self.solver = solver
        self.sketch_size = sketch_size
        self.batch_size = batch_size
        self.local_steps = local_steps
        self.block_entries = block_entries
        self.device = device
        self.fused = fused
        self.dtype = dtype
        self.allow_non_integer = allow_non_integer
        self.empty_genes = empty_genes
        self.empty_cells = empty_cells
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ helpers
    def _block_entries(self, device: torch.device, dtype: torch.dtype | None = None) -> int:
        """``block_entries``, or its default for ``device`` (see the class docstring)."""
        return block_entries(self.block_entries, device, dtype)

    def _progress(self, stochastic_epochs: int | None = None):
        """A tqdm bar and its per-epoch callback (:func:`zinbgrad.fitting.progress_bar`)."""
        return progress_bar(self.verbose, stochastic_epochs)

    def _penalty_obj(self, design: Design) -> Penalty:
        """The fitted penalty (:func:`zinbgrad.penalties.fitted_penalty`)."""
        return fitted_penalty(self, design)

    # ------------------------------------------------------------------ fit
    def _fit_options(self, n, J, dev, dt, checkpoint, checkpoint_every, tag, t_start):
        """The optimizer's settings for a fit of ``n`` x ``J`` counts: ``(options, sketch
        cells, progress bar or None)``; the solver is resolved (one rule:
        :func:`zinbgrad.optim.solvers.resolve_solver`)."""
        m = sketch_size(
            n,
            J,
            self.n_components,
            self.sketch_size,
            max_fraction=1.0 if self.solver == "sketch" else None,
        )
        solver = resolve_solver(self.solver, n, m)
        stochastic = min(FitOptions().stochastic_epochs, self.max_epochs)
        cb, bar = self._progress(stochastic if solver == "stochastic" else None)
        opts = FitOptions(
            fused=resolve_fused(self.fused, dev, n * J),
            max_epochs=self.max_epochs,
            tol=self.tol,
            local_steps=self.local_steps,
            block_entries=self._block_entries(dev, dt),
            batch_size=self.batch_size,
            solver=solver,
            progress=cb,
            checkpoint_path=None if checkpoint is None else str(checkpoint),
            checkpoint_every=checkpoint_every,
            checkpoint_tag=tag,
            t_origin=t_start,
        )
        return opts, m, bar

    def fit(
        self,
        data,
        y=None,
        *,
        layer: str | None = None,
        batch_key: str | None = None,
        covariate_keys: list[str] | None = None,
        X=None,
        V=None,
        O_mu=None,
        O_pi=None,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
        resume: str | os.PathLike | None = None,
        init: ZINBWaVE | Params | None = None,
    ) -> ZINBWaVE:
        """Fit the model to a cells x genes count matrix.

        Parameters
        ----------
        data
            AnnData (counts in ``.X`` or ``layer``), numpy array, scipy.sparse matrix or
            DataFrame of raw counts, cells x genes (never modified); or the path of an
            ``.h5ad`` file / a backed AnnData (``backed="r"``) with CSR counts, which is then
            streamed from disk in blocks of cells and never loaded whole. A view of a backed
            AnnData (``adata[cells, genes]``) reads just the selected part, into memory.
        y
            Ignored (scikit-learn API).
        layer
            AnnData layer with the counts.
        batch_key
            ``adata.obs`` column whose levels become indicator columns of X (first level is
            the reference); the batch is then modelled in X, i.e. removed from W.
        covariate_keys
            Further ``adata.obs`` columns for X (categorical -> indicators, numeric as is).
        X, V
            Explicit cell (n x M) and gene (J x L) design matrices; default intercepts.
        O_mu, O_pi
            Offsets, (n,) / (n, 1) per cell or (n, J).
        checkpoint
            Write all parameters and the optimizer state to this ``.npz`` every
            ``checkpoint_every`` epochs (atomically: temporary file, then rename).
        resume
            Continue an interrupted fit from its checkpoint (same data and settings).
        init
            Start from this fit instead of zinbwave's initialization (a warm start): a
            fitted ``ZINBWaVE`` of the same cells and genes (and design) with at least
            ``n_components`` factors, or its :class:`~zinbgrad.model.Params`. Its leading
            ``n_components`` factors after zinbwave's orthogonalization (ordered by singular
            value: the best approximation of its ``W alpha`` of that rank) and its fit path
            are the start (:func:`zinbgrad.optim.warm.leading_components`); the sketch is
            skipped. ``None`` (the default): zinbwave's initialization.

        Notes
        -----
        Under ``torchrun`` (an initialized ``torch.distributed`` process group) every process
        fits its own contiguous shard of the cells; gene statistics are all-reduced and all
        processes end with the same model (their W gathered).
        """
        t_start = time.perf_counter()
        comm = current_comm()
        dev, _ = torch_setup(self.device, self.dtype)  # checks both before any work
        # before any work: what would otherwise fail at the first checkpoint or the resume
        check_checkpoint_paths(checkpoint, resume, checkpoint_every, comm.world_size)
        inp = open_counts(data, layer, allow_non_integer=self.allow_non_integer, check_empty=False)
        check_unique_names(inp.obs_names, inp.var_names)
        cell_fitted, gene_fitted, var_names_in = leave_out_empty(self, inp, comm.rank == 0)
        n, J = inp.shape
        dt = resolve_dtype(self.dtype, dev, n * J)
        with cpu_threads(dev, n * J), keep_heap(dev), flush_denormals(dev.type == "cpu"):
            check_hyperparameters(self, n, J)
            Xm, xnames, batch_info, Vm, O_mu_a, O_pi_a = training_inputs(
                self, inp, X, V, O_mu, O_pi, batch_key, covariate_keys
            )
            design_all = make_design(
                self, Xm, Vm, O_mu_a, O_pi_a, dev, dt, columns=xnames, info=batch_info
            )
            pen = default_penalty(self, design_all)
            start = None if init is None else warm_start(init, self, inp, design_all, pen, resume)
            lo, hi = shard_bounds(n, comm.rank, comm.world_size)
            design = design_all.rows(lo, hi)
            source = inp.source(lo, hi, dt, dev)
            full_source = source if comm.world_size == 1 else inp.source(0, n, dt, dev)
            seed = fit_seed(self.random_state, comm)
            K = self.n_components
            tag = (
                checkpoint_tag(inp, xnames, Vm, O_mu_a, O_pi_a, penalty_params(pen))
                if checkpoint is not None or resume is not None
                else None
            )
            opts, m, bar = self._fit_options(
                n, J, dev, dt, checkpoint, checkpoint_every, tag, t_start
            )
            if start is not None and opts.solver == "sketch":  # the start replaces the sketch
                opts = dataclasses.replace(opts, solver="full")
            solver = opts.solver
            problem = Problem(
                full_source, design_all, pen, K, self.zero_inflation, self.common_dispersion
            )
            local = dataclasses.replace(problem, source=source, design=design)
            try:
                outcome = solve(
                    problem,
                    opts,
                    local=local,
                    shard=(lo, hi),
                    sketch_cells=m,
                    seed=seed,
                    comm=comm,
                    resume=resume,
                    start=start,
                )
            finally:
                if bar is not None:
                    bar.close()
            final, result = outcome.params, outcome.result
            store_params(self, final, design_all, Xm, xnames, Vm, inp)
            self.penalty_params_ = penalty_params(pen)
            self.var_names_in_ = var_names_in
            self.gene_fitted_, self.cell_fitted_ = gene_fitted, cell_fitted
            self.batch_info_ = batch_info
            store_result(self, result, None if solver == "stochastic" else outcome.trajectory)
            self.fit_time_ = time.perf_counter() - t_start
            set_criteria(self, n, J)
            return self

    @property
    def theta_(self) -> np.ndarray:
        """Inverse dispersion ``exp(zeta_)`` per gene."""
        return np.exp(self.zeta_)

    def fitted_masks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(gene_fitted_, cell_fitted_, var_names_in_)``: which genes and cells of the
        data passed to :meth:`fit` were fitted (all of them for models that left none
        out, loaded from older files or built by :meth:`from_params`)."""
        return fitted_masks(self)

    # ------------------------------------------------------------------ parameters as torch
    def get_params_torch(self, device="cpu", dtype=torch.float64) -> Params:
        """All fitted parameters as a :class:`~zinbgrad.model.Params` of torch tensors."""
        return model_params(self, device, dtype)

    def training_design(self, device="cpu", dtype=torch.float64, *, X=None) -> Design:
        """The design (X, V, offsets) of the training cells; ``X``: a replacement cell design
        of the shape of ``X_`` (e.g. every cell moved to one batch,
        :func:`zinbgrad.model.outputs.batch_design`)."""
        return training_design(self, device, dtype, X)

    # ------------------------------------------------------------------ new cells
    def fit_keys(self) -> tuple[str | None, list[str]]:
        """The ``obs`` columns the fit's design X was built from: ``(batch_key,
        covariate_keys)`` (``(None, [])`` for a model with an intercept only).

        Raises ``ValueError`` for a model fitted with an explicit ``X`` (or built by
        :meth:`from_params` with more than an intercept): its columns come from no ``obs``
        column, so new cells need ``X=``.
        """
        return fit_keys(self)

    encode_cells = encode_cells

    def transform(
        self,
        data,
        *,
        layer: str | None = None,
        X=None,
        reference_batch: bool = False,
        batch_key: str | None = None,
        covariate_keys: list[str] | None = None,
        O_mu=None,
        O_pi=None,
        device: str | torch.device | None = None,
        new_batches: bool = False,
    ) -> np.ndarray:
        """Latent factors W of new cells (gene parameters fixed; zinbwave's projection).

        Parameters
        ----------
        data
            Counts of the new cells (AnnData, array, sparse matrix, DataFrame, or an
            ``.h5ad`` path / backed AnnData, streamed). Genes are aligned by name with the
            training data (extra genes are ignored, missing genes are an error); an array or
            sparse matrix without names must have the model's genes as its columns.
        layer
            AnnData layer with the counts.
        X
            An explicit design for the new cells (n x M, the fit's columns).
        reference_batch
            Encode every new cell as the fit's reference batch (zero numeric covariates)
            instead of reading its batch from ``.obs``.
        batch_key, covariate_keys
            Not needed: the new cells are encoded with the fit's own ``batch_key`` and
            ``covariate_keys``, read from their ``.obs`` (see :meth:`encode_cells`: the
            fitted levels, the fit's reference; a missing column or a level the fit never saw
            is an error). When given they must be the fit's.
        O_mu, O_pi
            Offsets of the new cells, as in :meth:`fit`.
        device
            Overrides the ``device`` parameter for this computation (a fitted model runs on
            any machine: ``"cpu"``, ``"cuda"``, ...).
        new_batches
            Map cells of batch levels the fit did not see: the coefficients of each unseen
            level of the fit's ``batch_key`` (its X column effects, and its loading offsets
            with ``batch_loadings``) are estimated from its cells, every fitted gene parameter
            fixed, before their W (:meth:`map_query`). Without it, an unseen level is an error.
        """
        query = dict(layer=layer, X=X, batch_key=batch_key, covariate_keys=covariate_keys)
        query.update(O_mu=O_mu, O_pi=O_pi)
        return self._new_cells(data, new_batches, reference_batch, device, **query)[0]

    map_query = map_query

    def _new_cells(self, data, new_batches: bool, reference_batch: bool, device, **query):
        """W (numpy) and the per-cell log-likelihood of new cells, for :meth:`transform` and
        :meth:`score_samples`: projected, or with ``new_batches`` mapped (:meth:`map_query`)."""
        if new_batches:
            if reference_batch:
                raise ValueError("pass either new_batches=True or reference_batch=True, not both")
            if query["X"] is not None or query["covariate_keys"]:
                raise ValueError(
                    "new_batches=True reads the batch from obs; X/covariate_keys unused"
                )
            del query["X"], query["covariate_keys"]
            mapped = self.map_query(data, device=device, **query)
            return mapped.W, mapped.loglik
        params, ll, _ = project(self, data, **query, reference_batch=reference_batch, device=device)
        return params.W.cpu().numpy(), ll

    def score_samples(
        self,
        data,
        *,
        layer: str | None = None,
        X=None,
        reference_batch: bool = False,
        batch_key: str | None = None,
        covariate_keys: list[str] | None = None,
        O_mu=None,
        O_pi=None,
        device: str | torch.device | None = None,
        new_batches: bool = False,
    ) -> np.ndarray:
        """Held-out log-likelihood of each new cell (one value per cell), its local
        parameters re-optimized with the gene parameters fixed.

        The keywords are those of :meth:`transform` (the cells' batch is read from ``.obs``;
        with ``new_batches=True``, at the coefficients of the unseen levels estimated from these
        cells).
        """
        query = dict(layer=layer, X=X, batch_key=batch_key, covariate_keys=covariate_keys)
        query.update(O_mu=O_mu, O_pi=O_pi)
        return self._new_cells(data, new_batches, reference_batch, device, **query)[1]

    def score(self, data, y=None, **kw) -> float:
        """Mean held-out log-likelihood per cell (higher is better; the mean of
        :meth:`score_samples`); keywords as in :meth:`transform`."""
        return float(np.mean(self.score_samples(data, **kw)))

    def latent_scores(self, W=None, gene_weights=None) -> np.ndarray:
        """W as principal scores of the latent part of the log mean, for neighbour graphs.

        With ``Wc`` the training cells' W with centred columns and ``Wc alpha_mu_ = U S V^T``,
        the scores of the training cells are ``U S`` (columns by decreasing variance): each
        factor weighted by how much it moves the log means, so that Euclidean distances between
        cells are those between their latent log-mean profiles ``W_i alpha_mu`` (the raw
        ``W_`` weighs its factors by zinbwave's trace-norm balance instead, about the square
        root of that). ``W``: latent factors of other cells (e.g. from :meth:`transform`),
        mapped by the same linear map (default: the training cells' ``W_``).

        ``gene_weights="fisher"`` weighs each gene's log mean by the information its counts
        carry about it (:meth:`gene_information`: about ``mu`` for a gene of low counts, the
        inverse dispersion ``theta`` for a gene of high counts), so that distances are
        measured in how distinguishable the cells' count distributions are rather than in raw
        log-fold changes, which are largest, and noisiest, for genes of few counts; the same
        ``U S`` of ``Wc alpha_mu diag(sqrt(w))``. An array gives one weight per fitted gene.
        In the scib-metrics runs of issue 17 (BENCHMARKS.md section 4, seven data sets and
        seeds) the Fisher-weighted scores of ``batch_loadings`` fits mixed the batches best
        (batch correction 0.91-0.92 on average, unweighted 0.89-0.90, W 0.87-0.89, Harmony
        0.88) and had the highest silhouettes of any zinbgrad representation, but k-means
        found the cell types in them less often (50-init ARI 0.62-0.70 on average against
        0.90-0.93): an option, not the default.

        The batch-specific loading offsets of ``batch_loadings`` do not enter: the scores are
        batch-free, as ``W_`` is.
        """
        return latent_scores(self, W, gene_weights)

    def gene_information(self) -> np.ndarray:
        """Per fitted gene, the mean over the training cells of ``(1 - pi) mu theta / (mu +
        theta)``: the negative binomial's Fisher information about ``log mu`` carried by one
        count, times the chance that it is not a structural zero (the weights of
        ``latent_scores(gene_weights="fisher")``)."""
        return gene_information(self)

    def fit_transform(self, data, y=None, **fit_params) -> np.ndarray:
        return self.fit(data, **fit_params).W_

    # ------------------------------------------------------------------ persistence
    # (the fitted state <-> .npz / AnnData: zinbgrad.persistence)
    save = persistence.save

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "auto") -> ZINBWaVE:
        """Load a model written by :meth:`save` (never unpickles: ``allow_pickle=False``).

        Parameters
        ----------
        path
            The file; ``.npz`` is appended to a name without extension, as :meth:`save` does.
        device
            Where the model computes (``transform``, outputs): ``"auto"``, ``"cpu"``,
            ``"cuda"``, ``"cuda:N"``. It is not part of the file: a model fitted on a GPU
            loads and runs on a machine without one.
        """
        resolve_device(device)  # a device this machine lacks is an error now, not later
        model = persistence.load(cls, path)
        model.device = device
        return model

    from_params = classmethod(persistence.from_params)

    # ------------------------------------------------------------------ likelihood of data
    def loglik(self, data, *, layer: str | None = None) -> float:
        """Log-likelihood of the training counts at the fitted parameters (zinbwave's
        ``loglik``), computed exactly."""
        ll = training_loglik(self, data, layer)
        if not np.isfinite(self.loglik_):  # a model built from parameters: fill in criteria
            self.loglik_ = ll
            self.objective_ = ll - self.penalty_
            set_criteria(self, self.W_.shape[0], len(self.var_names_))
        return ll

    # --- downstream methods (begin) ------------------------------------------------------
    # Accessors and per-entry outputs (mu, pi, residuals, weights, imputation, sampling) live in
    # zinbgrad.model.outputs / zinbgrad.simulate; the methods below are thin wrappers.
    def get_likelihood_params(
        self, data=None, ignore_W: bool = False, **project_kw
    ) -> dict[str, np.ndarray]:
        """Fitted ZINB parameters of every cell and gene.

        Parameters
        ----------
        data
            ``None``: the training cells. Otherwise new cells (AnnData, array, sparse matrix or
            DataFrame of counts): their W and gamma are first fitted with the gene parameters
            fixed, as in :meth:`transform` (genes aligned by name).
        ignore_W
            Set the latent factors to 0 (zinbwave's ``ignoreW``).
        **project_kw
            For new cells: ``layer``, ``X``, ``reference_batch``, ``batch_key``,
            ``covariate_keys``, ``O_mu``, ``O_pi`` as in :meth:`transform` (by default the
            cells' batch and covariates are read from their ``.obs`` with the fit's keys).

        Returns
        -------
        dict
            ``"mu"`` (cells x genes, NB mean), ``"pi"`` (cells x genes, zero-inflation
            probability; 0 without zero inflation) and ``"theta"`` (genes,
            ``exp(zeta_)``, the NB inverse dispersion; with ``batch_dispersion``, cells x
            fitted genes, each cell's batch's ``exp(zeta_batch_)``).
        """
        if getattr(self, "zeta_batch_", None) is not None:
            return self._outputs(("mu", "pi", "theta"), data, ignore_W, project_kw)
        out = self._outputs(("mu", "pi"), data, ignore_W, project_kw)
        return out | {"theta": np.exp(np.asarray(self.zeta_, dtype=np.float64))}

    def _outputs(self, whats, data, ignore_W: bool, project_kw: dict) -> dict[str, np.ndarray]:
        """The per-entry outputs ``whats`` (``"theta"``: each cell's dispersion per batch)."""
        design, params = likelihood_tensors(self, data, project_kw)
        kw = {
            "zero_inflation": bool(self.zero_inflation),
            "ignore_W": ignore_W,
            "block_entries": self._block_entries(torch.device("cpu")),
        }
        out = {w: compute_output(w, design, params, **kw) for w in whats if w != "theta"}
        if "theta" in whats:
            out["theta"] = torch.exp(block_zeta(design, params.zeta, slice(None))).numpy()
        return out

    def get_mu(self, data=None, *, ignore_W: bool = False, **project_kw) -> np.ndarray:
        """NB means ``mu`` (cells x genes) of the training cells or of new cells."""
        return self._outputs(("mu",), data, ignore_W, project_kw)["mu"]

    def get_pi(self, data=None, *, ignore_W: bool = False, **project_kw) -> np.ndarray:
        """Zero-inflation probabilities ``pi`` (cells x genes; 0 without zero inflation)."""
        return self._outputs(("pi",), data, ignore_W, project_kw)["pi"]

    def sample(self, n_cells: int | None = None, random_state: int | None = 0, **kw):
        """Simulate counts from the fitted model (zinbwave's ``zinbSim``).

        ``n_cells=None`` draws one count matrix for the training cells; otherwise ``n_cells``
        cells are drawn with replacement from the training cells. Returns an AnnData (sparse
        integer ``X``, ``layers["nb_counts"]``, ``layers["dropouts"]``); see
        :func:`zinbgrad.simulate.zinb_sim` for the keyword arguments.
        """
        from .simulate import zinb_sim

        return zinb_sim(self, n_cells=n_cells, random_state=random_state, **kw)

    # --- downstream methods (end) --------------------------------------------------------
