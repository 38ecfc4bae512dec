"""Plan search for clusters too large to search exactly (exo/topology/search.py decides which).

Every search here is compared with the best one- and two-node plans (exo/topology/bounds.py), always checked in closed form.
Latency: the exact latency search (exo/topology/exact_latency.py) on the SEED_NODES most promising nodes (those of the best
small plan, then the fastest and the best linked in turn), then local moves (add, drop or swap a node) while TPOT falls.
Throughput: a ring through the nodes that reach the relaxation bound on the busiest stage (bounds.least_stage), every first
node and direction tried and the order polished; if it meets the bound it is optimal and the search stops.
Both then try the speed ranking: latency from the fewest fastest nodes whose memory holds the model, improved by the same
local moves; throughput scores every prefix by its optimistic bottleneck (cheapest transfer per node), solves the best few
with a real ring and refines a small enough winner by local moves and a transfer-aware 2-opt polish.
Rings: exact Held-Karp up to EXACT_RING nodes, else a bounded Hamiltonian-cycle search (cycles.hamiltonian_cycle: cheap
impossibility proofs, nearest neighbour + 2-opt on dense graphs, a Warnsdorff depth-first search on sparse ones, RING_EFFORT
extensions at most). When none of this finds a plan, the dispatcher seeds the search with a feasible plan from
exo/topology/feasibility.py (exact up to 16 nodes), so a ring that exists among the usable nodes of a sparse, banded, two-site
or star topology is not missed. O(n^2) per ring, O(n^2 log n) for the prefixes.
"""

import math

import numpy as np

from exo.topology.bounds import best_small_plan
from exo.topology.cycles import hamiltonian_cycle, ring_holding
from exo.topology.exact_latency import MAX_NODES, exact_latency
from exo.topology.layer_split import bottleneck_split, layers_within
from exo.topology.rings import held_karp, optimal_tours, subset_layout
from exo.topology.search_problem import Candidate, SearchProblem, better, within_tolerance

__all__ = ["best_orientation", "heuristic_search", "ring_through"]

EXACT_RING = 10  # rings through at most this many nodes are cheapest (Held-Karp); beyond, hamiltonian_cycle's
SEED_NODES = MAX_NODES  # the exact latency search runs on this many promising nodes
RING_EFFORT = 20_000  # path extensions per ring search: bounded, since the local search asks for many rings
LOCAL_MOVES = 60  # improving moves at most; each is one pass over the candidate moves
MOVE_CANDIDATES = 8  # outside nodes considered per pass: the fastest few and the nearest few
THROUGHPUT_PREFIXES = 3  # best-bounded prefixes solved with a real ring
LOCAL_SEARCH_LIMIT = 16  # throughput rings up to this size are refined by local moves; larger ones keep the best prefix
POLISH_WINDOW = 5  # on large rings, segment reversals of up to this many nodes
POLISH_PASSES = 3  # on large rings, passes of reversals at most
END_CHOICES = 3  # last stages tried per ring: its fastest few nodes, in both directions (the next node is first)


def ring_through(hop: np.ndarray, nodes: list[int], layouts: dict | None = None) -> list[int] | None:
  """A cheap ring through `nodes` (exact when small), or None if the heuristic finds none along existing edges. `layouts`:
  Held-Karp layouts by node count, reused across calls."""
  nodes = sorted(nodes)
  if len(nodes) == 1:
    return nodes
  if len(nodes) <= EXACT_RING:
    sub = hop[np.ix_(nodes, nodes)]
    layouts = {} if layouts is None else layouts
    if len(nodes) not in layouts:
      layouts[len(nodes)] = subset_layout(len(nodes))
    cycle, path = held_karp(sub, layouts[len(nodes)])
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
  """The best split of `nodes` for the objective on a cheap ring through them (remembered per subset)."""
  key = tuple(sorted(nodes))
  if key not in problem.plans:
    ring = ring_through(problem.hop, nodes, problem.layouts)
    problem.plans[key] = None if ring is None else best_orientation(problem, ring)
  return problem.plans[key]


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


