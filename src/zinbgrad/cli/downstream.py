"""Downstream subcommands of the ``zinbgrad`` command line, each with the builder of its
argument parser.

``normalize``, ``residuals``, ``impute``, ``weights``, ``project`` and ``simulate`` each read an
``.h5ad`` file (holding a model fitted by ``zinbgrad fit``, or with ``--model`` a model saved as
``.npz`` or stored in another ``.h5ad``) and write a NEW ``.h5ad`` file atomically (temporary
file in the output's folder, then renamed). The input is never overwritten; an existing output
is replaced only with ``--force``.
"""

from __future__ import annotations

import argparse
import time

from .common import (
    add_command,
    add_design_options,
    add_force_option,
    check_io,
    cli_error,
    load_model,
    options_of,
    read_h5ad_checked,
    run_timed,
    write_h5ad_atomic,
)

__all__ = [
    "add_impute_parser",
    "add_normalize_parser",
    "add_project_parser",
    "add_residuals_parser",
    "add_simulate_parser",
    "add_subcommands",
    "add_weights_parser",
]


def _run_layer_streaming(args, describe: str, what: str, ignore_W: bool) -> int:
    """``--stream``: the layer is computed block by block and written into a copy of the
    input in chunks (memory bounded by one block; the counts are never loaded whole)."""
    import anndata as ad
    import numpy as np

    from .streaming import write_output_layer

    inp, out = check_io(args)
    if args.model is None:
        try:
            backed = ad.read_h5ad(inp, backed="r")
        except Exception as err:  # noqa: BLE001 - any reader failure is reported the same way
            raise SystemExit(f"error: cannot read {inp} as .h5ad ({err})") from err
        model = load_model(None, args.key, backed)
        backed.file.close()
    else:
        model = load_model(args.model, args.key)
    seconds = run_timed(
        write_output_layer,
        (ValueError, KeyError),
        model,
        what,
        inp,
        out,
        args.key_added,
        ignore_W=ignore_W,
        layer=args.layer,
        out_dtype=np.dtype(args.dtype),
    )
    print(
        f"zinbgrad {args.command}: {describe} streamed in {seconds:.2f} s "
        f"-> {out} (layers['{args.key_added}'])"
    )
    return 0


def _read_input(args, *, model_key: str, stored: bool):
    """The checked input and output paths, the input AnnData and the model: ``--model``, or
    without it (when ``stored``) the one stored in the input under ``model_key``."""
    inp, out = check_io(args)
    adata = read_h5ad_checked(inp)
    model = load_model(args.model, model_key, adata if stored and args.model is None else None)
    return inp, out, adata, model


def _apply_and_write(args, fn, errors: tuple, *, model_key: str, stored: bool, **kw):
    """Read the input and the model (:func:`_read_input`), run ``fn(adata, model=model,
    **kw)`` timed (``errors`` become one-line errors) and write the AnnData atomically;
    returns the AnnData, the model, the seconds and the output path."""
    inp, out, adata, model = _read_input(args, model_key=model_key, stored=stored)
    seconds = run_timed(fn, errors, adata, model=model, **kw)
    write_h5ad_atomic(adata, out, like=inp)
    return adata, model, seconds, out


def _run_layer_command(
    args, fn, describe: str, *, stream_what: str, stream_ignore_W: bool = False, **kw
) -> int:
    if args.stream:
        return _run_layer_streaming(args, describe, stream_what, stream_ignore_W)
    adata, _, seconds, out = _apply_and_write(
        args,
        fn,
        (ValueError, KeyError, TypeError),
        model_key=args.key,
        stored=True,
        **options_of(args, "layer", "key", "key_added", "dtype"),
        **kw,
    )
    print(
        f"zinbgrad {args.command}: {describe} for {adata.n_obs} cells x {adata.n_vars} genes "
        f"in {seconds:.2f} s -> {out} (layers['{args.key_added}'])"
    )
    return 0


def _cmd_normalize(args) -> int:
    from .. import tl

    return _run_layer_command(
        args, tl.normalize, "normalized values", stream_what="deviance", stream_ignore_W=True
    )


def _cmd_residuals(args) -> int:
    from .. import tl

    key_added = args.key_added or f"zinbwave_{args.kind}_residuals"
    args.key_added = key_added
    return _run_layer_command(
        args,
        tl.residuals,
        f"{args.kind} residuals",
        kind=args.kind,
        ignore_W=args.ignore_w,
        stream_what=args.kind,
        stream_ignore_W=args.ignore_w,
    )


def _cmd_impute(args) -> int:
    from .. import tl

    what = f"imputed values ({args.method})"
    return _run_layer_command(
        args,
        tl.impute,
        what,
        method=args.method,
        stream_what="impute_zeros" if args.method == "zeros" else "mean",
    )


