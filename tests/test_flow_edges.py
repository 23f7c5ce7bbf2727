"""The flow runtime's pure parts as tables (no threads, no model): where a bounded loop's item
may leave, and which Rejects only drop their branch."""
from __future__ import annotations

import pytest

from pipeline_dsl.flow.joins import Joins
from pipeline_dsl.flow.router import Router

R, G = "Request", "Generated"


def test_a_loop_leaves_by_the_exits_that_carry_the_item_in_file_order_once_each():
    router = Router({}, {}, {"gen": frozenset({R}), "out": frozenset({G}), "log": frozenset({R, G})}, {})
    exits = ["out", "gen", "log", "out", "elsewhere"]           # "elsewhere": a stage the table lacks
    assert router.leave(exits, G) == ["out", "log"]
    assert router.leave(exits, R) == ["gen", "log"]
    assert router.leave(["elsewhere"], R) == []


ON_REJECT = {"vote": "drop", "strict": "fail", "merge": "drop"}
REACH = {"a": {"vote"}, "b": {"vote", "strict"}, "c": set(), "d": {"vote", "merge"}, "e": {"strict"}}


@pytest.mark.parametrize("stage, drops", [
    ("a", True),          # the one join ahead drops
    ("b", False),         # one join ahead fails the request
    ("c", False),         # no join ahead: nothing to drop the branch at
    ("d", True),          # every join ahead drops
    ("e", False),
    ("nowhere", False),   # a stage the table lacks reaches no join
])
def test_a_reject_drops_its_branch_only_when_every_join_ahead_says_drop(stage, drops):
    assert Joins(REACH, {}, ON_REJECT).drops(stage) is drops
