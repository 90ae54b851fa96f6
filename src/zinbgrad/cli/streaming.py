"""Per-entry outputs of a fitted model (normalized values, residuals, weights, ...) written
into a copy of its training .h5ad block by block (``zinbgrad normalize ... --stream``).

The model's side (checks that the file holds the cells and genes it was fitted on, the blocks
of :func:`zinbgrad.model.outputs.iter_output_blocks`) lives here; the file's side (a chunked
layer in anndata's on-disk layout, written atomically) is :func:`zinbgrad.data.writer.write_layer`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["write_output_layer"]


def _open_training_counts(model, inp: Path, layer: str | None, what: str):
    """The counts of ``inp`` as a block source over the genes the model fitted, after checking
    that ``inp`` holds the model's training cells and genes (same names, same order)."""
    from ..data.source import BackedCounts, read_annotations
    from ..model.outputs import COUNT_OUTPUTS

    genes, cells, names_in = model.fitted_masks()
    if not cells.all():
        raise ValueError(
            "the model left cells without counts out of its fit; its outputs are written "
            "in memory only (run without --stream)"
        )
    src = BackedCounts(inp, layer)
    n, J = src.shape
    src.close()
    if (n, J) != (model.W_.shape[0], len(genes)):
        raise ValueError(
            f"{inp} has {n} cells x {J} genes; the model was fitted on "
            f"{model.W_.shape[0]} x {len(genes)}"
        )
    src = BackedCounts(inp, layer, genes=genes)  # the genes left out of the fit are skipped
    try:
        _, obs_names, var_names = read_annotations(inp)
        for what_, names, fitted in (
            ("cells", obs_names, model.obs_names_),
            ("genes", var_names, names_in),
        ):
            if not np.array_equal(names, np.asarray(fitted).astype(str)):
                raise ValueError(
                    f"the {what_} of {inp} (their names or order) differ from those the model "
                    "was fitted on; these outputs are for the training data as it was fitted"
                )
        if what in COUNT_OUTPUTS:  # the same checks as the in-memory path, one pass
            src.validate(allow_non_integer=bool(model.allow_non_integer), check_empty=False)
    except BaseException:
        src.close()
        raise
    return src, genes, (n, J)


def _output_blocks(
    model, what: str, src, genes: np.ndarray, *, ignore_W: bool, block_rows: int, J: int
) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(start, stop, values)`` of ``what`` for every block of training cells, spread back to
    all the input's genes (the model's design and parameters are built now, the blocks as
    they are consumed)."""
    import torch

    from ..model.outputs import COUNT_OUTPUTS, iter_output_blocks, spread_to_input

    dev, dt = torch.device("cpu"), torch.float64
    design = model.training_design(dev, dt)
    params = model.get_params_torch(dev, dt)
    blocks = iter_output_blocks(
        what,
        design,
        params,
        src if what in COUNT_OUTPUTS else None,
        zero_inflation=bool(model.zero_inflation),
        ignore_W=ignore_W,
        block_entries=block_rows * J,
    )
    return (
        (start, stop, spread_to_input(values.numpy(), what, genes))
        for start, stop, values in blocks
    )


def write_output_layer(
    model,
    what: str,
    inp: str | os.PathLike,
    out: str | os.PathLike,
    key_added: str,
    *,
    ignore_W: bool = False,
    layer: str | None = None,
    block_rows: int = 4096,
    out_dtype=np.float32,
) -> Path:
    """Compute ``what`` (see :func:`zinbgrad.model.outputs.block_output`) for every training cell
    of ``model`` and write it as ``layers[key_added]`` of a copy of ``inp`` saved as ``out``.

    The counts (for residuals, weights, imputation) are read from ``inp`` (``layer`` or ``X``,
    CSR) block by block; peak memory is one block of cells x genes.
    """
    from ..data.writer import write_layer

    inp, out = Path(inp), Path(out)
    src, genes, shape = _open_training_counts(model, inp, layer, what)
    try:
        blocks = _output_blocks(
            model, what, src, genes, ignore_W=ignore_W, block_rows=block_rows, J=shape[1]
        )
        record = {"output": what, "ignore_W": bool(ignore_W), "streamed": True}
        return write_layer(
            inp,
            out,
            key_added,
            shape,
            blocks,
            record=record,
            block_rows=block_rows,
            out_dtype=out_dtype,
        )
    finally:
        src.close()
