"""The slot planner: which global experts fill a device's slots each round (broker_server/slots.py)."""

import numpy as np
import pytest

from broker_server.slots import SlotPlanner, tokens_by_global_expert

M = 8


def test_new_devices_are_spread_across_the_pool():
    planner = SlotPlanner(M, {})
    maps = [planner.assign([4, 5], 2, None) for _ in range(4)]
    assert [m[5] for m in maps] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert all(m[4] == m[5] for m in maps)  # the same offset in every adapted layer


def test_default_keeps_the_most_used_half_and_fills_with_the_least_used():
    usage = {5: np.array([0.30, 0.20, 0.15, 0.10, 0.10, 0.05, 0.05, 0.05])}
    history = {5: np.array([0, 50, 0, 0, 10, 0, 40, 0])}  # tokens per global expert, last round
    slot_map = SlotPlanner(M, usage).assign([5], 4, history)
    # ceil(4 / 2) kept: experts 1 and 6 (most tokens first); then the least used not already kept
    assert slot_map[5] == [1, 6, 5, 7]


def test_devices_sampled_together_share_out_the_least_used_experts():
    usage = {5: np.array([0.3, 0.3, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05])}
    planner = SlotPlanner(M, usage)
    history = {5: np.zeros(M)}  # trained before, but routed nothing here: nothing to keep
    first, second, third = (planner.assign([5], 2, h) for h in (history, history, {}))
    assert first[5] == [4, 5] and second[5] == [6, 7]
    assert third[5] == [4, 5]  # what was handed out only breaks ties of usage: 0.05 still comes first


def test_only_experts_actually_used_are_kept():
    history = {5: np.array([0, 0, 9, 0, 0, 0, 0, 0])}
    slot_map = SlotPlanner(M, {5: np.full(M, 1 / M)}).assign([5], 4, history)
    assert slot_map[5][0] == 2 and len(set(slot_map[5])) == 4 and slot_map[5].count(2) == 1


@pytest.mark.parametrize("keep, kept", [(0.0, 0), (0.25, 1), (0.5, 2), (1.0, 4)])
def test_keep_sets_how_many_slots_stay_with_the_device(keep, kept):
    history = {5: np.array([0, 50, 0, 40, 30, 20, 0, 0])}  # 4 experts used: 1 > 3 > 4 > 5
    usage = {5: np.array([0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05])}
    slot_map = SlotPlanner(M, usage, keep=keep).assign([5], 4, history)
    assert slot_map[5][:kept] == [1, 3, 4, 5][:kept]
    if keep == 0.0:  # coverage only: the four least used, whatever the device routed to
        assert slot_map[5] == [6, 7, 2, 3]  # ties at 0.1 broken by index


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="keep must be in"):
        SlotPlanner(M, {}, keep=1.5)
    with pytest.raises(ValueError, match="cannot hold 9 of 8"):
        SlotPlanner(M, {}).assign([5], 9, None)


def test_tokens_are_reindexed_by_global_expert():
    counts = tokens_by_global_expert({5: [6, 1]}, {5: np.array([3.0, 4.0])}, M)
    assert counts[5].tolist() == [0, 4, 0, 0, 0, 0, 3, 0]
