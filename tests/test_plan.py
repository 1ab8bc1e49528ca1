"""The prefix-tree plan of a fixed policy: structure, node count, serialisation, printing, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastshare.plan import Plan

policies = st.integers(1, 6).flatmap(
    lambda k: st.integers(1, 12).flatmap(
        lambda l: st.lists(st.lists(st.integers(0, 1), min_size=l, max_size=l), min_size=k, max_size=k)))


@settings(max_examples=200, deadline=None)
@given(policies)
def test_node_count_is_distinct_prefix_block_pairs(policy):
    plan = Plan(policy)
    distinct = {(l, tuple(row[:l + 1])) for row in policy for l in range(len(row))}
    assert plan.num_nodes == len(distinct)
    assert plan.num_executed == len({(l, p) for l, p in distinct if p[-1] == 1})


@settings(max_examples=100, deadline=None)
@given(policies)
def test_paths_follow_each_task_policy(policy):
    plan = Plan(policy)
    for k, row in enumerate(policy):
        path = plan.path(k)
        assert [plan.nodes[i].block for i in path] == list(range(len(row)))
        assert [int(plan.nodes[i].execute) for i in path] == row
        assert all(k in plan.nodes[i].tasks for i in path)
    for node in plan.nodes:  # the tasks of a node are exactly those sharing its prefix
        prefix = tuple(policy[node.tasks[0]][:node.block + 1])
        assert node.tasks == tuple(k for k, row in enumerate(policy) if tuple(row[:node.block + 1]) == prefix)
        assert node.parent < node.index
        if node.parent >= 0:
            assert set(node.tasks) <= set(plan.nodes[node.parent].tasks)


@settings(max_examples=50, deadline=None)
@given(policies)
def test_json_round_trip(policy):
    plan = Plan(policy)
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and again.nodes == plan.nodes and again.leaves == plan.leaves
    assert Plan.from_json(plan.to_json()) == plan


def test_tensor_policy_and_printing():
    # AdaShare's NYU example: task seg skips block 6; sn skips 9, 10, 11; depth skips 5, 10, 11.
    policy = torch.ones(3, 16)
    policy[0, 6] = 0
    policy[1, [9, 10, 11]] = 0
    policy[2, [5, 10, 11]] = 0
    plan = Plan(policy, ["seg", "sn", "depth"])
    assert plan.num_nodes == 5 + 2 + 3 * 10  # blocks 0..4 shared, block 5 two nodes, then one per task
    text = str(plan)
    assert "block  0  {seg,sn,depth} run" in text
    assert "block  5  {seg,sn} run   {depth} skip" in text
    assert "block  6  {seg} skip   {sn} run   {depth} run" in text
    assert torch.equal(plan.policy_tensor(), policy)
    assert plan.executing_tasks(10) == (0,)


def test_identical_and_trivial_policies():
    same = Plan([[1, 0, 1]] * 4)
    assert same.num_nodes == 3 and all(n.tasks == (0, 1, 2, 3) for n in same.nodes)
    assert Plan([[0, 0], [0, 0]]).num_executed == 0
    assert Plan([[1]]).num_nodes == 1


@pytest.mark.parametrize("bad, match", [
    ([[1, 2]], "only 0"),
    ([[1, 0], [1]], "row 1"),
    ([], "at least one"),
    (torch.ones(2, 3, 1), "shape"),
    (torch.tensor([[0.5, 1.0]]), "only 0"),
])
def test_bad_policies(bad, match):
    with pytest.raises(ValueError, match=match):
        Plan(bad)


def test_bad_dicts():
    with pytest.raises(ValueError, match="task names"):
        Plan([[1]], ["a", "b"])
    data = Plan([[1, 0], [1, 1]]).to_dict()
    data["nodes"][0]["execute"] = False
    with pytest.raises(ValueError, match="do not match"):
        Plan.from_dict(data)
    with pytest.raises(ValueError, match="format"):
        Plan.from_dict(dict(data, format=99))
    with pytest.raises(ValueError, match="policy"):
        Plan.from_dict({})
