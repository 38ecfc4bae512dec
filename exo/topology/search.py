"""The one entry to the plan searches: search(problem, method) runs the exact search of the problem's objective
(exo/topology/exact_latency.py, exo/topology/exact_throughput.py) or the heuristic (exo/topology/heuristic.py), and returns
the plan with a bound on the objective when the plan is not proven optimal.

method "auto": exact up to EXACT_LIMIT usable nodes, the heuristic beyond. "exact": the exact search, on at most EXACT_MAX
usable nodes (BadInput beyond). "heuristic": the heuristic at any size. The heuristic's plan comes with a bound
(exo/topology/bounds.py: least_tpot, least_stage); a throughput plan short of its bound by more than REFINE_GAP is refined by
the exact search on at most REFINE_NODES nodes. Whenever a search finds no plan, the ring of exo/topology/feasibility.py (exact
up to 16 nodes) seeds it, so a plan is found whenever one exists.
"""

from exo.base.errors import BadInput
from exo.topology.bounds import least_stage, least_tpot
from exo.topology.exact_latency import MAX_NODES as LATENCY_MAX_NODES
from exo.topology.exact_latency import exact_latency
from exo.topology.exact_throughput import MAX_NODES as THROUGHPUT_MAX_NODES
from exo.topology.exact_throughput import exact_throughput
from exo.topology.feasibility import feasibility
from exo.topology.heuristic import best_orientation, heuristic_search
from exo.topology.plan_request import check_method
from exo.topology.search_problem import Candidate, SearchProblem, better

__all__ = ["EXACT_LIMIT", "EXACT_MAX", "REFINE_GAP", "REFINE_NODES", "search"]

# method "auto": usable nodes up to which the search is exact. Latency: all the exact search takes; throughput: 10, since
# beyond the exact search takes seconds on two cores
EXACT_LIMIT = {"latency": LATENCY_MAX_NODES, "throughput": 10}
EXACT_MAX = {"latency": LATENCY_MAX_NODES, "throughput": THROUGHPUT_MAX_NODES}  # method "exact": the most usable nodes it takes
REFINE_GAP = 0.01  # a heuristic throughput plan further than this (relative) from its bound is refined by the exact search,
REFINE_NODES = 12  # on at most this many nodes: the whole cluster, or beyond, the plan's and the bound's nodes (under a second
# on two cores; all 16 would take 2 to 20 s)
_EXACT = {"latency": exact_latency, "throughput": exact_throughput}


def search(problem: SearchProblem, method: str = "auto") -> tuple[Candidate | None, float | None]:
  """The plan (a Candidate of `problem`, None if no plan exists), and a bound on the objective (least TPOT or busiest stage in
  seconds) when the search did not prove the plan optimal (None when it did)."""
  check_method(method)
  objective, size = problem.objective, problem.size
  if method == "exact" and size > EXACT_MAX[objective]:
    raise BadInput(
      f"the exact {objective} search takes at most {EXACT_MAX[objective]} usable nodes and this cluster has {size}: use method auto or heuristic"
    )
  if method == "exact" or method == "auto" and size <= EXACT_LIMIT[objective]:
    best = _EXACT[objective](problem)
    return (best if best is not None else _seed(problem)), None
  return _heuristic(problem)


def _heuristic(problem: SearchProblem) -> tuple[Candidate | None, float | None]:
  """The heuristic's plan, seeded by the feasibility search's ring when it finds none alone, and the objective's bound."""
  if problem.objective == "latency":
    bound, witness = least_tpot(problem), None
  else:
    bound, witness = least_stage(problem)
  best = heuristic_search(problem, witness, bound if witness is not None else 0.0)
  if best is None:
    seed = _seed(problem)
    best = None if seed is None else heuristic_search(problem, witness, bound if witness is not None else 0.0, seed=seed)
  elif problem.objective == "throughput" and best.bottleneck > bound * (1 + REFINE_GAP):
    best, bound = _refine_throughput(problem, best, witness, bound)
  return best, bound


def _refine_throughput(problem: SearchProblem, best: Candidate, witness: list[int], bound: float) -> tuple[Candidate, float | None]:
  """A throughput plan more than REFINE_GAP short of its bound (links with bandwidth make the order matter, where the bound is
  loose). On at most REFINE_NODES usable nodes: the exact search, so the plan is optimal and no bound is left to state. Beyond:
  the exact search on the plan's own nodes and on the bound's witness nodes (where the optimum's ring mostly lies), each of at
  most REFINE_NODES; the bound stays."""
  if problem.size <= REFINE_NODES:
    exact = exact_throughput(problem)
    return (exact if better(exact, best, "throughput") else best), None
  for nodes in dict.fromkeys([tuple(sorted(best.ring)), tuple(witness)]):
    if 1 < len(nodes) <= REFINE_NODES:
      found = exact_throughput(SearchProblem(problem.costs.restrict(list(nodes))))
      if found is not None:
        candidate = problem.plan_ring([nodes[i] for i in found.ring])
        best = candidate if better(candidate, best, "throughput") else best
  return best, bound


def _seed(problem: SearchProblem) -> Candidate | None:
  """The best plan on the feasibility search's ring, over its ends (None if no plan exists)."""
  ring = feasibility(problem.costs).ring
  if ring is None:
    return None
  on_ring, turned = problem.plan_ring(ring), best_orientation(problem, ring)
  return turned if better(turned, on_ring, problem.objective) else on_ring
