"""The plan travels with the request: a ring node that would plan differently (another strategy and objective) still runs exactly
the layers the origin's plan gives it. Three nodes in this process, each with its own gRPC server on 127.0.0.1 and its own peers
file, wired as `exo` wires them, with a spy on each engine.

Devices (llama-3.2-1b, 16 layers): a: 800 MB (11 layers), 20 GB/s;  b: 540 MB (7 layers), 200 GB/s;  c: 400 MB (5 layers), 150 GB/s.
flops-latency (latency) fills the fastest nodes first: b 7, c 5, then a the last 4 (1.7 ms per layer on a saves more than the
extra hop costs): a 0-3 -> b 4-10 -> c 11-15. Node c runs ring-memory-weighted with the throughput objective: for the same
cluster it would plan a 0-6 -> b 7-11 -> c 12-15. (Wrong device figures in c's peers file would not make its view differ for
long: each node's own report of its device replaces them as soon as c collects the views.)
"""

import asyncio

from tests.cluster.harness import Cluster, Device, Spy, reference_tokens, wait_for_local_mesh

MODEL_ARGS = ("--run-model", "llama-3.2-1b")
PROMPT = "Follow the carried plan"
DEVICES = {"a": Device(800, 10, 20), "b": Device(540, 10, 200), "c": Device(400, 10, 150)}
CARRIED = [("a", 0, 3), ("b", 4, 10), ("c", 11, 15)]
C_WOULD_PLAN = [("a", 0, 6), ("b", 7, 11), ("c", 12, 15)]


def stages(plan) -> list[tuple[str, int, int]]:
  return [(node_id, shard.start_layer, shard.end_layer) for node_id, shard in plan.node_shards()]


def test_ring_nodes_follow_the_plan_carried_by_the_request(cluster: Cluster):
  for node_id, device in DEVICES.items():
    cluster.declare(node_id, device)
  calls: list = []

  async def scenario():
    a = cluster.local_node("a", *MODEL_ARGS)
    b = cluster.local_node("b", *MODEL_ARGS)
    c = cluster.local_node("c", *MODEL_ARGS, "--partitioning-strategy", "ring-memory-weighted", "--objective", "throughput")
    nodes = [a, b, c]
    for node in nodes:
      node.engine = Spy(node.engine, node.id, calls)
    try:
      await asyncio.gather(*(node.start(wait_for_peers=2) for node in nodes))
      await wait_for_local_mesh(nodes)
      # a and b, with the same planner settings, agree; c would plan differently
      assert stages(a.plan(a.model)) == stages(b.plan(b.model)) == CARRIED
      assert stages(c.plan(c.model)) == C_WOULD_PLAN

      expected = await reference_tokens(a.model, PROMPT, a.max_generate_tokens)
      from_a = await a.generate(PROMPT)
      ran = [call[1:] for call in calls if call[0] == from_a.request_id]
      assert stages(from_a.plan) == CARRIED
      assert set(ran) == set(CARRIED), f"stages run: {sorted(set(ran))}"
      assert ran[: len(CARRIED)] == CARRIED  # the prompt went round in the carried order
      assert from_a.tokens == expected

      from_c = await c.generate(PROMPT)
      assert stages(from_c.plan) == C_WOULD_PLAN
      assert set(call[1:] for call in calls if call[0] == from_c.request_id) == set(C_WOULD_PLAN)
      assert from_c.tokens == expected
    finally:
      for node in nodes:
        await node.stop()

  asyncio.run(scenario())
