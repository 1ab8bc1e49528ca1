"""Typed YAML config: AdaShare's published YAMLs parse unchanged; bad keys, types and values fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fastshare.config import Config, ConfigError, DataloadConfig, TrainConfig, dump_config, load_config

FIXTURES = Path(__file__).parent / "fixtures" / "adashare_yamls"
PUBLISHED = sorted(FIXTURES.glob("*.yml"))


def test_all_seven_published_yamls_are_fixtures():
    assert len(PUBLISHED) == 7


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: p.stem)
def test_published_yaml_parses_with_its_values(path: Path):
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    assert cfg.exp_name == raw["exp_name"]
    assert cfg.seed == raw["seed"]
    assert cfg.tasks == raw["tasks"] and cfg.tasks_num_class == raw["tasks_num_class"]
    assert cfg.lambdas == [float(x) for x in raw["lambdas"]]
    assert cfg.init_neg_logits is None
    for section in ("paths", "dataload", "train", "test"):
        for key, value in raw[section].items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"


def test_published_nyu_3task_values():
    cfg = load_config(FIXTURES / "nyu_v2_3task.yml")
    assert cfg.backbone == "ResNet34"
    assert cfg.tasks == ["seg", "sn", "depth"]
    expected = DataloadConfig(dataset="NYU_v2", dataroot="/scratch/research/datasets/nyu_v2", crop_h=321, crop_w=321)
    assert cfg.dataload == expected
    assert cfg.train.reg_w == 0.001 and isinstance(cfg.train.init_temp, float) and cfg.train.init_temp == 5.0
    assert cfg.train.policy_iter == "best" and cfg.test.which_iter == "best"
    assert cfg.train.weight_iter_alternate is None  # AdaShare: len(train1 loader)


def test_test_yaml_fills_missing_train_keys_with_defaults():
    cfg = load_config(FIXTURES / "nyu_v2_2task_test.yml")
    assert cfg.train.batch_size == TrainConfig().batch_size
    assert cfg.train.policy_iter == "best"


def test_defaults_are_a_valid_cpu_demo():
    cfg = load_config({})
    assert cfg == Config()
    assert cfg.dataload.dataset == "Synthetic" and cfg.device == "auto" and cfg.workers == 0
    assert len(cfg.tasks) == len(cfg.tasks_num_class) == len(cfg.lambdas)


@pytest.mark.parametrize("path", PUBLISHED[:3], ids=lambda p: p.stem)
def test_round_trip_dict_and_yaml(path: Path, tmp_path: Path):
    cfg = load_config(path)
    assert load_config(cfg.to_dict()) == cfg
    out = tmp_path / "cfg.yml"
    text = dump_config(cfg, out)
    assert out.read_text() == text == cfg.to_yaml()
    assert load_config(out) == cfg


def test_fastshare_keys():
    keys = {"executor": "tree", "backend": "reference", "precision": "bf16", "channels_last": True, "device": "cpu"}
    cfg = load_config({**keys, "workers": 2})
    assert (cfg.executor, cfg.backend, cfg.precision, cfg.channels_last, cfg.device, cfg.workers) == (
        "tree", "reference", "bf16", True, "cpu", 2,
    )


@pytest.mark.parametrize(
    ("data", "named", "suggestion"),
    [
        ({"train": {"batch_sze": 4}}, "'train.batch_sze'", "'train.batch_size'"),
        ({"trian": {}}, "'trian'", "'train'"),
        ({"dataload": {"crop_hh": 3}}, "'dataload.crop_hh'", "'dataload.crop_h'"),
        ({"is_curiculum": True}, "'is_curiculum'", "'is_curriculum'"),
        ({"test": {"which_itr": "best"}}, "'test.which_itr'", "'test.which_iter'"),
    ],
)
def test_unknown_key_names_key_and_closest(data, named, suggestion):
    with pytest.raises(ConfigError, match="unknown key") as info:
        load_config(data)
    assert named in str(info.value) and f"did you mean {suggestion}" in str(info.value)


def test_unknown_key_in_file_names_the_file(tmp_path: Path):
    p = tmp_path / "bad.yml"
    p.write_text("paths:\n  log_dirr: x\n")
    with pytest.raises(ConfigError, match=r"bad\.yml.*'paths\.log_dirr'.*'paths\.log_dir'"):
        load_config(p)


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"train": {"batch_size": "16"}}, r"train\.batch_size: expected int, got str"),
        ({"train": {"batch_size": 1.5}}, r"train\.batch_size: expected int, got float"),
        ({"train": {"resume": 1}}, r"train\.resume: expected bool, got int"),
        ({"train": {"lr": True}}, r"train\.lr: expected float, got bool"),
        ({"train": {"lr": "1e-4"}}, r"train\.lr: .*write 1\.0e-4"),
        ({"tasks": "seg"}, r"tasks: expected list of str"),
        ({"lambdas": [1, "x", 3]}, r"lambdas\[1\]: expected float"),
        ({"seed": [1, 2.5]}, r"seed"),
        ({"paths": "logs"}, r"section 'paths': expected a mapping"),
        ({"train": {"policy_iter": 1.5}}, r"train\.policy_iter: expected str or int"),
    ],
)
def test_wrong_type_is_an_error_naming_the_key(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(data)


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"dataload": {"dataset": "NYU"}}, r"dataload\.dataset: 'NYU' is not one of .*did you mean 'NYU_v2'"),
        (
            {"tasks": ["seg", "normal"], "tasks_num_class": [40, 3], "lambdas": [1, 1]},
            r"tasks\[1\]: unknown task 'normal'",
        ),
        ({"tasks": ["seg"], "tasks_num_class": [40, 3], "lambdas": [1]}, r"tasks_num_class: needs one entry per task"),
        ({"train": {"batch_size": 0}}, r"train\.batch_size: must be > 0"),
        ({"executor": "fast"}, r"executor: 'fast' is not one of"),
        ({"backend": "cuda_fast"}, r"backend: 'cuda_fast' is not one of"),
        ({"device": "gpu0"}, r"device: 'gpu0'"),
        ({"dataload": {"dataset": "NYU_v2"}}, r"dataload\.dataroot: required"),
        ({"dataload": {"crop_h": None}}, r"crop_h / crop_w"),
        ({"backbone": "ResNet50"}, r"backbone: 'ResNet50' is not one of ResNet18, ResNet34, ResNet101"),
        ({"policy_model": "instance-specific"}, r"policy_model: 'instance-specific' is not one of task-specific"),
        ({"train": {"decay_temp": 1.5}}, r"train\.decay_temp: must be in \(0, 1\], got 1\.5"),
        ({"train": {"decay_lr_rate": 0}}, r"train\.decay_lr_rate: must be in \(0, 1\]"),
        ({"train": {"lr": -0.1}}, r"train\.lr: must be > 0"),
        ({"train": {"policy_lr": 0}}, r"train\.policy_lr: must be > 0"),
        ({"train": {"reg_w": -1}}, r"train\.reg_w: must be >= 0"),
        ({"tasks_num_class": [4, 2, 1]}, r"tasks_num_class: task 'sn' predicts 3 channel\(s\), got 2"),
        ({"lambdas": [1, -1, 1]}, r"lambdas: every task weight must be >= 0"),
        ({"train": {"retrain_resume": True}}, r"train\.retrain_resume: True is not supported.*fastshare retrain --from"),
        ({"retrain_from_pl": True}, r"retrain_from_pl: True is not supported"),
        ({"policy": False}, r"policy: False is not supported"),
    ],
)
def test_invalid_value_is_an_error(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(data)


def test_seed_int_becomes_list_and_ints_widen_to_float():
    cfg = load_config({"seed": 7, "train": {"lr": 1}})
    assert cfg.seed == [7]
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("train:\n  init_temp: .nan\n", "train.init_temp"),
        ("lambdas: [.nan, 1, 1]\n", r"lambdas\[0\]"),
        ("train:\n  lr: .nan\n", "train.lr"),
        ("train:\n  reg_w: .nan\n", "train.reg_w"),
        ("train:\n  policy_lr: .inf\n", "train.policy_lr"),
        ("lambdas: [1, -.inf, 1]\n", r"lambdas\[1\]"),
        ("init_neg_logits: .nan\n", "init_neg_logits"),
    ],
)
def test_non_finite_number_is_an_error_naming_the_key(tmp_path: Path, text, named):
    p = tmp_path / "nan.yml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=rf"nan\.yml: {named}: must be a finite number"):
        load_config(p)


def test_duplicate_key_is_an_error_naming_key_and_line(tmp_path: Path):
    p = tmp_path / "dup.yml"
    p.write_text("train:\n  batch_size: 2\n  lr: 0.1\n  batch_size: 4\n")
    with pytest.raises(ConfigError, match=r"dup\.yml: duplicate key 'batch_size' at line 4 \(first given at line 2\)"):
        load_config(p)
    p.write_text("train: {lr: 0.1}\nlambdas: [1, 1, 1]\ntrain: {lr: 0.2}\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'train' at line 3"):
        load_config(p)


def test_merge_keys_may_override_without_being_duplicates():
    """``<<: *base`` then an overriding key is YAML's way to derive a mapping, even when the anchored mapping
    is itself merged elsewhere (PyYAML flattens it in place before constructing it)."""
    from fastshare.config import _UniqueKeyLoader

    doc = "a:\n  inner: &mid {<<: {x: 1, b: 2}, b: 3}\nc: {<<: *mid}\n"
    assert yaml.load(doc, Loader=_UniqueKeyLoader) == yaml.safe_load(doc) == {"a": {"inner": {"x": 1, "b": 3}},
                                                                                "c": {"x": 1, "b": 3}}


def test_unreadable_config_file_is_a_config_error(tmp_path: Path):
    p = tmp_path / "latin1.yml"
    p.write_bytes("exp_name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yml: not UTF-8 text"):
        load_config(p)
    with pytest.raises(ConfigError, match=rf"{tmp_path.name}: is a folder"):
        load_config(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yml")


@pytest.mark.parametrize("name", ["", ".", "..", "../elsewhere", "a/b", "a\\b"])
def test_exp_name_must_name_one_folder(name):
    """The run writes <checkpoint_dir>/<exp_name>: an empty name or a path would write outside its folder."""
    with pytest.raises(ConfigError, match="exp_name: .* must name one folder"):
        load_config({"exp_name": name})
