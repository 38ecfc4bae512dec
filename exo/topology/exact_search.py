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
from exo.topology.ring_search import all_tours, held_karp, members, optimal_tours, tour_cost
from exo.topology.search_problem import Candidate, SearchProblem, better, within_tolerance

TOUR_BUDGET = 200_000  # rings evaluated per search at most: complete for 8 nodes; beyond, the best found so far is kept


def exact_search(problem: SearchProblem, objective: str) -> Candidate | None:
  cycle, path = held_karp(problem.hop)
  if objective == "latency":
    return _latency(problem, cycle, path)
  return _throughput(problem, cycle, path)


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


def _throughput(problem: SearchProblem, cycle: np.ndarray, path: np.ndarray) -> Candidate | None:
  bounded = []
  for mask, nodes in _subsets(problem, cycle):
    times, caps = [problem.times[i] for i in nodes], [problem.caps[i] for i in nodes]
    cheapest = _cheapest_transfer(problem, nodes)
    bound, layers = bottleneck_split(times, caps, cheapest, problem.n_layers)
    bounded.append((bound, mask, nodes, layers))
  bounded.sort(key=lambda entry: (entry[0], entry[1]))
  best, budget = None, [TOUR_BUDGET]
  for bound, mask, nodes, layers in bounded:
    if best is not None and not within_tolerance(bound, best.bottleneck):
      break
    if _order_free(problem, nodes):
      tour = next(optimal_tours(mask, cycle, path, problem.hop))
      by_node = dict(zip(nodes, layers))
      candidate = problem.candidate(tour, [by_node[i] for i in tour], float(cycle[mask]))
      if better(candidate, best, "throughput"):
        best = candidate
    else:
      best = _throughput_over_rings(problem, mask, nodes, best, budget)
    if budget[0] <= 0:
      break
  return best


def _throughput_over_rings(problem: SearchProblem, mask: int, nodes: list[int], best: Candidate | None, budget: list[int]) -> Candidate | None:
  """Try every ring of one subset, pruning a partial ring once its optimistic bottleneck (cheapest transfer for every node whose
  successor is still open) cannot reach the best found."""
  cheapest = dict(zip(nodes, _cheapest_transfer(problem, nodes)))
  times = {i: problem.times[i] for i in nodes}
  caps = {i: problem.caps[i] for i in nodes}

  def keep(partial: list[int]) -> bool:
    if best is None or len(partial) >= len(nodes):
      return True
    fixed = {a: float(problem.transfer[a, b]) for a, b in zip(partial, partial[1:])}
    transfer = [fixed.get(i, cheapest[i]) for i in nodes]
    bound = bottleneck_split([times[i] for i in nodes], [caps[i] for i in nodes], transfer, problem.n_layers)[0]
    return within_tolerance(bound, best.bottleneck)

  for tour in all_tours(mask, problem.hop, keep):
    split = bottleneck_split([times[i] for i in tour], [caps[i] for i in tour], problem.ring_transfer(tour), problem.n_layers)
    candidate = problem.candidate(tour, split[1], tour_cost(tour, problem.hop))
    if better(candidate, best, "throughput"):
      best = candidate
    budget[0] -= 1
    if budget[0] <= 0:
      break
  return best
