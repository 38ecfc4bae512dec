"""Three `exo` node processes on 127.0.0.1 with manual discovery find each other, measure every link, agree on the plan, and
generate the same tokens whatever the strategy, the origin or the number of nodes.

Devices (llama-3.2-1b: 16 layers of 34.2e6 bytes plus 33.6e6 bytes of float32 KV cache; the first stage also holds the 147.75e6
byte embedding, the last the 147.76e6 byte head, which costs eta = 4.32 layers of time; capacity =
floor((memory MB * 2**20 * 0.9 - embedding or head) / 67.8e6)):
  a: 800 MB (11 layers, 8 at either end), 100 GB/s, 0.342 ms a layer;  b: 540 MB (7, 5 at an end), 200 GB/s, 0.171 ms, the
  fastest;  c: 400 MB (5, 3 at an end), 50 GB/s, 0.684 ms.
No two nodes hold the model (8 + 5 at the ends). Of the six ways to give the three nodes the ends, c first, a in the middle and b
last is fastest: b fills its 5 layers and runs the head (5 x 0.171 + 4.32 x 0.171 = 1.59 ms), a takes 10 (3.42 ms), c the one
left (0.68 ms), 5.70 ms of compute; the next best, a first, c in the middle, b last, gives c 3 layers: 6.38 ms. Ring c 0 -> a
1-10 -> b 11-15. Upstream's memory-weighted split ignores the ends: a 0-6, b 7-11, c 12-15.
"""

import json
import subprocess
import time

import pytest

from exo.topology.planner import make_plan
from tests.cluster.harness import CLIENT, EXO, ROOT, RUN_TIMEOUT_S, Cluster, Device, edge_rtts, error_lines, free_port, plan_line, ring_of

MODEL = "llama-3.2-1b"
PROMPT = "Pipeline parallel around a ring"
TRIO = {"a": Device(800, 10, 100), "b": Device(540, 10, 200), "c": Device(400, 10, 50)}
CLIENTS = ("x", "y", "z", "w", "v")
FLOPS_LATENCY_RING = [("c", 0, 0), ("a", 1, 10), ("b", 11, 15)]
MEMORY_WEIGHTED_RING = [("a", 0, 6), ("b", 7, 11), ("c", 12, 15)]


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
  cluster = Cluster(tmp_path_factory.mktemp("trio"))
  try:
    for node_id, device in TRIO.items():
      cluster.declare(node_id, device)
    for client in CLIENTS:
      cluster.declare(client, CLIENT)
    for node_id in TRIO:
      cluster.start(node_id)
    cluster.wait_for_mesh()
    yield cluster
  finally:
    cluster.close()


def run_ok(cluster: Cluster, client: str, *extra: str) -> tuple[str, dict]:
  """(generated text, plan) of a successful `exo run --show-plan` from `client`."""
  result = cluster.run(client, MODEL, PROMPT, "--show-plan", "--request-timeout", str(RUN_TIMEOUT_S), *extra, timeout=RUN_TIMEOUT_S)
  assert result.returncode == 0, f"exo run from {client} failed: {result.stderr}\n{cluster.logs()}"
  assert error_lines(result.stderr) == []
  return result.stdout, plan_line(result.stderr)


def test_nodes_find_each_other_and_measure_every_link(trio):
  for node_id in TRIO:
    view = trio.topology(node_id)  # the `exo topology --address` CLI
    assert set(TRIO) <= set(view["nodes"]), f"{node_id} sees {sorted(view['nodes'])}"
    for peer_id, device in TRIO.items():
      caps = view["nodes"][peer_id]
      assert (caps["memory"], caps["flops"]["fp16"], caps["memory_bandwidth"]) == (device.memory_mb, device.tflops, device.memory_bandwidth)
    rtts = edge_rtts(view)
    for u in TRIO:
      for v in TRIO:
        if u != v:
          assert rtts.get((u, v)) is not None and rtts[(u, v)] > 0, f"{node_id}'s view has no measured RTT on {u} -> {v}: {rtts}"


def test_two_origins_and_every_node_agree_on_the_plan(trio):
  text_x, plan_x = run_ok(trio, "x")
  text_y, plan_y = run_ok(trio, "y")
  assert ring_of(plan_x) == ring_of(plan_y) == FLOPS_LATENCY_RING
  assert text_x == text_y and text_x.strip()
  # what each node's own live view implies is the same plan
  for node_id in TRIO:
    assert ring_of(make_plan(trio.topology(node_id), MODEL)) == FLOPS_LATENCY_RING, f"{node_id}'s view plans differently"


def test_strategies_and_a_single_node_generate_identical_tokens(trio, tmp_path):
  flops_text, flops_plan = run_ok(trio, "z", "--partitioning-strategy", "flops-latency")
  weighted_text, weighted_plan = run_ok(trio, "w", "--partitioning-strategy", "ring-memory-weighted")
  assert ring_of(flops_plan) == FLOPS_LATENCY_RING
  assert ring_of(weighted_plan) == MEMORY_WEIGHTED_RING

  peers = tmp_path / "no-peers.json"
  peers.write_text(json.dumps({"peers": {}}))
  solo = [*EXO, "run", MODEL, "--prompt", PROMPT, "--node-id", "solo", "--node-host", "127.0.0.1", "--node-port", str(free_port())]
  solo += [
    "--discovery-module",
    "manual",
    "--discovery-config-path",
    str(peers),
    "--inference-engine",
    "dummy",
    *Device(2000, 10, 100).args(),
    "--show-plan",
  ]
  result = subprocess.run(solo, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
  assert result.returncode == 0, result.stderr
  assert ring_of(plan_line(result.stderr)) == [("solo", 0, 15)]
  assert flops_text == weighted_text == result.stdout and result.stdout.strip()


def test_the_same_origin_can_run_again(trio):
  """A second `exo run` under the same node id a few seconds after the first: the ring nodes still hold their channel to the
  first process, which has been failing to reconnect (and backing off) since it exited."""
  first, _ = run_ok(trio, "v")
  time.sleep(3.0)  # longer than gRPC's reconnect backoff cap (2 s): the channel is backing off when the second run starts
  second, _ = run_ok(trio, "v")
  assert first == second
