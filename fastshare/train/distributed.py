"""Data-parallel training across processes (``torchrun --nproc_per_node=N -m fastshare train ...``).

- Process group: NCCL when CUDA is available, gloo otherwise; rank, world size and local rank from the
  environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).
- Weights: :class:`torch.nn.parallel.DistributedDataParallel` (gradients averaged by its reducer, buffers
  broadcast from rank 0 at every forward). The policy logits are excluded from DDP: the weight steps do
  not train them, and the policy steps run the bare model and all-reduce the logits' gradient themselves
  (:func:`fastshare.train.phases.policy_step`). The logits are broadcast from rank 0 when wrapping, so
  they start and stay identical on every rank. The Gumbel noise is drawn from the same seeded generator
  on every rank: it is per task and block, not per sample, so all ranks use the gates a single process
  would use.
- Data: :class:`~fastshare.train.phases.BatchStream` gives rank ``r`` the ``r``-th slice of each global
  batch, so ``N`` ranks at ``B / N`` see the same samples as one process at ``B``.

BatchNorm: as with any DDP model (and AdaShare's ``nn.DataParallel``), each rank normalises with the
statistics of its own ``B / N`` samples, so N ranks at ``B / N`` equal one process at ``B`` only for
batch-independent normalisation (BN in eval mode, or SyncBatchNorm). Pass ``sync_bn=True`` to
:func:`wrap_model` (CUDA) for SyncBatchNorm semantics; the equivalence test uses eval-mode BN on the CPU.
SyncBatchNorm works only with ``executor="sequential"``: the batched and tree executors stack several
tasks' rows into one BatchNorm call and normalise each task's rows on their own, which SyncBatchNorm
cannot do (it would pool all tasks' statistics), so :func:`wrap_model` refuses ``sync_bn=True`` for a model
whose executor is another one (and those executors raise ``TypeError`` on a SyncBatchNorm in training).
The losses are means over each rank's pixels, so the averaged gradient equals the single-process one when
every rank has the same number of valid pixels per task (always, without ignore labels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = ["DistContext", "init_distributed", "wrap_model", "broadcast_logits", "barrier", "cleanup"]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun set up (``WORLD_SIZE > 1``), or return a single-process context.

    ``device``: ``"auto"`` (``cuda:<local rank>`` when CUDA is available, else CPU) or a torch device.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        dev = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistContext(rank, world, local, dev)


def broadcast_logits(model: torch.nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's policy logits to every rank."""
    if ctx.enabled:
        with torch.no_grad():
            dist.broadcast(model.logits.data, src=0)


def wrap_model(model: torch.nn.Module, ctx: DistContext, *, find_unused_parameters: bool = False,
               sync_bn: bool = False) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` without the logits (see the module docstring); the model itself
    when not distributed. ``find_unused_parameters`` is needed where an executor skips blocks entirely
    (the tree executor in re-training). ``sync_bn`` converts every BatchNorm to ``torch.nn.SyncBatchNorm``
    and needs CUDA and a model whose ``executor`` is ``"sequential"`` (see the module docstring)."""
    if not ctx.enabled:
        return model
    if sync_bn:
        executor = getattr(model, "executor", "sequential")
        if executor != "sequential":
            raise ValueError(
                f"sync_bn=True needs executor='sequential', but the model's executor is {executor!r}: the "
                f"batched and tree executors stack the tasks' rows into one BatchNorm call and normalise each "
                f"task on its own, which torch.nn.SyncBatchNorm cannot do (it would pool all tasks' "
                f"statistics). Set executor: sequential, or train without sync_bn")
        if ctx.device.type != "cuda":
            raise ValueError("sync_bn needs CUDA (torch's SyncBatchNorm does not run on the CPU)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    broadcast_logits(model, ctx)
    # DDP's reducer covers the parameters that require a gradient when it is built: leave the logits out
    # by switching their flag off while wrapping. (Naming them in DDP's "params to ignore" instead made
    # the reducer skip every gradient on torch 2.13/gloo.)
    was = model.logits.requires_grad
    model.logits.requires_grad_(False)
    try:
        wrapped = DistributedDataParallel(model, device_ids=None, find_unused_parameters=find_unused_parameters)
    finally:
        model.logits.requires_grad_(was)
    return wrapped


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op when not distributed)."""
    if ctx.enabled:
        dist.barrier()


def cleanup(ctx: DistContext) -> None:
    """Leave the process group."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
