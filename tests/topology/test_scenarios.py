"""Scenario files (tests/scenarios/*.json): hand-computed expected plans, checked against make_plan and a brute-force optimum.

Each scenario is a topology file (tests/scenarios/NAME.json, usable as `exo plan --topology`) and its expectations
(tests/scenarios/expected/NAME.json): a model (built-in id or spec), an objective, planner params and `expected`, written by hand from
docs/DESIGN.md section 2 (the arithmetic is in the scenario's "why"): either {"error": substring} or the ring, layers per node and
predicted tpot_ms / throughput_tps, plus optional property checks (max_ring_nodes, min_layers_per_node, max_layer_spread,
sites + site_crossings, warnings_contain).

The brute force below reads only the topology and model-spec dicts; nothing from exo.topology. It enumerates every node subset
and every ring order (first node fixed: rotating a ring changes neither TPOT nor any stage time). Per ring it enumerates every
integer split when there are few (C(L - 1, k - 1) compositions), and otherwise computes the ring's optimal split directly:
latency fills the fastest nodes first, throughput takes the smallest candidate bottleneck L_i t_i + x_i that admits L layers.
"""

import copy
import itertools
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import pytest

from exo.errors import PlanError
from exo.models import MODELS
from exo.topology.planner import make_plan

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "scenarios"
SCENARIOS = sorted(SCENARIO_DIR.glob("*.json"))
REL = 1e-6
BRUTE_MAX_NODES = 7
ENUMERATE_MAX = 5000  # compositions per ring up to which every integer split is enumerated


def load(path: Path) -> dict:
  """A scenario: the topology file itself (usable as `exo plan --topology`) joined with its expectations in expected/."""
  return {"topology": json.loads(path.read_text()), **json.loads((path.parent / "expected" / path.name).read_text())}


def model_dict(model) -> dict:
  """The model-spec JSON dict: given inline, or the built-in model's spec as data."""
  return MODELS[model].to_dict() if isinstance(model, str) else model


def close(a: float, b: float, rel: float = REL) -> bool:
  return abs(a - b) <= rel * max(abs(a), abs(b))


def plan_for(scenario: dict, strategy: str = "flops-latency") -> dict:
  return make_plan(scenario["topology"], scenario["model"], strategy, scenario["objective"], **scenario.get("params", {}))


def ring_of(plan: dict) -> list[tuple[str, int]]:
  return [(s["node_id"], s["end_layer"] - s["start_layer"] + 1) for s in plan["shards"]]


def same_ring(got: list[str], want: list[str], match: str) -> bool:
  if match == "exact":
    return got == want
  if len(got) != len(want):
    return False
  rotations = [want[i:] + want[:i] for i in range(len(want))]
  if match == "rotation":
    return got in rotations
  assert match == "rotation_or_reversal", f"unknown ring_match {match!r}"
  return got in rotations or got[::-1] in rotations


# ---------- the cost model, read straight off the JSON dicts (docs/DESIGN.md section 2) ----------


