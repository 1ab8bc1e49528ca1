"""The whole AdaShare run: warm-up, policy learning, architecture sampling, re-training, evaluation.

:class:`Trainer` drives the phases of :mod:`fastshare.train.phases` from a :class:`fastshare.config.Config`
(AdaShare's YAML keys) plus :class:`RunOptions` (fastshare settings the YAML does not carry). Its whole
state (model, optimisers, schedulers, logits, temperature, counters, batch-stream positions, every RNG)
goes into one checkpoint (:mod:`fastshare.train.checkpoint`), and a run resumed from it ends with the same
weights, bit for bit on the CPU, as an uninterrupted one.

Schedule (AdaShare's ``train.py`` and ``re-train.py``; differences are listed below):

1. ``warm_up_iters`` warm-up iterations on ``train`` (all blocks, logits frozen);
2. policy learning until ``total_iters``: weight epochs of ``weight_iter_alternate`` iterations on
   ``train1`` and policy epochs of ``alpha_iter_alternate`` iterations on ``train2``; after each weight
   epoch the model is validated; after each policy epoch the temperature decays
   (``tau = init_temp * decay_temp ** policy_epochs``) and the curriculum may advance;
   **model selection** (checkpoint ``best``, the validation with the highest score) considers only the
   validations at search iterations ``i`` with ``i - warm_up_iters >= Lp * curriculum_speed *
   (weight_iter_alternate + alpha_iter_alternate)`` (:attr:`Trainer.selection_start`), ``Lp`` being the
   number of policy blocks, as AdaShare's ``train.py`` does, with or without the curriculum: the delay lets
   the logits move away from their initial values (and, with the curriculum, covers every block) before a
   policy is selected; when no validation reaches it (a short run), the final logits are used;
3. ``num_samples`` architectures drawn from ``softmax(alpha)`` of the selected logits (else the final
   ones), plus the argmax one; each re-trained from the run's initial weights for ``retrain_total_iters`` iterations on ``train``
   with its fixed policy (executor ``auto``: the tree executor where registered), validated every
   ``val_freq`` iterations, its best weights evaluated on ``test``.

Differences from AdaShare's code (deliberate):

- model selection uses a validation split held out of ``train`` (``RunOptions.val_fraction``, disjoint
  from ``train1``/``train2``), never the test split; the score is the multi-task delta (percent,
  :func:`fastshare.metrics.multi_task_delta`) of the validation metrics relative to those of the warm-up
  (hard-sharing) model, instead of AdaShare's ratios to published numbers;
- validation during policy learning uses the argmax policy (deterministic) at the current curriculum stage,
  not a policy sampled from ``softmax(alpha)``;
- warm-up is exactly ``warm_up_iters`` iterations (AdaShare's loop does ``warm_up_iters - 1``);
- the Gumbel noise comes from a dedicated seeded generator (identical on all ranks), not torch's global one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastshare.config import BACKBONES, Config, ConfigError
from fastshare.data import check_tasks_provided
from fastshare.metrics import LOWER_IS_BETTER, MultiTaskMetrics, multi_task_delta
from fastshare.model import AdaShareNet
from fastshare.policy import (
    Gates,
    argmax_policy,
    curriculum_stage,
    draw_uniform,
    sample_architectures,
    select_probability,
    temperature,
)
from fastshare.train import checkpoint as ckpt_io
from fastshare.train.distributed import DistContext, barrier, wrap_model
from fastshare.train.phases import (
    BatchStream,
    PolicyRegularisation,
    adashare_policy_optimizer,
    adashare_weight_optimizer,
    policy_step,
    weight_step,
)

__all__ = ["RunOptions", "Trainer", "seed_everything", "build_model", "build_splits", "evaluate",
           "selection_score", "SELECTION_METRICS"]

#: Metrics of the model-selection score (AdaShare's reference metrics, fastshare's names).
SELECTION_METRICS: dict[str, tuple[str, ...]] = {
    "seg": ("mIoU", "pixel_acc"),
    "sn": ("mean_angle", "median_angle", "within_11.25", "within_22.5", "within_30"),
    "depth": ("abs_err", "rel_err", "delta_1.25", "delta_1.25^2", "delta_1.25^3"),
    "keypoint": ("err",),
    "edge": ("err",),
}

_BACKBONES = {name: name.lower() for name in BACKBONES}  # config name -> fastshare.model name


@dataclass
class RunOptions:
    """fastshare run settings that AdaShare's YAML does not carry (CLI flags).

    Attributes:
        head_width: ASPP branch width (1024 in the paper; ~32 for CPU demos).
        dropout: head dropout.
        num_samples: architectures sampled from ``softmax(alpha)`` for re-training, besides the argmax one.
        val_fraction: fraction of ``train`` held out for model selection (at least one batch).
        eval_batches: cap on validation/test batches (None: the whole split).
        num_train, num_test: sizes of the synthetic splits.
        checkpoint_every: also write ``latest`` every this many iterations (None: at validations only).
        latest_at_validation: write ``latest`` at every validation (AdaShare's resume points); off, only
            ``best``, phase-end and ``checkpoint_every`` checkpoints are written (the demo: less disk I/O).
        tensorboard: write TensorBoard scalars (needs ``tensorboard``).
        progress: tqdm progress bars.
        sync_bn: SyncBatchNorm under DDP (CUDA only).
        overwrite: let a new run write into a checkpoint folder that holds an earlier run's checkpoints
            (by default :meth:`Trainer.run` refuses, so that nothing written before is lost).
    """

    head_width: int = 1024
    dropout: float = 0.5
    num_samples: int = 1
    val_fraction: float = 0.1
    eval_batches: int | None = None
    num_train: int = 256
    num_test: int = 64
    checkpoint_every: int | None = None
    latest_at_validation: bool = True
    tensorboard: bool = False
    progress: bool = True
    sync_bn: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        checks = [("head_width", self.head_width >= 1, ">= 1"), ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
                  ("num_samples", self.num_samples >= 0, ">= 0"),
                  ("val_fraction", 0 < self.val_fraction < 1, "in (0, 1): the search selects on it"),
                  ("eval_batches", self.eval_batches is None or self.eval_batches >= 1, ">= 1 or None"),
                  ("num_train", self.num_train >= 1, ">= 1"), ("num_test", self.num_test >= 1, ">= 1"),
                  ("checkpoint_every", self.checkpoint_every is None or self.checkpoint_every >= 1, ">= 1 or None")]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"RunOptions.{name} must be {want}, got {getattr(self, name)!r}")


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: Config, opts: RunOptions) -> AdaShareNet:
    """The :class:`AdaShareNet` of a configuration (initialised from torch's global generator)."""
    if cfg.backbone not in _BACKBONES:
        raise ValueError(f"backbone: {cfg.backbone!r} is not one of {', '.join(_BACKBONES)}")
    if cfg.policy_model != "task-specific":
        raise ValueError(f"policy_model: only 'task-specific' is implemented, got {cfg.policy_model!r}")
    return AdaShareNet(_BACKBONES[cfg.backbone], dict(zip(cfg.tasks, cfg.tasks_num_class)),
                       skip_layer=cfg.skip_layer, init_method=cfg.train.init_method,
                       init_neg_logits=cfg.init_neg_logits, head_width=opts.head_width, dropout=opts.dropout,
                       executor=cfg.executor)


def config_resume_path(cfg: Config) -> Path | None:
    """The checkpoint AdaShare's ``train.resume: true`` continues from:
    ``<checkpoint_dir>/<exp_name>/<train.which_iter>.pth`` (``warmup``, ``latest``, ``best``, ...); None
    when ``train.resume`` is false. Raises :class:`~fastshare.train.CheckpointError` when the file is
    missing, saying how to start a new run instead."""
    if not cfg.train.resume:
        return None
    which = cfg.train.which_iter
    if isinstance(which, int):
        raise ConfigError(f"train.which_iter: {which} names an iteration; fastshare writes named checkpoints "
                          "(warmup, latest, best, search_done): name one of them")
    path = Path(cfg.paths.checkpoint_dir) / cfg.exp_name / f"{which}.pth"
    if not path.is_file():
        raise ckpt_io.CheckpointError(path, "no such file (train.resume is true and train.which_iter names it; "
                                            "set train.resume: false to start a new run)")
    return path


def _seg_class_weights(ds: torch.utils.data.Dataset) -> torch.Tensor | None:
    """The data set's segmentation class weights (Taskonomy's ``semseg_prior_factor.npy``), or None."""
    while isinstance(ds, torch.utils.data.Subset):
        ds = ds.dataset
    return getattr(ds, "class_weights", None)


def _sample_keys(ds: torch.utils.data.Dataset) -> list[Any]:
    """An identity per sample shared by the splits of one data set (to hold validation samples out)."""
    if hasattr(ds, "groups"):
        return [tuple(g) for g in ds.groups]
    if hasattr(ds, "start") and hasattr(ds, "length"):
        return list(range(ds.start, ds.start + ds.length))
    raise TypeError(f"cannot identify the samples of {type(ds).__name__} to hold out a validation split")


def _dataset(cfg: Config, opts: RunOptions, split: str, seed: int) -> torch.utils.data.Dataset:
    d = cfg.dataload
    name = d.dataset
    if name == "Synthetic":
        from fastshare.data.synthetic import SyntheticScenes

        size = (d.crop_h or 64, d.crop_w or 64)
        return SyntheticScenes(split, num_train=opts.num_train, num_test=opts.num_test, size=size, seed=seed)
    if name == "NYU_v2":
        from fastshare.data.nyu_v2 import NYUv2

        return NYUv2(d.dataroot, split, d.crop_h, d.crop_w)
    if name == "CityScapes":
        from fastshare.data.cityscapes import CityScapes

        n_cls = cfg.tasks_num_class[cfg.tasks.index("seg")] if "seg" in cfg.tasks else 19
        return CityScapes(d.dataroot, split, d.crop_h, d.crop_w, num_class=n_cls, small_res=d.small_res)
    if name == "Taskonomy":
        from fastshare.data.taskonomy import Taskonomy

        return Taskonomy(d.dataroot, "test_small" if split == "test" else split, d.crop_h, d.crop_w)
    raise ValueError(f"dataload.dataset: unknown data set {name!r}")


def build_splits(cfg: Config, opts: RunOptions, seed: int) -> dict[str, torch.utils.data.Dataset]:
    """``train``, ``train1``, ``train2``, ``val`` and ``test`` data sets.

    ``val`` is a random ``val_fraction`` of ``train`` (drawn with ``seed``); those samples are removed from
    ``train``, ``train1`` and ``train2``. The validation split is evaluated without augmentation where the
    data set allows turning it off.
    """
    check_tasks_provided(cfg)
    train = _dataset(cfg, opts, "train", seed)
    n_val = max(cfg.train.batch_size, int(round(opts.val_fraction * len(train))))
    if n_val >= len(train):
        raise ValueError(f"the validation split (val_fraction {opts.val_fraction} of {len(train)} training "
                         f"samples, at least train.batch_size = {cfg.train.batch_size}) leaves no training data")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 4242)).tolist()
    val_idx = sorted(perm[:n_val])
    keys = _sample_keys(train)
    held = {keys[i] for i in val_idx}
    out: dict[str, torch.utils.data.Dataset] = {}
    for split in ("train", "train1", "train2"):
        ds = train if split == "train" else _dataset(cfg, opts, split, seed)
        keep = [i for i, k in enumerate(_sample_keys(ds)) if k not in held]
        out[split] = torch.utils.data.Subset(ds, keep)
    val_ds = copy.copy(train)
    if hasattr(val_ds, "augment"):
        val_ds.augment = False
    out["val"] = torch.utils.data.Subset(val_ds, val_idx)
    out["test"] = _dataset(cfg, opts, "test", seed)
    return out


