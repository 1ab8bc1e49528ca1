"""Training: the AdaShare schedule (warm-up, policy learning, sampling, re-training), checkpoints, DDP.

- :class:`Trainer`, :class:`RunOptions`: the whole run, resumable (:mod:`fastshare.train.trainer`);
- step functions and loss composition (:mod:`fastshare.train.phases`);
- atomic checkpoints and AdaShare import (:mod:`fastshare.train.checkpoint`);
- DistributedDataParallel with synchronised policy logits (:mod:`fastshare.train.distributed`).
"""

from fastshare.train.checkpoint import CheckpointError, atomic_save, import_adashare, load_adashare_checkpoint, load_checkpoint
from fastshare.train.phases import BatchStream, PolicyRegularisation, policy_objective, policy_step, weight_step
from fastshare.train.trainer import RunOptions, Trainer, evaluate, seed_everything, selection_score

__all__ = [
    "BatchStream",
    "CheckpointError",
    "PolicyRegularisation",
    "RunOptions",
    "Trainer",
    "atomic_save",
    "evaluate",
    "import_adashare",
    "load_adashare_checkpoint",
    "load_checkpoint",
    "policy_objective",
    "policy_step",
    "seed_everything",
    "selection_score",
    "weight_step",
]
