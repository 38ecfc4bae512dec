"""Exact plan search for small clusters: the best subset of nodes, ring order and layer split under the cost model.

Latency. TPOT(S, ring, L) = sum L_i t_i + hops(ring) separates: the split depends only on the subset S (fastest nodes fill
first) and the ring only on S (Held-Karp). So min over S of min_split(S) + min_tour(S), all subsets in O(2^n n^2).
Ties (same TPOT) are broken by throughput over every cheapest tour of every tied subset.

Throughput. The busiest stage max(L_i t_i + c_i) depends on the ring only through each node's transfer time to its successor.
For each subset a lower bound uses each node's cheapest transfer; subsets are visited in bound order and stop once the bound
passes the best found. A subset whose transfers do not depend on order is solved in closed form; otherwise its rings are
enumerated with the same bound as pruning. Exact; worst case O(2^n n!) but the bound keeps typical cases to a few subsets.
"""

import math

import numpy as np

from exo.topology.layer_split import bottleneck_split, min_time_split
from exo.topology.ring_search import SubsetLayout, held_karp, members, optimal_tours, subset_layout
from exo.topology.search_problem import Candidate, SearchProblem, better, within_tolerance

TOUR_BUDGET = 200_000  # rings per subset evaluated at most when breaking ties; beyond, the best found so far is kept
_REL_EPS = 1e-9  # float slack when turning a stage time back into a whole number of layers


def exact_search(problem: SearchProblem, objective: str) -> Candidate | None:
  layout = subset_layout(problem.size)
  cycle, path = held_karp(problem.hop, layout)
  if objective == "latency":
    return _latency(problem, cycle, path)
  return _throughput(problem, cycle, path, layout)


def _subsets(problem: SearchProblem, cycle: np.ndarray):
  """Every subset that can form a ring and hold the model, with its members."""
  for mask in range(1, 1 << problem.size):
    if math.isfinite(cycle[mask]):
      nodes = members(mask)
      caps = [problem.caps[i] for i in nodes]
      if len(nodes) <= problem.n_layers and min(caps) >= 1 and sum(caps) >= problem.n_layers:
        yield mask, nodes


def _order_free(problem: SearchProblem, nodes: list[int]) -> bool:
  """True if every node's transfer time is the same to every neighbour in the subset, so the ring order cannot change the split."""
  for i in nodes:
    seen = {float(problem.transfer[i, j]) for j in nodes if j != i and math.isfinite(problem.hop[i, j])}
    if len(seen) > 1:
      return False
  return True


def _latency(problem: SearchProblem, cycle: np.ndarray, path: np.ndarray) -> Candidate | None:
  zeros = [0.0] * problem.size
  scored = []
  for mask, nodes in _subsets(problem, cycle):
    times = [problem.times[i] for i in nodes]
    layers = min_time_split(times, [problem.caps[i] for i in nodes], zeros[: len(nodes)], problem.n_layers)
    scored.append((sum(n * t for n, t in zip(layers, times)) + float(cycle[mask]), mask, nodes))
  if not scored:
    return None
  best_tpot = min(s[0] for s in scored)
  best, budget = None, TOUR_BUDGET
  for tpot, mask, nodes in scored:
    if not within_tolerance(tpot, best_tpot):
      continue
    free = _order_free(problem, nodes)
    for tour in optimal_tours(mask, cycle, path, problem.hop):
      layers = min_time_split([problem.times[i] for i in tour], [problem.caps[i] for i in tour], problem.ring_transfer(tour), problem.n_layers)
      candidate = problem.candidate(tour, layers, float(cycle[mask]))
      if better(candidate, best, "latency"):
        best = candidate
      budget -= 1
      if free or budget <= 0:
        break
  return best


def _cheapest_transfer(problem: SearchProblem, nodes: list[int]) -> list[float]:
  if len(nodes) == 1:
    return [0.0]
  return [min(float(problem.transfer[i, j]) for j in nodes if j != i and math.isfinite(problem.hop[i, j])) for i in nodes]


def _throughput(problem: SearchProblem, cycle: np.ndarray, path: np.ndarray, layout: SubsetLayout) -> Candidate | None:
  subsets = list(_subsets(problem, cycle))
  if not subsets:
    return None
  if _order_free(problem, list(range(problem.size))) or all(_order_free(problem, nodes) for _, nodes in subsets):
    return _throughput_order_free(problem, subsets, cycle, path)
  stage = _optimal_stage_time(problem, layout)
  reach = _layers_reachable(problem, stage, layout)
  best = None
  for mask, nodes in subsets:
    if reach[mask] < problem.n_layers:
      continue
    if _order_free(problem, nodes):
      candidate = _order_free_candidate(problem, mask, nodes, cycle, path)
      best = candidate if better(candidate, best, "throughput") else best
    else:
      best = _rings_at_stage(problem, mask, nodes, stage, path, best)
  return best


def _order_free_candidate(problem: SearchProblem, mask: int, nodes: list[int], cycle: np.ndarray, path: np.ndarray) -> Candidate:
  """Transfers that do not depend on the order: the closed-form split of the subset on its cheapest ring."""
  _, layers = bottleneck_split(
    [problem.times[i] for i in nodes], [problem.caps[i] for i in nodes], _cheapest_transfer(problem, nodes), problem.n_layers
  )
  tour = next(optimal_tours(mask, cycle, path, problem.hop))
  by_node = dict(zip(nodes, layers))
  return problem.candidate(tour, [by_node[i] for i in tour], float(cycle[mask]))


