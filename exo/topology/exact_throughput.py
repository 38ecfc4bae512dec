"""Exact throughput search: the subset of nodes, ring order, first node and layer split of the least busy busiest stage under
cost model v2 (ties: least TPOT, then node ids), up to MAX_NODES nodes.

A ring's first node f holds the embedding and its last node l (f's predecessor) the head, which also costs eta layers of time;
the ring's size k sets the KV cache each node reserves (k micro-batches of b requests).

Subsets are visited by a lower bound (middle-of-ring capacities, no embedding or head, the cheapest transfers) until it passes
the best plan found, so only subsets that could win or tie are solved exactly. The busiest stage depends on the ring through
each node's transfer to its successor. A subset whose transfers do not depend on the order is solved in closed form for every
(f, l) on its cheapest ring (rings.paths_from_every_start, path[S, f, j], O(2^n n^3) time and O(2^n n^2) memory); otherwise a
binary search on the busiest-stage time, each probe a longest-cycle DP (_reach, O(2^n n^2)), finds the best time, and the
rings that reach it are searched depth first. Worst case O(2^n n!) splits; the bounds keep typical cases to a few subsets.
"""

import math
from typing import Iterator

import numpy as np

from exo.topology.layer_split import bottleneck_split, layers_within, min_time_split
from exo.topology.rings import cheapest_rings, members, paths_from_every_start
from exo.topology.search_problem import Candidate, SearchProblem, better, within_tolerance

__all__ = ["MAX_NODES", "exact_throughput"]

MAX_NODES = 16  # the most nodes the search takes: its tables hold 2 x 2^n n^2 floats, 270 MB at 16 nodes
TOUR_BUDGET = 200_000  # rings evaluated at most per search when breaking ties or trying orders; beyond, the best found is kept
_TOL = 1e-9


def exact_throughput(problem: SearchProblem) -> Candidate | None:
  """The plan of most throughput (ties broken as search_problem.better orders them) of a throughput problem of at most
  MAX_NODES nodes; None if no plan fits."""
  assert problem.size <= MAX_NODES, f"exact throughput search is for at most {MAX_NODES} nodes, got {problem.size}"
  paths = paths_from_every_start(problem.hop)
  cycles = paths + problem.hop.T[None, :, :]  # cycles[S, f, l]: the cheapest ring through S that closes with the hop l -> f
  for i in range(problem.size):
    cycles[1 << i, i, i] = 0.0
  return _throughput(problem, paths, cycles)


def _subsets(problem: SearchProblem, cycles: np.ndarray) -> Iterator[tuple[int, list[int], list[int]]]:
  """Every subset that has a ring and whose middle-of-ring capacities could hold the model: (mask, members, capacities)."""
  has_ring = np.isfinite(cycles.reshape(len(cycles), -1).min(axis=1))
  for mask in np.flatnonzero(has_ring).tolist():
    nodes = members(mask)
    k = len(nodes)
    if k > problem.n_layers:
      continue
    caps = [problem.middle_capacity(i, k) for i in nodes]
    if min(caps) >= 1 and sum(caps) >= problem.n_layers:
      yield mask, nodes, caps


def _ends(nodes: list[int], mask: int, cycles: np.ndarray) -> Iterator[tuple[int, int]]:
  """Every (first, last) pair a ring through the subset can have: one node is both; otherwise last -> first is a ring hop."""
  if len(nodes) == 1:
    yield nodes[0], nodes[0]
    return
  for f in nodes:
    for last in nodes:
      if last != f and math.isfinite(cycles[mask, f, last]):
        yield f, last


def _cheapest_rings(mask: int, first: int, last: int, paths: np.ndarray, hop: np.ndarray) -> Iterator[list[int]]:
  """Every cheapest ring through subset `mask` from `first` to `last` (within a relative 1e-9), in lexicographic order:
  rings.cheapest_rings completed by paths[S, y, last], each ring in O(k^2)."""
  target = paths[mask, first, last] * (1 + _TOL) + 1e-15
  return cheapest_rings(first, mask, hop, lambda spent, left, y: spent + paths[left, y, last] <= target, last)


def _throughput(problem: SearchProblem, paths: np.ndarray, cycles: np.ndarray) -> Candidate | None:
  tb, n, b = problem.tb, problem.n_layers, problem.batch
  bounds = []
  for mask, nodes, caps in _subsets(problem, cycles):
    cheapest = (
      (b * np.where(np.isfinite(problem.hop), problem.transfer, math.inf)[np.ix_(nodes, nodes)].min(axis=1)).tolist() if len(nodes) > 1 else [0.0]
    )
    bounds.append((bottleneck_split([tb[i] for i in nodes], caps, cheapest, n)[0], mask, nodes))
  bounds.sort(key=lambda entry: (entry[0], entry[1]))
  best, dependent = None, []
  for bound, mask, nodes in bounds:
    if best is not None and not within_tolerance(bound, best.bottleneck):
      break
    free = problem.order_free(nodes)
    fastest = min(nodes, key=lambda i: (tb[i], i))
    for first, last in _ends(nodes, mask, cycles):  # exact when the order does not matter, else upper bounds
      if not free and last != fastest:
        continue
      if free and best is not None:  # any order with these ends has the same stages: skip building a ring that cannot tie
        order = [first] + [i for i in nodes if i not in (first, last)] + ([last] if last != first else [])
        layers = problem.split(order)
        if layers is None or not within_tolerance(problem.costs.busiest_stage(order, layers), best.bottleneck):
          continue
      candidate = problem.plan_ring(next(_cheapest_rings(mask, first, last, paths, problem.hop)))
      best = candidate if better(candidate, best, "throughput") else best
    if not free:
      dependent.append((bound, mask, nodes))
  if dependent:
    best = _order_dependent(problem, [d for d in dependent if best is None or within_tolerance(d[0], best.bottleneck)], best, paths)
  return best