def _cmd_weights(args) -> int:
    from .. import tl

    return _run_layer_command(
        args, tl.observational_weights, "observational weights", stream_what="weights"
    )


#: ``zinbgrad project`` options passed under their own names to :func:`zinbgrad.tl.project`.
_PROJECT_OPTIONS = (
    "key_added",
    "layer",
    "reference_batch",
    "batch_key",
    "covariate_keys",
    "new_batches",
)


def _cmd_project(args) -> int:
    from .. import tl

    query, model, seconds, out = _apply_and_write(
        args,
        tl.project,
        (ValueError, KeyError),
        model_key=args.model_key,
        stored=False,
        **options_of(args, *_PROJECT_OPTIONS),
    )
    print(
        f"zinbgrad project: {query.n_obs} cells into K={model.W_.shape[1]} in {seconds:.2f} s "
        f"-> {out} (obsm['{args.key_added}'])"
    )
    return 0


#: ``zinbgrad simulate`` options of :func:`zinbgrad.simulate.make_synthetic` (with --n-cells).
_SYNTHETIC = (
    "n_batches",
    "batch_effect",
    "de_genes",
    "de_lfc",
    "latent",
    "jitter",
    "chunk_cells",
    "compression",
)


def _cmd_simulate(args) -> int:
    from ..simulate import make_synthetic, zinb_sim

    inp, out, adata, model = _read_input(args, model_key=args.key, stored=True)
    del adata
    given = {k: getattr(args, k) for k in _SYNTHETIC if getattr(args, k) is not None}
    if args.n_cells is None and given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise SystemExit(f"error: {flags} only apply with --n-cells (a synthetic dataset)")
    if "de_genes" in given and float(given["de_genes"]).is_integer():
        given["de_genes"] = int(given["de_genes"])  # a count; a fraction stays a float
    t0 = time.perf_counter()
    try:
        if args.n_cells is None:
            sim = zinb_sim(model, random_state=args.seed, count_dtype=args.count_dtype)
            write_h5ad_atomic(sim, out, like=inp)
            n = sim.n_obs
        else:
            make_synthetic(
                model,
                args.n_cells,
                out,
                count_dtype=args.count_dtype,
                overwrite=args.force,
                random_state=args.seed,
                **given,
            )
            n = args.n_cells
    except (ValueError, OverflowError, FileExistsError) as err:
        raise cli_error(err) from err
    seconds = time.perf_counter() - t0
    print(f"zinbgrad simulate: {n} cells x {len(model.zeta_)} genes in {seconds:.2f} s -> {out}")
    return 0


def _add_common_options(p: argparse.ArgumentParser, *, model_help: str) -> None:
    p.add_argument("-o", "--output", required=True, help="output .h5ad (new file, atomic)")
    p.add_argument("--key", default="X_zinbwave", help="key of the model stored in the input")
    p.add_argument("--model", default=None, help=model_help)
    add_force_option(p)


#: The layer commands: what runs each, its help (also its ``--help`` description), and the
#: defaults of its ``--key-added`` and ``--dtype``.
_LAYER_COMMANDS = {
    "normalize": (
        _cmd_normalize,
        "zinbwave's normalized values (deviance residuals with W ignored) into a layer",
        "zinbwave_normalized",
        "float32",
    ),
    "residuals": (_cmd_residuals, "deviance or Pearson residuals into a layer", None, "float32"),
    "impute": (
        _cmd_impute,
        "imputed counts (zinbwave's imputeZeros, or the denoised mean) into a layer",
        "zinbwave_imputed",
        "float32",
    ),
    "weights": (
        _cmd_weights,
        "zinbwave's observational weights (for weighted DE) into a layer",
        "zinbwave_weights",
        "float64",
    ),
}

#: The other commands: what runs each, its one-line help and its ``--help`` description.
_COMMANDS = {
    "project": (
        _cmd_project,
        "map new cells into a fitted model's latent space",
        "Fit W (and the cell intercepts) of new cells with the model's gene "
        "parameters fixed; genes are matched by name (all model genes must be present). Each "
        "query cell is encoded with the fit's batch_key and covariate_keys, read from the "
        "query's obs (a missing column is an error).",
    ),
    "simulate": (
        _cmd_simulate,
        "simulate counts from a fitted model (zinbSim, or large synthetic datasets)",
        "Without --n-cells: one ZINB draw for the model's own cells (zinbwave's "
        "zinbSim). With --n-cells: a synthetic dataset of that many new cells (latent factors "
        "drawn from the fit, planted batch effect and DE), streamed to the output in chunks.",
    ),
}


