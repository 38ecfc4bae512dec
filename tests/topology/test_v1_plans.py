"""Cost model v2 reduces to v1 (docs/DESIGN.md section 2): with no measured layer times, batch 1, no embedding or head and, under
the throughput objective, no KV cache, `make_plan` gives the plans the v1 planner gave.

tests/topology/v1_plans.json holds 77 random v1 inputs of 1 to 10 nodes (full and partial meshes, bandwidths on some links, four
model shapes) with the v1 planner's answer, recorded by running it (commit a1d6732) on them: the ring's shards and predicted
TPOT and throughput, or the first words of its error. Where v1 found no plan for a model with KV cache, v2.1 may plan a shorter
context, or explain at the shortest one why no ring holds the model: either way it must say why.
"""

import json
from pathlib import Path

import pytest

from exo.base.errors import ExoError
from exo.topology.planner import make_plan

CASES = json.loads((Path(__file__).parent / "v1_plans.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=[f"{i}-{c['objective']}-{len(c['topology']['nodes'])}nodes" for i, c in enumerate(CASES)])
def test_v1_inputs_get_the_v1_plans(case):
  want = case["v1"]
  try:
    plan = make_plan(case["topology"], case["model"], "flops-latency", case["objective"])
  except ExoError as e:
    assert "error" in want, f"v1 planned {want}, v2 raised {e}"
    shorter = case["model"].get("kv_bytes_per_layer", 0) > 0 and "512 tokens" in str(e)
    assert shorter or str(e).split(":")[0] == want["error"], f"v1 raised {want['error']!r}, v2 raised {e}"
    return
  if "error" in want:
    assert plan["context_tokens"] < 8192 and any("planned for" in w for w in plan["warnings"]), f"v1 raised {want['error']!r}, v2 planned {plan}"
    return
  assert [[s["node_id"], s["start_layer"], s["end_layer"]] for s in plan["shards"]] == want["shards"]
  assert plan["predicted"]["tpot_ms"] == pytest.approx(want["tpot_ms"], rel=1e-9)
  assert plan["predicted"]["throughput_tps"] == pytest.approx(want["throughput_tps"], rel=1e-9)
