import pytest

from exo.base.shard import Shard
from exo.networking.request_context import RingPlan, RingStage


def ring(*stages):
  return RingPlan("m", 10, tuple(RingStage(*s) for s in stages))


def test_plan_from_node_shards_and_back():
  plan = RingPlan.from_node_shards([("a", Shard("m", 0, 3, 10)), ("b", Shard("m", 4, 9, 10))])
  plan.validate()
  assert plan.node_ids() == ["a", "b"]
  assert plan.shard(1) == Shard("m", 4, 9, 10)
  assert plan.index_of(Shard("m", 4, 9, 10), "b") == 1
  assert plan.index_of(Shard("m", 4, 9, 10), "a") is None  # a node is only ever given the shard the plan gives it
  assert plan.context_tokens == 0  # no context named: the model's default
  assert RingPlan.from_node_shards([("a", Shard("m", 0, 9, 10))], 3072).context_tokens == 3072


@pytest.mark.parametrize(
  "stages, message",
  [
    ((("a", 0, 3), ("b", 5, 9)), "not contiguous"),
    ((("a", 1, 9),), "not contiguous"),
    ((("a", 0, 3), ("b", 4, 8)), "covers 9 of 10"),
    ((("a", 0, 3), ("a", 4, 9)), "names a node twice"),
    ((), "at least one stage"),
  ],
)
def test_malformed_plans_are_rejected(stages, message):
  with pytest.raises(ValueError, match=message):
    ring(*stages).validate()
