import itertools

from hypothesis import example, given, settings
from hypothesis import strategies as st

from exo.topology.layer_split import bottleneck_split, min_time_split

times_st = st.sampled_from([0.5, 1.0, 1.0, 2.0, 3.0, 0.37, 1.9])
node_st = st.tuples(times_st, st.integers(0, 7), st.sampled_from([0.0, 0.0, 0.25, 1.3]))


def all_splits(caps, n):
  return [s for s in itertools.product(*[range(1, c + 1) for c in caps]) if sum(s) == n]


def busiest(split, times, transfer):
  return max(m * t + c for m, t, c in zip(split, times, transfer))


def compute(split, times):
  return sum(m * t for m, t in zip(split, times))


@settings(max_examples=400, deadline=None)
@given(st.lists(node_st, min_size=1, max_size=4), st.integers(1, 12))
@example([(1e-6, 4, 44.984), (1e-6, 2, 44.984)], 6)  # a transfer of 45 s against 1 us layers: rounding once lost a layer
def test_bottleneck_split_is_optimal_then_cheapest(nodes, n):
  times, caps, transfer = map(list, zip(*nodes))
  splits = all_splits(caps, n)
  result = bottleneck_split(times, caps, transfer, n)
  if not splits:
    assert result is None
    return
  stage, split = result
  assert sum(split) == n and all(1 <= m <= c for m, c in zip(split, caps))
  best_stage = min(busiest(s, times, transfer) for s in splits)
  assert busiest(split, times, transfer) == stage
  assert abs(stage - best_stage) <= 1e-9 * best_stage
  ties = [s for s in splits if busiest(s, times, transfer) <= best_stage * (1 + 1e-9)]
  assert abs(compute(split, times) - min(compute(s, times) for s in ties)) <= 1e-9


@settings(max_examples=400, deadline=None)
@given(st.lists(node_st, min_size=1, max_size=4), st.integers(1, 12))
def test_min_time_split_is_cheapest_then_most_balanced(nodes, n):
  times, caps, transfer = map(list, zip(*nodes))
  splits = all_splits(caps, n)
  split = min_time_split(times, caps, transfer, n)
  if not splits:
    assert split is None
    return
  assert sum(split) == n and all(1 <= m <= c for m, c in zip(split, caps))
  least = min(compute(s, times) for s in splits)
  assert abs(compute(split, times) - least) <= 1e-9
  ties = [s for s in splits if compute(s, times) <= least + 1e-9]
  assert abs(busiest(split, times, transfer) - min(busiest(s, times, transfer) for s in ties)) <= 1e-9


def test_speed_proportional_when_no_cap_binds():
  # speeds 3:2:1 (times 1/3, 1/2, 1) over 60 layers: 30, 20, 10 gives every stage 10 s
  stage, split = bottleneck_split([1 / 3, 1 / 2, 1.0], [60, 60, 60], [0.0] * 3, 60)
  assert split == [30, 20, 10] and abs(stage - 10) < 1e-9


def test_water_filling_under_a_memory_cap():
  # the fast node would take 30 of 40 layers but holds only 12; the other two share the rest by speed
  stage, split = bottleneck_split([1 / 3, 1 / 2, 1.0], [12, 40, 40], [0.0] * 3, 40)
  assert split == [12, 19, 9] and stage == 9.5


def test_latency_split_fills_the_fastest_first():
  assert min_time_split([2.0, 1.0, 3.0], [10, 5, 10], [0.0] * 3, 12) == [6, 5, 1]
  assert min_time_split([1.0, 1.0], [10, 10], [0.0, 0.0], 2) == [1, 1]
  assert min_time_split([1.0], [3], [0.0], 4) is None
