"""A data-parallel strategy for runs in spawned worker processes (``conf/trainer/ddp_sim.yaml``: CPU, gloo)."""

from __future__ import annotations

import atexit
from typing import Any, Literal

import torch.distributed
from lightning.pytorch.strategies import DDPStrategy


def destroy_process_group_if_initialized() -> None:
    """Destroy the default process group, if there is one (idempotent: an ``atexit`` handler).

    Example:
        >>> destroy_process_group_if_initialized()  # no process group in this process: nothing to do
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class SpawnDDPStrategy(DDPStrategy):
    """``DDPStrategy(start_method="spawn")`` (Lightning's ``"ddp_spawn"``) that destroys the default process group
    when the process exits, whatever the backend, before the interpreter shuts down.

    Lightning registers that ``atexit`` handler for NCCL only (``_init_dist_connection``). A gloo group is left to
    the interpreter's shutdown, and gloo's worker threads still hold the last collective (an ``AsyncWork`` with its
    tensors) for a moment after it completes: releasing those tensors takes the GIL, Python ends a thread that asks
    for the GIL while it finalizes (``pthread_exit``), the unwinding meets a ``noexcept`` destructor and the C++
    runtime aborts the worker: "terminate called without an active exception", SIGABRT, and
    ``ProcessExitedException`` in the main process. Rank 1 exits a few milliseconds after the fit's last metric
    ``all_gather``, so a loaded machine loses that race often. Destroyed at exit, the group joins its threads while
    the interpreter is still whole; hooks and the launcher's result collection still have the group, as with
    ``"ddp_spawn"``.

    Args:
        start_method: how the worker processes are started (default ``"spawn"``).
        **kwargs: forwarded to :class:`~lightning.pytorch.strategies.DDPStrategy`.

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=SpawnDDPStrategy(), logger=False)
        >>> type(trainer.strategy).__name__, trainer.strategy._start_method
        ('SpawnDDPStrategy', 'spawn')
    """

    def __init__(self, start_method: Literal["popen", "spawn", "fork", "forkserver"] = "spawn", **kwargs: Any) -> None:
        super().__init__(start_method=start_method, **kwargs)

    def setup_distributed(self) -> None:
        """Lightning's setup, then the ``atexit`` handler (registered once per process)."""
        super().setup_distributed()
        atexit.unregister(destroy_process_group_if_initialized)
        atexit.register(destroy_process_group_if_initialized)
