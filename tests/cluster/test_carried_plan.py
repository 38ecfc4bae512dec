"""The plan travels with the request: a ring node that would plan differently (another strategy and objective) still runs exactly
the layers the origin's plan gives it. Three nodes in this process, each with its own gRPC server on 127.0.0.1 and its own peers
file, wired as `exo` wires them, with a spy on each engine.

Devices (llama-3.2-1b, 16 layers; the first stage also holds the embedding, the last the head, which costs 4.32 layers of time):
a: 800 MB (11 layers, 8 at an end), 20 GB/s, 1.71 ms a layer;  b: 540 MB (7, 5 at an end), 200 GB/s, 0.171 ms;  c: 400 MB (5, 3 at
an end), 150 GB/s, 0.228 ms. No two nodes hold the model. flops-latency (latency) puts the slow a first and fills the fast ones:
b last with 5 layers and the head (1.59 ms), c in the middle with 5 (1.14 ms), a the 6 left (10.26 ms): 12.99 ms of compute,
against 13.13 ms with b in the middle (7 layers) and c last: a 0-5 -> c 6-10 -> b 11-15. Node c runs ring-memory-weighted with the throughput objective: for the same
cluster it would plan a 0-6 -> b 7-11 -> c 12-15. (Wrong device figures in c's peers file would not make its view differ for
long: each node's own report of its device replaces them as soon as c collects the views.)
"""

import asyncio

from tests.cluster.harness import Cluster, Device, Spy, reference_tokens, wait_for_local_mesh

MODEL_ARGS = ("--run-model", "llama-3.2-1b")
PROMPT = "Follow the carried plan"
DEVICES = {"a": Device(800, 10, 20), "b": Device(540, 10, 200), "c": Device(400, 10, 150)}
CARRIED = [("a", 0, 5), ("c", 6, 10), ("b", 11, 15)]
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

      expected = await reference_tokens(a.model, PROMPT, a.origin.max_generate_tokens)
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
