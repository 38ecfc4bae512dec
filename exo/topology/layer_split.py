"""How many layers each node of a fixed ring holds: integer splits that are optimal for each objective.

Nodes are given in ring order with two per-layer times, one token's (TPOT) and one batch's (a stage of the saturated ring),
capacities cap_i (max layers) and per-stage constants c_i (the batch's transfer to the next node, the head on the last stage).
Every node holds 1 <= L_i <= cap_i layers and sum L_i = n. Both splits are exact and run in O(k log k + n) for k nodes.
"""

import heapq
import math

import numpy as np

__all__ = ["bottleneck_split", "layers_within", "min_time_split", "splittable"]

_REL_EPS = 1e-9  # float slack when turning a time budget back into a whole number of layers


def layers_within(stage, constant, per_layer):
  """Whole layers of `per_layer` seconds that fit in `stage` seconds after `constant` seconds (floats or numpy arrays):
  floor((stage - constant) / per_layer), with a slack for rounding that grows with stage / per_layer, since stage - constant
  loses about 1e-16 x stage to cancellation when the constant dwarfs a layer's time."""
  fits = (stage - constant) / per_layer + _REL_EPS * (1 + abs(stage) / per_layer)
  return np.floor(fits) if isinstance(fits, np.ndarray) or not math.isfinite(fits) else math.floor(fits)


def splittable(caps: list[int], n: int) -> bool:
  return 0 < len(caps) <= n and min(caps) >= 1 and sum(caps) >= n


def _speed_order(times: list[float]) -> list[int]:
  return sorted(range(len(times)), key=lambda i: (times[i], i))


def _add_greedily(layers: list[int], cost, caps: list[int], count: int, members: list[int]) -> None:
  """Give `count` more layers, one at a time, to whichever member's stage would be least loaded after taking it.

  Greedy on the marginal stage time is optimal for minimising the largest of non-decreasing per-node costs.
  """
  heap = [(cost(i, layers[i] + 1), i) for i in members if layers[i] < caps[i]]
  heapq.heapify(heap)
  for _ in range(count):
    _, i = heapq.heappop(heap)
    layers[i] += 1
    if layers[i] < caps[i]:
      heapq.heappush(heap, (cost(i, layers[i] + 1), i))


def min_time_split(times: list[float], caps: list[int], transfer: list[float], n: int, stage_times: list[float] | None = None) -> list[int] | None:
  """Minimise total compute sum L_i t_i (the TPOT part a split controls); among those, minimise the busiest stage
  max(L_i s_i + c_i), with s the batch's per-layer times (default: t).

  The fastest nodes fill to capacity, the rest keep one layer. Only nodes tied in speed at the margin leave a choice, and the
  tie is spread to balance stages. None if no split exists.
  """
  stage_times = times if stage_times is None else stage_times
  if not splittable(caps, n):
    return None
  layers, left = [1] * len(times), n - len(times)
  order = _speed_order(times)
  g = 0
  while left > 0:
    group = [order[g]]
    while g + len(group) < len(order) and math.isclose(times[order[g + len(group)]], times[order[g]], rel_tol=1e-12):
      group.append(order[g + len(group)])
    room = sum(caps[i] - 1 for i in group)
    if room <= left:
      for i in group:
        layers[i] = caps[i]
      left -= room
    else:
      _add_greedily(layers, lambda i, m: m * stage_times[i] + transfer[i], caps, left, group)
      left = 0
    g += len(group)
  return layers


def _water_level(times: list[float], caps: list[int], transfer: list[float], n: int) -> float:
  """The continuous stage time T with sum_i clamp((T - c_i) / t_i, 1, cap_i) = n: the speed-proportional split under memory caps.

  Each node's share grows linearly (slope 1 / t_i) between T = c_i + t_i and T = c_i + cap_i t_i; walk those breakpoints in order.
  """
  events = []
  for t, cap, c in zip(times, caps, transfer):
    events.append((c + t, 1 / t))
    events.append((c + cap * t, -1 / t))
  events.sort()
  level, filled, slope = events[0][0], float(len(times)), 0.0
  for at, delta in events:
    if slope > 0 and filled + slope * (at - level) >= n:
      return level + (n - filled) / slope
    filled += slope * (at - level)
    level, slope = at, slope + delta
  return level


def bottleneck_split(
  times: list[float], caps: list[int], transfer: list[float], n: int, tpot_times: list[float] | None = None
) -> tuple[float, list[int]] | None:
  """Minimise the busiest stage max(L_i t_i + c_i) (batch / throughput); among those, minimise total compute sum L_i u_i, with u
  one token's per-layer times (default: t).

  Closed-form water level, rounded down, then the remaining few layers placed greedily on the least-loaded stage: the rounded
  split never exceeds any optimum's per-node counts, so the greedy completion is optimal. Then, with the optimal stage time T
  fixed, layers move to the fastest nodes up to floor((T - c_i) / t_i). None if no split exists.
  """
  if not splittable(caps, n):
    return None
  k = len(times)
  level = _water_level(times, caps, transfer, n)
  layers = [min(cap, max(1, math.floor((level - c) / t))) for t, cap, c in zip(times, caps, transfer)]
  if sum(layers) > n:
    layers = [1] * k
  _add_greedily(layers, lambda i, m: m * times[i] + transfer[i], caps, n - sum(layers), list(range(k)))
  stage = max(m * t + c for m, t, c in zip(layers, times, transfer))
  # the split found stays allowed: with a stage constant far above a layer's time, (stage - c) / t loses whole units to rounding
  limit = [min(cap, max(m, layers_within(stage, c, t))) for m, t, cap, c in zip(layers, times, caps, transfer)]
  best, left = [1] * k, n - k
  for i in _speed_order(times if tpot_times is None else tpot_times):
    extra = min(left, limit[i] - 1)
    best[i] += extra
    left -= extra
  return max(m * t + c for m, t, c in zip(best, times, transfer)), best
