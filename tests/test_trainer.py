"""Trainer: phases run, schedule (curriculum, temperature, alternation), loss composition, seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastshare.train.trainer as trainer_mod
from fastshare.config import load_config
from fastshare.losses import sharing_loss, sparsity_loss
from fastshare.policy import curriculum_stage, temperature
from fastshare.train import PolicyRegularisation, RunOptions, Trainer, policy_objective
from fastshare.train.phases import BatchStream
from test_checkpoint import OPTS, tiny_config


def test_policy_objective_composition():
    alpha = torch.randn(2, 8, 2)
    losses = {"seg": torch.tensor(1.5), "depth": torch.tensor(0.25)}
    lambdas = {"seg": 2.0, "depth": 4.0}
    reg = PolicyRegularisation(reg_w=0.1, reg_w_hamming=0.3, is_sparse=True, is_sharing=True)
    loss, parts = policy_objective(losses, lambdas, alpha, 3, reg)
    expect = 2 * 1.5 + 4 * 0.25 + 0.3 * sharing_loss(alpha, True) + 0.1 * sparsity_loss(alpha, 3, True, True)
    torch.testing.assert_close(loss, expect)
    assert set(parts) == {"task", "sharing", "sparsity"}
    off = PolicyRegularisation(reg_w=0.1, reg_w_hamming=0.3, is_sparse=False, is_sharing=False)
    loss, parts = policy_objective(losses, lambdas, alpha, 3, off)
    torch.testing.assert_close(loss, torch.tensor(4.0))
    assert parts == {"task": 4.0}


def test_schedule_phases_curriculum_and_temperature(tmp_path):
    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path, total_iters=7, warm_up_iters=1, init_temp=5.0, decay_temp=0.5,
                      retrain_total_iters=1)
    tr = Trainer(cfg, RunOptions(**OPTS))
    seen = []
    orig = tr.sample_gates

    def spy(requires_grad):
        g = orig(requires_grad)
        seen.append((tr.state.flag, requires_grad, g.tau, g.kinds.count("sampled"), g.alpha.requires_grad))
        return g

    tr.sample_gates = spy
    w0 = tr.net.backbone.conv1.weight.detach().clone()
    assert tr.search()
    # 1 warm-up, then alternating 1 weight / 1 policy iteration: w a w a w a
    assert [s[0] for s in seen] == ["update_w", "update_alpha"] * 3
    assert [s[1] for s in seen] == [False, True] * 3
    assert all(not s[4] for s in seen[0::2]) and all(s[4] for s in seen[1::2])
    # temperature decays once per policy epoch; curriculum stage = policy_epoch // speed + 1 (speed 1)
    assert [s[2] for s in seen] == [5.0, 5.0, 2.5, 2.5, 1.25, 1.25]
    assert [s[3] for s in seen] == [1, 1, 2, 2, 3, 3]
    assert tr.state.policy_epoch == 3 and tr.state.phase == "retrain"
    torch.testing.assert_close(tr.net.backbone.conv1.weight, w0)  # re-training starts from the initial weights
    assert len(tr.state.policies) == 2 and len(tr.state.policies[0]) == 2
    assert (tmp_path / "ck" / "t" / "warmup.pth").exists()
    assert (tmp_path / "logs" / "t" / "log.jsonl").exists()


def test_selection_waits_for_adashare_delay(tmp_path, monkeypatch):
    """Model selection ignores every validation before warm_up + Lp * speed * (w_alt + a_alt) iterations,
    even when those score best; a run too short to reach the delay re-trains from the final logits."""
    torch.set_num_threads(1)
    validated = []

    def score(metrics, reference):  # earlier validations score higher: only the delay keeps them out
        validated.append(tr.state.iteration)
        return -float(tr.state.iteration)

    monkeypatch.setattr(trainer_mod, "selection_score", score)
    cfg = tiny_config(tmp_path / "long", total_iters=11, warm_up_iters=2, retrain_total_iters=1)
    cfg.skip_layer = 6  # Lp = 2 policy blocks: delay 2 * 1 * (1 + 1) = 4 iterations after warm-up
    tr = Trainer(cfg, RunOptions(**OPTS))
    assert tr.selection_start == 2 + 2 * 1 * (1 + 1)
    assert tr.search()
    assert validated == [3, 5, 7, 9, 11]  # after each weight epoch (1 iteration) of policy learning
    assert tr.state.best_iter == 7  # the first validation at or after selection_start = 6
    assert (tmp_path / "long" / "ck" / "t" / "best.pth").exists()

    validated.clear()
    cfg = tiny_config(tmp_path / "short", total_iters=5, warm_up_iters=2, retrain_total_iters=1)
    cfg.skip_layer = 6
    tr = Trainer(cfg, RunOptions(**OPTS))
    final = []
    finish = tr._finish_search
    monkeypatch.setattr(tr, "_finish_search", lambda: (final.append(tr.net.logits.detach().clone()), finish()))
    assert tr.search()
    assert validated == [3, 5] and tr.state.best_iter == -1
    assert not (tmp_path / "short" / "ck" / "t" / "best.pth").exists()
    assert torch.equal(torch.tensor(tr.state.best_logits), final[0])  # fallback: the search's final logits


def test_schedule_helpers():
    assert [curriculum_stage(e, 3, 8) for e in (0, 2, 3, 21, 30)] == [1, 1, 2, 8, 8]
    assert temperature(5.0, 0.965, 2) == 5.0 * 0.965 ** 2


def test_batch_stream_ranks_partition_global_batches():
    class Dict(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return {"i": torch.tensor(i)}

    one = BatchStream(Dict(), 4, seed=3)
    two = [BatchStream(Dict(), 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):  # crosses an epoch boundary (2 batches per epoch)
        whole = one.next()["i"]
        halves = torch.cat([s.next()["i"] for s in two])
        assert torch.equal(whole, halves)


def test_seeds_reproducible(tmp_path):
    torch.set_num_threads(1)
    runs = []
    for name in ("a", "b"):
        tr = Trainer(tiny_config(tmp_path / name, total_iters=4, retrain_total_iters=1), RunOptions(**OPTS))
        tr.search()
        runs.append((tr.state.policies, tr.state.best_logits))
    assert runs[0] == runs[1]


def test_taskonomy_five_tasks_train_with_class_weights(tmp_path, monkeypatch):
    """AdaShare's Taskonomy set-up: keypoint and edge L1 losses, segmentation weighted by
    semseg_prior_factor.npy (in the loss and the segmentation error)."""
    import json

    from test_data import _write_taskonomy

    torch.set_num_threads(1)
    root = tmp_path / "taskonomy"
    groups = []
    for i in range(6):  # six distinct samples (the validation hold-out goes by sample)
        (root / str(i)).mkdir(parents=True)
        _write_taskonomy(root / str(i))
        groups += [[f"{i}/{name}" for name in group]
                   for group in json.loads((root / str(i) / "taskonomy.json").read_text())["train"]]
    (root / "semseg_prior_factor.npy").write_bytes((root / "0" / "semseg_prior_factor.npy").read_bytes())
    (root / "taskonomy.json").write_text(json.dumps({s: groups for s in ("train", "train1", "train2", "test_small")}))
    cfg = load_config({"exp_name": "tk", "tasks": ["seg", "sn", "depth", "keypoint", "edge"],
                       "tasks_num_class": [17, 3, 1, 1, 1], "lambdas": [1, 3, 2, 7, 7],
                       "paths": {"log_dir": str(tmp_path / "logs"), "checkpoint_dir": str(tmp_path / "ck")},
                       "dataload": {"dataset": "Taskonomy", "dataroot": str(root), "crop_h": 33, "crop_w": 33},
                       "train": {"batch_size": 2, "total_iters": 3, "warm_up_iters": 1, "retrain_total_iters": 1,
                                 "weight_iter_alternate": 1, "alpha_iter_alternate": 1, "val_freq": 2}})
    seen = []
    real = trainer_mod.weight_step
    monkeypatch.setattr(trainer_mod, "weight_step",
                        lambda *a, **k: (seen.append(k["seg_class_weights"]), real(*a, **k))[1])
    tr = Trainer(cfg, RunOptions(head_width=8, num_samples=0, eval_batches=1, progress=False, val_fraction=0.2))
    result = tr.run()
    weights = torch.from_numpy(np.linspace(0.5, 2.0, 17).astype(np.float32))
    assert seen and all(torch.equal(w, weights) for w in seen)
    test = result["architectures"][0]["test"]
    assert set(test) == {"seg", "sn", "depth", "keypoint", "edge"}
    assert all(math.isfinite(v) for task in test.values() for v in task.values())


def test_trainer_rejects_a_task_the_data_set_lacks(tmp_path):
    cfg = load_config({"tasks": ["seg", "keypoint"], "tasks_num_class": [4, 1], "lambdas": [1, 1],
                       "paths": {"log_dir": str(tmp_path / "logs"), "checkpoint_dir": str(tmp_path / "ck")}})
    with pytest.raises(ValueError, match=r"dataset 'Synthetic' has no task\(s\) \['keypoint'\]"):
        Trainer(cfg, RunOptions(head_width=8, num_train=8, num_test=4, progress=False))
    assert not (tmp_path / "logs").exists()