class Cluster:
  def __init__(self, topology: dict, model: dict, memory_headroom: float = 0.1, default_rtt_ms: float = 5.0):
    nodes = topology["nodes"]
    self.ids = sorted(nodes)
    self.n_layers = model["n_layers"]
    B, F, A, K = model["layer_bytes"], model["layer_flops"], model["activation_bytes"], model.get("kv_bytes_per_layer", 0)
    known = {}
    for i, node in nodes.items():
      f, b = node.get("flops", {}).get("fp16", 0), node.get("memory_bandwidth", 0)
      terms = ([F / (f * 1e12)] if f > 0 else []) + ([B / (b * 1e9)] if b > 0 else [])
      if terms:
        known[i] = max(terms)
    assert known, "the brute force does not model the memory-weighted fallback"
    self.t = {i: known.get(i, max(known.values())) for i in self.ids}  # unknown speed: the slowest known node
    self.cap = {i: math.floor(nodes[i].get("memory", 0) * 2**20 * (1 - memory_headroom) / (B + K)) for i in self.ids}
    rtts, bandwidths = defaultdict(list), defaultdict(list)
    for e in topology.get("edges", []):
      measured = rtts[frozenset((e["from"], e["to"]))]  # an edge makes its ends neighbours even with no measurement
      if e.get("rtt_ms") is not None:
        measured.append(e["rtt_ms"])
      if e.get("bandwidth_mbps"):
        bandwidths[frozenset((e["from"], e["to"]))].append(e["bandwidth_mbps"])
    self.hop, self.transfer = {}, {}
    for pair, measured in rtts.items():
      w = sum(bandwidths[pair]) / len(bandwidths[pair]) if bandwidths[pair] else None
      self.transfer[pair] = A * 8 / (w * 1e6) if w else 0.0
      rtt_ms = sum(measured) / len(measured) if measured else default_rtt_ms
      self.hop[pair] = rtt_ms / 2 / 1000 + self.transfer[pair]

  def rings(self):
    """Every ring of nodes that can hold a layer, neighbours adjacent, one rotation each (reversals are separate rings)."""
    usable = [i for i in self.ids if self.cap[i] >= 1]
    for k in range(1, len(usable) + 1):
      for subset in itertools.combinations(usable, k):
        for rest in itertools.permutations(subset[1:]):
          ring = (subset[0], *rest)
          if k == 1 or all(frozenset((ring[j], ring[(j + 1) % k])) in self.hop for j in range(k)):
            yield ring

  def hops(self, ring) -> float:
    return 0.0 if len(ring) < 2 else sum(self.hop[frozenset((ring[j], ring[(j + 1) % len(ring)]))] for j in range(len(ring)))

  def extras(self, ring) -> list[float]:
    """Per stage, the time to push the activation to the next node (0 for a ring of one)."""
    return [0.0 if len(ring) < 2 else self.transfer[frozenset((ring[j], ring[(j + 1) % len(ring)]))] for j in range(len(ring))]

  def evaluate(self, ring, layers) -> tuple[float, float]:
    """(TPOT s, throughput tokens/s) of a ring with the given layer counts."""
    tpot = sum(n * self.t[i] for i, n in zip(ring, layers)) + self.hops(ring)
    bottleneck = max(n * self.t[i] + x for i, n, x in zip(ring, layers, self.extras(ring)))
    return tpot, 1 / bottleneck

  def splits(self, ring):
    """Every integer split of the layers over the ring, each node 1..cap."""
    for cuts in itertools.combinations(range(1, self.n_layers), len(ring) - 1):
      bounds = (0, *cuts, self.n_layers)
      layers = [bounds[j + 1] - bounds[j] for j in range(len(ring))]
      if all(n <= self.cap[i] for i, n in zip(ring, layers)):
        yield layers

  def best_latency_split(self, ring) -> list[int] | None:
    """Least sum L_i t_i: one layer each, then the rest to the fastest nodes first, up to their caps (hops are fixed by the ring)."""
    if sum(self.cap[i] for i in ring) < self.n_layers or len(ring) > self.n_layers:
      return None
    layers = {i: 1 for i in ring}
    left = self.n_layers - len(ring)
    for i in sorted(ring, key=lambda i: self.t[i]):
      take = min(left, self.cap[i] - 1)
      layers[i] += take
      left -= take
    return [layers[i] for i in ring]

  def best_throughput_split(self, ring) -> list[int] | None:
    """Least bottleneck: binary search over the candidate stage times n t_i + x_i for the smallest that fits L layers."""
    if sum(self.cap[i] for i in ring) < self.n_layers or len(ring) > self.n_layers:
      return None
    x = self.extras(ring)

    def most(T):  # per node, the most layers whose stage time stays within T
      return [sum(1 for n in range(1, self.cap[i] + 1) if n * self.t[i] + xi <= T) for i, xi in zip(ring, x)]

    def fits(T):
      counts = most(T)
      return min(counts) >= 1 and sum(counts) >= self.n_layers

    candidates = sorted({n * self.t[i] + xi for i, xi in zip(ring, x) for n in range(1, self.cap[i] + 1)})
    lo, hi = 0, len(candidates) - 1  # fits(candidates[-1]) holds: every node may take its whole cap
    while lo < hi:
      mid = (lo + hi) // 2
      if fits(candidates[mid]):
        hi = mid
      else:
        lo = mid + 1
    counts, over = most(candidates[lo]), sum(most(candidates[lo])) - self.n_layers
    for j in range(len(ring)):  # drop the surplus anywhere, keeping one layer each: no stage grows
      drop = min(over, counts[j] - 1)
      counts[j] -= drop
      over -= drop
    return counts

  def ring_optimum(self, ring, objective: str, enumerate_splits: bool) -> float | None:
    """The ring's best TPOT (s, latency) or throughput (tokens/s); None if no split fits."""
    if enumerate_splits:
      values = [self.evaluate(ring, layers) for layers in self.splits(ring)]
      if not values:
        return None
      return min(t for t, _ in values) if objective == "latency" else max(x for _, x in values)
    layers = self.best_latency_split(ring) if objective == "latency" else self.best_throughput_split(ring)
    if layers is None:
      return None
    tpot, throughput = self.evaluate(ring, layers)
    return tpot if objective == "latency" else throughput

  def few_splits(self, ring) -> bool:
    return math.comb(self.n_layers - 1, len(ring) - 1) <= ENUMERATE_MAX

  def optimum(self, objective: str) -> float | None:
    """Best TPOT (s) or throughput (tokens/s) over every feasible plan; None if none is feasible."""
    values = [v for ring in self.rings() if (v := self.ring_optimum(ring, objective, self.few_splits(ring))) is not None]
    if not values:
      return None
    return min(values) if objective == "latency" else max(values)

  def plan_problems(self, plan: dict) -> list[str]:
    """Why a plan is not a valid one: shards must tile the layers in order, each node hold 1..cap layers, ring neighbours share an edge."""
    shards, problems = plan["shards"], []
    if shards[0]["start_layer"] != 0 or shards[-1]["end_layer"] != self.n_layers - 1:
      problems.append(f"shards do not cover layers 0..{self.n_layers - 1}")
    problems += [f"shards {a} and {b} do not tile" for a, b in zip(shards, shards[1:]) if b["start_layer"] != a["end_layer"] + 1]
    ring = [i for i, _ in ring_of(plan)]
    if len(set(ring)) != len(ring):
      problems.append(f"a node appears twice in {ring}")
    problems += [f"{i} holds {n} layers, cap {self.cap[i]}" for i, n in ring_of(plan) if not 1 <= n <= self.cap[i]]
    if len(ring) > 1:
      pairs = [(ring[j], ring[(j + 1) % len(ring)]) for j in range(len(ring))]
      problems += [f"{u} and {v} share no edge" for u, v in pairs if frozenset((u, v)) not in self.hop]
    return problems


