"""Typed configuration read from YAML; accepts AdaShare's published YAML files unchanged.

The layout is AdaShare's: top-level experiment keys, and sections ``paths``, ``dataload``, ``train`` and
``test``. fastshare adds its own top-level keys: ``executor``, ``backend``, ``precision``,
``channels_last``, ``device``, ``workers``. Every key has a default suited to a CPU demo on the built-in
synthetic data, so ``load_config({})`` is a valid configuration.

Checks (all raise :class:`ConfigError`, a ``ValueError``, naming the key by its dotted path):

- an unknown key, with the closest valid key as a suggestion (``difflib``);
- a value of the wrong type (``int`` is accepted where a ``float`` is expected; ``bool`` never counts as a
  number); a string such as ``1e-4`` where a number is expected gets a hint, because YAML 1.1 (PyYAML)
  reads exponent notation without a decimal point as a string;
- a number that is not finite (YAML's ``.nan``, ``.inf``);
- a value outside its allowed set (dataset, tasks, executor, ...), and inconsistent lengths of ``tasks``,
  ``tasks_num_class`` and ``lambdas``;
- in a file: a key given twice in one mapping (YAML would silently keep the last), text that is not
  UTF-8, a path that is a folder.

``seed`` is a list (AdaShare's YAMLs list one seed per experiment id); a single int is accepted and
stored as a one-element list.

Example::

    cfg = load_config("yamls/adashare/nyu_v2_3task.yml")
    cfg.train.batch_size        # 16
    cfg.to_dict()["dataload"]   # {'dataset': 'NYU_v2', ...}
    print(dump_config(cfg))     # YAML that load_config reads back to an equal Config
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from fastshare.ops.backends import BACKENDS

TASKS: tuple[str, ...] = ("seg", "sn", "depth", "keypoint", "edge")
BACKBONES: tuple[str, ...] = ("ResNet18", "ResNet34", "ResNet101")
#: Output channels of the regression tasks (``tasks_num_class`` must say so); ``seg`` has one per class.
_OUTPUT_CHANNELS: dict[str, int] = {"sn": 3, "depth": 1, "keypoint": 1, "edge": 1}
DATASETS: tuple[str, ...] = ("Synthetic", "NYU_v2", "CityScapes", "Taskonomy")
EXECUTORS: tuple[str, ...] = ("auto", "sequential", "batched", "tree")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
POLICY_MODELS: tuple[str, ...] = ("task-specific",)
INIT_METHODS: tuple[str, ...] = ("equal", "random", "all_chosen")


class ConfigError(ValueError):
    """An invalid configuration: unknown key, wrong type or value; the message names the key."""


@dataclass
class PathsConfig:
    """Output folders; each run writes under ``<dir>/<exp_name>``."""

    log_dir: str = "experiments/logs"
    result_dir: str = "experiments/results"
    checkpoint_dir: str = "experiments/checkpoints"


@dataclass
class DataloadConfig:
    """Data set choice. ``crop_h``/``crop_w`` are the training crop (the synthetic image size for
    ``Synthetic``); ``None`` lets the data set choose. ``small_res`` is CityScapes' 128x256 variant."""

    dataset: str = "Synthetic"
    dataroot: str = ""
    crop_h: int | None = 64
    crop_w: int | None = 64
    small_res: bool = False


@dataclass
class TrainConfig:
    """Schedule and optimiser settings (AdaShare's ``train`` section; iterations count batches).

    ``retrain_total_iters``, ``weight_iter_alternate`` and ``alpha_iter_alternate`` default to ``None``,
    which means what it means in AdaShare: ``total_iters``, ``len(train1 loader)`` and
    ``len(train2 loader)``. ``policy_iter`` and ``which_iter`` name a checkpoint (``'best'``, ``'latest'``,
    ``'warmup'``) or an iteration number.
    """

    batch_size: int = 8
    total_iters: int = 200
    warm_up_iters: int = 50
    retrain_total_iters: int | None = None
    lr: float = 0.001
    backbone_lr: float = 0.001
    policy_lr: float = 0.01
    reg_w: float = 0.001
    reg_w_hamming: float = 0.05
    print_freq: int = 10
    val_freq: int = 50
    decay_lr_freq: int = 100
    decay_lr_rate: float = 0.5
    decay_temp_freq: int = 10
    init_temp: float = 5.0
    decay_temp: float = 0.965
    resume: bool = False
    retrain_resume: bool = False
    policy_iter: str | int = "best"
    which_iter: str | int = "warmup"
    init_method: str = "equal"
    hard_sampling: bool = False
    weight_iter_alternate: int | None = None
    alpha_iter_alternate: int | None = None


