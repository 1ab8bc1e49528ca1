"""Two gloo ranks at batch B/2 make the same update as one process at batch B.

BatchNorm normalises with per-rank statistics under DDP, so the comparison runs the network with BN in
eval mode (running statistics: no batch dependence) and no dropout; everything else (DDP gradient
averaging of the weights, all-reduce of the policy logits' gradient, data split across ranks) is the
training code path.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastshare.model import AdaShareNet
from fastshare.policy import Gates, draw_uniform
from fastshare.train import PolicyRegularisation, policy_step, weight_step
from fastshare.train.distributed import DistContext, wrap_model
from fastshare.train.phases import adashare_policy_optimizer, adashare_weight_optimizer

TASKS = {"seg": 3, "depth": 1}
B = 4


def _data():
    g = torch.Generator().manual_seed(5)
    return {"img": torch.randn(B, 3, 33, 33, generator=g), "seg": torch.randint(0, 3, (B, 33, 33), generator=g),
            "depth": torch.rand(B, 1, 33, 33, generator=g) + 0.5}


def _model():
    torch.manual_seed(0)
    net = AdaShareNet("resnet18", TASKS, head_width=8, dropout=0.0, executor="sequential")
    net.logits.data.add_(0.3 * torch.randn(net.logits.shape))
    # He initialisation instead of AdaShare's N(0, 0.01): with eval-mode BN the latter shrinks the signal
    # to rounding noise within a few blocks, which would make the comparison ill-conditioned.
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net.eval()  # BN on running statistics: the same function for any batch split


def _steps(net, forward, batch, world):
    lambdas = {"seg": 1.0, "depth": 1.0}
    w_opt = adashare_weight_optimizer(net, 0.1, 0.1, sgd=True)
    a_opt = adashare_policy_optimizer(net, 0.1)
    u = draw_uniform(tuple(net.logits.shape), torch.Generator().manual_seed(1))
    gates = Gates.sample(net.logits.detach(), 2.0, False, net.num_blocks, None, u)
    weight_step(forward, batch, gates, list(TASKS), lambdas, w_opt)
    gates = Gates.sample(net.logits, 2.0, False, net.num_blocks, None, u)
    policy_step(net, batch, gates, list(TASKS), lambdas, a_opt, None, PolicyRegularisation(), world_size=world)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        net = _model()
        forward = wrap_model(net, DistContext(rank, world))
        full = _data()
        per = B // world
        batch = {k: v[rank * per:(rank + 1) * per] for k, v in full.items()}
        state = _steps(net, forward, batch, world)
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process(tmp_path):
    torch.set_num_threads(1)
    net = _model()
    ref = _steps(net, net, _data(), 1)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    before = _model().state_dict()
    # The updates must agree to 1e-3 of each tensor's largest update: gradients summed in another order
    # (per rank, then all-reduced) differ by float32 rounding, which cancellation can make large relative
    # to a near-zero entry but never relative to the update itself.
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for k, v in ref.items():
            if not v.is_floating_point():
                assert torch.equal(got[k], v), k
                continue
            scale = float((v - before[k]).abs().max())
            err = float((got[k] - v).abs().max())
            assert err <= 1e-3 * scale + 1e-8, f"rank {rank} {k}: max diff {err:.3e}, largest update {scale:.3e}"
    assert not torch.equal(before["logits"], ref["logits"])  # the policy step did move the logits
    assert not torch.equal(before["backbone.conv1.weight"], ref["backbone.conv1.weight"])


def _refusal_worker(rank, world, init_file, folders, out_dir):
    """Rank 0 sees an earlier run's checkpoint in its folder, rank 1 (another disk) sees none."""
    from types import SimpleNamespace

    from fastshare.train import CheckpointError, RunOptions, Trainer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        me = SimpleNamespace(opts=RunOptions(), ctx=DistContext(rank, world), checkpoint_dir=Path(folders[rank]))
        try:
            Trainer.refuse_to_overwrite(me, ("*.pth",), "test")
            outcome = "went on"
        except CheckpointError as exc:
            outcome = f"refused: {exc}"
        Path(out_dir, f"rank{rank}.txt").write_text(outcome)
    finally:
        dist.destroy_process_group()


def test_every_rank_refuses_what_rank_0_sees(tmp_path):
    """Only rank 0 writes checkpoints, so rank 0 decides; a rank that went on would wait in the next
    collective for ranks that raised."""
    folders = [tmp_path / "rank0-disk", tmp_path / "rank1-disk"]
    for f in folders:
        f.mkdir()
    (folders[0] / "latest.pth").write_bytes(b"an earlier run")
    mp.spawn(_refusal_worker, args=(2, str(tmp_path / "init"), [str(f) for f in folders], str(tmp_path)),
             nprocs=2, join=True)
    for rank in range(2):
        assert (tmp_path / f"rank{rank}.txt").read_text().startswith("refused: "), rank
        assert "holds latest.pth of an earlier run" in (tmp_path / f"rank{rank}.txt").read_text()
