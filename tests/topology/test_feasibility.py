"""Complete planning: the planner returns a plan exactly when one exists (exo/tools/exact_oracle.py's feasible, an exhaustive
check over every subset and pair of ends written from docs/DESIGN.md alone), at the context v2.1 plans; planted rings among
up to 64 nodes are found; a cluster that cannot serve is told why, with figures checked by hand."""

import copy
import math
import random

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from exo.base.errors import ClusterCannotServe, ExoError
from exo.base.model_spec import ModelSpec
from exo.base.topology import Topology
from exo.tools.exact_oracle import feasible
from exo.tools.oracle_cost_model import planned_context
from exo.topology.cannot_serve import cannot_serve
from exo.topology.cost_model import PlannerParams, cost_model
from exo.topology.feasibility import feasibility
from exo.topology.planner import make_plan
from tests.topology.planner_cases import check_feasible, log_floats

MB = 2**20
HEAVY = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Found by the large-cluster hypothesis test in CI (11 sparse nodes, throughput, batch 4): the old fallback answered "no ring can
# hold the model" while the 4-cycle n01-n04-n07-n03 holds 5 + 3 + 5 + 2 = 15 layers.
_SPARSE_ELEVEN = {
  "topology": {
    "nodes": {
      f"n{i:02d}": {
        "model": "dev",
        "chip": "chip",
        "memory": {0: 715.0, 3: 715.0, 4: 1073.0}.get(i, 1430.0),
        "flops": {"fp32": 5.0, "fp16": 10.0, "int8": 20.0},
        "memory_bandwidth": 100.0 + 10 * i,
      }
      for i in range(11)
    },
    "edges": [
      {"from": f"n{a:02d}", "to": f"n{b:02d}", "rtt_ms": 1.0}
      for a, b in [(0, 1), (0, 2), (0, 8), (0, 10), (1, 3), (1, 4), (1, 9), (2, 3), (2, 5), (2, 6), (3, 7), (4, 7)]
    ],
  },
  "model": {"id": "m", "n_layers": 15, "layer_bytes": 1e8, "layer_flops": 1e9, "activation_bytes": 1e4, "kv_bytes_per_layer": 1e7},
  "params": {"batch": 4},
}


@st.composite
def heavy_sparse_clusters(draw) -> dict:
  """11 to 16 nodes holding 10% to 50% of the model each, KV cache up to half a layer per request, few links, batch 1 to 4."""
  n_layers = draw(st.integers(6, 30))
  B = draw(log_floats(1e7, 1e9, 6))
  model = {
    "id": "m",
    "n_layers": n_layers,
    "layer_bytes": B,
    "layer_flops": draw(log_floats(1e8, 1e10, 6)),
    "activation_bytes": 1e4,
    "kv_bytes_per_layer": B * draw(st.sampled_from([0.02, 0.1, 0.3, 0.5])),
    "embed_bytes": draw(st.sampled_from([0.0, 0.5 * B])),
    "head_bytes": draw(st.sampled_from([0.0, 0.5 * B, 2.0 * B])),
  }
  total_mb = n_layers * B / MB
  ids = [f"n{i:02d}" for i in range(draw(st.integers(11, 16)))]
  nodes = {
    node_id: {
      "model": "dev",
      "chip": "chip",
      "memory": total_mb * draw(st.floats(0.1, 0.5)),
      "flops": {"fp32": 1.0, "fp16": draw(log_floats(1, 100, 6)), "int8": 1.0},
      "memory_bandwidth": draw(log_floats(50, 1000, 6)),
    }
    for node_id in ids
  }
  density = draw(st.floats(0.12, 0.45))
  edges = [
    {"from": a, "to": b, "rtt_ms": draw(st.floats(0.2, 10.0))} for i, a in enumerate(ids) for b in ids[i + 1 :] if draw(st.floats(0, 1)) < density
  ]
  return {"topology": {"nodes": nodes, "edges": edges}, "model": model, "params": {"batch": draw(st.integers(1, 4))}}


def plan_or_error(case: dict, objective: str) -> dict | ExoError:
  try:
    return make_plan(copy.deepcopy(case["topology"]), copy.deepcopy(case["model"]), objective=objective, **case["params"])
  except ExoError as e:
    return e


@HEAVY
@given(case=heavy_sparse_clusters(), objective=st.sampled_from(["latency", "throughput"]))
@example(case=_SPARSE_ELEVEN, objective="throughput")
def test_a_plan_exactly_when_one_exists_at_the_context_v2_1_plans(case, objective):
  topology, model, params = case["topology"], case["model"], case["params"]
  context = planned_context(model, lambda tokens: feasible(topology, model, objective, context=tokens, **params))
  plan = plan_or_error(case, objective)
  if context is None:
    assert isinstance(plan, ClusterCannotServe), f"the oracle finds no plan at any context, the planner planned {plan}"
    return
  assert isinstance(plan, dict), f"a plan exists at {context} tokens, the planner said: {plan}"
  assert plan["context_tokens"] == context
  check_feasible(case, objective, plan)
  if context < 8192:
    assert any(f"planned for {context} tokens" in w and "8192" in w for w in plan["warnings"])


