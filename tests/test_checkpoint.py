"""Checkpoints: atomic writes, clear errors for damaged files, bitwise resume, AdaShare import."""

from __future__ import annotations

import os

import pytest
import torch

from fastshare.config import load_config
from fastshare.model import AdaShareNet
from fastshare.train import CheckpointError, RunOptions, Trainer, atomic_save, import_adashare, load_checkpoint
from fastshare.train.checkpoint import load_adashare_checkpoint


def tiny_config(tmp_path, **train):
    base = {"batch_size": 2, "total_iters": 6, "warm_up_iters": 2, "weight_iter_alternate": 1,
            "alpha_iter_alternate": 1, "val_freq": 100, "print_freq": 1, "retrain_total_iters": 2,
            "decay_lr_freq": 3}
    base.update(train)
    return load_config({"exp_name": "t", "tasks": ["seg", "depth"], "tasks_num_class": [4, 1], "lambdas": [1.0, 1.0],
                        "is_curriculum": True, "curriculum_speed": 1,
                        "paths": {"log_dir": str(tmp_path / "logs"), "checkpoint_dir": str(tmp_path / "ck"),
                                  "result_dir": str(tmp_path / "res")},
                        "dataload": {"crop_h": 33, "crop_w": 33}, "train": base})


OPTS = dict(head_width=8, dropout=0.1, num_train=12, num_test=2, num_samples=1, eval_batches=1, progress=False)


def test_atomic_save_replaces_and_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "a" / "x.pth"
    atomic_save({"v": torch.ones(2)}, path)
    atomic_save({"v": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path)["v"], torch.zeros(2))

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        atomic_save({"v": Boom()}, path)
    assert torch.equal(torch.load(path)["v"], torch.zeros(2))  # old file intact
    assert sorted(os.listdir(path.parent)) == ["x.pth"]  # no temporary file left


