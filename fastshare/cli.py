"""``fastshare`` command line (also ``python -m fastshare``; under ``torchrun`` for several processes).

Commands:

- ``demo [--quick]``: the whole AdaShare run on synthetic data (tiny ResNet-18 heads, 64 px), printing the
  learned policy (task x block), the test metrics and the measured speed-up of the fast executor over the
  sequential reference;
- ``train --config X.yml [--resume CKPT]``: search + re-training (``torchrun ... -m fastshare train`` for DDP);
- ``retrain --config X.yml --from CKPT``: re-train the architectures of a finished search checkpoint;
- ``eval --config X.yml --checkpoint CKPT [--split test]``: metrics of a checkpoint's model and policy;
- ``policy show --checkpoint CKPT [--out policy.png]``: select-probability table and heat map (matplotlib);
- ``info``: versions and which backends and executors are available (and why not), :mod:`fastshare.info`;
- ``bench [--quick] [--filter S] [--out F] [--device D]``: the benchmark suite, :func:`fastshare.bench.main`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any, Callable, Sequence

import torch

__all__ = ["main", "format_policy", "DEMO_CONFIG"]

#: The demo's configuration (AdaShare's keys). Hyper-parameters chosen so that the tasks take different
#: paths with the default seed: sharing loss off (nothing pulls the tasks' logits together), a sparsity
#: weight large enough for the logits to move within a few policy epochs, no curriculum (every block is
#: trained from the first policy epoch), a policy learning rate of 0.1 and hard straight-through gates.
#: Model selection starts after AdaShare's delay, 8 blocks x curriculum_speed 1 x (2 + 2) = 32 iterations
#: after the 12 warm-up iterations: the validations at iterations 46, 50 and 54 are selectable.
DEMO_CONFIG: dict[str, Any] = {
    "exp_name": "demo",
    "seed": [0],
    "backbone": "ResNet18",
    "tasks": ["seg", "sn", "depth"],
    "tasks_num_class": [4, 3, 1],
    "lambdas": [1.0, 5.0, 1.0],
    "is_sparse": True,
    "is_sharing": False,
    "is_curriculum": False,
    "curriculum_speed": 1,
    "diff_sparsity_weights": True,
    "dataload": {"dataset": "Synthetic", "crop_h": 64, "crop_w": 64},
    "train": {"batch_size": 4, "total_iters": 54, "warm_up_iters": 12, "retrain_total_iters": 12,
              "weight_iter_alternate": 2, "alpha_iter_alternate": 2, "lr": 0.001, "backbone_lr": 0.001,
              "policy_lr": 0.1, "reg_w": 0.05, "val_freq": 10, "print_freq": 5, "decay_lr_freq": 1000,
              "init_temp": 5.0, "decay_temp": 0.965, "init_method": "equal", "hard_sampling": True},
}
#: ``demo --quick`` (a smoke test): too short to reach the selection delay, so it re-trains the argmax
#: policy of the final logits.
DEMO_QUICK = {"train": {"batch_size": 2, "total_iters": 8, "warm_up_iters": 2, "retrain_total_iters": 2,
                        "weight_iter_alternate": 2, "alpha_iter_alternate": 2, "val_freq": 2},
              "dataload": {"crop_h": 33, "crop_w": 33}}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def format_policy(tasks: Sequence[str], policy: Sequence[Sequence[int]],
                  probs: Sequence[Sequence[float]] | None = None) -> str:
    """A task x block table: ``X`` = execute, ``.`` = skip (with the select probability when given)."""
    n = len(policy[0])
    width = 6 if probs is not None else 3
    lp = len(probs[0]) if probs is not None else 0
    head = f"{'task':<8}" + "".join(f"{'b' + str(l):>{width}}" for l in range(n))
    rows = [head]
    for k, task in enumerate(tasks):
        cells = []
        for l in range(n):
            mark = "X" if policy[k][l] else "."
            if probs is not None and l >= n - lp:
                cells.append(f"{mark}{probs[k][l - (n - lp)]:.2f}".rjust(width))
            else:
                cells.append(mark.rjust(width))
        rows.append(f"{task:<8}" + "".join(cells))
    return "\n".join(rows)


def _format_metrics(metrics: dict[str, dict[str, float]]) -> str:
    return "\n".join(f"  {task:<6} " + ", ".join(f"{k}={v:.4g}" for k, v in vals.items())
                     for task, vals in metrics.items())


def measure_speedup(trainer: Any, policy: torch.Tensor, steps: int = 3) -> dict[str, Any]:
    """Seconds per training step (forward + backward) of the re-training model with ``policy`` under the
    sequential reference and the executor ``auto`` picks for a fixed policy, on the same batch (medians of
    ``steps`` interleaved rounds)."""
    from fastshare import executors
    from fastshare.bench.timing import Timed, interleaved_seconds
    from fastshare.train.phases import task_losses
    from fastshare.losses import total_task_loss

    net = trainer.net
    gates = net.gates("fixed", policy=policy)
    batch = trainer._batch("train")
    fast = executors.resolve("auto", gates)

    def step(name: str) -> Timed:
        def run(_: object) -> None:
            net.zero_grad(set_to_none=True)
            out = net(batch["img"], gates, executor=name)
            total_task_loss(task_losses(out, batch, trainer.tasks), trainer.lambdas).backward()
        return Timed(run)

    names = dict.fromkeys(("sequential", fast))
    times = interleaved_seconds({name: step(name) for name in names}, steps, device=batch["img"].device)
    t = {name: median(ts) for name, ts in times.items()}
    net.zero_grad(set_to_none=True)
    return {"fast_executor": fast, "sequential_s": t["sequential"], "fast_s": t[fast],
            "speedup": t["sequential"] / t[fast]}


def _cmd_demo(args: argparse.Namespace) -> int:
    from fastshare.config import load_config
    from fastshare.train import RunOptions, Trainer

    raw = _merge(DEMO_CONFIG, DEMO_QUICK) if args.quick else dict(DEMO_CONFIG)
    out = Path(args.out)
    raw = _merge(raw, {"seed": [args.seed], "paths": {"log_dir": str(out / "logs"),
                                                       "checkpoint_dir": str(out / "checkpoints"),
                                                       "result_dir": str(out / "results")}})
    cfg = load_config(raw)
    opts = RunOptions(head_width=8 if args.quick else 32, dropout=0.0, num_samples=1,
                      num_train=24 if args.quick else 96, num_test=4 if args.quick else 32,
                      eval_batches=2 if args.quick else None, progress=not args.no_progress,
                      latest_at_validation=False, overwrite=True)  # the demo's folder is its own scratch space
    t0 = time.perf_counter()
    trainer = Trainer(cfg, opts)
    result = trainer.run()
    elapsed = time.perf_counter() - t0
    policy = result["policy"]
    if result["best_iter"] >= 0:
        origin = (f"selected at iteration {result['best_iter']} (selection from iteration "
                  f"{result['selection_start']} on)")
    else:
        origin = (f"final logits: no validation reached the selection delay (iteration "
                  f"{result['selection_start']})")
    print(f"learned policy (X = execute, with P(execute)), {origin}:")
    print(format_policy(result["tasks"], policy, result["select_prob"]))
    distinct = len({tuple(p) for p in policy}) > 1
    print(f"tasks take different paths: {'yes' if distinct else 'no'}")
    for arch in result["architectures"]:
        kind = "argmax" if arch["arch"] == 0 else "sampled"
        print(f"architecture {arch['arch']} ({kind}), validation score {arch['val_score']:+.2f}%, test metrics:")
        print(_format_metrics(arch["test"]))
    speed = measure_speedup(trainer, torch.tensor(policy, dtype=torch.float32), steps=3 if args.quick else 5)
    print(f"re-training step: sequential {speed['sequential_s'] * 1e3:.1f} ms, {speed['fast_executor']} "
          f"{speed['fast_s'] * 1e3:.1f} ms, speed-up {speed['speedup']:.2f}x")
    print(f"demo wall time {elapsed:.1f} s (training and evaluation); logs in {out / 'logs' / cfg.exp_name}")
    return 0


def _load_cfg(path: str):
    from fastshare.config import load_config

    return load_config(path)


def _run_options(args: argparse.Namespace, checkpoint: dict[str, Any] | None = None):
    """The run's options from the flags; with a checkpoint, the options that shape the model (head width,
    dropout) and the data splits (validation fraction) are the checkpoint's unless a flag names them."""
    from fastshare.config import ConfigError
    from fastshare.train import RunOptions

    saved = (checkpoint or {}).get("options", {})
    default = RunOptions()
    head_width = args.head_width if args.head_width is not None else saved.get("head_width", default.head_width)
    val_fraction = (args.val_fraction if args.val_fraction is not None
                    else saved.get("val_fraction", default.val_fraction))
    try:
        return RunOptions(head_width=head_width, dropout=saved.get("dropout", default.dropout),
                          num_samples=args.num_samples, val_fraction=val_fraction,
                          eval_batches=args.eval_batches, tensorboard=args.tensorboard,
                          progress=not args.no_progress, checkpoint_every=args.checkpoint_every,
                          overwrite=getattr(args, "overwrite", False))
    except ValueError as exc:  # a flag out of range: one line, as configuration errors
        raise ConfigError(f"command-line flags: {exc}") from exc