def planted_ring(seed: int, n: int, objective: str) -> tuple[dict, list[str]]:
  """n nodes: a ring of m slow nodes that holds the model only as a whole (capacities at its own size), hidden among fast
  nodes too small to matter, linked as trees that each touch the ring at one node (so the ring is the only cycle and no pair
  or tree holds the model). Returns the case and the ring's node ids."""
  rng = random.Random(seed)
  m, n_layers, B = rng.randint(3, 8), 40, 1e8
  batch = rng.randint(1, 3)
  K = 0.05 * B
  resident = 1 if objective == "latency" else m * batch
  share = math.ceil((n_layers + 2) / m)  # each ring node holds this many layers at the ring's size: the ring holds the model
  ring_memory = (share + 0.5) * (B + resident * K) / 0.9 / MB
  ids = [f"v{i:02d}" for i in range(n)]
  ring = sorted(rng.sample(ids, m))
  nodes = {}
  for node_id in ids:
    on_ring = node_id in ring
    nodes[node_id] = {
      "model": "dev",
      "chip": "chip",
      "memory": ring_memory if on_ring else 2.5 * (B + resident * K) / 0.9 / MB,
      "flops": {"fp32": 1.0, "fp16": 2.0 if on_ring else 200.0, "int8": 1.0},
      "memory_bandwidth": 50.0 if on_ring else 2000.0,
    }
  order = ring[:]
  rng.shuffle(order)
  edges = [(order[i], order[(i + 1) % m]) for i in range(m)]
  rest = [node_id for node_id in ids if node_id not in ring]
  rng.shuffle(rest)
  placed = list(ring)
  for node_id in rest:  # one link each, to a node already placed: trees hanging from the ring, no cycle but the ring
    edges.append((rng.choice(placed), node_id))
    placed.append(node_id)
  model = {"id": "m", "n_layers": n_layers, "layer_bytes": B, "layer_flops": 1e9, "activation_bytes": 1e4, "kv_bytes_per_layer": K}
  topology = {"nodes": nodes, "edges": [{"from": a, "to": b, "rtt_ms": rng.uniform(0.5, 5.0)} for a, b in edges]}
  return {"topology": topology, "model": model, "params": {"batch": batch}}, ring


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(17, 64), objective=st.sampled_from(["latency", "throughput"]))
def test_a_planted_ring_hidden_among_many_tree_linked_nodes_is_found(seed, n, objective):
  case, ring = planted_ring(seed, n, objective)
  plan = plan_or_error(case, objective)
  assert isinstance(plan, dict), f"the planted ring {ring} holds the model, the planner said: {plan}"
  assert plan["context_tokens"] == 8192
  assert sorted(s["node_id"] for s in plan["shards"]) == ring, "the planted ring is the only ring that holds the model"
  check_feasible(case, objective, plan)


def test_a_cluster_that_cannot_serve_is_told_what_would_make_it_fit():
  # 10 layers of 100 MB, no KV: each node (450 MB, 405 MB usable) holds 4. Linked a-b and b-c only: the best ring, a pair, holds
  # 8 of 10, 2 layers (222.2 MB of memory before the 10% headroom) short; a, b and c together would hold 12, given the link c-a.
  node = {"model": "dev", "chip": "chip", "memory": 450.0, "flops": {"fp32": 1.0, "fp16": 2.0, "int8": 4.0}, "memory_bandwidth": 100.0}
  topology = {"nodes": {k: dict(node) for k in "abc"}, "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}]}
  model = {"id": "m", "n_layers": 10, "layer_bytes": 100 * MB, "layer_flops": 1e9, "activation_bytes": 1e4}
  for objective in ("latency", "throughput"):
    error = plan_or_error({"topology": topology, "model": model, "params": {}}, objective)
    assert isinstance(error, ClusterCannotServe)
    text = str(error)
    assert "the most any ring of linked nodes holds is 8 of its 10 layers" in text, text
    assert "about 223 MB more memory among 'a', 'b'" in text, text
    assert "links c-a (a ring a > b > c would hold it)" in text, text
    assert "context" not in text.split(":", 1)[1], "a model without KV cache gains nothing from a shorter context"


def test_beyond_sixteen_nodes_a_search_cut_short_says_so_instead_of_claiming_no_plan_exists():
  case, ring = planted_ring(7, 30, "latency")
  costs = cost_model(Topology.from_dict(case["topology"]), ModelSpec.from_dict(case["model"]), PlannerParams())
  found = feasibility(costs)
  assert found.ring is not None and sorted(costs.node_ids[i] for i in found.ring) == ring
  starved = feasibility(costs, budget=1)
  assert starved.ring is None and not starved.proven
  text = str(cannot_serve(costs, starved, 8192, smallest=False))
  assert "was found" in text and "within the search budget" in text and "not proven impossible" in text, text


def test_nodes_too_small_for_the_embedding_get_no_plan_and_a_clear_message():
  # 2 layers of 1 MB and a 3 MB head: each node (2 MB, 1.8 MB usable) holds one layer first or in the middle of a ring but none
  # as the last, and alone "holds" -2 layers. No plan exists; the search must say so, not crash on the negative count.
  node = {"model": "dev", "chip": "chip", "memory": 2.0, "flops": {"fp32": 1.0, "fp16": 2.0, "int8": 4.0}, "memory_bandwidth": 100.0}
  topology = {"nodes": {k: dict(node) for k in "abc"}, "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}, {"from": "c", "to": "a"}]}
  model = {"id": "m", "n_layers": 2, "layer_bytes": MB, "layer_flops": 1e9, "activation_bytes": 1e4, "head_bytes": 3 * MB}
  costs = cost_model(Topology.from_dict(topology), ModelSpec.from_dict(model), PlannerParams())
  found = feasibility(costs)
  assert found.ring is None and found.most_layers == 0
  for objective in ("latency", "throughput"):
    assert not feasible(topology, model, objective)
    error = plan_or_error({"topology": topology, "model": model, "params": {}}, objective)
    assert isinstance(error, ClusterCannotServe) and "more memory" in str(error), error