def test_corrupt_truncated_and_foreign_files_name_the_file(tmp_path):
    good = tmp_path / "good.pth"
    atomic_save({"format": "fastshare-checkpoint", "version": 1, "model": {}, "trainer": {}}, good)
    data = good.read_bytes()
    bad = tmp_path / "trunc.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.pth.*(corrupt|truncated)"):
        load_checkpoint(bad)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pth"):
        load_checkpoint(empty)
    with pytest.raises(CheckpointError, match="missing.pth: no such file"):
        load_checkpoint(tmp_path / "missing.pth")
    foreign = tmp_path / "foreign.pth"
    torch.save({"mtl-net": {}}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pth: not a fastshare checkpoint.*AdaShare"):
        load_checkpoint(foreign)


def test_atomic_save_gives_the_umask_default_mode(tmp_path):
    old = os.umask(0o027)
    try:
        path = atomic_save({"v": 1}, tmp_path / "x.pth")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640  # 0o666 & ~umask, as open() gives; mkstemp's is 0o600
    os.umask(0o002)
    try:
        atomic_save({"v": 2}, path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o664


def _minimal(**changes):
    """The smallest checkpoint load_checkpoint accepts, with entries (or trainer-state keys) changed; a
    value of None removes the entry."""
    ck = {"format": "fastshare-checkpoint", "version": 1, "model": {"logits": torch.zeros(2, 3, 2)},
          "trainer": {"phase": "policy"}, "config": {"tasks": ["seg", "depth"]}}
    ck.update(changes)
    return {k: v for k, v in ck.items() if v is not None}


@pytest.mark.parametrize(
    ("ck", "pattern"),
    [
        (_minimal(config=None), r"hollow\.pth: checkpoint has no 'config' entry"),
        (_minimal(trainer=None), r"hollow\.pth: checkpoint has no 'trainer' entry"),
        (_minimal(model={}), r"hollow\.pth: checkpoint entry 'model' has no 'logits'"),
        (_minimal(trainer={}), r"hollow\.pth: checkpoint entry 'trainer' has no 'phase'"),
        (_minimal(config={"exp_name": "t"}), r"hollow\.pth: checkpoint entry 'config' has no 'tasks'"),
        (_minimal(config=[1, 2]), r"hollow\.pth: checkpoint entry 'config' is a list, not a dict"),
        (_minimal(trainer={"phase": "search"}), r"hollow\.pth: trainer phase 'search' is not one of warmup, policy"),
        (_minimal(trainer={"phase": "done", "policies": [[1, 0]], "arch": 0}),
         r"hollow\.pth: checkpoint entry 'trainer' \(phase 'done'\) has no 'retrain_iter'"),
        (_minimal(trainer={"phase": "retrain", "policies": None, "arch": 0, "retrain_iter": 0}),
         r"hollow\.pth: .*has no architecture in 'policies' \(got None\)"),
    ],
)
def test_load_names_missing_required_entries(tmp_path, ck, pattern):
    path = atomic_save(ck, tmp_path / "hollow.pth")
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(path)


def test_minimal_checkpoint_loads(tmp_path):
    retrain = {"phase": "retrain", "policies": [[1, 0, 1]], "arch": 0, "retrain_iter": 3}
    for ck in (_minimal(), _minimal(trainer=retrain)):
        assert load_checkpoint(atomic_save(ck, tmp_path / "ok.pth"))["trainer"] == ck["trainer"]


def test_cli_reports_hollow_checkpoint_in_one_line(tmp_path, capsys):
    """`policy show` and `retrain --from` on a checkpoint without config/trainer state: an error naming the
    missing entry and the file, no KeyError traceback."""
    from fastshare.cli import main

    hollow = atomic_save({"format": "fastshare-checkpoint", "version": 1, "model": {}, "trainer": {}},
                         tmp_path / "hollow.pth")
    assert main(["policy", "show", "--checkpoint", str(hollow)]) == 2
    assert "hollow.pth: checkpoint entry 'model' has no 'logits'" in capsys.readouterr().err
    yml = tmp_path / "cfg.yml"
    yml.write_text(tiny_config(tmp_path).to_yaml())
    assert main(["retrain", "--config", str(yml), "--from", str(hollow)]) == 2
    assert "hollow.pth: checkpoint entry 'model' has no 'logits'" in capsys.readouterr().err


def _params(trainer):
    return {k: v.clone() for k, v in trainer.net.state_dict().items()}


# 3: inside policy learning; 7: inside re-training; search_done: the checkpoint written when the search
# ends (the one `fastshare retrain --from` suggests).
@pytest.mark.parametrize("stop,label", [(3, "latest"), (7, "latest"), (7, "search_done")])
def test_resume_is_bitwise_identical(tmp_path, stop, label):
    torch.set_num_threads(1)
    ref = Trainer(tiny_config(tmp_path / "ref"), RunOptions(**OPTS))
    ref.run()
    cfg = tiny_config(tmp_path / "int")
    first = Trainer(cfg, RunOptions(**OPTS))
    assert first.run(stop_after=stop) == {"interrupted": True}
    second = Trainer(cfg, RunOptions(**OPTS))
    second.load(tmp_path / "int" / "ck" / "t" / f"{label}.pth")
    second.run()
    a, b = _params(ref), _params(second)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert ref.state.policies == second.state.policies
    assert ref.state.results == second.state.results


def _adashare_state(model: AdaShareNet) -> dict:
    """A state dict with AdaShare's MTL2 names, built from a fastshare model's tensors."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("backbone."):
            sd[k] = v.clone()
        elif k.startswith("heads."):
            _, task, rest = k.split(".", 2)
            sd[f"task{model.tasks.index(task) + 1}_{rest}"] = v.clone()
    for i in range(model.num_tasks):
        sd[f"task{i + 1}_logits"] = torch.randn(model.logits.shape[1], 2)
    return sd


def test_adashare_import(tmp_path):
    torch.manual_seed(0)
    src = AdaShareNet("resnet18", {"seg": 4, "sn": 3}, head_width=8)
    ada = _adashare_state(src)
    renamed = import_adashare({"mtl-net": ada, "iter": 10}, src.tasks)
    assert renamed["logits"].shape == (2, 8, 2)
    assert torch.equal(renamed["logits"][1], ada["task2_logits"])
    assert torch.equal(renamed["heads.sn.fc1_c3.conv2.weight"], ada["task2_fc1_c3.conv2.weight"])

    path = tmp_path / "best_model.pth.tar"
    torch.save({"mtl-net": ada, "weights": {}, "alphas": {}, "iter": 10, "temp": 2.5}, path)
    dst = AdaShareNet("resnet18", {"seg": 4, "sn": 3}, head_width=8)
    info = load_adashare_checkpoint(path, dst)
    assert info == {"iter": 10, "temp": 2.5}
    for k, v in src.state_dict().items():
        if k != "logits":
            assert torch.equal(dst.state_dict()[k], v), k
    assert torch.equal(dst.logits[0], ada["task1_logits"])

    wrong = AdaShareNet("resnet18", {"seg": 4, "sn": 3}, head_width=16)
    with pytest.raises(CheckpointError, match="best_model.pth.tar: shape mismatch.*heads.seg"):
        load_adashare_checkpoint(path, wrong)
    with pytest.raises(ValueError, match=r"tasks \[1, 2, 3\]; expected task1..task2"):
        import_adashare({**ada, "task3_logits": torch.zeros(8, 2)}, src.tasks)


def test_load_names_missing_entries(tmp_path):
    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path)
    trainer = Trainer(cfg, RunOptions(**OPTS))
    full = trainer.state_dict()
    partial = tmp_path / "partial.pth"
    atomic_save({k: v for k, v in full.items() if k not in ("init_model", "streams")}, partial)
    with pytest.raises(CheckpointError, match="partial.pth: not a training checkpoint: no 'init_model', 'streams'"):
        trainer.load(partial)


def test_config_resume_continues_from_which_iter(tmp_path, monkeypatch):
    """AdaShare's `train.resume: true` (its Taskonomy YAML sets it) continues from
    <checkpoint_dir>/<exp_name>/<train.which_iter>.pth; a missing file says how to start afresh."""
    from fastshare.cli import main
    from fastshare.config import ConfigError
    from fastshare.train.trainer import config_resume_path

    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path, resume=True, which_iter="warmup")
    with pytest.raises(CheckpointError, match=r"warmup.pth: no such file .*set train.resume: false"):
        config_resume_path(cfg)
    assert config_resume_path(tiny_config(tmp_path)) is None
    with pytest.raises(ConfigError, match="train.which_iter: 400 names an iteration"):
        config_resume_path(tiny_config(tmp_path, resume=True, which_iter=400))
    Trainer(tiny_config(tmp_path), RunOptions(**OPTS)).run(stop_after=3)  # writes warmup.pth
    warmup = tmp_path / "ck" / "t" / "warmup.pth"
    assert config_resume_path(cfg) == warmup

    loaded = []
    monkeypatch.setattr(Trainer, "load", lambda self, path, checkpoint=None: loaded.append(path))
    monkeypatch.setattr(Trainer, "run", lambda self: {"stopped": "here"})
    yml = tmp_path / "resume.yml"
    yml.write_text(cfg.to_yaml())
    assert main(["train", "--config", str(yml), "--head-width", "8", "--no-progress"]) == 0
    assert loaded == [warmup]


def test_run_options_out_of_range_are_errors():
    for name, value in (("val_fraction", 0.0), ("val_fraction", 1.0), ("eval_batches", 0), ("num_samples", -1),
                        ("head_width", 0), ("dropout", 1.0), ("checkpoint_every", 0)):
        with pytest.raises(ValueError, match=f"RunOptions.{name} must be"):
            RunOptions(**{name: value})


def test_log_reopens_after_run_and_zero_retrain_iterations_use_final_weights(tmp_path):
    torch.set_num_threads(1)
    trainer = Trainer(tiny_config(tmp_path, total_iters=3, retrain_total_iters=None), RunOptions(**OPTS))
    log = tmp_path / "logs" / "t" / "log.jsonl"
    assert trainer.run(stop_after=2) == {"interrupted": True}
    lines = len(log.read_text().splitlines())
    trainer.run(stop_after=1)  # the same trainer goes on after run() returned (and closed its log)
    assert len(log.read_text().splitlines()) > lines

    zero = Trainer(tiny_config(tmp_path / "zero", total_iters=0, warm_up_iters=0, retrain_total_iters=None),
                   RunOptions(**OPTS))
    result = zero.run()  # no re-training iteration, hence no <arch>_best.pth: tested on the final weights
    assert [set(a["test"]) for a in result["architectures"]] == [{"seg", "depth"}] * 2
    assert not list((tmp_path / "zero" / "ck" / "t").glob("retrain*_best.pth"))
