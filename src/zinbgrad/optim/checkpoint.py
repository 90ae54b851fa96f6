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
import torch

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
_STATE = ("lam_cells", "lam_genes", "zeta_cap")


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
    """Write the engine's parameters, optimizer state and history atomically."""
    out = checkpoint_file(path, engine.comm.rank, engine.comm.world_size)
    arrays = {f"param_{k}": v for k, v in engine.params.as_numpy().items()}
    for k in _STATE:
        arrays[f"state_{k}"] = getattr(engine, k).detach().cpu().numpy()
    if engine.sto_H is not None:
        arrays["state_sto_H"] = engine.sto_H.detach().cpu().numpy()
        arrays["state_sto_lam"] = engine.sto_lam.detach().cpu().numpy()
    if engine.proposal is not None:  # a gene step awaiting its check
        for k in engine.proposal.FIELDS:
            arrays[f"proposal_{k}"] = getattr(engine.proposal, k).detach().cpu().numpy()
    if engine.trajectory is not None:  # the fit's path (kept by the model), in full precision
        for k, v in engine.trajectory.to_arrays(with_start=True).items():
            arrays[f"path_{k}"] = v
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "history": history,
        "rng": engine.rng.bit_generator.state,
        "n": engine.n,
        "J": engine.J,
        "K": engine.K,
        "zero_inflation": engine.zi,
        "common_dispersion": engine.common,
        "rank": engine.comm.rank,
        "world_size": engine.comm.world_size,
        "sto_t": engine.sto_t,
        **engine.dispersion_state(),
        "gene_rejected": engine.gene_rejected,
        "tag": engine.opt.checkpoint_tag,
    }
    arrays["metadata"] = np.array(json.dumps(meta, default=float))
    with atomic_write(out, what="checkpoint") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return out


def load_checkpoint(engine, path: str | os.PathLike) -> list[dict]:
    """Restore parameters and optimizer state into ``engine``; returns the history."""
    f = checkpoint_file(path, engine.comm.rank, engine.comm.world_size)
    z, meta = _read_meta(f)
    expect = {
        "n": engine.n,
        "J": engine.J,
        "K": engine.K,
        "zero_inflation": engine.zi,
        "common_dispersion": engine.common,
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
    kw = {"dtype": engine.dtype, "device": engine.device}
    for name in engine.params.__dataclass_fields__:
        if getattr(engine.params, name) is None:  # an optional parameter this model lacks
            continue
        setattr(engine.params, name, torch.as_tensor(z[f"param_{name}"], **kw))
    for k in _STATE:
        setattr(engine, k, torch.as_tensor(z[f"state_{k}"], **kw))
    engine.rng.bit_generator.state = meta["rng"]
    engine.sto_t = int(meta.get("sto_t", 0))
    engine.set_dispersion_state(meta)
    engine.gene_rejected = float(meta.get("gene_rejected", 1.0))
    if "path_n_newton" in z.files:
        from .engine import FitPath

        arr = {k[5:]: z[k] for k in z.files if k.startswith("path_")}
        engine.trajectory = FitPath.from_arrays(arr, engine.dtype, engine.device)
    engine.proposal = None
    if "proposal_v_old" in z.files:
        from .engine import _Proposal

        engine.proposal = _Proposal(
            **{k: torch.as_tensor(z[f"proposal_{k}"], **kw) for k in _Proposal.FIELDS}
        )
    if "state_sto_H" in z.files:
        engine.sto_H = torch.as_tensor(z["state_sto_H"], **kw)
        engine.sto_lam = torch.as_tensor(z["state_sto_lam"], **kw)
    return list(meta["history"])
