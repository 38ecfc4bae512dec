"""Injected link latency: node c sits behind a slow link (LatencyProxy processes add 20 ms each way on a - c and b - c; each
node's own peers file routes that link through a proxy). The nodes measure it, and the planners react to it.

Devices (llama-3.2-1b, 16 layers; per-layer decode time = 34.2 MB / bandwidth):
  a: 1340 MB (18 layers), 50 GB/s (0.684 ms/layer);  b: 540 MB (7 layers), 50 GB/s;  c: 670 MB (9 layers), 400 GB/s (0.086 ms/layer).
a holds the model alone: 10.9 ms per token. With c on a loopback link, a 0-6 -> c 7-15 costs 4.8 + 0.8 ms plus one round trip
(about 2 ms): faster, so flops-latency would use c. Behind a 40 ms round trip it is not: flops-latency runs on a alone. Upstream's
memory-weighted split ignores the link and gives c 4 layers.

The measured RTT includes the measurement's own cost: on a 2-core machine a gRPC health check over loopback takes 1-2 ms and a
proxy adds about 1 ms (two timer wake-ups), so the slow links read about 3 ms above the injected 40 ms; on a busy machine more.
So the test bounds what cannot depend on load: a slow link never reads below its injected delay, every loopback link reads
below every slow one, and the planner keeps c out.
"""

import time

from exo.topology.planner import make_plan
from tests.cluster.harness import CLIENT, RUN_TIMEOUT_S, Device, edge_rtts, error_lines, plan_line, ring_of

MODEL = "llama-3.2-1b"
PROMPT = "Far away"
DEVICES = {"a": Device(1340, 10, 50), "b": Device(540, 10, 50), "c": Device(670, 10, 400)}
INJECTED_RTT_MS = 40.0
LOOPBACK_RTT_MS = 2.0  # a gRPC health check's round trip over loopback on an idle 2-core machine
SLOW = {("a", "c"), ("c", "a"), ("b", "c"), ("c", "b")}
SETTLE_S = 120.0  # only a hang: RTT medians (of the last five samples, one a second) settle within seconds of the mesh forming


def separated(rtts: dict) -> bool:
  """Every link between the nodes measured; the slow ones at least their injected delay; every other one below all slow ones."""
  links = {(u, v): rtts.get((u, v)) for u in DEVICES for v in DEVICES if u != v}
  if any(rtt is None for rtt in links.values()):
    return False
  slow = [rtt for link, rtt in links.items() if link in SLOW]
  fast = [rtt for link, rtt in links.items() if link not in SLOW]
  return min(slow) >= INJECTED_RTT_MS - 0.5 and max(fast) < min(slow)


def test_measured_rtt_matches_the_injected_delay_and_flops_latency_drops_the_far_node(cluster):
  for node_id, device in DEVICES.items():
    cluster.declare(node_id, device)
  for client in ("x", "y"):
    cluster.declare(client, CLIENT)
  cluster.delay("a", "c", INJECTED_RTT_MS)
  cluster.delay("b", "c", INJECTED_RTT_MS)
  for node_id in DEVICES:
    cluster.start(node_id)
  cluster.wait_for_mesh()

  # a's view holds every node's own measurements; the medians move once a second, so wait for them to settle
  deadline = time.monotonic() + SETTLE_S
  while True:
    view = cluster.topology("a")  # the `exo topology --address` CLI
    if separated(edge_rtts(view)) or time.monotonic() > deadline:
      break
    time.sleep(0.5)
  rtts = edge_rtts(view)
  assert separated(rtts), f"measured RTTs {rtts}, {INJECTED_RTT_MS} ms injected on {sorted(SLOW)}"

  run = ("--show-plan", "--max-generate-tokens", "8", "--request-timeout", str(RUN_TIMEOUT_S))
  fast = cluster.run("x", MODEL, PROMPT, *run)
  weighted = cluster.run("y", MODEL, PROMPT, *run, "--partitioning-strategy", "ring-memory-weighted")
  for result in (fast, weighted):
    assert result.returncode == 0 and error_lines(result.stderr) == [], f"{result.stderr}\n{cluster.logs()}"
  assert ring_of(plan_line(fast.stderr)) == [("a", 0, 15)]
  assert ring_of(plan_line(weighted.stderr)) == [("a", 0, 7), ("c", 8, 11), ("b", 12, 15)]
  assert fast.stdout == weighted.stdout and fast.stdout.strip()

  # the same live view with c's links at a loopback round trip: flops-latency would use c, so the measured latency is what keeps
  # it out (a fixed figure: a loopback link measured on a busy machine may read several times its idle RTT)
  for edge in view["edges"]:
    if (edge["from"], edge["to"]) in SLOW:
      edge["rtt_ms"] = LOOPBACK_RTT_MS
  assert "c" in [node_id for node_id, _, _ in ring_of(make_plan(view, MODEL))], f"measured RTTs {rtts}"