@dataclass
class TestConfig:
    """Evaluation: which checkpoint to load."""

    __test__ = False  # not a pytest test class

    which_iter: str | int = "best"


@dataclass
class Config:
    """A whole experiment: AdaShare's keys plus fastshare's execution keys (see the module docstring)."""

    exp_name: str = "fastshare_demo"
    seed: list[int] = field(default_factory=lambda: [0])
    backbone: str = "ResNet18"
    tasks: list[str] = field(default_factory=lambda: ["seg", "sn", "depth"])
    tasks_num_class: list[int] = field(default_factory=lambda: [4, 3, 1])
    lambdas: list[float] = field(default_factory=lambda: [1.0, 20.0, 3.0])
    policy_model: str = "task-specific"
    policy: bool = True
    init_neg_logits: float | None = None
    is_sparse: bool = True
    is_sharing: bool = True
    skip_layer: int = 0
    is_curriculum: bool = True
    curriculum_speed: int = 3
    fix_BN: bool = False
    diff_sparsity_weights: bool = True
    retrain_from_pl: bool = False
    paths: PathsConfig = field(default_factory=PathsConfig)
    dataload: DataloadConfig = field(default_factory=DataloadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)
    # fastshare's own keys
    executor: str = "auto"
    backend: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    device: str = "auto"
    workers: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (sections as dicts) that :func:`load_config` reads back to an equal Config."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The configuration as a YAML document (see :func:`dump_config`)."""
        return dump_config(self)


_CHOICES: dict[str, tuple[str, ...]] = {
    "backbone": BACKBONES,
    "dataload.dataset": DATASETS,
    "executor": EXECUTORS,
    "backend": BACKENDS,
    "precision": PRECISIONS,
    "policy_model": POLICY_MODELS,
    "train.init_method": INIT_METHODS,
}
_NON_NEGATIVE = {"skip_layer", "workers", "train.warm_up_iters", "train.total_iters", "train.reg_w",
                 "train.reg_w_hamming"}
_POSITIVE = {
    "curriculum_speed",
    "dataload.crop_h",
    "dataload.crop_w",
    "train.batch_size",
    "train.retrain_total_iters",
    "train.print_freq",
    "train.val_freq",
    "train.decay_lr_freq",
    "train.decay_temp_freq",
    "train.init_temp",
    "train.lr",
    "train.backbone_lr",
    "train.policy_lr",
    "train.weight_iter_alternate",
    "train.alpha_iter_alternate",
}


#: Keys in (0, 1]: multiplicative decays.
_UNIT_INTERVAL = {"train.decay_temp", "train.decay_lr_rate"}