def cluster_for(scenario: dict) -> Cluster:
  return Cluster(scenario["topology"], model_dict(scenario["model"]), **scenario.get("params", {}))


def feasible_scenarios() -> list[Path]:
  return [p for p in SCENARIOS if "error" not in load(p)["expected"]]


def brute_scenarios() -> list[Path]:
  return [p for p in feasible_scenarios() if len(load(p)["topology"]["nodes"]) <= BRUTE_MAX_NODES]


# ---------- tests ----------


def test_required_scenarios_exist():
  names = {p.stem for p in SCENARIOS}
  required = {
    "mac_trio_iphone_70b",
    "llama_405b_must_spread",
    "mixed_nvidia_throughput",
    "two_sites_slow_link",
    "identical_nodes",
    "zero_tflops_node",
    "model_too_large",
    "more_nodes_than_layers",
    "single_node",
  }
  assert required <= names, f"missing scenarios: {sorted(required - names)}"


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_scenario_expected(path: Path):
  scenario = load(path)
  expected = scenario["expected"]
  if "error" in expected:
    with pytest.raises(PlanError, match=re.escape(expected["error"])):
      plan_for(scenario)
    return
  plan = plan_for(scenario)
  ring = ring_of(plan)
  ids = [i for i, _ in ring]
  assert same_ring(ids, expected["ring"], expected["ring_match"]), f"ring {ids}, expected {expected['ring']} ({expected['ring_match']})"
  assert dict(ring) == expected["layers"]
  predicted = plan["predicted"]
  assert predicted["feasible"] is True
  assert close(predicted["tpot_ms"], expected["tpot_ms"]), f"tpot_ms {predicted['tpot_ms']!r}, expected {expected['tpot_ms']!r}"
  assert close(predicted["throughput_tps"], expected["throughput_tps"]), (
    f"throughput {predicted['throughput_tps']!r}, expected {expected['throughput_tps']!r}"
  )
  assert close(predicted["tokens_per_second"], 1000 / expected["tpot_ms"])
  if "max_ring_nodes" in expected:
    assert len(ring) <= expected["max_ring_nodes"]
  if "min_layers_per_node" in expected:
    assert min(n for _, n in ring) >= expected["min_layers_per_node"]
  if "max_layer_spread" in expected:
    assert max(n for _, n in ring) - min(n for _, n in ring) <= expected["max_layer_spread"]
  if "site_crossings" in expected:
    site = {node: name for name, members in expected["sites"].items() for node in members}
    crossings = sum(site[ids[j]] != site[ids[(j + 1) % len(ids)]] for j in range(len(ids)))
    assert crossings == expected["site_crossings"], f"ring {ids} crosses sites {crossings} times"
  for word in expected.get("warnings_contain", []):
    assert any(word.lower() in w.lower() for w in plan["warnings"]), f"no warning mentions {word!r}: {plan['warnings']}"


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_scenario_well_formed(path: Path):
  scenario = load(path)
  assert set(scenario) <= {"description", "topology", "model", "objective", "params", "expected", "why"}
  assert scenario["objective"] in ("latency", "throughput")
  assert scenario["description"].strip() and scenario["why"].strip()


