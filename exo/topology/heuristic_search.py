"""Plan search for clusters too large to search exactly.

Nodes are ranked by speed. Latency: start from the fewest fastest nodes whose memory holds the model, then improve the subset by
local moves (add, drop or swap a node) while TPOT falls: a near node can beat a faster far one. Throughput: every prefix of the
speed ranking is scored by its optimistic bottleneck (cheapest transfer per node), the best few are solved with a real ring,
and a small enough winner is refined by the same local moves.
Rings: exact Held-Karp up to EXACT_RING nodes, else a bounded Hamiltonian-cycle search (ring_search.hamiltonian_cycle: cheap
impossibility proofs, nearest neighbour + 2-opt on dense graphs, a Warnsdorff depth-first search on sparse ones, RING_EFFORT
extensions at most). If no plan is found that way, ring_holding searches for any ring whose nodes hold the model (the fastest
nodes first, within RING_EFFORT work), so a ring that exists among the usable nodes of a sparse, banded, two-site or star
topology is not missed. O(n^2) per ring, O(n^2 log n) for the prefixes.
"""

import math

import numpy as np

from exo.topology.layer_split import bottleneck_split
from exo.topology.ring_search import hamiltonian_cycle, held_karp, optimal_tours, ring_holding
from exo.topology.search_problem import Candidate, SearchProblem, better

EXACT_RING = 10
RING_EFFORT = 20_000  # path extensions per ring search: bounded, since the local search asks for many rings
FALLBACK_TRIES = 8  # rings of growing capacity asked of ring_holding when its first one cannot take the embedding and head
LOCAL_MOVES = 60  # improving moves at most; each is one pass over the candidate moves
MOVE_CANDIDATES = 8  # outside nodes considered per pass: the fastest few and the nearest few
THROUGHPUT_PREFIXES = 3  # best-bounded prefixes solved with a real ring
LOCAL_SEARCH_LIMIT = 16  # throughput rings up to this size are refined by local moves; larger ones keep the best prefix
END_CHOICES = 3  # last stages tried per ring: its fastest few nodes, in both directions (the next node is first)


def ring_through(hop: np.ndarray, nodes: list[int]) -> list[int] | None:
  """A cheap ring through `nodes` (exact when small), or None if the heuristic finds none along existing edges."""
  nodes = sorted(nodes)
  if len(nodes) == 1:
    return nodes
  if len(nodes) <= EXACT_RING:
    sub = hop[np.ix_(nodes, nodes)]
    cycle, path = held_karp(sub)
    full = (1 << len(nodes)) - 1
    if not math.isfinite(cycle[full]):
      return None
    return [nodes[i] for i in next(optimal_tours(full, cycle, path, sub))]
  return hamiltonian_cycle(nodes, hop, RING_EFFORT)


def _times(problem: SearchProblem) -> list[float]:
  return problem.t1 if problem.objective == "latency" else problem.tb


def _speed_ranking(problem: SearchProblem) -> list[int]:
  times = _times(problem)
  return sorted((i for i in range(problem.size) if problem.middle_capacity(i, 1) >= 1), key=lambda i: (times[i], i))


def _caps(problem: SearchProblem, nodes: list[int]) -> list[int]:
  return [problem.middle_capacity(i, len(nodes)) for i in nodes]


def best_orientation(problem: SearchProblem, ring: list[int]) -> Candidate | None:
  """The best plan on a ring's cycle over a few choices of its ends: each of its END_CHOICES fastest nodes as the last stage
  (it runs the head), in both directions, the next node first. O(END_CHOICES) splits."""
  times = _times(problem)
  best = None
  for last in sorted(ring, key=lambda i: (times[i], i))[:END_CHOICES]:
    k = ring.index(last)
    for order in (ring[k + 1 :] + ring[: k + 1], (ring[k:] + ring[:k])[::-1]):
      candidate = problem.plan_ring(order)
      best = candidate if better(candidate, best, problem.objective) else best
  return best


def _plan(problem: SearchProblem, nodes: list[int], objective: str) -> Candidate | None:
  """The best split of `nodes` for the objective on a cheap ring through them."""
  ring = ring_through(problem.hop, nodes)
  return None if ring is None else best_orientation(problem, ring)


def _smallest_fitting_prefix(problem: SearchProblem, ranking: list[int]) -> int | None:
  for k in range(1, len(ranking) + 1):
    if sum(_caps(problem, ranking[:k])) >= problem.n_layers:
      return k
  return None