def build_eval_split(cfg: Config, opts: RunOptions, seed: int, split: str) -> dict[str, torch.utils.data.Dataset]:
    """The data that evaluating ``split`` needs: ``test`` alone (a data root without training data, or
    with too little for the validation hold-out, can still be evaluated), or for ``val`` every split
    (:func:`build_splits`: the validation samples are held out of ``train``)."""
    if split == "test":
        check_tasks_provided(cfg)
        return {"test": _dataset(cfg, opts, "test", seed)}
    return build_splits(cfg, opts, seed)


@torch.no_grad()
def evaluate(model: AdaShareNet, dataset: torch.utils.data.Dataset, gates: Gates, tasks_num_class: Mapping[str, int],
             batch_size: int, device: torch.device, max_batches: int | None = None,
             autocast: contextlib.AbstractContextManager | None = None,
             seg_class_weights: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of ``model`` with ``gates`` over ``dataset`` (eval mode).

    Predictions are upsampled to the target size bilinearly (``align_corners=True``, as AdaShare's
    ``resize_results``) before :class:`fastshare.metrics.MultiTaskMetrics` (``seg_class_weights`` weight
    the segmentation error, as Taskonomy's loss).
    """
    was_training = model.training
    model.eval()
    metrics = MultiTaskMetrics(list(tasks_num_class), list(tasks_num_class.values()), seg_class_weights)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            img = batch["img"].to(device)
            with autocast or contextlib.nullcontext():
                out = model(img, gates)
            size = tuple(img.shape[-2:])
            preds = {t: F.interpolate(p.float(), size=size, mode="bilinear", align_corners=True).cpu()
                     for t, p in out.items()}
            metrics.update(preds, batch)
    finally:
        model.train(was_training)
    return metrics.compute()


def selection_score(metrics: Mapping[str, Mapping[str, float]], reference: Mapping[str, Mapping[str, float]]) -> float:
    """Model-selection score: multi-task delta (percent) of ``metrics`` over ``reference`` on
    :data:`SELECTION_METRICS`; metrics whose reference is 0 or not finite are left out."""
    chosen = {}
    for task, names in SELECTION_METRICS.items():
        if task in reference and task in metrics:
            ok = [n for n in names if n in reference[task] and n in metrics[task]
                  and math.isfinite(reference[task][n]) and reference[task][n] != 0]
            if ok:
                chosen[task] = ok
    if not chosen:
        return 0.0
    return multi_task_delta(metrics, reference, metrics=chosen, lower_is_better=LOWER_IS_BETTER)


class _RunLog:
    """JSON-lines log (``log.jsonl``) and optional TensorBoard scalars, on the main rank only. Closing it
    (at the end of :meth:`Trainer.run`) releases the files; a later record opens them again (appending)."""

    def __init__(self, folder: Path | None, tensorboard: bool) -> None:
        self.folder = folder
        self.tensorboard = tensorboard
        self._fh = None
        self._tb = None
        self._open()

    def _open(self) -> None:
        if self.folder is None or self._fh is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.folder / "log.jsonl", "a", encoding="utf-8", buffering=1)
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError("TensorBoard logging was requested but tensorboard is not installed "
                                   "(pip install 'fastshare[tensorboard]')") from exc
            self._tb = SummaryWriter(str(self.folder / "tensorboard"))

    def write(self, record: Mapping[str, Any], step: int | None = None) -> None:
        self._open()
        if self._fh is None:
            return
        self._fh.write(json.dumps(record, default=float) + "\n")
        if self._tb is not None and step is not None:
            prefix = record.get("phase", "run")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iter":
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


@dataclass
class _State:
    """Counters of the run (all plain values, saved in checkpoints)."""

    phase: str = "warmup"          # warmup | policy | retrain | done
    iteration: int = 0             # search iteration (warm-up + policy learning)
    iter_w: int = 0                # weight iterations of policy learning
    iter_a: int = 0                # policy iterations
    flag: str = "update_w"         # update_w | update_alpha
    policy_epoch: int = 0          # completed policy epochs (= temperature decays)
    reference: dict | None = None  # validation metrics of the warm-up model
    best_score: float = -math.inf
    best_iter: int = -1
    best_logits: list | None = None
    policies: list | None = None   # (K, L) 0/1 lists of the architectures to re-train
    arch: int = 0                  # architecture being re-trained
    retrain_iter: int = 0
    retrain_best: float = -math.inf
    results: list = field(default_factory=list)


class Trainer:
    """Runs (and resumes) a whole AdaShare experiment; see the module docstring for the schedule.

    Args:
        cfg: the configuration (:func:`fastshare.config.load_config`).
        opts: fastshare run settings.
        ctx: distributed context (:func:`fastshare.train.distributed.init_distributed`); single process
            on ``cfg.device`` by default.
        datasets: override the data sets (``train``, ``train1``, ``train2``, ``val``, ``test``), e.g. in tests.

    Example::

        trainer = Trainer(load_config("configs/demo.yml"), RunOptions(head_width=32))
        result = trainer.run()           # {"policy": ..., "architectures": [...], ...}
    """

    def __init__(self, cfg: Config, opts: RunOptions | None = None, ctx: DistContext | None = None,
                 datasets: Mapping[str, torch.utils.data.Dataset] | None = None) -> None:
        self.cfg = cfg
        self.opts = opts or RunOptions()
        self.ctx = ctx or DistContext(device=_resolve_device(cfg.device))
        self.device = self.ctx.device
        self.seed = int(cfg.seed[0])
        self.tasks = list(cfg.tasks)
        self.lambdas = dict(zip(cfg.tasks, (float(x) for x in cfg.lambdas)))
        self.num_class = dict(zip(cfg.tasks, cfg.tasks_num_class))
        self.reg = PolicyRegularisation(cfg.train.reg_w, cfg.train.reg_w_hamming, cfg.is_sparse, cfg.is_sharing,
                                        cfg.diff_sparsity_weights)
        self.checkpoint_dir = Path(cfg.paths.checkpoint_dir) / cfg.exp_name
        seed_everything(self.seed)
        # The data first: a configuration the data set cannot serve leaves no log folder behind.
        self.data = dict(datasets) if datasets is not None else build_splits(cfg, self.opts, self.seed)
        # Taskonomy's class weights come with the data root: any split has them (evaluation may build one).
        self.seg_class_weights = _seg_class_weights(self.data.get("train") or next(iter(self.data.values())))
        self.log = _RunLog(Path(cfg.paths.log_dir) / cfg.exp_name if self.ctx.is_main else None,
                           self.opts.tensorboard)
        b = cfg.train.batch_size
        mk = dict(workers=cfg.workers, rank=self.ctx.rank, world_size=self.ctx.world_size,
                  pin_memory=self.device.type == "cuda")
        self.streams = {s: BatchStream(self.data[s], b, self.seed + i, **mk)
                        for i, s in enumerate(("train", "train1", "train2"), start=11) if s in self.data}
        self.gumbel = torch.Generator().manual_seed(self.seed + 1)
        self.state = _State()
        # Whether the checkpoint folder's files are this run's: after a first run() here, or load() of a
        # checkpoint of that folder. Until then run() refuses a folder that holds checkpoints.
        self._owns_folder = False
        self._init_model_state: dict[str, torch.Tensor] | None = None
        self._new_search_model()

    # ------------------------------------------------------------------------------------------ setup

    @property
    def num_blocks(self) -> int:
        return self.net.num_blocks

    def _autocast(self) -> contextlib.AbstractContextManager:
        p = self.cfg.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)

    def _place(self, model: AdaShareNet) -> AdaShareNet:
        model = model.to(self.device)
        if self.cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _new_search_model(self) -> None:
        seed_everything(self.seed)
        self.net = self._place(build_model(self.cfg, self.opts))
        self._init_model_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        if self.cfg.fix_BN:
            for n, p in self.net.backbone.named_parameters():
                if ".bn" in f".{n}":
                    p.requires_grad_(False)
        self.forward = wrap_model(self.net, self.ctx, sync_bn=self.opts.sync_bn)
        t = self.cfg.train
        self.optimizers = {"weights": adashare_weight_optimizer(self.net, t.lr, t.backbone_lr, sgd=False,
                                                                 fix_bn=self.cfg.fix_BN),
                           "alphas": adashare_policy_optimizer(self.net, t.policy_lr)}
        self.schedulers = {"weights": torch.optim.lr_scheduler.StepLR(self.optimizers["weights"], t.decay_lr_freq,
                                                                      t.decay_lr_rate)}
        self.scaler = self._new_scaler()

    def _new_scaler(self) -> torch.amp.GradScaler | None:
        if self.cfg.precision == "fp16":
            return torch.amp.GradScaler(self.device.type)
        return None

    def _start_policy_learning(self) -> None:
        """End of warm-up: SGD for the weights (no LR schedule, as AdaShare's YAMLs), Adam for the logits."""
        t = self.cfg.train
        self.optimizers["weights"] = adashare_weight_optimizer(self.net, t.lr, t.backbone_lr, sgd=True,
                                                               fix_bn=self.cfg.fix_BN)
        self.schedulers = {}
        self.state.phase = "policy"

    def _new_retrain_model(self, arch: int) -> None:
        """A fresh model with the run's initial weights (AdaShare re-trains from the initial state)."""
        seed_everything(self.seed + 1000 * (arch + 1))
        self.net = self._place(build_model(self.cfg, self.opts))
        self.net.load_state_dict(self._init_model_state)
        if self.cfg.fix_BN:
            for n, p in self.net.backbone.named_parameters():
                if ".bn" in f".{n}":
                    p.requires_grad_(False)
        self.net.logits.requires_grad_(False)
        self.forward = wrap_model(self.net, self.ctx, find_unused_parameters=True, sync_bn=self.opts.sync_bn)
        t = self.cfg.train
        self.optimizers = {"weights": adashare_weight_optimizer(self.net, t.lr, t.backbone_lr, sgd=False,
                                                                 fix_bn=self.cfg.fix_BN)}
        self.schedulers = {"weights": torch.optim.lr_scheduler.StepLR(self.optimizers["weights"], t.decay_lr_freq,
                                                                      t.decay_lr_rate)}
        self.scaler = self._new_scaler()
        if "train" in self.streams:  # absent when only an evaluation split was built
            self.streams["train"].load_state_dict({"epoch": 0, "batch": 0})

    # --------------------------------------------------------------------------------------- schedule

    @property
    def num_train_layers(self) -> int:
        """The curriculum stage of the current policy epoch."""
        lp = self.net.logits.shape[1]
        return curriculum_stage(self.state.policy_epoch, self.cfg.curriculum_speed, lp, self.cfg.is_curriculum)

    @property
    def tau(self) -> float:
        """The Gumbel-Softmax temperature: decayed once per completed policy epoch."""
        t = self.cfg.train
        return temperature(t.init_temp, t.decay_temp, self.state.policy_epoch)

    @property
    def selection_start(self) -> int:
        """The first search iteration whose validation may be selected (AdaShare's delay):
        ``warm_up_iters + Lp * curriculum_speed * (weight_iter_alternate + alpha_iter_alternate)``."""
        w_alt, a_alt = self._alternation()
        lp = self.net.logits.shape[1]
        return self.cfg.train.warm_up_iters + lp * self.cfg.curriculum_speed * (w_alt + a_alt)

    def _alternation(self) -> tuple[int, int]:
        t = self.cfg.train
        return (t.weight_iter_alternate or len(self.streams["train1"]),
                t.alpha_iter_alternate or len(self.streams["train2"]))

    def sample_gates(self, requires_grad: bool) -> Gates:
        """Gumbel gates of the current stage; the noise comes from the run's Gumbel generator."""
        logits = self.net.logits
        u = draw_uniform(tuple(logits.shape), self.gumbel).to(logits.device)
        alpha = logits if requires_grad else logits.detach()
        return Gates.sample(alpha, self.tau, self.cfg.train.hard_sampling, self.num_blocks, self.num_train_layers, u)

    def current_policy(self, logits: torch.Tensor | None = None, stage: int | None = None) -> torch.Tensor:
        """``(K, L)`` argmax policy; blocks before the curriculum stage (``stage`` trained blocks) execute."""
        logits = self.net.logits if logits is None else logits
        policy = argmax_policy(logits.detach().cpu(), self.num_blocks)
        if stage is not None:
            policy[:, : self.num_blocks - stage] = 1
        return policy

    def _batch(self, split: str) -> dict[str, torch.Tensor]:
        nb = self.device.type == "cuda"
        batch = self.streams[split].next()
        out = {k: v.to(self.device, non_blocking=nb) for k, v in batch.items()}
        if self.cfg.channels_last:
            out["img"] = out["img"].contiguous(memory_format=torch.channels_last)
        return out

    def _validate(self, gates: Gates, split: str = "val") -> dict[str, dict[str, float]]:
        return evaluate(self.net, self.data[split], gates, self.num_class, self.cfg.train.batch_size, self.device,
                        self.opts.eval_batches, self._autocast(), self.seg_class_weights)

    # ------------------------------------------------------------------------------------------- run

    def run(self, stop_after: int | None = None) -> dict[str, Any]:
        """Search, sample, re-train and evaluate (continuing from the current state, e.g. after
        :meth:`load`). ``stop_after``: stop (with a ``latest`` checkpoint) after this many more
        iterations, counting search and re-training iterations: a simulated interruption."""
        budget = [math.inf if stop_after is None else int(stop_after)]
        if not self._owns_folder:
            self.refuse_to_overwrite(("*.pth",), "a new run would replace them: continue that run with "
                                                 "`--resume` and its latest checkpoint, or choose another "
                                                 "exp_name")
            self._owns_folder = True
        try:
            if self.state.phase in ("warmup", "policy"):
                if not self.search(budget):
                    return {"interrupted": True}
            if self.state.phase == "retrain":
                if not self.retrain_all(budget):
                    return {"interrupted": True}
            return self.summary()
        finally:
            self.log.close()

    def search(self, budget: list[float] | None = None) -> bool:
        """Warm-up and policy learning up to ``total_iters``; False if stopped by ``budget``."""
        budget = budget if budget is not None else [math.inf]
        t, st = self.cfg.train, self.state
        w_alt, a_alt = self._alternation()
        self.net.train()
        bar = tqdm(total=t.total_iters, initial=st.iteration, desc="search", disable=not self._bars, leave=False)
        with self._backend():
            while st.iteration < t.total_iters:
                if budget[0] <= 0:
                    bar.close()
                    self.save("latest")
                    return False
                if st.phase == "warmup" and st.iteration >= t.warm_up_iters:
                    self._end_warmup()
                if st.phase == "warmup":
                    log = weight_step(self.forward, self._batch("train"), self.net.gates("full"), self.tasks,
                                      self.lambdas, self.optimizers["weights"], self.schedulers.get("weights"),
                                      self._autocast(), self.scaler,
                                      seg_class_weights=self.seg_class_weights)
                elif st.flag == "update_w":
                    log = weight_step(self.forward, self._batch("train1"), self.sample_gates(False), self.tasks,
                                      self.lambdas, self.optimizers["weights"], self.schedulers.get("weights"),
                                      self._autocast(), self.scaler,
                                      seg_class_weights=self.seg_class_weights)
                    st.iter_w += 1
                else:
                    log = policy_step(self.net, self._batch("train2"), self.sample_gates(True), self.tasks,
                                      self.lambdas, self.optimizers["alphas"], self.num_train_layers, self.reg,
                                      self._autocast(), self.ctx.world_size,
                                      seg_class_weights=self.seg_class_weights)
                    st.iter_a += 1
                st.iteration += 1
                budget[0] -= 1
                bar.update(1)
                self._log_step(st.phase if st.phase == "warmup" else st.flag, st.iteration, log)
                if st.phase == "policy" and st.flag == "update_w" and st.iter_w % w_alt == 0:
                    st.flag = "update_alpha"
                    self._validate_search()
                elif st.phase == "policy" and st.flag == "update_alpha" and st.iter_a % a_alt == 0:
                    st.flag = "update_w"
                    st.policy_epoch += 1
                    self.log.write({"phase": "policy", "iter": st.iteration, "tau": self.tau,
                                    "num_train_layers": self.num_train_layers,
                                    "select_prob": select_probability(self.net.logits).tolist()}, st.iteration)
                elif st.phase == "warmup" and st.iteration % t.val_freq == 0:
                    self._save_latest_at_validation()
                if self.opts.checkpoint_every and st.iteration % self.opts.checkpoint_every == 0:
                    self.save("latest")
            if st.phase == "warmup":  # total_iters <= warm_up_iters: no policy learning
                self._end_warmup()
        bar.close()
        self._finish_search()
        return True

    @property
    def _bars(self) -> bool:
        return self.opts.progress and self.ctx.is_main

    def _backend(self) -> contextlib.AbstractContextManager:
        from fastshare.ops import use_backend

        return use_backend(self.cfg.backend)

    def _log_step(self, phase: str, it: int, log: Mapping[str, float]) -> None:
        if it % self.cfg.train.print_freq == 0:
            self.log.write({"phase": phase, "iter": it, **log, "tau": self.tau}, it)

    def _end_warmup(self) -> None:
        """Reference metrics of the hard-sharing model, ``warmup`` checkpoint, policy-learning optimisers."""
        if self.ctx.is_main:
            self.state.reference = self._validate(self.net.gates("full"))
            self.log.write({"phase": "warmup", "iter": self.state.iteration, "val": self.state.reference})
        self.save("warmup")
        self._start_policy_learning()

    def _validate_search(self) -> None:
        """Validate the argmax policy at the current stage; select from :attr:`selection_start` on."""
        st = self.state
        stage = self.num_train_layers
        selectable = st.iteration >= self.selection_start
        if self.ctx.is_main:
            policy = self.current_policy(stage=stage)
            metrics = self._validate(self.net.gates("fixed", policy=policy))
            score = selection_score(metrics, st.reference or metrics)
            self.log.write({"phase": "policy", "iter": st.iteration, "val": metrics, "score": score,
                            "num_train_layers": stage, "selectable": selectable}, st.iteration)
            if selectable and score > st.best_score:
                st.best_score, st.best_iter = score, st.iteration
                st.best_logits = self.net.logits.detach().cpu().tolist()
                self._write("best")
        self._save_latest_at_validation()

    def _finish_search(self) -> None:
        """Sample the architectures (argmax first) from the selected logits (the final logits when no
        validation was selectable), then switch to re-training."""
        st = self.state
        if st.best_logits is None:
            st.best_logits = self.net.logits.detach().cpu().tolist()
        alpha = torch.tensor(st.best_logits)
        g = torch.Generator().manual_seed(self.seed + 2)
        policies = [argmax_policy(alpha, self.num_blocks)]
        policies += sample_architectures(alpha, self.opts.num_samples, g, self.num_blocks)
        st.policies = [p.to(torch.int64).tolist() for p in policies]
        if self.ctx.enabled:  # selection ran on rank 0 only: every rank re-trains rank 0's architectures
            shared = [st.policies, st.best_logits, st.best_iter, st.best_score, st.reference]
            dist.broadcast_object_list(shared, src=0)
            st.policies, st.best_logits, st.best_iter, st.best_score, st.reference = shared
        st.phase, st.arch, st.retrain_iter, st.retrain_best = "retrain", 0, 0, -math.inf
        self.log.write({"phase": "sample", "policies": st.policies, "best_iter": st.best_iter})
        # The re-training model first: search_done.pth is then a re-training checkpoint (initial weights,
        # Adam), which `fastshare retrain --from` and load() expect of the phase it records.
        self._new_retrain_model(0)
        self.save("search_done")

    def retrain_all(self, budget: list[float] | None = None) -> bool:
        """Re-train every sampled architecture from scratch; False if stopped by ``budget``."""
        budget = budget if budget is not None else [math.inf]
        st = self.state
        t = self.cfg.train
        total = t.retrain_total_iters or t.total_iters
        with self._backend():
            while st.arch < len(st.policies):
                policy = torch.tensor(st.policies[st.arch], dtype=torch.float32)
                gates = self.net.gates("fixed", policy=policy)
                self.net.train()
                bar = tqdm(total=total, initial=st.retrain_iter, desc=f"retrain {st.arch}",
                           disable=not self._bars, leave=False)
                while st.retrain_iter < total:
                    if budget[0] <= 0:
                        bar.close()
                        self.save("latest")
                        return False
                    log = weight_step(self.forward, self._batch("train"), gates, self.tasks, self.lambdas,
                                      self.optimizers["weights"], self.schedulers.get("weights"),
                                      self._autocast(), self.scaler,
                                      seg_class_weights=self.seg_class_weights)
                    st.retrain_iter += 1
                    budget[0] -= 1
                    bar.update(1)
                    self._log_step(f"retrain{st.arch}", st.retrain_iter, log)
                    if st.retrain_iter % t.val_freq == 0 or st.retrain_iter == total:
                        self._validate_retrain(gates)
                    elif self.opts.checkpoint_every and st.retrain_iter % self.opts.checkpoint_every == 0:
                        self.save("latest")
                bar.close()
                self._finish_arch(gates)
        st.phase = "done"
        self.save("latest")
        return True

    def _arch_label(self) -> str:
        return f"retrain{self.state.arch:03d}"

    def _validate_retrain(self, gates: Gates) -> None:
        st = self.state
        if self.ctx.is_main:
            metrics = self._validate(gates)
            score = selection_score(metrics, st.reference or metrics)
            self.log.write({"phase": self._arch_label(), "iter": st.retrain_iter, "val": metrics, "score": score},
                           st.retrain_iter)
            if score > st.retrain_best:
                st.retrain_best = score
                self._write(f"{self._arch_label()}_best")
        self._save_latest_at_validation()

    def _finish_arch(self, gates: Gates) -> None:
        """Test metrics of the architecture's best (validation) weights; next architecture."""
        st = self.state
        if self.ctx.is_main:
            # The best validation's weights if this run wrote <arch>_best.pth; else (no re-training
            # iteration, or NaN scores) the final weights.
            final_state = None
            if st.retrain_best > -math.inf:
                best = ckpt_io.load_checkpoint(self.checkpoint_dir / f"{self._arch_label()}_best.pth", self.device)
                final_state = copy.deepcopy(self.net.state_dict())
                self.net.load_state_dict(best["model"])
            test = self._validate(gates, "test")
            if final_state is not None:
                self.net.load_state_dict(final_state)
            st.results.append({"arch": st.arch, "policy": st.policies[st.arch], "val_score": st.retrain_best,
                               "test": test})
            self.log.write({"phase": self._arch_label(), "test": test, "val_score": st.retrain_best})
        barrier(self.ctx)
        st.arch += 1
        st.retrain_iter, st.retrain_best = 0, -math.inf
        if st.arch < len(st.policies):
            self._new_retrain_model(st.arch)

    def summary(self) -> dict[str, Any]:
        """The run's outcome: learned select probabilities, architectures with validation score and test
        metrics, the architecture chosen by validation, and the selected search iteration (``best_iter``,
        -1 when no validation reached ``selection_start`` and the final logits were used)."""
        st = self.state
        alpha = torch.tensor(st.best_logits) if st.best_logits is not None else self.net.logits.detach().cpu()
        results = st.results
        chosen = max(results, key=lambda r: r["val_score"]) if results else None
        return {"tasks": self.tasks, "select_prob": select_probability(alpha).tolist(),
                "policy": st.policies[0] if st.policies else None, "architectures": results, "chosen": chosen,
                "best_iter": st.best_iter, "selection_start": self.selection_start, "reference_val": st.reference}

    # ------------------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly (see :mod:`fastshare.train.checkpoint`)."""
        return {
            "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION,
            "model": self.net.state_dict(),
            "init_model": self._init_model_state,
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "trainer": {**asdict(self.state), "temperature": self.tau},
            "streams": {k: s.state_dict() for k, s in self.streams.items()},
            "rng": ckpt_io.capture_rng({"gumbel": self.gumbel}),
            "config": self.cfg.to_dict(),
            "options": asdict(self.opts),
        }

    def _save_latest_at_validation(self) -> None:
        if self.opts.latest_at_validation:
            self.save("latest")

    def refuse_to_overwrite(self, patterns: Sequence[str], what_to_do: str) -> None:
        """Raise :class:`~fastshare.train.CheckpointError` if the checkpoint folder holds files matching the
        glob ``patterns`` (unless ``RunOptions.overwrite``): a run must not replace an earlier run's files."""
        if self.opts.overwrite:
            return
        # Rank 0 writes the checkpoints, so rank 0 looks (the folder may be on its disk only) and every
        # rank gets its answer: all raise together instead of some waiting in the next collective.
        found = sorted({p.name for pattern in patterns for p in self.checkpoint_dir.glob(pattern)}
                       if self.ctx.is_main else [])
        if self.ctx.enabled:
            shared = [found]
            dist.broadcast_object_list(shared, src=0)
            found = shared[0]
        if found:
            shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
            raise ckpt_io.CheckpointError(self.checkpoint_dir, f"holds {shown} of an earlier run; {what_to_do} "
                                                               "(or pass --overwrite)")

    def save(self, label: str) -> Path:
        """Write ``<checkpoint_dir>/<exp_name>/<label>.pth`` atomically (main rank; every rank waits)."""
        path = self._write(label)
        barrier(self.ctx)
        return path

    def _write(self, label: str) -> Path:
        """The main rank's part of :meth:`save` (no barrier: callable from main-rank-only code)."""
        path = self.checkpoint_dir / f"{label}.pth"
        if self.ctx.is_main:
            ckpt_io.atomic_save(self.state_dict(), path)
        return path

    def load(self, path: str | os.PathLike[str], checkpoint: Mapping[str, Any] | None = None) -> None:
        """Continue from a checkpoint written by :meth:`save` (``--resume``); raises
        :class:`~fastshare.train.CheckpointError` when it lacks an entry a run needs or was written for
        another model (tasks, backbone, head width, ...). ``checkpoint``: the file's contents when the
        caller has read them already (:func:`~fastshare.train.load_checkpoint` of ``path``); else read here."""
        ck = checkpoint if checkpoint is not None else ckpt_io.load_checkpoint(path, self.device)
        missing = [k for k in _RUN_ENTRIES if k not in ck]
        if missing:
            raise ckpt_io.CheckpointError(path, f"not a training checkpoint: no {', '.join(map(repr, missing))} "
                                                f"entr{'y' if len(missing) == 1 else 'ies'}")
        self._check_same_model(path, ck)
        self._owns_folder = Path(path).resolve().parent == self.checkpoint_dir.resolve()
        st = _State(**{k: v for k, v in ck["trainer"].items() if k != "temperature"})
        self._init_model_state = ck["init_model"]
        self.state = st
        if st.phase in ("retrain", "done"):
            self._new_retrain_model(min(st.arch, len(st.policies) - 1))
        elif st.phase == "policy":
            self._start_policy_learning()
        self.net.load_state_dict(ck["model"])
        for k, o in self.optimizers.items():
            if k not in ck["optimizers"]:
                raise ckpt_io.CheckpointError(path, f"checkpoint has no state for optimiser {k!r}")
            o.load_state_dict(ck["optimizers"][k])
        for k, s in self.schedulers.items():
            if k in ck["schedulers"]:
                s.load_state_dict(ck["schedulers"][k])
        if self.scaler is not None and ck.get("scaler") is not None:
            self.scaler.load_state_dict(ck["scaler"])
        for k, s in self.streams.items():
            s.load_state_dict(ck["streams"][k])
        ckpt_io.restore_rng(ck["rng"], {"gumbel": self.gumbel})

    def _check_same_model(self, path: str | os.PathLike[str], ck: Mapping[str, Any]) -> None:
        """The checkpoint's model-shaping configuration and options equal this run's."""
        mine = {**{k: getattr(self.cfg, k) for k in _MODEL_CONFIG_KEYS},
                **{k: getattr(self.opts, k) for k in _MODEL_OPTION_KEYS}}
        theirs = {**{k: ck["config"].get(k) for k in _MODEL_CONFIG_KEYS},
                  **{k: ck["options"].get(k) for k in _MODEL_OPTION_KEYS}}
        diff = [f"{k} {_plain(theirs[k])!r} (this run: {_plain(mine[k])!r})" for k in mine
                if _plain(theirs[k]) != _plain(mine[k])]
        if diff:
            raise ckpt_io.CheckpointError(path, "written for another model: " + "; ".join(diff))


#: The entries :meth:`Trainer.load` reads besides ``model`` and ``trainer``.
_RUN_ENTRIES = ("init_model", "optimizers", "schedulers", "streams", "rng", "config", "options")

#: Configuration keys and run options that shape the model: a checkpoint must agree on them.
_MODEL_CONFIG_KEYS = ("backbone", "tasks", "tasks_num_class", "skip_layer")
_MODEL_OPTION_KEYS = ("head_width",)


def _plain(v: Any) -> Any:
    """Lists for tuples (a configuration read back from a checkpoint holds lists)."""
    return list(v) if isinstance(v, tuple) else v


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
