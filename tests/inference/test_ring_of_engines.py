"""SmolLM2 split over 2 and 3 local nodes, on the uneven shards flops-latency chooses, gives exactly one node's greedy tokens.

Every node is a real Node with its own engine and gRPC server on loopback, found through a manual peers file; the declared devices
differ so the planner's throughput split is uneven. The reference is the same engine class holding all 30 layers alone.
"""

import asyncio
import json

import pytest

from exo.base.device_capabilities import DeviceCapabilities, DeviceFlops
from exo.base.models import model_spec
from exo.base.shard import Shard
from exo.inference.ggml_inference_engine import GGMLInferenceEngine
from exo.inference.mlx_inference_engine import MLXInferenceEngine
from exo.inference.tinygrad_inference_engine import TinygradInferenceEngine
from exo.networking.discovery import NoDiscovery
from exo.networking.grpc.grpc_peer_handle import peer_handles
from exo.networking.grpc.grpc_server import GRPCServer
from exo.networking.manual_discovery import ManualDiscovery
from exo.networking.ports import free_port
from exo.orchestration.node import Node
from exo.orchestration.planner_driver import PlannerConfig
from exo.topology.plan_request import PlanRequest
from tests.support.patience import HANG_S

MODEL = model_spec("smollm2-135m")
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
TOKENS = 12
WHOLE = Shard(MODEL.id, 0, MODEL.n_layers - 1, MODEL.n_layers)
QUESTIONS = [
  "What is the capital of France?",
  "Name a primary colour.",
  "How many legs does a spider have?",
  "Write a haiku about rain.",
  "What is 12 times 12?",
  "Who wrote Hamlet?",
  "Give me a synonym for happy.",
  "Why is the sky blue? Answer in one sentence.",
]
CHATS = [[{"role": "user", "content": question}] for question in QUESTIONS]  # CHATS[0] is MESSAGES
# Uneven devices, speeds 4:2:1: under the throughput objective every node takes layers in proportion to its speed.
DEVICES = {
  "fast": DeviceCapabilities("Test", "fast", 4096, DeviceFlops(2.0, 4.0, 8.0), 40.0),
  "mid": DeviceCapabilities("Test", "mid", 4096, DeviceFlops(1.0, 2.0, 4.0), 20.0),
  "slow": DeviceCapabilities("Test", "slow", 4096, DeviceFlops(0.5, 1.0, 2.0), 10.0),
}
THROUGHPUT = PlannerConfig(PlanRequest.of(objective="throughput"))
ENGINES = {"ggml": GGMLInferenceEngine, "tinygrad": TinygradInferenceEngine, "mlx": MLXInferenceEngine}


async def single_node_tokens(engine_class, chats: list[list[dict]]) -> list[list[int]]:
  """Each chat's tokens from one node holding every layer, asked one after another: each request alone on the node."""
  node = Node("solo", engine_class(), NoDiscovery(), DEVICES["fast"], MODEL, max_generate_tokens=TOKENS, request_timeout=HANG_S)
  node.server = GRPCServer(node, "127.0.0.1", free_port())
  await node.start()
  try:
    tokens = []
    for messages in chats:
      prompt = await node.engine.apply_chat_template(WHOLE, messages)
      tokens.append((await node.generate(prompt)).tokens)
    return tokens
  finally:
    await node.stop()


@pytest.fixture(scope="module")
def alone():
  """engine -> each of CHATS' tokens alone on one node (the reference of every test here), computed once per engine: one
  engine loads the model and captures its steps once for all of them."""
  computed: dict[str, list[list[int]]] = {}

  def tokens(engine: str) -> list[list[int]]:
    if engine not in computed:
      computed[engine] = asyncio.run(single_node_tokens(ENGINES[engine], CHATS))
    return computed[engine]

  return tokens


async def ring_tokens(engine_class, names: list[str], tmp_path, questions=(MESSAGES,), planner=THROUGHPUT):
  """Each chat's tokens, all sent at once to the first node of a ring over `names`, and the ring they ran on. `engine_class`:
  every node's, or a dict of each node's."""
  ports = {name: free_port() for name in names}
  peers = {"peers": {n: {"address": "127.0.0.1", "port": ports[n], "device_capabilities": DEVICES[n].to_dict()} for n in names}}
  peers_file = tmp_path / "peers.json"
  peers_file.write_text(json.dumps(peers))
  nodes = []
  for name in names:
    node = Node(
      name,
      (engine_class[name] if isinstance(engine_class, dict) else engine_class)(),
      ManualDiscovery(name, peers_file, peer_handles(name), poll_interval=0.2),
      DEVICES[name],
      MODEL,
      planner,
      TOKENS,
      HANG_S,
    )
    node.server = GRPCServer(node, "127.0.0.1", ports[name])
    nodes.append(node)
  try:
    await asyncio.gather(*(n.start(wait_for_peers=len(names) - 1) for n in nodes))
    origin = nodes[0]
    # The origin's topology was collected when it saw its peers, while a peer might not yet have seen the third node (no edge
    # between them yet: no 3-node ring); now that every node has seen every other, collect it again.
    await origin.cluster.refresh()
    prompts = [await origin.engine.apply_chat_template(WHOLE, messages) for messages in questions]
    generations = await asyncio.gather(*(origin.generate(prompt) for prompt in prompts))
    return [g.tokens for g in generations], generations[0].plan.ring()
  finally:
    for node in nodes:
      await node.stop()


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_split_over_two_and_three_nodes_equals_one_node(engine, tmp_path, alone):
  reference = alone(engine)[0]
  assert len(reference) >= 5
  for names in (["fast", "slow"], ["fast", "mid", "slow"]):
    [tokens], ring = asyncio.run(ring_tokens(ENGINES[engine], names, tmp_path))
    layers = dict(ring)
    assert sorted(layers) == sorted(names), ring
    assert len(set(layers.values())) > 1, ring  # and the split is uneven, as the devices are
    assert tokens == reference, (engine, ring)


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_eight_concurrent_requests_batched_get_the_tokens_each_gets_alone(engine, tmp_path, alone):
  """Eight requests at once on a 2-node ring, each stage batching them; on one node too for ggml (a stage that embeds and runs
  the head): the slower engines' single-stage batches are what their 2-node stages run, and their minutes go to the ring."""
  for names in (["fast"], ["fast", "slow"]) if engine == "ggml" else (["fast", "slow"],):
    planner = PlannerConfig(PlanRequest.of(strategy="ring-memory-weighted", batch=8))  # every node in the ring: 15 layers each
    together, ring = asyncio.run(ring_tokens(ENGINES[engine], names, tmp_path, CHATS, planner))
    assert len(ring) == len(names)
    assert together == alone(engine), (engine, ring)


@pytest.mark.slow
def test_a_ring_of_ggml_tinygrad_and_mlx_nodes_gives_one_nodes_tokens(tmp_path, alone):
  """Hidden states cross engines as float32: the ring's greedy tokens are those of one node (here the ggml one's: the engines
  round differently, and on this prompt ggml's 8-bit activations choose another first token than float32 products do)."""
  for engines in ({"fast": "ggml", "mid": "tinygrad", "slow": "mlx"}, {"fast": "tinygrad", "mid": "mlx", "slow": "ggml"}):
    [tokens], ring = asyncio.run(ring_tokens({n: ENGINES[e] for n, e in engines.items()}, ["fast", "mid", "slow"], tmp_path))
    assert len(ring) == 3, ring
    assert tokens == alone("ggml")[0], (engines, ring)