def _layer_command(sub, name: str) -> argparse.ArgumentParser:
    """Register the layer command ``name`` (see :data:`_LAYER_COMMANDS`) with its options."""
    func, help_, key_added, dtype = _LAYER_COMMANDS[name]
    p = add_command(sub, name, func, help_, help_)
    p.add_argument("input", help="input .h5ad with the counts and a fitted model (not modified)")
    _add_common_options(
        p,
        model_help="use this model (.npz from ZINBWaVE.save, or an .h5ad holding one under "
        "--key) instead of the one stored in the input",
    )
    p.add_argument("--layer", default=None, help="layer with the raw counts (default .X)")
    p.add_argument("--key-added", default=key_added, help="layer receiving the result")
    p.add_argument("--dtype", default=dtype, choices=["float32", "float64"], help="layer dtype")
    p.add_argument(
        "--stream",
        action="store_true",
        help="compute block by block and write the layer in chunks (bounded memory)",
    )
    return p


def add_normalize_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``zinbgrad normalize`` on an ``argparse`` subparsers object."""
    return _layer_command(subparsers, "normalize")


def add_residuals_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``zinbgrad residuals`` on an ``argparse`` subparsers object."""
    p = _layer_command(subparsers, "residuals")
    p.add_argument("--kind", default="deviance", choices=["deviance", "pearson"])
    p.add_argument("--ignore-w", action="store_true", help="set the latent factors W to 0")
    return p


def add_impute_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``zinbgrad impute`` on an ``argparse`` subparsers object."""
    p = _layer_command(subparsers, "impute")
    p.add_argument("--method", default="zeros", choices=["zeros", "mean"])
    return p


def add_weights_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``zinbgrad weights`` on an ``argparse`` subparsers object."""
    return _layer_command(subparsers, "weights")


def add_project_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``zinbgrad project`` on an ``argparse`` subparsers object."""
    p = add_command(subparsers, "project", *_COMMANDS["project"])
    p.add_argument("input", help="query .h5ad with raw counts (not modified)")
    p.add_argument("-o", "--output", required=True, help="output .h5ad (new file, atomic)")
    p.add_argument("--model", required=True, help="the fitted model: .npz, or an .h5ad holding one")
    p.add_argument("--model-key", default="X_zinbwave", help="model key in the --model .h5ad")
    p.add_argument("--key-added", default="X_zinbwave", help="obsm key receiving W")
    p.add_argument("--layer", default=None, help="layer of the query with the raw counts")
    p.add_argument(
        "--reference-batch",
        action="store_true",
        help="encode every query cell as the fit's reference batch (default: read each cell's "
        "batch and covariates from the query's obs, with the fit's keys)",
    )
    p.add_argument(
        "--new-batches",
        action="store_true",
        help="map query cells of batches the fit never saw: each unseen level of the fit's "
        "batch key gets its coefficients (its X column, and its loading offsets with "
        "--batch-loadings) estimated from its cells, every fitted gene parameter fixed, "
        "before their W (a linear-model scArches). Without it an unseen level is an error",
    )
    add_design_options(
        p,
        "optional check: must be the fit's batch key",
        "optional check: must be the fit's covariate keys",
    )
    add_force_option(p)
    return p


def add_simulate_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``zinbgrad simulate`` on an ``argparse`` subparsers object."""
    p = add_command(subparsers, "simulate", *_COMMANDS["simulate"])
    p.add_argument("input", help=".h5ad holding a fitted model (not modified)")
    _add_common_options(
        p,
        model_help="use this model (.npz, or an .h5ad holding one) instead of the input's",
    )
    p.add_argument("--n-cells", type=int, default=None, help="number of synthetic cells")
    g = p.add_argument_group("synthetic data (only with --n-cells)")
    g.add_argument("--n-batches", type=int, help="synthetic batches (default 2)")
    g.add_argument("--batch-effect", type=float, help="sd of log batch shifts (default 0.5)")
    g.add_argument("--de-genes", type=float, help="number or fraction of DE genes (default 0)")
    g.add_argument("--de-lfc", type=float, help="planted absolute log2 fold change (default 1)")
    g.add_argument("--latent", choices=["resample", "gmm"], help="(default resample)")
    g.add_argument("--jitter", type=float, help="jitter of resampled cells (default 0.1)")
    g.add_argument("--chunk-cells", type=int, help="cells per write (default 50000)")
    g.add_argument("--compression", choices=["gzip", "lzf"], help="of X (default none)")
    p.add_argument("--count-dtype", default="int32", choices=["int32", "int64"])
    p.add_argument("--seed", type=int, default=0, help="random seed")
    return p


#: The downstream commands' parser builders, in the order ``zinbgrad --help`` lists them.
PARSER_BUILDERS = (
    add_normalize_parser,
    add_residuals_parser,
    add_impute_parser,
    add_weights_parser,
    add_project_parser,
    add_simulate_parser,
)


def add_subcommands(subparsers) -> None:
    """Register ``normalize``, ``residuals``, ``impute``, ``weights``, ``project`` and
    ``simulate`` on an ``argparse`` subparsers object (from ``add_subparsers``)."""
    for add in PARSER_BUILDERS:
        add(subparsers)