def _improve(problem: SearchProblem, start: list[int], ranking: list[int], objective: str, best: Candidate | None = None) -> Candidate | None:
  """Steepest descent over subsets: drop a node, add one of a few promising outsiders, or swap one in for a member. `best`: the
  plan on `start` if already known."""
  best = best or _plan(problem, start, objective)
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
  on the full objective until none helps, O(k^2) splits per pass; on rings of more than LOCAL_SEARCH_LIMIT nodes only the
  reversals of up to POLISH_WINDOW nodes, for POLISH_PASSES passes at most, O(k POLISH_WINDOW) splits per pass."""
  window = len(best.ring) if len(best.ring) <= LOCAL_SEARCH_LIMIT else POLISH_WINDOW
  improved, passes = True, 0
  while improved and (window == len(best.ring) or passes < POLISH_PASSES):
    improved, passes = False, passes + 1
    ring = list(best.ring)
    for i in range(1, len(ring) - 1):
      for j in range(i + 1, min(len(ring), i + window)):
        order = ring[:i] + ring[i : j + 1][::-1] + ring[j + 1 :]
        if not problem.ring_ok(order):
          continue
        candidate = problem.plan_ring(order)
        if better(candidate, best, "throughput"):
          best, improved = candidate, True
  return best


def heuristic_search(
  problem: SearchProblem, witness: list[int] | None = None, least_stage: float = 0.0, seed: Candidate | None = None
) -> Candidate | None:
  """The best of the best one- or two-node plan, `seed` (a feasible plan, or None), a start (below) and the speed-ranked
  prefixes, improved by local moves. Latency's start: the exact optimum on the SEED_NODES most promising nodes, improved by
  local moves. Throughput's: a ring through `witness`, the nodes that reach the bound `least_stage` on the busiest stage in
  its relaxation; failing that bound, the ring of _ring_by_stage; then local moves and the order's polish, from the seed too.
  A throughput plan that reaches `least_stage` is optimal and returned at once. None when none of these finds a plan (the
  caller then asks exo/topology/feasibility.py for any)."""
  ranking = _speed_ranking(problem)
  k_min = _smallest_fitting_prefix(problem, ranking)
  small = _best(problem, best_small_plan(problem), seed)
  if problem.objective == "latency":
    start = _exact_on(problem, _promising(problem, SEED_NODES, small))
    best = _best(problem, small, None if start is None else _improve(problem, list(start.ring), ranking, "latency", start))
  else:
    best = _throughput_seed(problem, small, witness, least_stage, ranking)
    if best is not None and within_tolerance(best.bottleneck, least_stage):
      return best
  if k_min is None:  # under throughput a longer prefix keeps KV for more stages: none may hold what a ring elsewhere does
    return best
  return _best(problem, best, _search(problem, ranking, k_min))


def _best(problem: SearchProblem, *candidates: Candidate | None) -> Candidate | None:
  best = None
  for candidate in candidates:
    best = candidate if better(candidate, best, problem.objective) else best
  return best


def _throughput_seed(
  problem: SearchProblem, small: Candidate | None, witness: list[int] | None, least_stage: float, ranking: list[int]
) -> Candidate | None:
  def done(plan: Candidate | None) -> bool:
    return plan is not None and within_tolerance(plan.bottleneck, least_stage)

  best = _best(problem, small, _every_orientation(problem, witness) if witness else None)
  if done(best):
    return best
  high = math.inf if best is None else best.bottleneck
  best = _best(problem, best, _ring_by_stage(problem, least_stage, high, max(2, len(witness or []))))
  if done(best) or best is None or len(best.ring) > LOCAL_SEARCH_LIMIT:
    return best
  return _polish_order(problem, _improve(problem, list(best.ring), ranking, "throughput", best))


def _every_orientation(problem: SearchProblem, nodes: list[int]) -> Candidate | None:
  """The best plan on a cheap ring through `nodes` over every choice of first node and direction, its order then polished."""
  ring = ring_through(problem.hop, nodes, problem.layouts)
  if ring is None:
    return None
  best = None
  for k in range(len(ring)):
    for order in (ring[k:] + ring[:k], (ring[k + 1 :] + ring[: k + 1])[::-1]):
      candidate = problem.plan_ring(order)
      best = candidate if better(candidate, best, problem.objective) else best
  return best if best is None or problem.objective == "latency" else _polish_order(problem, best)


def _ring_by_stage(problem: SearchProblem, low: float, high: float, ring_size: int) -> Candidate | None:
  """Throughput, when the bound's nodes have no ring between them or miss it: the least stage time T in [low, high) at which
  ring_holding finds a ring of nodes that holds the model with every stage within T (each node's layers limited by its
  capacity in a ring of `ring_size` and by T less its cheapest transfer; a margin of ceil(eta) layers for the head), by binary
  search over the values a stage can take; that ring in its best orientation and order. O(log(n L)) ring searches."""
  t, total = np.array(problem.tb), problem.n_layers
  send = problem.batch * np.where(np.isfinite(problem.hop), problem.transfer, math.inf).min(axis=1)
  caps = np.array([problem.costs.capacity(i, ring_size=ring_size) for i in range(problem.size)], dtype=float)
  values = np.unique((np.outer(t, np.arange(1, total + 1)) + send[:, None]).ravel())
  values = values[(values >= low) & (values < high)]

  def ring_at(stage: float) -> list[int] | None:
    with np.errstate(invalid="ignore"):
      held = np.minimum(caps, layers_within(stage, send, t))
    held = np.where(np.isfinite(held) & (held >= 1), held, 0.0)
    order = [i for i in np.argsort(-held, kind="stable").tolist() if held[i] >= 1]
    return ring_holding(problem.hop, held.tolist(), total + math.ceil(problem.eta), order, RING_EFFORT) if order else None

  lo, hi, found = 0, len(values), None
  while lo < hi:
    mid = (lo + hi) // 2
    ring = ring_at(float(values[mid]))
    if ring is None:
      lo = mid + 1
    else:
      hi, found = mid, ring
  return None if found is None else _every_orientation(problem, found)


def _promising(problem: SearchProblem, count: int, small: Candidate | None) -> list[int]:
  """`count` nodes likely to hold the best plan: those of the best small plan, then the fastest and the best linked (cheapest
  two links) in turn."""
  times = _times(problem)
  links = np.sort(np.concatenate([problem.hop, np.full((problem.size, 2), math.inf)], axis=1), axis=1)
  linked = sorted(range(problem.size), key=lambda i: (links[i, 0] + links[i, 1], times[i], i))
  fastest = sorted(range(problem.size), key=lambda i: (times[i], i))
  chosen = list(small.ring) if small is not None else []
  for pair in zip(fastest, linked):
    for i in pair:
      if len(chosen) < count and i not in chosen:
        chosen.append(i)
  return sorted(chosen)


def _exact_on(problem: SearchProblem, nodes: list[int]) -> Candidate | None:
  """The exact latency search's plan on a subset of the nodes, as a candidate of the whole problem."""
  found = exact_latency(SearchProblem(problem.costs.restrict(nodes)))
  return None if found is None else problem.candidate([nodes[i] for i in found.ring], list(found.layers))


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
