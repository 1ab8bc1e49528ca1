"""The building blocks of an AdaShare run: deterministic batch streams, loss composition, one step of
each phase.

AdaShare's schedule (their ``train.py`` / ``envs/blockdrop_env.py``), which :mod:`fastshare.train.trainer`
follows:

- **warm-up**: every block executed (hard sharing), logits frozen; weights trained with Adam
  (betas (0.5, 0.999), weight decay 1e-4; ``lr`` for the heads, ``backbone_lr`` for the backbone) and a
  StepLR (``decay_lr_freq``, ``decay_lr_rate``) stepped per iteration;
- **policy learning**: alternate a *weight epoch* (``weight_iter_alternate`` iterations on ``train1``:
  SGD momentum 0.9, weight decay 1e-4; Gumbel-sampled gates with detached logits; loss = task losses only)
  and a *policy epoch* (``alpha_iter_alternate`` iterations on ``train2``: Adam on the logits with weight
  decay 5e-4; loss = task losses + ``reg_w`` * sparsity + ``reg_w_hamming`` * sharing). The curriculum
  stage is ``policy_epoch // curriculum_speed + 1`` and the temperature decays once per policy epoch;
- **re-training**: each sampled architecture from scratch with its fixed policy, as in warm-up.

Every step function takes its gates, noise and batch from the caller, so a step is a pure function of
(weights, optimiser state, batch, gates) and is reproducible.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from fastshare.data import TASK_TARGET_KEY
from fastshare.losses import sharing_loss, sparsity_loss, task_loss, total_task_loss

__all__ = [
    "BatchStream",
    "PolicyRegularisation",
    "target_of",
    "task_losses",
    "policy_objective",
    "weight_step",
    "policy_step",
    "adashare_weight_optimizer",
    "adashare_policy_optimizer",
]

#: Batch key holding each task's target, where it differs from the task name.


def target_of(task: str, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The target of ``task`` in a data-set sample/batch (``sn`` is stored under ``normal``)."""
    key = TASK_TARGET_KEY.get(task, task)
    if key not in batch:
        raise KeyError(f"the batch has no target {key!r} for task {task!r} (keys: {', '.join(sorted(batch))})")
    return batch[key]