def _outside_candidates(problem: SearchProblem, inside: set[int], ranking: list[int]) -> list[int]:
  outside = [i for i in ranking if i not in inside]
  if not outside:
    return []
  members = sorted(inside)
  closeness = problem.hop[np.ix_(outside, members)].min(axis=1)
  nearest = [outside[i] for i in np.argsort(closeness, kind="stable")[: MOVE_CANDIDATES // 2]]
  fastest = outside[: MOVE_CANDIDATES // 2]
  return sorted(set(nearest) | set(fastest))


def _improve(problem: SearchProblem, start: list[int], ranking: list[int], objective: str) -> Candidate | None:
  """Steepest descent over subsets: drop a node, add one of a few promising outsiders, or swap one in for a member."""
  best = _plan(problem, start, objective)
  current = set(start)
  for _ in range(LOCAL_MOVES):
    moves = [current - {i} for i in sorted(current) if len(current) > 1]
    for j in _outside_candidates(problem, current, ranking):
      moves.append(current | {j})
      moves.extend((current - {i}) | {j} for i in sorted(current))
    improved = None
    for move in moves:
      if len(move) > problem.n_layers or sum(_caps(problem, sorted(move))) < problem.n_layers:
        continue
      candidate = _plan(problem, sorted(move), objective)
      if candidate is not None and better(candidate, best, objective) and better(candidate, improved, objective):
        improved = candidate
    if improved is None:
      break
    best, current = improved, set(improved.ring)
  return best


def _polish_order(problem: SearchProblem, best: Candidate) -> Candidate:
  """Throughput depends on the order through each node's transfer to its successor: try every segment reversal (2-opt move)
  on the full objective until none helps. O(k^2) splits per pass."""
  improved = True
  while improved:
    improved = False
    ring = list(best.ring)
    for i in range(1, len(ring) - 1):
      for j in range(i + 1, len(ring)):
        order = ring[:i] + ring[i : j + 1][::-1] + ring[j + 1 :]
        if not problem.ring_ok(order):
          continue
        candidate = problem.plan_ring(order)
        if better(candidate, best, "throughput"):
          best, improved = candidate, True
  return best


def heuristic_search(problem: SearchProblem) -> Candidate | None:
  ranking = _speed_ranking(problem)
  k_min = _smallest_fitting_prefix(problem, ranking)
  if k_min is None:
    return None
  return _search(problem, ranking, k_min) or _any_ring(problem, ranking)


def _any_ring(problem: SearchProblem, ranking: list[int]) -> Candidate | None:
  """A plan on any ring that holds the model, for topologies where the subsets the search tried have no ring. When a ring
  found cannot hold the model after all (its ends take the embedding and head; under throughput each node keeps KV for every
  stage), the next try counts capacities for a ring of its size or asks for a layer more. FALLBACK_TRIES rings at most."""
  ring_size, need = 1, problem.n_layers
  for _ in range(FALLBACK_TRIES):
    weight = [float(max(0, problem.middle_capacity(i, ring_size))) for i in range(problem.size)]
    ring = ring_holding(problem.hop, weight, need, ranking, RING_EFFORT)
    if ring is None:
      return None
    best = best_orientation(problem, ring)
    if best is not None:
      return best
    if len(ring) > ring_size:
      ring_size = len(ring)
    else:
      need += 1
  return None


def _search(problem: SearchProblem, ranking: list[int], k_min: int) -> Candidate | None:
  objective = problem.objective
  if objective == "latency":
    return _improve(problem, ranking[:k_min], ranking, objective)
  scored = []
  for k in range(k_min, min(len(ranking), problem.n_layers) + 1):
    nodes = ranking[:k]
    cheapest = [problem.batch * min((float(problem.transfer[i, j]) for j in nodes if j != i), default=0.0) for i in nodes]
    bound = bottleneck_split([problem.tb[i] for i in nodes], _caps(problem, nodes), cheapest, problem.n_layers)
    if bound is not None:
      scored.append((bound[0], k))
  best = None
  for _, k in sorted(scored)[:THROUGHPUT_PREFIXES]:
    candidate = _plan(problem, ranking[:k], objective)
    if candidate is not None and better(candidate, best, objective):
      best = candidate
  if best is not None and len(best.ring) <= LOCAL_SEARCH_LIMIT:
    best = _polish_order(problem, _improve(problem, list(best.ring), ranking, objective))
  return best
