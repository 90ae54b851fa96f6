"""Communication for data-parallel fits over cell shards (torch.distributed).

Each process (rank) owns a contiguous shard of the cells and their local parameters. Gene
parameters are replicated: every rank applies the same update computed from all-reduced
(summed) per-gene statistics, so they stay identical without being broadcast. Communication per
epoch is a few all-reduces of the size of the gene statistics (J x q^2 numbers), independent of
the number of cells.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

__all__ = [
    "LocalComm",
    "RankFailed",
    "TorchComm",
    "shard_bounds",
    "current_comm",
    "launch",
    "local_gpu",
]


class LocalComm:
    """Single process: every reduction is the identity."""

    rank = 0
    world_size = 1

    def all_reduce_(self, *tensors: Tensor) -> None:
        return None

    def all_reduce_max_(self, *tensors: Tensor) -> None:
        return None

    def sum(self, x: float) -> float:
        return float(x)

    def max(self, x: float) -> float:
        return float(x)

    def broadcast_(self, *tensors: Tensor, src: int = 0) -> None:
        return None

    def barrier(self) -> None:
        return None

    def all_gather_rows(self, t: Tensor, n_total: int) -> Tensor:
        return t


class TorchComm(LocalComm):
    """Reductions over an initialized ``torch.distributed`` process group (gloo or nccl)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized (use torchrun)")
        self.dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.backend = dist.get_backend()

    def _dev(self, t: Tensor) -> Tensor:
        # gloo reduces CPU tensors, nccl CUDA tensors
        if self.backend == "gloo" and t.device.type != "cpu":
            return t.cpu()
        return t

    def all_reduce_(self, *tensors: Tensor, op=None) -> None:
        for t in tensors:
            if t is None or t.numel() == 0:
                continue
            buf = self._dev(t)
            self.dist.all_reduce(buf, op=self.dist.ReduceOp.SUM if op is None else op)
            if buf is not t:
                t.copy_(buf)

    def all_reduce_max_(self, *tensors: Tensor) -> None:
        self.all_reduce_(*tensors, op=self.dist.ReduceOp.MAX)

    def _scalar(self, x: float, op) -> float:
        t = torch.tensor([float(x)], dtype=torch.float64)
        if self.backend == "nccl":
            t = t.cuda()
        self.dist.all_reduce(t, op=op)
        return float(t.item())

    def sum(self, x: float) -> float:
        return self._scalar(x, self.dist.ReduceOp.SUM)

    def max(self, x: float) -> float:
        return self._scalar(x, self.dist.ReduceOp.MAX)

    def broadcast_(self, *tensors: Tensor, src: int = 0) -> None:
        for t in tensors:
            if t is None or t.numel() == 0:
                continue
            buf = self._dev(t)
            self.dist.broadcast(buf, src=src)
            if buf is not t:
                t.copy_(buf)

    def barrier(self) -> None:
        self.dist.barrier()

    def all_gather_rows(self, t: Tensor, n_total: int) -> Tensor:
        """Concatenate every rank's shard rows (shards as :func:`shard_bounds`)."""
        sizes = [shard_bounds(n_total, r, self.world_size) for r in range(self.world_size)]
        width = max(b - a for a, b in sizes)
        buf = self._dev(t)
        pad = torch.zeros((width,) + tuple(buf.shape[1:]), dtype=buf.dtype, device=buf.device)
        pad[: buf.shape[0]] = buf
        parts = [torch.empty_like(pad) for _ in range(self.world_size)]
        self.dist.all_gather(parts, pad)
        out = torch.cat([p[: b - a] for p, (a, b) in zip(parts, sizes, strict=True)])
        return out.to(t.device)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous cell range ``[start, stop)`` owned by ``rank``."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def current_comm() -> LocalComm:
    """TorchComm when a process group is initialized (e.g. under torchrun), else LocalComm."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchComm()
    return LocalComm()


def local_gpu() -> int:
    """Index of this process's GPU: its ``LOCAL_RANK`` modulo the visible GPUs when it is one
    of several ranks (``WORLD_SIZE`` > 1, as torchrun and :func:`launch` set), else the current
    CUDA device. NCCL needs one GPU per rank."""
    local = os.environ.get("LOCAL_RANK")
    if local is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(local) % max(torch.cuda.device_count(), 1)
    return torch.cuda.current_device()


def init_from_env(backend: str | None = None) -> LocalComm:
    """Initialize the default process group from torchrun's environment variables."""
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return LocalComm()
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_gpu())
        dist.init_process_group(backend=backend)
    return TorchComm()


def free_port() -> int:
    """A free TCP port on localhost for a single-host process group."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RankFailed(RuntimeError):
    """A process of :func:`launch` failed; the message is the first failing rank's error."""


def _worker(
    rank: int, world_size: int, port: int, backend: str, fn, args, errors: str | None = None
) -> None:
    import sys

    import torch.distributed as dist

    from ..io_utils import Terminated, terminate_as_interrupt

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    threads = max(1, (os.cpu_count() or 1) // world_size)
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(local_gpu())
    # SIGTERM (sent by launch to the other ranks when one fails, or by the user) unwinds like
    # Ctrl-C, so that this rank's temporary files are removed
    with terminate_as_interrupt():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        try:
            fn(*args)
        except Terminated:
            sys.exit(143)  # ended by launch (another rank failed) or by the user: no message
        except SystemExit as err:
            if errors is None or isinstance(err.code, int | None):
                raise
            # a one-line error (e.g. the command line's): handed to launch, which prints the
            # first rank's once instead of one copy per rank
            with open(os.path.join(errors, f"rank{rank}"), "w") as fh:
                fh.write(str(err.code))
            sys.exit(1)
        finally:
            dist.destroy_process_group()


def launch(fn, nproc: int, *args, backend: str | None = None) -> None:
    """Run ``fn(*args)`` in ``nproc`` local processes forming a process group (like
    ``torchrun --nproc_per_node nproc`` on one host). ``fn`` must be importable (picklable).

    Raises
    ------
    RankFailed
        A process failed. When it ended with a one-line error (``SystemExit("error: ...")``)
        the exception's message is that line, once (from the lowest failing rank); the
        other processes are ended quietly.
    """
    import logging
    import tempfile

    import torch.multiprocessing as mp

    if backend is None:
        backend = (
            "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= nproc else "gloo"
        )
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)  # not "Terminating process ... via signal SIGTERM"
    try:
        with tempfile.TemporaryDirectory(prefix="zinbgrad-ranks-") as errors:
            context = mp.start_processes(
                _worker,
                args=(nproc, free_port(), backend, fn, args, errors),
                nprocs=nproc,
                join=False,
                start_method="spawn",
            )
            try:
                while not context.join():
                    pass
            except (mp.ProcessExitedException, mp.ProcessRaisedException) as err:
                lines = []
                for r in range(nproc):
                    path = os.path.join(errors, f"rank{r}")
                    if os.path.exists(path):
                        with open(path) as fh:
                            lines.append(fh.read().strip())
                if lines:
                    raise RankFailed(lines[0]) from None
                raise RankFailed(str(err)) from err
            except BaseException:  # Ctrl-C or SIGTERM here: end the ranks the same way (each
                # removes its temporary files), instead of waiting for them to finish the fit
                for p in context.processes:
                    if p.is_alive():
                        p.terminate()
                for p in context.processes:
                    p.join(30)
                    if p.is_alive():
                        p.kill()
                raise
    finally:
        spawn_log.setLevel(level)