def task_losses(outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
                tasks: Sequence[str], seg_class_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{task: loss}`` (:func:`fastshare.losses.task_loss`) of each task's prediction against its target
    (``seg_class_weights``: the data set's segmentation class weights, Taskonomy's, or None)."""
    return {t: task_loss(t, outputs[t], target_of(t, batch), seg_class_weights) for t in tasks}


@dataclass(frozen=True)
class PolicyRegularisation:
    """The policy regularisers of AdaShare's policy update (their ``backward_policy``).

    Attributes:
        reg_w: weight of the sparsity loss (applied when ``is_sparse``).
        reg_w_hamming: weight of the sharing loss (applied when ``is_sharing``).
        diff_sparsity_weights: block weights ``(l + 1) / Lp`` (see :mod:`fastshare.losses`).
    """

    reg_w: float = 0.001
    reg_w_hamming: float = 0.05
    is_sparse: bool = True
    is_sharing: bool = True
    diff_sparsity_weights: bool = True


def policy_objective(losses: Mapping[str, torch.Tensor], lambdas: Mapping[str, float], alpha: torch.Tensor,
                     num_train_layers: int | None, reg: PolicyRegularisation) -> tuple[torch.Tensor, dict[str, float]]:
    """Policy loss ``sum_k lambda_k L_k + reg_w * sparsity + reg_w_hamming * sharing``.

    The sparsity term covers the curriculum's trained blocks (the last ``num_train_layers``); the sharing
    term all blocks, as in AdaShare. Returns the loss and its parts as floats (``task``, ``sparsity``,
    ``sharing``; a switched-off term is absent).
    """
    loss = total_task_loss(losses, lambdas)
    parts = {"task": float(loss.detach())}
    if reg.is_sharing:
        sharing = sharing_loss(alpha, reg.diff_sparsity_weights)
        loss = loss + reg.reg_w_hamming * sharing
        parts["sharing"] = float(sharing.detach())
    if reg.is_sparse:
        sparsity = sparsity_loss(alpha, num_train_layers, reg.diff_sparsity_weights, reg.is_sharing)
        loss = loss + reg.reg_w * sparsity
        parts["sparsity"] = float(sparsity.detach())
    return loss, parts


def _loss_log(losses: Mapping[str, torch.Tensor], total: torch.Tensor) -> dict[str, float]:
    log = {f"loss/{t}": float(v.detach()) for t, v in losses.items()}
    log["loss/total"] = float(total.detach())
    return log


def weight_step(forward: Callable[..., dict[str, torch.Tensor]], batch: Mapping[str, torch.Tensor], gates: Any,
                tasks: Sequence[str], lambdas: Mapping[str, float], optimizer: torch.optim.Optimizer,
                scheduler: Any | None = None, autocast: contextlib.AbstractContextManager | None = None,
                scaler: torch.amp.GradScaler | None = None, seg_class_weights: torch.Tensor | None = None
                ) -> dict[str, float]:
    """One update of the network weights (warm-up, weight epochs, re-training): task losses only.

    Args:
        forward: the model (or its ``DistributedDataParallel`` wrapper, which averages the gradients).
        batch: a batch on the model's device, ``img`` plus the targets.
        gates: the gates of this step (their logits, if any, detached: the policy is not updated here).
        scheduler: stepped after the update (AdaShare steps its StepLR per iteration).
        autocast, scaler: mixed precision (GradScaler for float16).
        seg_class_weights: see :func:`task_losses`.
    """
    optimizer.zero_grad(set_to_none=True)
    with autocast or contextlib.nullcontext():
        outputs = forward(batch["img"], gates)
    losses = task_losses(outputs, batch, tasks, seg_class_weights)
    loss = total_task_loss(losses, lambdas)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return _loss_log(losses, loss)


def policy_step(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], gates: Any, tasks: Sequence[str],
                lambdas: Mapping[str, float], optimizer: torch.optim.Optimizer, num_train_layers: int | None,
                reg: PolicyRegularisation, autocast: contextlib.AbstractContextManager | None = None,
                world_size: int = 1, seg_class_weights: torch.Tensor | None = None) -> dict[str, float]:
    """One update of the policy logits (a policy epoch's iteration).

    The gradient is taken with respect to ``model.logits`` only (``backward(inputs=...)``): the weights
    are frozen, as AdaShare's ``fix_w`` does, and no weight gradient is computed. With ``world_size > 1``
    the logits' gradient is averaged over the ranks (all-reduce) before the step, so the logits stay
    identical on every rank. ``model`` is the bare :class:`~fastshare.model.AdaShareNet` (not a DDP
    wrapper, whose reducer would wait for weight gradients that this step does not produce).
    """
    logits = model.logits
    optimizer.zero_grad(set_to_none=True)
    with autocast or contextlib.nullcontext():
        outputs = model(batch["img"], gates)
    losses = task_losses(outputs, batch, tasks, seg_class_weights)
    loss, parts = policy_objective(losses, lambdas, logits, num_train_layers, reg)
    loss.backward(inputs=[logits])
    if world_size > 1:
        dist.all_reduce(logits.grad, op=dist.ReduceOp.SUM)
        logits.grad.div_(world_size)
    optimizer.step()
    log = _loss_log(losses, loss)
    log.update({f"policy/{k}": v for k, v in parts.items()})
    return log


def adashare_weight_optimizer(model: torch.nn.Module, lr: float, backbone_lr: float, sgd: bool,
                              fix_bn: bool = False) -> torch.optim.Optimizer:
    """AdaShare's weight optimiser: heads at ``lr``, backbone at ``backbone_lr``; Adam (betas (0.5, 0.999),
    weight decay 1e-4) for warm-up and re-training, SGD (momentum 0.9, weight decay 1e-4) for the weight
    epochs of policy learning. ``fix_bn`` leaves the backbone's BN affine parameters out (AdaShare's
    ``fix_BN``, which sets their ``requires_grad`` to False)."""
    backbone = [p for n, p in model.backbone.named_parameters()
                if p.requires_grad and not (fix_bn and ".bn" in f".{n}")]
    heads = [p for p in model.heads.parameters() if p.requires_grad]
    groups = [{"params": heads, "lr": lr}, {"params": backbone, "lr": backbone_lr}]
    if sgd:
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=1e-4)
    return torch.optim.Adam(groups, lr=lr, betas=(0.5, 0.999), weight_decay=1e-4)


def adashare_policy_optimizer(model: torch.nn.Module, policy_lr: float) -> torch.optim.Optimizer:
    """Adam on the logits with weight decay 5e-4 (AdaShare's ``alphas`` optimiser).

    Deviation: AdaShare uses ``policy_lr`` only with ``init_method: all_chosen`` and a hard-coded 0.01
    otherwise; here ``policy_lr`` always applies (their YAMLs set it to 0.01).
    """
    return torch.optim.Adam([model.logits], lr=policy_lr, weight_decay=5e-4)


class BatchStream:
    """An endless, resumable stream of batches over a data set, identical for any number of ranks.

    Epoch ``e`` visits ``torch.randperm(n)`` drawn from a generator seeded with ``(seed, e)`` (or
    ``0..n-1`` when ``shuffle`` is off) in global batches of ``batch_size`` (the last partial batch is
    dropped, as AdaShare's loaders do). Rank ``r`` of ``world_size`` receives the ``r``-th contiguous slice
    of ``batch_size // world_size`` samples of each global batch, so ``world_size`` ranks together see
    exactly the batches a single process sees.

    The position is ``(epoch, batch)``; :meth:`state_dict` / :meth:`load_state_dict` resume the stream
    exactly. With ``workers > 0`` each epoch's DataLoader gets worker seeds derived from ``(seed, e)``;
    data augmentation that draws from torch's global generator is then reproducible only for streams
    resumed at an epoch boundary (use ``workers=0`` for a bitwise resume anywhere).
    """

    def __init__(self, dataset: torch.utils.data.Dataset, batch_size: int, seed: int, *, shuffle: bool = True,
                 workers: int = 0, rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size % world_size:
            raise ValueError(f"the global batch size {batch_size} must be divisible by the number of ranks "
                             f"{world_size}")
        self.dataset = dataset
        self.n = len(dataset)
        if self.n < batch_size:
            raise ValueError(f"the data set has {self.n} samples, fewer than one batch of {batch_size}")
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.workers = workers
        self.rank, self.world_size = rank, world_size
        self.pin_memory = pin_memory
        self.epoch, self.batch = 0, 0
        self._it: Iterator | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.n // self.batch_size

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def _start(self) -> None:
        order = self._order(self.epoch)
        per_rank = self.batch_size // self.world_size
        batches = []
        for b in range(self.batch, len(self)):
            start = b * self.batch_size + self.rank * per_rank
            batches.append(order[start:start + per_rank])
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch + 7919)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers,
                                             generator=g, pin_memory=self.pin_memory,
                                             persistent_workers=False)
        self._it = iter(loader)

    def next(self) -> dict[str, torch.Tensor]:
        """The next batch (a new epoch starts transparently)."""
        if self._it is None:
            self._start()
        batch = next(self._it)
        self.batch += 1
        if self.batch == len(self):
            self.epoch, self.batch, self._it = self.epoch + 1, 0, None
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.batch, self._it = int(state["epoch"]), int(state["batch"]), None