def _order_dependent(problem: SearchProblem, subsets: list, best: Candidate | None, paths: np.ndarray) -> Candidate | None:
  """Subsets whose stages depend on the ring order: per ring size k, the least busiest-stage time any ring of k nodes achieves,
  by binary search over the values a stage can take, each probe a longest-cycle DP (_reach); then, at the best time, every
  ring of the subsets that reach it, searched depth-first with the layers and TPOT bounds of _rings_at_stage."""
  layout = _SizeLayout(problem.size)
  values = _stage_values(problem)
  stage_at = {}
  for k in sorted({len(nodes) for _, _, nodes in subsets}):
    low = min(bound for bound, _, nodes in subsets if len(nodes) == k)
    high = math.inf if best is None else best.bottleneck * (1 + _TOL)
    window = values[(values >= low * (1 - _TOL)) & (values <= high)]
    lo, hi = 0, len(window)
    while lo < hi:
      mid = (lo + hi) // 2
      if _reach(problem, float(window[mid]), k, layout).max() >= problem.n_layers:
        hi = mid
      else:
        lo = mid + 1
    if lo < len(window):
      stage_at[k] = float(window[lo])
  if not stage_at:
    return best
  target = min(stage_at.values())
  budget = [TOUR_BUDGET]
  for k, stage in sorted(stage_at.items()):
    if not within_tolerance(stage, target):
      continue
    reach = _reach(problem, stage, k, layout)
    for _, mask, nodes in subsets:
      if len(nodes) == k and reach[mask] >= problem.n_layers:
        best = _rings_at_stage(problem, mask, nodes, stage, paths, best, budget)
  return best


class _SizeLayout:
  """Masks of n nodes grouped for the DP of _reach: by subset size, each mask's lowest node (where its rings are anchored), and
  per size and node j the masks of that size holding j above their lowest node (those a path from the anchor can end at j)."""

  def __init__(self, n: int):
    masks = np.arange(1 << n)
    size = np.zeros(1 << n, dtype=np.int64)
    lowest = np.zeros(1 << n, dtype=np.int64)
    for i in reversed(range(n)):
      size += (masks >> i) & 1
      lowest = np.where((masks >> i) & 1 == 1, i, lowest)
    self.lowest = lowest
    self.by_size = [masks[size == k] for k in range(n + 1)]
    self.ending_at = [[layer[((layer >> j) & 1 == 1) & (lowest[layer] != j)] for j in range(n)] for layer in self.by_size]


def _stage_values(problem: SearchProblem) -> np.ndarray:
  """Every value a stage can take: m t_i(b) + the batch's transfer to any successor (or none), plus the head on a last stage."""
  tb = np.array(problem.tb)
  extra = np.concatenate([np.zeros((problem.size, 1)), problem.batch * problem.transfer], axis=1)
  m = np.arange(1, problem.n_layers + 1, dtype=float)
  plain = tb[:, None, None] * m[None, None, :] + extra[:, :, None]
  return np.unique(np.concatenate([plain.ravel(), (plain + problem.eta * tb[:, None, None]).ravel()]))


