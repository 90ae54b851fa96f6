"""The commands that fit or produce a model's input: ``zinbgrad fit``, ``convert`` and
``demo``, each with the builder of its argument parser."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from .common import (
    add_command,
    add_design_options,
    add_force_option,
    check_key,
    check_output_path,
    cli_error,
    options_of,
    read_h5ad_checked,
    run_timed,
    write_h5ad_atomic,
    write_model_into_copy,
)

__all__ = ["add_convert_parser", "add_demo_parser", "add_fit_parser", "demo_figure"]


def _cmd_fit(args: argparse.Namespace) -> int:
    from ..optim.checkpoint import check_checkpoint_paths
    from ..persistence import model_file

    inp, out = Path(args.input), Path(args.output)
    if not inp.exists():
        raise SystemExit(f"error: input file {inp} does not exist")
    resume = None if args.resume is None else Path(args.resume)
    check_output_path({"the input file": inp, "the --resume file": resume}, out, args.force)
    check_key(args.key_added)
    taken = {"the input file": inp, "the output": out}
    if args.save_model:
        try:
            saved = model_file(args.save_model)
        except ValueError as err:
            raise SystemExit(f"error: --save-model: {err}") from None
        check_output_path({**taken, "the --resume file": resume}, saved, args.force, "--save-model")
        taken["the --save-model file"] = saved
    if args.checkpoint is not None or args.resume is not None:
        # the ranks' checkpoint files: --nproc's, or torchrun's when it launched this process
        world = args.nproc if args.nproc > 1 else int(os.environ.get("WORLD_SIZE", "1"))
        try:  # before any work: the checkpoint's folder writable, the resumed file readable
            check_checkpoint_paths(
                args.checkpoint, args.resume, args.checkpoint_every, max(world, 1), taken
            )
        except (ValueError, FileNotFoundError) as err:
            raise cli_error(err) from None
    _check_batch_options(args)
    if args.nproc < 1:
        raise SystemExit(f"error: --nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1:
        from ..optim.distributed import RankFailed, launch

        try:
            launch(_fit_worker, args.nproc, args)
        except RankFailed as err:  # the first failing rank's error, once
            msg = str(err)
            raise SystemExit(msg if msg.startswith("error:") else f"error: {msg}") from None
        return 0
    return _fit_and_write(args)


def _check_batch_options(args: argparse.Namespace) -> None:
    """Refuse, before reading the data, batch options without what they need (the
    estimator's own checks, as options): --batch-key, and gene-wise dispersion."""
    needs_key = {
        "--batch-loadings": args.batch_loadings,
        "--batch-dispersion": args.batch_dispersion,
    }
    for flag, on in needs_key.items():
        if on and args.batch_key is None:
            raise SystemExit(f"error: {flag} needs --batch-key (the obs column of the batches)")
    if args.batch_dispersion and not args.genewise_dispersion:
        raise SystemExit(
            "error: --batch-dispersion (a dispersion per gene and batch) needs "
            "--genewise-dispersion"
        )


def _fit_worker(args: argparse.Namespace) -> None:
    """One process of ``zinbgrad fit --nproc N`` (or of a torchrun launch)."""
    _fit_and_write(args)


#: ``zinbgrad fit`` options passed under their own names to ZINBWaVE(...) and to its fit(...)
_ESTIMATOR_OPTIONS = (
    "n_components",
    "tol",
    "device",
    "dtype",
    "epsilon",
    "solver",
    "sketch_size",
    "batch_size",
    "allow_non_integer",
    "empty_genes",
    "empty_cells",
    "batch_loadings",
    "epsilon_delta",
    "batch_dispersion",
    "epsilon_alpha_pi",
)
_FIT_OPTIONS = ("layer", "batch_key", "covariate_keys", "checkpoint", "checkpoint_every", "resume")


def _fit_and_write(args: argparse.Namespace) -> int:
    """Fit (streaming the input from disk when it runs distributed) and write the result.

    Under torch.distributed every rank fits its shard; rank 0 writes the output.
    """
    from ..estimator import ZINBWaVE
    from ..optim.distributed import current_comm, init_from_env
    from ..persistence import store_model

    comm = init_from_env() if "WORLD_SIZE" in os.environ else current_comm()
    inp, out = Path(args.input), Path(args.output)
    stream = args.stream or comm.world_size > 1
    if stream and not inp.exists():
        raise SystemExit(f"error: input file {inp} does not exist")
    adata = None if stream else read_h5ad_checked(inp)
    t0 = time.perf_counter()
    try:
        model = ZINBWaVE(
            max_epochs=args.epochs,
            common_dispersion=not args.genewise_dispersion,
            zero_inflation=not args.no_zero_inflation,
            random_state=args.seed,
            verbose=not args.quiet and comm.rank == 0,
            **options_of(args, *_ESTIMATOR_OPTIONS),
        )
        model.fit(str(inp) if stream else adata, **options_of(args, *_FIT_OPTIONS))
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise cli_error(err) from err
    if comm.rank != 0:
        return 0
    seconds = time.perf_counter() - t0
    if stream:
        write_model_into_copy(inp, out, model, args.key_added)
    else:
        store_model(adata, model, args.key_added)
        write_h5ad_atomic(adata, out, like=inp)
    if args.save_model:
        model.save(args.save_model, overwrite=args.force)
    n, J = model.W_.shape[0], model.n_features_in_
    print(
        f"zinbgrad fit: {n} cells x {J} genes, K={args.n_components}, "
        f"log-likelihood {model.loglik_:.6g}, penalized {model.objective_:.6g}, "
        f"{model.n_iter_} epochs ({'converged' if model.converged_ else 'max epochs reached'}), "
        f"{seconds:.2f} s -> {out} (obsm['{args.key_added}'])"
    )
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from ..data.convert import to_csr

    inp, out = Path(args.input), Path(args.output)
    check_output_path(inp, out, args.force)
    seconds = run_timed(
        to_csr, (ValueError, KeyError, FileNotFoundError), inp, out, layer=args.layer
    )
    what = "X" if args.layer is None else f"layers[{args.layer!r}]"
    print(f"zinbgrad convert: {what} stored as CSR in {seconds:.2f} s -> {out}")
    return 0


def demo_figure(adata):
    """The demo's scatter plot of the latent space, coloured by cluster (title kept inside)."""
    import matplotlib.pyplot as plt

    W = adata.obsm["X_zinbwave"]
    fig, ax = plt.subplots(figsize=(5, 4))
    for ct in sorted(adata.obs["cell_type"].astype(str).unique()):
        sel = (adata.obs["cell_type"].astype(str) == ct).to_numpy()
        ax.scatter(W[sel, 0], W[sel, 1], s=18, label=f"cluster {ct}")
    ax.set_xlabel("W1")
    ax.set_ylabel("W2")
    ax.set_title("zinbgrad ZINB-WaVE latent space\n(pbmc_small, K=2)", fontsize=11)
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def _cmd_demo(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .. import datasets, tl

    outdir = Path(args.output)
    if outdir.exists() and not outdir.is_dir():
        raise SystemExit(f"error: {outdir} is a file; the demo writes into a directory")
    h5 = outdir / "pbmc_small_zinbwave.h5ad"
    png = outdir / "pbmc_small_zinbwave.png"
    diag = outdir / "pbmc_small_diagnostics.png"
    for out in (h5, png, diag):  # the demo replaces its own files, never a non-regular one
        check_output_path(None, out, force=True, what="demo output")
    outdir.mkdir(parents=True, exist_ok=True)
    adata = datasets.pbmc_small()
    t0 = time.perf_counter()
    model = tl.zinbwave(adata, n_components=2, random_state=0, verbose=False)
    seconds = time.perf_counter() - t0
    # uncertainty of W, loadings with standard errors, the choice of K (zinbgrad.pl below)
    tl.latent_uncertainty(adata, store_cov=True)
    tl.top_genes(adata, 4)
    tl.select_n_components(adata, [1, 2, 3])
    write_h5ad_atomic(adata, h5)
    fig = demo_figure(adata)
    from ..io_utils import atomic_write

    with atomic_write(png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    from .. import pl

    pl.diagnostics(adata, model, color="cell_type", save=diag, show=False)
    plt.close("all")
    print(
        f"zinbgrad demo: pbmc_small ({adata.n_obs} cells x {adata.n_vars} genes), K=2, "
        f"log-likelihood {model.loglik_:.6g}, penalized {model.objective_:.6g}, "
        f"{seconds:.2f} s\n  wrote {h5}\n  wrote {png}\n  wrote {diag} (history, latent "
        f"space with 90 % regions, choice of K: {adata.uns['zinbwave_n_components']['recommended']}"
        ", top loadings)"
    )
    return 0


def _add_fit_model_options(f: argparse.ArgumentParser) -> None:
    """The input, the output and the model (K, design, dispersion, zero inflation)."""
    f.add_argument("input", help="input .h5ad with raw counts (never modified)")
    f.add_argument("-o", "--output", required=True, help="output .h5ad (written atomically)")
    f.add_argument("-k", "--n-components", type=int, default=10, help="latent factors K")
    add_design_options(
        f,
        "obs column modelled as batch in X",
        "further obs columns in X (categorical as indicators, numeric as they are)",
    )
    f.add_argument("--layer", default=None, help="layer with the raw counts (default .X)")
    f.add_argument("--epochs", type=int, default=100, help="maximum epochs")
    f.add_argument("--tol", type=float, default=1e-4, help="relative change to stop at")
    f.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    f.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float64"],
        help="auto: float32 on a GPU, and on the CPU for fits of at least a million "
        "entries (cells x genes); float64 below",
    )
    f.add_argument("--epsilon", type=float, default=None, help="penalty scale (default J)")
    f.add_argument("--genewise-dispersion", action="store_true", help="one theta per gene")
    f.add_argument("--no-zero-inflation", action="store_true", help="negative binomial model")


def _add_fit_batch_options(f: argparse.ArgumentParser) -> None:
    """The batch integration options beyond zinbwave's model (off by default) and the
    zero-inflation loadings' own penalty."""
    g = f.add_argument_group("batch integration and penalties (not in zinbwave)")
    g.add_argument(
        "--batch-loadings",
        action="store_true",
        help="batch-specific loadings (needs --batch-key): a cell of batch b has mean loadings "
        "alpha_mu + delta_b, the offsets ridge-penalized toward 0 by --epsilon-delta and W "
        "shared by all batches, so that a batch effect may differ between cell types; W stays "
        "the batch-free latent space. Off: zinbwave's model",
    )
    g.add_argument(
        "--epsilon-delta",
        metavar="X",
        type=float,
        default=None,
        help="ridge weight of the --batch-loadings offsets delta_b (default 30 x epsilon_alpha, "
        "30 at zinbwave's defaults; larger values pull the batches' loadings together)",
    )
    g.add_argument(
        "--batch-dispersion",
        action="store_true",
        help="a dispersion per gene and batch level (scVI's gene-batch; needs --batch-key and "
        "--genewise-dispersion); new cells use their batch's dispersion. Off: zinbwave's model",
    )
    g.add_argument(
        "--epsilon-alpha-pi",
        metavar="X",
        type=float,
        default=None,
        help="ridge weight of the zero-inflation loadings alpha_pi alone (default: "
        "epsilon_alpha, zinbwave's model); a larger weight keeps genes whose zeros W nearly "
        "separates from spending factors on them",
    )


def _add_fit_output_options(f: argparse.ArgumentParser) -> None:
    """Where the result goes, and what the data may hold (non-integer, empty genes/cells)."""
    f.add_argument("--key-added", default="X_zinbwave", help="obsm key of the latent space")
    f.add_argument("--save-model", default=None, help="also save the model (.npz)")
    f.add_argument("--seed", type=int, default=0, help="random seed")
    add_force_option(f)
    f.add_argument(
        "--allow-non-integer",
        action="store_true",
        help="fit non-integer counts (e.g. ambient-corrected), with a warning",
    )
    f.add_argument(
        "--empty-genes",
        default="exclude",
        choices=["exclude", "error"],
        help="genes without counts: leave them out of the fit (with a warning; "
        "var['<key>_fitted']) or refuse the data",
    )
    f.add_argument(
        "--empty-cells",
        default="error",
        choices=["error", "exclude"],
        help="cells without counts: refuse the data, or leave them out of the fit "
        "(in memory only; obs['<key>_fitted'])",
    )
    f.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _add_fit_solver_options(f: argparse.ArgumentParser) -> None:
    """The solver, checkpoints, streaming from disk and data-parallel processes."""
    f.add_argument(
        "--solver",
        default="auto",
        choices=["auto", "full", "sketch", "stochastic"],
        help="auto: sketch when the sketch is at most half of the cells, else full",
    )
    f.add_argument("--sketch-size", type=int, default=None, help="cells in the sketch")
    f.add_argument("--batch-size", type=int, default=None, help="cells per minibatch")
    f.add_argument("--checkpoint", default=None, help="write a checkpoint (.npz) each epoch")
    f.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints")
    f.add_argument("--resume", default=None, help="continue from this checkpoint")
    f.add_argument(
        "--stream",
        action="store_true",
        help="stream the counts from disk in blocks (bounded memory; CSR .h5ad)",
    )
    f.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes on this host (torch.distributed; gloo on CPU)",
    )


#: The commands of this module: what runs each, its one-line help and its ``--help``
#: description (``None``: none).
_COMMANDS = {
    "fit": (_cmd_fit, "fit ZINB-WaVE to an .h5ad file and write a new .h5ad", None),
    "convert": (
        _cmd_convert,
        "rewrite a dense or CSC .h5ad with CSR counts, in chunks (for --stream)",
        "Copy an .h5ad, storing its counts (X or --layer) as CSR, so that fits can "
        "stream it by blocks of cells; the counts are never loaded whole.",
    ),
    "demo": (
        _cmd_demo,
        "fit the bundled example and write the result and a PNG",
        "Fit ZINB-WaVE (K=2) to the bundled pbmc_small example (80 cells x 230 "
        "genes of 10x pbmc3k) and write the fitted .h5ad and a PNG of the latent space, "
        "coloured by cluster, into the output directory.",
    ),
}


def add_fit_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``zinbgrad fit`` on an ``argparse`` subparsers object."""
    f = add_command(subparsers, "fit", *_COMMANDS["fit"])
    _add_fit_model_options(f)
    _add_fit_batch_options(f)
    _add_fit_output_options(f)
    _add_fit_solver_options(f)
    return f


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``zinbgrad convert`` on an ``argparse`` subparsers object."""
    c = add_command(subparsers, "convert", *_COMMANDS["convert"])
    c.add_argument("input", help="input .h5ad (never modified)")
    c.add_argument("output", help="output .h5ad (written atomically)")
    c.add_argument("--layer", default=None, help="convert this layer instead of X")
    add_force_option(c)
    return c


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``zinbgrad demo`` on an ``argparse`` subparsers object."""
    d = add_command(subparsers, "demo", *_COMMANDS["demo"])
    d.add_argument("-o", "--output", default="zinbgrad_demo", help="output directory")
    return d