def _run_trainer(args: argparse.Namespace, source: str | None = None,
                 checkpoint: dict[str, Any] | None = None,
                 prepare: Callable[[Any], None] | None = None) -> int:
    """Build a :class:`~fastshare.train.Trainer` (DDP under torchrun), continue it from the checkpoint
    file ``source`` when given (model options from it; ``checkpoint``: its contents if already read, so the
    file is read once), ``prepare`` it, run it, print the result on the main rank."""
    from fastshare.train import Trainer, load_checkpoint
    from fastshare.train.distributed import cleanup, init_distributed

    cfg = _load_cfg(args.config)
    ck = checkpoint if checkpoint is not None or source is None else load_checkpoint(source)
    ctx = init_distributed(cfg.device)
    try:
        trainer = Trainer(cfg, _run_options(args, ck), ctx)
        if source is not None:
            trainer.load(source, ck)
        if prepare is not None:
            prepare(trainer)
        result = trainer.run()
        if ctx.is_main:
            print(json.dumps(result, indent=1, default=float))
    finally:
        cleanup(ctx)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from fastshare.train.trainer import config_resume_path

    # --resume wins; else AdaShare's `train.resume: true` continues from `train.which_iter`'s checkpoint.
    return _run_trainer(args, args.resume or config_resume_path(_load_cfg(args.config)))


