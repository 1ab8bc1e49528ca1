"""The ``fastshare`` command line, run as a subprocess (``python -m fastshare``)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fastshare(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fastshare", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=900)


def test_info_is_fastshare_info():
    r = fastshare("info")
    assert r.returncode == 0, r.stderr
    assert "torch" in r.stdout and "backends for cpu tensors" in r.stdout and "reference" in r.stdout
    assert "matplotlib" in r.stdout and "tensorboard" in r.stdout and "numpy" in r.stdout
    assert "executors:" in r.stdout and "sequential" in r.stdout


def test_bench_passes_its_arguments_to_fastshare_bench(tmp_path):
    r = fastshare("bench", "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: fastshare bench" in r.stdout and "--filter" in r.stdout and "--quick" in r.stdout
    r = fastshare("bench", "--quick", "--filter", "no-such-case", "--out", str(tmp_path / "b.json"))
    assert r.returncode == 2 and "no case matches --filter 'no-such-case'" in r.stderr
    assert not (tmp_path / "b.json").exists()
    r = fastshare("info", "--filter", "x")  # other commands still reject unknown arguments
    assert r.returncode == 2 and "unrecognized arguments: --filter x" in r.stderr


def test_bad_config_key_names_the_key(tmp_path):
    cfg = tmp_path / "bad.yml"
    cfg.write_text("train:\n  batch_sise: 2\n")
    r = fastshare("train", "--config", str(cfg))
    assert r.returncode == 2
    assert "train.batch_sise" in r.stderr and "batch_size" in r.stderr


def test_missing_checkpoint_is_reported(tmp_path):
    r = fastshare("policy", "show", "--checkpoint", str(tmp_path / "nope.pth"))
    assert r.returncode == 2 and "nope.pth: no such file" in r.stderr


def test_demo_quick_then_policy_show(tmp_path):
    r = fastshare("demo", "--quick", "--no-progress", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "learned policy" in r.stdout and "tasks take different paths:" in r.stdout
    assert "speed-up" in r.stdout
    ckpt = tmp_path / "checkpoints" / "demo" / "latest.pth"
    assert ckpt.exists()
    assert (tmp_path / "logs" / "demo" / "log.jsonl").exists()
    png = tmp_path / "policy.png"
    r = fastshare("policy", "show", "--checkpoint", str(ckpt), "--out", str(png))
    assert "seg" in r.stdout
    if importlib.util.find_spec("matplotlib") is None:
        assert r.returncode == 2 and "matplotlib" in r.stderr
    else:
        assert r.returncode == 0, r.stderr
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_commands_take_the_model_options_from_the_checkpoint(tmp_path, capsys, monkeypatch):
    """eval / retrain / train --resume build the checkpoint's model (head width) without repeating the
    flag, and name the difference when the flags or the YAML describe another model."""
    import torch

    from fastshare.cli import main
    from fastshare.config import load_config
    from fastshare.train import RunOptions, Trainer
    from test_checkpoint import OPTS, tiny_config

    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path)
    Trainer(cfg, RunOptions(**OPTS)).run(stop_after=7)  # the search (6 iterations) and 1 re-training step
    ckpt = str(tmp_path / "ck" / "t" / "latest.pth")
    yml = tmp_path / "run.yml"
    yml.write_text(cfg.to_yaml())
    assert main(["eval", "--config", str(yml), "--checkpoint", ckpt, "--eval-batches", "1", "--no-progress"]) == 0
    assert '"seg"' in capsys.readouterr().out
    # The test split is evaluated without building (or having) any training data.
    from fastshare.train import trainer as trainer_module

    build = trainer_module._dataset

    def test_split_only(cfg, opts, split, seed):
        assert split == "test", f"eval --split test built the {split!r} split"
        return build(cfg, opts, split, seed)

    with monkeypatch.context() as m:
        m.setattr(trainer_module, "_dataset", test_split_only)
        assert main(["eval", "--config", str(yml), "--checkpoint", ckpt, "--split", "test", "--eval-batches", "1",
                     "--no-progress"]) == 0
    assert '"depth"' in capsys.readouterr().out
    # search_done.pth is the first architecture's re-training start: initial weights, nothing to evaluate.
    done = str(tmp_path / "ck" / "t" / "search_done.pth")
    assert main(["eval", "--config", str(yml), "--checkpoint", done, "--no-progress"]) == 2
    assert "search_done.pth: holds architecture 0 before its re-training" in capsys.readouterr().err

    assert main(["eval", "--config", str(yml), "--checkpoint", ckpt, "--head-width", "16", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "latest.pth: written for another model: head_width 8 (this run: 16)" in err

    # A new run, or a re-training, into the folder of a run would replace its checkpoints: refused, untouched.
    folder = tmp_path / "ck" / "t"
    before = {p.name: p.read_bytes() for p in folder.glob("*.pth")}
    assert main(["train", "--config", str(yml), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{folder}: holds latest.pth, search_done.pth" in err and "--resume" in err and "--overwrite" in err
    assert main(["retrain", "--config", str(yml), "--from", done, "--no-progress"]) == 2
    assert "holds latest.pth of an earlier run; re-training writes these names" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.glob("*.pth")} == before
    assert main(["retrain", "--config", str(yml), "--from", done, "--overwrite", "--no-progress"]) == 0
    assert '"architectures"' in capsys.readouterr().out and (folder / "retrain001_best.pth").exists()

    other = load_config({**cfg.to_dict(), "tasks_num_class": [5, 1]})
    yml.write_text(other.to_yaml())
    assert main(["train", "--config", str(yml), "--resume", ckpt, "--no-progress"]) == 2
    assert "tasks_num_class [4, 1] (this run: [5, 1])" in capsys.readouterr().err


def test_out_of_range_flag_is_a_one_line_error(tmp_path, capsys):
    from fastshare.cli import main

    yml = tmp_path / "c.yml"
    yml.write_text("train:\n  batch_size: 2\n")
    assert main(["train", "--config", str(yml), "--val-fraction", "0"]) == 2
    assert "command-line flags: RunOptions.val_fraction must be in (0, 1)" in capsys.readouterr().err


def test_checkpoint_commands_take_the_validation_fraction_from_the_checkpoint():
    """The held-out split is rebuilt from the checkpoint's val_fraction (else a resumed run trains on the
    samples its search selected on); a flag still wins."""
    from fastshare.cli import _run_options, build_parser

    ck = {"options": {"val_fraction": 0.5, "head_width": 8}}
    args = build_parser().parse_args(["eval", "--config", "c.yml", "--checkpoint", "x.pth"])
    assert _run_options(args, ck).val_fraction == 0.5
    assert _run_options(args).val_fraction == 0.1  # no checkpoint: the default
    args = build_parser().parse_args(["eval", "--config", "c.yml", "--checkpoint", "x.pth", "--val-fraction", "0.2"])
    assert _run_options(args, ck).val_fraction == 0.2


def test_policy_show_of_diverged_logits_is_a_one_line_error(tmp_path, capsys):
    import torch

    from fastshare.cli import main
    from fastshare.train.checkpoint import FORMAT, VERSION, atomic_save

    path = tmp_path / "nan.pth"
    atomic_save({"format": FORMAT, "version": VERSION, "model": {"logits": torch.full((2, 3, 2), float("nan"))},
                 "trainer": {"phase": "policy"}, "config": {"tasks": ["seg", "depth"]}}, path)
    assert main(["policy", "show", "--checkpoint", str(path)]) == 2
    assert "nan.pth: its policy logits hold NaN or Inf (the search diverged)" in capsys.readouterr().err


def test_policy_show_out_must_be_a_png_path(tmp_path, capsys):
    from fastshare.cli import main

    for out in (tmp_path / "heat", tmp_path / "heat.txt", tmp_path):
        assert main(["policy", "show", "--checkpoint", str(tmp_path / "none.pth"), "--out", str(out)]) == 2
        assert "the heat map is written as PNG; give a file path ending in .png" in capsys.readouterr().err


def test_data_file_errors_are_one_line(tmp_path, capsys):
    """A data root without its split file: the data loader's error, not a traceback."""
    from fastshare.cli import main

    yml = tmp_path / "nyu.yml"
    yml.write_text(f"dataload:\n  dataset: NYU_v2\n  dataroot: {tmp_path / 'no-such-root'}\n"
                   "tasks: [seg, sn]\ntasks_num_class: [40, 3]\nlambdas: [1, 1]\n")
    assert main(["train", "--config", str(yml), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastshare train: error: ") and "no-such-root" in err and "Traceback" not in err
