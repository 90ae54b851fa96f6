"""Atomic checkpoints of a fit: every parameter, the optimizer state and the history.

A checkpoint is a ``.npz`` (arrays) with a JSON metadata string — never a pickle. It is written
to a temporary file in the same directory and renamed into place, so a process killed at any
moment leaves either the previous checkpoint or the new one, never a half-written file. Under
torch.distributed each rank writes its own shard (``<path>.rank<r>.npz``).
"""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..io_utils import (
    atomic_write,
    check_writable,
    npz_file,
    read_npz_metadata,
    remove_stale_temps,
    same_file,
)

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_file", "check_checkpoint_paths"]

FORMAT = "zinbgrad-checkpoint"
VERSION = 1


def checkpoint_file(path: str | os.PathLike, rank: int = 0, world_size: int = 1) -> Path:
    """The file of ``rank``'s checkpoint: ``path`` (``.npz`` appended when it has no
    extension; a folder or another extension is an error), ``<stem>.rank<r>.npz`` beside it
    under torch.distributed."""
    p = npz_file(path, "checkpoint")
    if world_size > 1:
        p = p.with_name(f"{p.stem}.rank{rank}.npz")
    return p


def _read_meta(f: Path) -> tuple[Any, dict]:
    """The archive and metadata of a checkpoint file, or a clear error."""
    if not f.exists():
        raise FileNotFoundError(f"no checkpoint at {f} (nothing to resume)")
    z, meta = read_npz_metadata(f, "checkpoint")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{f} is not a zinbgrad checkpoint")
    return z, meta


def check_checkpoint_paths(
    checkpoint: str | os.PathLike | None,
    resume: str | os.PathLike | None,
    every: int = 1,
    world_size: int = 1,
    taken: dict[str, Any] | None = None,
) -> None:
    """Refuse, before any work, what would fail at the first checkpoint or at the resume:
    ``checkpoint_every`` not a positive integer, a checkpoint in a folder that cannot be
    written, a checkpoint that is one of ``taken`` (a mapping from a name, e.g. ``"the
    output"``, to a path the fit reads or writes), a missing or unreadable ``resume`` file.
    """
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer, got {every!r}")
    if checkpoint is not None:
        for r in range(world_size):
            f = checkpoint_file(checkpoint, r, world_size)
            for name, other in (taken or {}).items():
                if other is not None and same_file(f, other):
                    raise ValueError(f"the checkpoint {f} is {name}; choose another path")
            check_writable(f, "checkpoint")
            remove_stale_temps(f)  # left by an earlier run killed while writing it
    if resume is not None:
        for r in range(world_size):
            _read_meta(checkpoint_file(resume, r, world_size))


def save_checkpoint(engine, history: list[dict], path: str | os.PathLike) -> Path:
    """Write the engine's parameters, optimizer state (``engine.state``, see
    :meth:`~zinbgrad.optim.state.OptimizerState.state_dict`) and history atomically."""
    out = checkpoint_file(path, engine.comm.rank, engine.comm.world_size)
    arrays, state = engine.state.state_dict()
    problem = engine.problem
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "history": history,
        "rng": state.pop("rng"),
        "n": problem.design.n,
        "J": problem.design.J,
        "K": problem.K,
        "zero_inflation": problem.zero_inflation,
        "common_dispersion": problem.common_dispersion,
        "rank": engine.comm.rank,
        "world_size": engine.comm.world_size,
        **state,
        "tag": engine.opt.checkpoint_tag,
    }
    arrays["metadata"] = np.array(json.dumps(meta, default=float))
    with atomic_write(out, what="checkpoint") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return out


def load_checkpoint(engine, path: str | os.PathLike) -> list[dict]:
    """Restore parameters and optimizer state into ``engine`` (``engine.state``, see
    :meth:`~zinbgrad.optim.state.OptimizerState.load_state_dict`); returns the history."""
    f = checkpoint_file(path, engine.comm.rank, engine.comm.world_size)
    z, meta = _read_meta(f)
    problem = engine.problem
    expect = {
        "n": problem.design.n,
        "J": problem.design.J,
        "K": problem.K,
        "zero_inflation": problem.zero_inflation,
        "common_dispersion": problem.common_dispersion,
        "world_size": engine.comm.world_size,
    }
    wrong = {k: (meta.get(k), v) for k, v in expect.items() if meta.get(k) != v}
    if wrong:
        raise ValueError(f"checkpoint {f} does not match this fit: {wrong} (saved, current)")
    saved, current = meta.get("tag") or {}, engine.opt.checkpoint_tag or {}
    differ = sorted(k for k in saved.keys() & current.keys() if saved[k] != current[k])
    if differ == ["counts"]:
        raise ValueError(
            f"checkpoint {f} was written by a fit of other counts (the same cells and genes, "
            "other values); resume with the data it was fitted on"
        )
    if differ:
        raise ValueError(
            f"checkpoint {f} was written by a fit of other data or settings: its {differ} differ "
            "from this fit's; resume with the same data, design and penalty"
        )
    engine.state.load_state_dict({k: z[k] for k in z.files if k != "metadata"}, meta)
    return list(meta["history"])