def _cmd_retrain(args: argparse.Namespace) -> int:
    from fastshare.train import load_checkpoint

    ck = load_checkpoint(args.source)
    if ck["trainer"]["phase"] not in ("retrain", "done"):
        raise SystemExit(f"{args.source}: the search has not finished (phase {ck['trainer']['phase']!r}); "
                         f"use `fastshare train --resume {args.source}`, or the `search_done` checkpoint")

    def prepare(trainer: Any) -> None:
        trainer.refuse_to_overwrite(("latest.pth", "retrain*_best.pth"),
                                    "re-training writes these names: set another exp_name for it")
        if trainer.state.phase == "done":  # re-train again from the first architecture
            trainer.state.phase, trainer.state.arch, trainer.state.retrain_iter = "retrain", 0, 0
            trainer.state.results = []
            trainer._new_retrain_model(0)

    return _run_trainer(args, args.source, ck, prepare)


def _check_finite_logits(path: str, alpha: torch.Tensor) -> None:
    """A policy read from a checkpoint: NaN/Inf logits (a diverged search) are the checkpoint's problem."""
    from fastshare.train import CheckpointError

    if not bool(torch.isfinite(alpha).all()):
        raise CheckpointError(path, "its policy logits hold NaN or Inf (the search diverged): no policy to "
                                    "read; use an earlier checkpoint of the run")


def _cmd_eval(args: argparse.Namespace) -> int:
    from fastshare.train import CheckpointError, Trainer, load_checkpoint
    from fastshare.train.trainer import build_eval_split

    cfg = _load_cfg(args.config)
    ck = load_checkpoint(args.checkpoint)  # checks that a re-training state has "arch" and "retrain_iter"
    state = ck["trainer"]
    # Refused before any work (data, model, log folder): the checkpoint alone says it has nothing to evaluate.
    if state["phase"] == "retrain" and state["retrain_iter"] == 0:
        raise CheckpointError(args.checkpoint, f"holds architecture {state['arch']} before its re-training (the "
                                               "initial weights, e.g. search_done.pth); evaluate best.pth or "
                                               "latest.pth of the search, or a checkpoint written while re-training")
    opts = _run_options(args, ck)
    trainer = Trainer(cfg, opts, datasets=build_eval_split(cfg, opts, int(cfg.seed[0]), args.split))
    trainer.load(args.checkpoint, ck)  # checks that the checkpoint is of this model, restores its state
    if state["phase"] in ("retrain", "done"):  # load_checkpoint checked that such a state has policies
        arch = min(state["arch"], len(state["policies"]) - 1)
        policy = torch.tensor(state["policies"][arch], dtype=torch.float32)
        gates = trainer.net.gates("fixed", policy=policy)
    elif state["phase"] == "policy":
        _check_finite_logits(args.checkpoint, trainer.net.logits.detach())
        policy = trainer.current_policy()
        gates = trainer.net.gates("fixed", policy=policy)
    else:
        gates = trainer.net.gates("full")
    metrics = trainer._validate(gates, args.split)
    print(json.dumps(metrics, indent=1))
    return 0