def _limits(problem: SearchProblem, stage: float, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Most layers each node can hold within `stage` in a ring of k nodes: (first[i, j], middle[i, j], last[i, j]) with successor
  j, -inf below one layer or without an edge; and alone[i] for a ring of one."""
  n, tb, eta = problem.size, np.array(problem.tb), problem.eta
  roles = ((True, False), (False, False), (False, True), (True, True))
  caps = np.array([[problem.costs.capacity(i, first, last, k) for first, last in roles] for i in range(n)], dtype=float)
  x = problem.batch * problem.transfer
  plain = layers_within(stage, x, tb[:, None])
  headed = layers_within(stage, x + eta * tb[:, None], tb[:, None])
  edge = np.isfinite(problem.hop)
  out = []
  for cap, fits in ((caps[:, 0], plain), (caps[:, 1], plain), (caps[:, 2], headed)):
    g = np.minimum(cap[:, None], fits)
    out.append(np.where(edge & (g >= 1), g, -math.inf))
  alone = np.minimum(caps[:, 3], layers_within(stage, eta * tb, tb))
  out.append(np.where(alone >= problem.n_layers, alone, -math.inf))
  return tuple(out)


def _reach(problem: SearchProblem, stage: float, k: int, layout: _SizeLayout) -> np.ndarray:
  """For every subset of k nodes, the most layers a ring through exactly it can hold with every stage within `stage`.

  A node's limit depends only on its role (first, middle, last) and its successor, so this is a longest-cycle Held-Karp. Each
  ring is walked from its subset's lowest node s, with the phase of the walk as state: `before` (the hop last -> first is still
  ahead; s is a middle node or the last), `first` (the walk just took that hop: the current node is the first), `after` (it
  took it earlier), and `opened` (s is the first, so the walk ends with that hop). O(2^n n^2) for k = n."""
  n = problem.size
  first, middle, last, alone = _limits(problem, stage, k)
  reach = np.full(1 << n, -math.inf)
  if k == 1:
    reach[1 << np.arange(n)] = alone
    return reach
  walk = np.full((4, 1 << n, n), -math.inf)  # before, first, after, opened: the most held on a walk from the anchor ending at j
  walk[0, 1 << np.arange(n), np.arange(n)] = 0.0
  # the hop i -> j adds i's limit in the role the phase gives it, row by row: before -> before (middle), before -> first (i is
  # the last), after -> after (middle), opened -> opened (middle), first -> after (i is the first)
  source = np.array([0, 0, 2, 3, 1])[:, None]
  into = [np.stack([middle[:, j], last[:, j], middle[:, j], middle[:, j], first[:, j]])[:, None, :] for j in range(n)]
  for size in range(2, k + 1):
    for j in range(n):
      sel = layout.ending_at[size][j]
      held = (walk[source, (sel ^ (1 << j))[None, :]] + into[j]).max(axis=2)
      np.maximum(held[2], held[4], out=held[2])
      if size == 2:
        held[3] = first[layout.lowest[sel], j]
      walk[:, sel, j] = held[:4]
  masks = layout.by_size[k]
  home = layout.lowest[masks]
  closed = np.maximum.reduce([walk[3, masks] + last[:, home].T, walk[1, masks] + first[:, home].T, walk[2, masks] + middle[:, home].T])
  reach[masks] = closed.max(axis=1)
  return reach


def _rings_at_stage(
  problem: SearchProblem, mask: int, nodes: list[int], stage: float, paths: np.ndarray, best: Candidate | None, budget: list[int]
) -> Candidate | None:
  """Among the rings through one subset whose stages all fit in `stage`, the best by the objective's order (lowest TPOT).

  Depth-first from every first node; a branch is cut when even its most generous layer limits cannot hold the model, or when
  its hops so far plus the cheapest completion plus the subset's least compute cannot beat the best TPOT."""
  k = len(nodes)
  first_g, middle_g, last_g, _ = _limits(problem, stage, k)
  # the most each node could hold after or as the first node; 0 for none (its own edges then fail the search)
  most = {i: max(0.0, *(max(middle_g[i, j], last_g[i, j]) for j in nodes if j != i)) for i in nodes}
  opened = {i: max(0.0, *(first_g[i, j] for j in nodes if j != i)) for i in nodes}
  limits = [max(1, int(max(most[i], opened[i]))) for i in nodes]
  times = [problem.t1[i] for i in nodes]
  fill = min_time_split(times, limits, [0.0] * k, problem.n_layers)
  least_compute = sum(c * t for c, t in zip(fill, times)) + problem.eta * min(times)

  def extend(ring: list[int], left: int, held: float, hops: float, optimistic: float):
    """`optimistic`: the most the nodes not yet given a successor (the ring's end and those left) could hold."""
    nonlocal best
    x, f = ring[-1], ring[0]
    if not left:
      if held + last_g[x, f] >= problem.n_layers:
        best = _better_ring(problem, ring, best)
        budget[0] -= 1
      return
    for y in members(left):
      if budget[0] <= 0:
        return
      gain, own = (first_g[x, y], opened[x]) if len(ring) == 1 else (middle_g[x, y], most[x])
      if held + gain + optimistic - own < problem.n_layers:
        continue
      rest = left & ~(1 << y)
      spent = hops + float(problem.hop[x, y])
      closing = float(paths[rest | (1 << y) | (1 << f), f, y])  # hops are symmetric: the cheapest way from y through the rest back to f
      if best is not None and within_tolerance(best.bottleneck, stage) and not within_tolerance(spent + closing + least_compute, best.tpot):
        continue
      ring.append(y)
      extend(ring, rest, held + gain, spent, optimistic - own)
      ring.pop()

  total = sum(most.values())
  for f in nodes:
    extend([f], mask & ~(1 << f), 0.0, 0.0, total - most[f] + opened[f])
  return best


def _better_ring(problem: SearchProblem, ring: list[int], best: Candidate | None) -> Candidate | None:
  candidate = problem.plan_ring(list(ring))
  return candidate if better(candidate, best, "throughput") else best