@pytest.mark.parametrize("path", brute_scenarios(), ids=lambda p: p.stem)
def test_planner_matches_brute_force(path: Path):
  scenario = load(path)
  cluster, objective = cluster_for(scenario), scenario["objective"]
  plan = plan_for(scenario)
  assert cluster.plan_problems(plan) == []
  tpot, throughput = cluster.evaluate([i for i, _ in ring_of(plan)], [n for _, n in ring_of(plan)])
  assert close(plan["predicted"]["tpot_ms"], tpot * 1000), "predicted tpot_ms disagrees with the plan's own shards"
  assert close(plan["predicted"]["throughput_tps"], throughput), "predicted throughput disagrees with the plan's own shards"
  best = cluster.optimum(objective)
  assert best is not None
  if objective == "latency":
    assert close(plan["predicted"]["tpot_ms"], best * 1000), f"planner tpot {plan['predicted']['tpot_ms']} ms, optimum {best * 1000} ms"
  else:
    assert close(plan["predicted"]["throughput_tps"], best), f"planner throughput {plan['predicted']['throughput_tps']}, optimum {best}"


def shrunk(cluster: Cluster, n_layers: int, max_cap: int) -> Cluster:
  """The same nodes and links with fewer layers and caps clipped to max_cap, so that caps bind and every split can be enumerated."""
  small = copy.copy(cluster)
  small.n_layers, small.cap = n_layers, {i: min(c, max_cap) for i, c in cluster.cap.items()}
  return small


@pytest.mark.parametrize("path", brute_scenarios(), ids=lambda p: p.stem)
def test_direct_split_matches_enumeration(path: Path):
  """The per-ring split shortcuts agree with enumerating every split: on the scenario's rings small enough to enumerate, and on
  every ring of shrunk copies of the scenario where the caps bind."""
  base = cluster_for(load(path))
  checked = 0
  for cluster in [base] + [shrunk(base, n_layers, max_cap) for n_layers, max_cap in ((3, 1), (5, 2), (8, 3), (10, 6))]:
    for ring in cluster.rings():
      if not cluster.few_splits(ring):
        continue
      for objective in ("latency", "throughput"):
        enumerated = cluster.ring_optimum(ring, objective, enumerate_splits=True)
        direct = cluster.ring_optimum(ring, objective, enumerate_splits=False)
        assert (enumerated is None) == (direct is None), f"{ring} {objective}: {enumerated} vs {direct}"
        if enumerated is not None:
          assert close(enumerated, direct, 1e-12), f"{ring} {objective}: enumerated {enumerated}, direct {direct}"
          checked += 1
  assert checked > 0


@pytest.mark.parametrize("path", feasible_scenarios(), ids=lambda p: p.stem)
def test_flops_latency_at_least_as_good_as_memory_weighted(path: Path):
  scenario = load(path)
  cluster, objective = cluster_for(scenario), scenario["objective"]
  try:
    baseline = plan_for(scenario, "ring-memory-weighted")
  except PlanError:
    pytest.skip("ring-memory-weighted refuses this request")
  if cluster.plan_problems(baseline):
    pytest.skip(f"ring-memory-weighted's plan is infeasible: {cluster.plan_problems(baseline)[0]}")
  ours = cluster.evaluate(*zip(*ring_of(plan_for(scenario))))
  theirs = cluster.evaluate(*zip(*ring_of(baseline)))
  if objective == "latency":
    assert ours[0] <= theirs[0] * (1 + 1e-9), f"flops-latency TPOT {ours[0]} s, ring-memory-weighted {theirs[0]} s"
  else:
    assert ours[1] >= theirs[1] * (1 - 1e-9), f"flops-latency {ours[1]} tokens/s, ring-memory-weighted {theirs[1]}"
