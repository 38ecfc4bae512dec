"""Scenario files (tests/scenarios/*.json): hand-computed expected plans, checked against make_plan and a brute-force optimum.

Each scenario is a topology file (tests/scenarios/NAME.json, usable as `exo plan --topology`) and its expectations
(tests/scenarios/expected/NAME.json): a model (built-in id or spec), an objective, planner params (memory_headroom, default_rtt_ms,
batch) and `expected`, written by hand from docs/DESIGN.md section 2, cost model v2 (the arithmetic is in the scenario's "why"):
either {"error": substring} or the ring, layers per node (or a list of splits that tie on both objectives) and predicted
tpot_ms / throughput_tps (and ttft_ms where given), plus optional property checks (max_ring_nodes, min_layers_per_node,
max_layer_spread, sites + site_crossings, warnings_contain) and the planned context (`context_tokens`, v2.1; default 8192).

The brute force is exo/tools/plan_oracle.py's BruteForce, which reads only the topology and model-spec dicts: every node
subset, every ring order and every rotation (the first node holds the embedding and the last the head, so rotations are
different plans), every integer split where there are few, else the ring's optimal split computed directly; the direct
splits are checked here against enumerating every split.
"""

import json
import re
from pathlib import Path

import pytest

from exo.base.errors import ExoError
from exo.base.models import MODELS
from exo.tools.oracle_cost_model import plan_ring
from exo.tools.plan_oracle import REL_TIE, BruteForce
from exo.topology.planner import make_plan

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "scenarios"
SCENARIOS = sorted(SCENARIO_DIR.glob("*.json"))
REL = 1e-6
BRUTE_MAX_NODES = 7


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


def cluster_for(scenario: dict, objective: str | None = None) -> BruteForce:
  """The scenario's brute force, under its own objective unless another is given (capacities depend on the objective)."""
  return BruteForce(scenario["topology"], model_dict(scenario["model"]), objective or scenario["objective"], **scenario.get("params", {}))


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
    "measured_slower_than_roofline",
    "batch_kv_drops_node",
  }
  assert required <= names, f"missing scenarios: {sorted(required - names)}"


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_scenario_expected(path: Path):
  scenario = load(path)
  expected = scenario["expected"]
  if "error" in expected:
    with pytest.raises(ExoError, match=re.escape(expected["error"])):
      plan_for(scenario)
    return
  plan = plan_for(scenario)
  ring = plan_ring(plan)
  ids = [i for i, _ in ring]
  assert same_ring(ids, expected["ring"], expected["ring_match"]), f"ring {ids}, expected {expected['ring']} ({expected['ring_match']})"
  layers = expected["layers"]  # one split, or a list of splits that tie on both objectives (DESIGN breaks ties by node ids only)
  assert dict(ring) in (layers if isinstance(layers, list) else [layers]), f"layers {dict(ring)}, expected {layers}"
  predicted = plan["predicted"]
  assert predicted["feasible"] is True
  assert plan["context_tokens"] == expected.get("context_tokens", 8192), (
    f"context {plan['context_tokens']}, expected {expected.get('context_tokens')}"
  )
  assert close(predicted["tpot_ms"], expected["tpot_ms"]), f"tpot_ms {predicted['tpot_ms']!r}, expected {expected['tpot_ms']!r}"
  assert close(predicted["throughput_tps"], expected["throughput_tps"]), (
    f"throughput {predicted['throughput_tps']!r}, expected {expected['throughput_tps']!r}"
  )
  assert close(predicted["tokens_per_second"], 1000 / expected["tpot_ms"])
  if "ttft_ms" in expected:
    assert close(predicted["ttft_ms"], expected["ttft_ms"]), f"ttft_ms {predicted['ttft_ms']!r}, expected {expected['ttft_ms']!r}"
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