def _cmd_policy_show(args: argparse.Namespace) -> int:
    from fastshare.config import ConfigError
    from fastshare.policy import argmax_policy, select_probability
    from fastshare.train import load_checkpoint

    out = Path(args.out) if args.out else None
    if out is not None and (out.suffix.lower() != ".png" or out.is_dir()):
        raise ConfigError(f"policy show --out {args.out}: the heat map is written as PNG; give a file path "
                          "ending in .png")
    ck = load_checkpoint(args.checkpoint)
    st = ck["trainer"]
    alpha = torch.tensor(st["best_logits"]) if st.get("best_logits") else ck["model"]["logits"]
    _check_finite_logits(args.checkpoint, alpha)
    tasks = ck["config"]["tasks"]
    probs = select_probability(alpha)
    lp = alpha.shape[1]
    num_blocks = lp + int(ck["config"].get("skip_layer", 0))
    print(format_policy(tasks, argmax_policy(alpha, num_blocks).to(torch.int64).tolist(), probs.tolist()))
    if out is not None:
        try:
            import matplotlib
        except ImportError:
            print("policy show: writing a PNG needs matplotlib, which is not installed "
                  "(pip install 'fastshare[plot]'); the table above is the text version", file=sys.stderr)
            return 2
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1 + 0.6 * lp, 1 + 0.5 * len(tasks)))
        im = ax.imshow(probs.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(lp), [f"b{l + num_blocks - lp}" for l in range(lp)])
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xlabel("block")
        ax.set_title("P(execute) per task and block")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100, format="png")
        plt.close(fig)
        print(f"wrote {out}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from fastshare.info import collect, format_info

    print(format_info(collect()))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from fastshare.bench import main as bench_main

    return bench_main(args.bench_args)


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML configuration (AdaShare's keys + fastshare's)")
    p.add_argument("--head-width", type=int, default=None,
                   help="ASPP branch width (default: the checkpoint's when one is given, else 1024, the paper's)")
    p.add_argument("--num-samples", type=int, default=1, help="architectures sampled besides the argmax one")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="fraction of train held out for selection (default: the checkpoint's when one is given, "
                        "else 0.1)")
    p.add_argument("--eval-batches", type=int, default=None, help="cap on evaluation batches")
    p.add_argument("--checkpoint-every", type=int, default=None, help="also save 'latest' every N iterations")
    p.add_argument("--tensorboard", action="store_true", help="write TensorBoard scalars (needs tensorboard)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_overwrite_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="write into a checkpoint folder that holds an earlier run's checkpoints (else refused)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fastshare`` command."""
    parser = argparse.ArgumentParser(prog="fastshare", description="Fast AdaShare multi-task training")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the whole run on synthetic data (CPU, a few minutes)")
    p.add_argument("--quick", action="store_true", help="a much shorter run (for tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="fastshare_demo", help="folder for logs and checkpoints")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("train", help="search + re-train from a YAML configuration")
    _add_run_flags(p)
    p.add_argument("--resume", default=None, help="continue from this checkpoint")
    _add_overwrite_flag(p)
    p.set_defaults(fn=_cmd_train)

    p = sub.add_parser("retrain", help="re-train the architectures of a finished search")
    _add_run_flags(p)
    p.add_argument("--from", dest="source", required=True, help="checkpoint written after the search")
    _add_overwrite_flag(p)
    p.set_defaults(fn=_cmd_retrain)

    p = sub.add_parser("eval", help="metrics of a checkpoint")
    _add_run_flags(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="test", choices=("val", "test"))
    p.set_defaults(fn=_cmd_eval)

    p = sub.add_parser("policy", help="inspect a learned policy")
    psub = p.add_subparsers(dest="policy_command", required=True)
    q = psub.add_parser("show", help="select probabilities as a table and a PNG heat map")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--out", default=None, help="PNG path for the heat map (needs matplotlib)")
    q.set_defaults(fn=_cmd_policy_show)

    p = sub.add_parser("info", help="versions, backends and executors available here")
    p.set_defaults(fn=_cmd_info)

    # Every argument after `bench` goes to fastshare.bench's own parser (see main): `fastshare bench --help`.
    p = sub.add_parser("bench", add_help=False, help="benchmark suite (fastshare bench --help for its options)")
    p.set_defaults(fn=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fastshare`` / ``python -m fastshare``; configuration, checkpoint and data-file errors
    (and other ``OSError`` exceptions: a missing or unreadable file) are reported in one line (exit status
    2). The arguments after ``bench`` are passed unparsed to :func:`fastshare.bench.main` (whose exit status
    is returned); other commands reject unknown ones."""
    from fastshare.config import ConfigError
    from fastshare.train.checkpoint import CheckpointError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.fn(args) or 0)
    except (ConfigError, CheckpointError, OSError) as exc:
        print(f"fastshare {args.command}: error: {exc}", file=sys.stderr)
        return 2