def _throughput_order_free(problem: SearchProblem, subsets: list, cycle: np.ndarray, path: np.ndarray) -> Candidate | None:
  """Every subset solved in closed form; visited by bottleneck, stopping once a subset cannot tie the best."""
  scored = []
  for mask, nodes in subsets:
    times, caps = [problem.times[i] for i in nodes], [problem.caps[i] for i in nodes]
    scored.append((bottleneck_split(times, caps, _cheapest_transfer(problem, nodes), problem.n_layers)[0], mask, nodes))
  scored.sort(key=lambda entry: (entry[0], entry[1]))
  best = None
  for stage, mask, nodes in scored:
    if best is not None and not within_tolerance(stage, best.bottleneck):
      break
    candidate = _order_free_candidate(problem, mask, nodes, cycle, path)
    best = candidate if better(candidate, best, "throughput") else best
  return best


def _max_layers(problem: SearchProblem, stage: float) -> np.ndarray:
  """g[i, j]: most layers node i can hold with successor j within stage time `stage` (diagonal: i alone, no transfer); -inf if < 1."""
  times = np.array(problem.times)[:, None]
  transfer = problem.transfer.copy()
  np.fill_diagonal(transfer, 0.0)
  g = np.minimum(np.array(problem.caps, dtype=float)[:, None], np.floor((stage - transfer) / times + _REL_EPS))
  edge = np.isfinite(problem.hop) | np.eye(problem.size, dtype=bool)
  return np.where(edge & (g >= 1), g, -math.inf)


def _layers_reachable(problem: SearchProblem, stage: float, layout: SubsetLayout) -> np.ndarray:
  """For every subset, the most layers any ring through exactly that subset can hold with every stage within `stage`.

  A node's limit depends only on its successor, so this is a longest-cycle Held-Karp with edge weight g[i, j]."""
  g = _max_layers(problem, stage)
  cycle, _ = held_karp(-g, layout)
  reach = -cycle
  singles = 1 << np.arange(problem.size)
  reach[singles] = np.diag(g)
  reach[layout.size > problem.n_layers] = -math.inf
  return reach


def _optimal_stage_time(problem: SearchProblem, layout: SubsetLayout) -> float:
  """The least busiest-stage time any plan achieves: binary search over every value a stage can take (m t_i + c_ij), each
  probe a longest-cycle DP. O(log(n^2 L) 2^n n^2)."""
  values = set()
  for i in range(problem.size):
    outgoing = [0.0] + [float(problem.transfer[i, j]) for j in range(problem.size) if j != i and math.isfinite(problem.hop[i, j])]
    for m in range(1, min(problem.caps[i], problem.n_layers) + 1):
      values.update(m * problem.times[i] + c for c in outgoing)
  values = sorted(values)
  lo, hi = 0, len(values) - 1
  while lo < hi:
    mid = (lo + hi) // 2
    if _layers_reachable(problem, values[mid], layout).max() >= problem.n_layers:
      hi = mid
    else:
      lo = mid + 1
  return values[lo]


def _rings_at_stage(problem: SearchProblem, mask: int, nodes: list[int], stage: float, path: np.ndarray, best: Candidate | None) -> Candidate | None:
  """Among the rings of one subset whose stages all fit in `stage`, the one with the lowest TPOT.

  Depth-first over rings from the subset's lowest node; a branch is cut when even its most generous layer limits cannot hold
  the model, or when its hops so far plus the cheapest completion plus the subset's least compute cannot beat the best TPOT."""
  g = _max_layers(problem, stage)
  start = nodes[0]
  most = {i: max(g[i, j] for j in nodes if j != i) for i in nodes}
  least_compute = sum(
    n * problem.times[i]
    for i, n in zip(nodes, min_time_split([problem.times[i] for i in nodes], [int(most[i]) for i in nodes], [0.0] * len(nodes), problem.n_layers))
  )
  budget = TOUR_BUDGET

  def extend(tour: list[int], left: int, hops: float, held: float, open_most: float):
    nonlocal best, budget
    x = tour[-1]
    if not left:
      limits = [int(g[a, b]) for a, b in zip(tour, tour[1:] + tour[:1])]
      layers = min_time_split([problem.times[i] for i in tour], limits, problem.ring_transfer(tour), problem.n_layers)
      candidate = problem.candidate(tour, layers, hops + float(problem.hop[x, start]))
      best = candidate if better(candidate, best, "throughput") else best
      budget -= 1
      return
    for y in members(left):
      rest = left & ~(1 << y)
      closing = g[y, start] if not rest else 0.0
      gained = held + g[x, y] + closing
      spent = hops + float(problem.hop[x, y])
      if budget <= 0 or gained + open_most - most[x] - (most[y] if not rest else 0.0) < problem.n_layers:
        continue
      if best is not None and not within_tolerance(spent + float(path[left | (1 << start), y]) + least_compute, best.tpot):
        continue
      tour.append(y)
      extend(tour, rest, spent, gained - closing, open_most - most[x])
      tour.pop()

  extend([start], mask & ~(1 << start), 0.0, 0.0, sum(most.values()))
  return best