#: AdaShare switches fastshare accepts (its YAML files load unchanged) only at the value that selects
#: what fastshare does; another value would be silently ignored, so it is an error that says what to do.
_FIXED_SWITCHES: dict[str, tuple[Any, str]] = {
    "train.retrain_resume": (False, "re-train from a finished search with `fastshare retrain --from "
                                    "<checkpoint_dir>/<exp_name>/search_done.pth`"),
    "retrain_from_pl": (False, "fastshare re-trains every architecture from the run's initial weights, as "
                               "AdaShare's default does"),
    "policy": (True, "fastshare always learns the select-or-skip policy (policy: false is AdaShare's plain "
                     "multi-task baseline)"),
}


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widened to float where asked)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise _type_error(value, tp, key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise _type_error(value, tp, key)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
        raise _type_error(value, tp, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(value, tp, key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(value, tp, key)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _type_error(value, tp, key)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(value, tp, key)
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module, not in the YAML


def _type_error(value: Any, tp: Any, key: str) -> ConfigError:
    msg = f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            pass
        else:
            msg += (
                " (YAML 1.1 reads exponent notation without a decimal point, e.g. 1e-4, as a string;"
                " write 1.0e-4)"
            )
    return ConfigError(msg)


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = f"section {prefix.rstrip('.')!r}" if prefix else "the top level"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown key {prefix + str(key)!r} in {where}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        elif key == "seed":
            seed = _coerce(value, int | list[int], "seed")
            kwargs[key] = [seed] if isinstance(seed, int) else seed
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def _check_finite(flat: Mapping[str, Any]) -> None:
    """Every float (a float-typed key or list item: coercion let no other float through) is finite."""
    for key, value in flat.items():
        named = [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
        for name, v in named:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{name}: must be a finite number, got {v}")


def _check_values(cfg: Config) -> None:
    flat = _flatten(cfg.to_dict())
    _check_finite(flat)
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            close = difflib.get_close_matches(str(flat[key]), choices, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key}: {flat[key]!r} is not one of {', '.join(choices)}{hint}")
    for key in _NON_NEGATIVE | _POSITIVE:
        v = flat[key]
        if v is not None and (v < 0 or (key in _POSITIVE and v == 0)):
            raise ConfigError(f"{key}: must be {'> 0' if key in _POSITIVE else '>= 0'}, got {v}")
    for key in _UNIT_INTERVAL:
        if not 0 < flat[key] <= 1:
            raise ConfigError(f"{key}: must be in (0, 1], got {flat[key]}")
    for key, (value, how) in _FIXED_SWITCHES.items():
        if flat[key] != value:
            raise ConfigError(f"{key}: {flat[key]!r} is not supported (only {value!r}); {how}")
    if not cfg.seed:
        raise ConfigError("seed: give at least one seed")
    if not cfg.exp_name or cfg.exp_name in (".", "..") or any(sep in cfg.exp_name for sep in "/\\"):
        raise ConfigError(f"exp_name: {cfg.exp_name!r} must name one folder (the run writes "
                          "<checkpoint_dir>/<exp_name> and <log_dir>/<exp_name>): not empty, no '/' or '\\'")
    if not cfg.tasks:
        raise ConfigError("tasks: give at least one task")
    for i, task in enumerate(cfg.tasks):
        if task not in TASKS:
            close = difflib.get_close_matches(task, TASKS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"tasks[{i}]: unknown task {task!r} (valid: {', '.join(TASKS)}){hint}")
    if len(set(cfg.tasks)) != len(cfg.tasks):
        raise ConfigError(f"tasks: each task may appear once, got {cfg.tasks}")
    for key in ("tasks_num_class", "lambdas"):
        if len(getattr(cfg, key)) != len(cfg.tasks):
            raise ConfigError(f"{key}: needs one entry per task ({len(cfg.tasks)}), got {getattr(cfg, key)}")
    if any(n <= 0 for n in cfg.tasks_num_class):
        raise ConfigError(f"tasks_num_class: every entry must be > 0, got {cfg.tasks_num_class}")
    for task, n in zip(cfg.tasks, cfg.tasks_num_class):
        if task != "seg" and n != _OUTPUT_CHANNELS[task]:
            raise ConfigError(f"tasks_num_class: task {task!r} predicts {_OUTPUT_CHANNELS[task]} channel(s), "
                              f"got {n}")
    if any(w < 0 for w in cfg.lambdas):
        raise ConfigError(f"lambdas: every task weight must be >= 0, got {cfg.lambdas}")
    if cfg.dataload.dataset != "Synthetic" and not cfg.dataload.dataroot:
        raise ConfigError(f"dataload.dataroot: required for dataset {cfg.dataload.dataset!r}")
    if (cfg.dataload.crop_h is None) != (cfg.dataload.crop_w is None):
        raise ConfigError("dataload.crop_h / crop_w: give both or neither")
    if cfg.device != "auto":
        import torch

        try:
            torch.device(cfg.device)
        except RuntimeError as exc:
            raise ConfigError(f"device: {cfg.device!r} is not 'auto' or a torch device ({exc})") from exc


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is a :class:`ConfigError`
    (PyYAML keeps the last value silently). Checked as each mapping is composed, before merge keys
    (``<<: *base``, which may override) are flattened into it."""

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        first_line: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a merge key, or a collection as key (the constructor reports that)
            key = (key_node.tag, key_node.value)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise ConfigError(f"duplicate key {key_node.value!r} at line {line} "
                                  f"(first given at line {first_line[key]})")
            first_line[key] = line
        return node


def load_config(source: str | os.PathLike[str] | Mapping[str, Any]) -> Config:
    """Read and check a configuration.

    Args:
        source: a path to a YAML file, or an already-parsed mapping (missing keys take their defaults).

    Returns:
        The :class:`Config`.

    Raises:
        ConfigError: unknown key (with a suggestion), wrong type or invalid value; the message names the
            key (and the file, for a path). Also a path that is a folder, a file that is not UTF-8 text or
            not valid YAML, or that gives a key twice in one mapping (named, with its lines).
        FileNotFoundError: the file does not exist.
    """
    if isinstance(source, Mapping):
        return _load_mapping(source)
    path = Path(source)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a YAML configuration file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc})") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    try:
        return _load_mapping(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _load_mapping(data: Any) -> Config:
    cfg = _build(Config, data, "")
    _check_values(cfg)
    return cfg


def dump_config(cfg: Config, path: str | os.PathLike[str] | None = None) -> str:
    """Serialise ``cfg`` as YAML (keys in declaration order); also write it to ``path`` when given.

    Returns the YAML text; ``load_config`` of it gives a Config equal to ``cfg``.
    """
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text
