"""OpenMP wait policy: keep torch's CPU threads from spinning against other processes.

libgomp (the OpenMP runtime of torch's CPU builds) lets an idle worker thread spin for a while
before it sleeps, so that the next parallel region starts a few microseconds sooner. When other
processes compete for the cores, the spinning threads take the CPU time the working thread
needs: a Zeisel fit that takes 4.3 s on an idle 2-core machine took 33.7 s beside one other
CPU-bound process (BENCHMARKS.md, "Busy machines"). With the passive policy idle threads sleep at
once, and the same fit beside that process takes about as long as one pinned to one thread.

The policy is read once, when torch loads libgomp, so it must be in the environment before
``import torch``. :func:`prefer_passive_wait` sets ``OMP_WAIT_POLICY=PASSIVE`` when (a) torch is
not imported yet and (b) the user has not chosen a policy (``OMP_WAIT_POLICY`` or
``GOMP_SPINCOUNT`` set). ``import zinbgrad`` calls it first thing, and so does the ``zinbgrad``
command. A user who imports torch before zinbgrad keeps libgomp's default: set
``OMP_WAIT_POLICY=PASSIVE`` in the shell (or call ``torch.set_num_threads(1)``) on a busy
machine. ``ZINBGRAD_OMP_PASSIVE=0`` turns this off.

This module must not import torch.
"""

from __future__ import annotations

import os
import sys

__all__ = ["prefer_passive_wait"]


def prefer_passive_wait(
    environ: dict[str, str] | None = None, torch_imported: bool | None = None
) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` where it can still take effect and nobody chose otherwise.

    Parameters
    ----------
    environ
        The environment to change (default :data:`os.environ`).
    torch_imported
        Whether torch is imported already (default: look in :data:`sys.modules`); then libgomp
        has read its environment and nothing is set.

    Returns
    -------
    bool
        True when the policy was set by this call.
    """
    env = os.environ if environ is None else environ
    if torch_imported is None:
        torch_imported = "torch" in sys.modules
    if torch_imported:
        return False
    if env.get("ZINBGRAD_OMP_PASSIVE", "1") == "0":
        return False
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env:
        return False
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
