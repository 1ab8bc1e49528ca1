"""The one-step profiler."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fastshare.model import AdaShareNet
from fastshare.profile import StepProfile, _main, profile_policy_step, profile_step


def test_counts_a_linear_layer_exactly():
    lin = nn.Linear(8, 4, bias=False)
    x = torch.randn(3, 8, requires_grad=False)

    def step():
        torch.relu(lin(x)).sum().backward()

    prof = profile_step(step, params=lin.parameters(), timed_runs=2)
    assert isinstance(prof, StepProfile)
    # forward 2*3*8*4, backward: grad of the weight only (x needs no grad).
    assert prof.flops == 2 * 3 * 8 * 4 * 2
    # Saved: x (by mm, for the weight grad) and relu's output; the weight itself is a parameter.
    assert prof.saved_bytes == x.numel() * 4 + 3 * 4 * 4
    assert prof.aten_ops > 0 and any("mm" in k for k in prof.op_counts)
    assert prof.peak_memory_bytes is None and prof.wall_s is not None and prof.wall_s > 0
    assert "GFLOP" in prof.summary()


def test_shared_storage_counted_once():
    w = torch.randn(16, requires_grad=True)

    def step():
        base = w * 2
        (base[:8] * base[8:]).sum().backward()  # two views of one storage saved by one mul

    prof = profile_step(step, params=[w])
    assert prof.saved_bytes == 16 * 4
    assert prof.saved_tensors >= 2


def test_batched_step_saves_less_and_dispatches_fewer_ops_than_sequential():
    torch.manual_seed(0)
    model = AdaShareNet("resnet18", {"a": 3, "b": 2, "c": 1}, head_width=16, dropout=0.0)
    x = torch.randn(2, 3, 33, 33)
    seq = profile_policy_step(model, x, stage=1, executor="sequential")
    bat = profile_policy_step(model, x, stage=1, executor="batched")
    assert bat.flops < seq.flops
    assert bat.saved_bytes < seq.saved_bytes
    assert bat.aten_ops < seq.aten_ops


def test_cli_prints_summary(capsys):
    _main(["--backbone", "resnet18", "--image", "33", "--batch", "2", "--head-width", "16", "--stage", "2"])
    out = capsys.readouterr().out
    assert "FLOPs" in out and "ATen ops" in out


@pytest.mark.parametrize("flags, message", [
    (["--stage", "0"], "argument --stage: must be >= 1, got 0"),
    (["--image", "0"], "argument --image: must be >= 1, got 0"),
    (["--head-width", "0"], "argument --head-width: must be >= 1, got 0"),
    (["--timed-runs", "-1"], "argument --timed-runs: must be >= 0, got -1"),
    (["--device", "nonsense"], "--device 'nonsense'"),
    (["--stage", "9", "--image", "33", "--head-width", "4"], "--stage 9: resnet18 has 8 blocks"),
])
def test_cli_rejects_bad_flags_with_a_usage_error(capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        _main(flags)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_warmup_runs_the_step_uninstrumented_first():
    calls = []
    w = torch.randn(4, requires_grad=True)

    def step():
        calls.append(torch.is_grad_enabled())
        (w * 2).sum().backward()

    prof = profile_step(step, params=[w], warmup=2, timed_runs=1)
    assert len(calls) == 4 and prof.flops == 0
    for bad in ({"warmup": -1}, {"timed_runs": -1}):
        try:
            profile_step(step, **bad)
        except ValueError as exc:
            assert "must be >= 0" in str(exc)
        else:
            raise AssertionError(f"{bad} was accepted")


def test_split_choices_are_made_in_the_warmup_not_in_the_count(monkeypatch):
    # The fast heads time their split convolutions on the first call of a shape; that must not be counted.
    from fastshare.ops import pruned_conv

    monkeypatch.setenv("FASTSHARE_CONV_SPLIT", "auto")
    monkeypatch.setattr(pruned_conv, "split_choice_cache", {})
    monkeypatch.setattr(pruned_conv, "_time_split", lambda run, device, repeats=3: {True: 1.0, False: 2.0})
    x = torch.randn(2, 8, 16, 16, requires_grad=True)  # both gradients, as in the heads
    w = torch.randn(4, 8, 3, 3, requires_grad=True)

    def step():
        pruned_conv.pruned_conv3x3(x, w, None, 12).sum().backward()

    cold = profile_step(step, params=[w])  # no warm-up: the instrumented call must not time (no split)
    assert pruned_conv.split_choice_cache == {}
    warm = profile_step(step, params=[w], warmup=1)  # times in the warm-up (split wins), counts the split
    assert list(pruned_conv.split_choice_cache.values()) == [True]
    assert warm.flops * 4 == cold.flops  # rate 12 on 16 x 16 keeps a quarter of the products