@pytest.mark.parametrize("objective", ["latency", "throughput"])
@pytest.mark.parametrize("path", brute_scenarios(), ids=lambda p: p.stem)
def test_planner_matches_brute_force(path: Path, objective: str):
  """The planner's plan is valid, its predictions are the cost model's for its own shards, and it reaches the brute-force optimum
  and tie-break, under the scenario's objective and under the other one (same topology, model and parameters)."""
  scenario = {**load(path), "objective": objective}
  cluster = cluster_for(scenario)
  best = cluster.optimum()
  if best is None:  # possible under the other objective: throughput reserves KV for k b requests per stage
    with pytest.raises(ExoError):
      plan_for(scenario)
    return
  plan = plan_for(scenario)
  assert plan["context_tokens"] == cluster.context
  assert cluster.plan_problems(plan) == []
  ring, layers = [i for i, _ in plan_ring(plan)], [n for _, n in plan_ring(plan)]
  tpot, throughput, ttft = cluster.evaluate(ring, layers)
  predicted = plan["predicted"]
  assert close(predicted["tpot_ms"], tpot * 1000), f"predicted tpot_ms {predicted['tpot_ms']} disagrees with the shards' {tpot * 1000}"
  assert close(predicted["throughput_tps"], throughput), f"predicted throughput {predicted['throughput_tps']} disagrees with {throughput}"
  assert close(predicted["ttft_ms"], ttft * 1000), f"predicted ttft_ms {predicted['ttft_ms']} disagrees with the shards' {ttft * 1000}"
  (want, want_tie), best_ring, best_layers = best
  got, got_tie = cluster.score(ring, layers)
  where = f"planner {list(zip(ring, layers))}, brute force {list(zip(best_ring, best_layers))}"
  assert close(got, want), f"{objective}: planner {abs(got)}, optimum {abs(want)} ({where})"
  assert close(got_tie, want_tie), f"{objective} tie-break: planner {abs(got_tie)}, best {abs(want_tie)} ({where})"


@pytest.mark.parametrize("path", brute_scenarios(), ids=lambda p: p.stem)
def test_direct_split_matches_enumeration(path: Path):
  """The per-ring split shortcuts agree with enumerating every split, objective and tie-break: on the scenario's rings small enough
  to enumerate, and on every ring of shrunk copies of the scenario where the caps bind."""
  checked = 0
  for objective in ("latency", "throughput"):
    base = cluster_for(load(path), objective)
    for cluster in [base] + [base.shrunk(n_layers, max_cap) for n_layers, max_cap in ((3, 1), (5, 2), (8, 3), (10, 6))]:
      for ring in cluster.rings():
        if not cluster.few_splits(ring):
          continue
        enumerated = cluster.ring_best(ring, enumerate_splits=True)
        direct = cluster.ring_best(ring, enumerate_splits=False)
        assert (enumerated is None) == (direct is None), f"{ring} {objective}: {enumerated} vs {direct}"
        if enumerated is not None:
          (a, a_tie), (b, b_tie) = enumerated[0], direct[0]
          assert close(a, b, REL_TIE) and close(a_tie, b_tie, REL_TIE), f"{ring} {objective}: enumerated {enumerated}, direct {direct}"
          checked += 1
  assert checked > 0


@pytest.mark.parametrize("path", feasible_scenarios(), ids=lambda p: p.stem)
def test_flops_latency_at_least_as_good_as_memory_weighted(path: Path):
  scenario = load(path)
  cluster, objective = cluster_for(scenario), scenario["objective"]
  try:
    baseline = plan_for(scenario, "ring-memory-weighted")
  except ExoError:
    pytest.skip("ring-memory-weighted refuses this request")
  if cluster.plan_problems(baseline):
    pytest.skip(f"ring-memory-weighted's plan is infeasible: {cluster.plan_problems(baseline)[0]}")
  ours = cluster.evaluate(*zip(*plan_ring(plan_for(scenario))))
  theirs = cluster.evaluate(*zip(*plan_ring(baseline)))
  if objective == "latency":
    assert ours[0] <= theirs[0] * (1 + 1e-9), f"flops-latency TPOT {ours[0]} s, ring-memory-weighted {theirs[0]} s"
  else:
    assert ours[1] >= theirs[1] * (1 - 1e-9), f"flops-latency {ours[1]} tokens/s, ring-memory-weighted {theirs[1]}"
