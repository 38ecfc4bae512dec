"""A node asked for a second layer range while it serves a request keeps that request intact: every answer equals the answer the
request gets alone. Reproduces the triggers seen on real clusters, through real nodes and gRPC on loopback:
- a node joins during a request, so the next request runs on a new ring (another range on the node that was alone);
- an origin with another view of the cluster (another objective here) sends a SendPrompt for another range mid-request.
The first request is held at a chosen step (an event, not a sleep) until the second has finished, so the two always overlap.
"""

import asyncio
import json

import pytest

from exo.base.device_capabilities import DeviceCapabilities, DeviceFlops
from exo.base.models import model_spec
from exo.base.shard import Shard
from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.networking.grpc.grpc_peer_handle import peer_handles
from exo.networking.grpc.grpc_server import GRPCServer
from exo.networking.manual_discovery import ManualDiscovery
from exo.networking.ports import free_port
from exo.orchestration.node import Node
from exo.orchestration.planner_driver import PlannerConfig
from exo.orchestration.requests import RequestFailed
from exo.topology.plan_request import PlanRequest
from tests.support.greedy import greedy_tokens
from tests.support.patience import HANG_S

MODEL = model_spec("smollm2-135m")
WHOLE = Shard(MODEL.id, 0, MODEL.n_layers - 1, MODEL.n_layers)
TOKENS = 10
FAST = DeviceCapabilities("Test", "fast", 4096, DeviceFlops(2.0, 4.0, 8.0), 40.0)
SLOW = DeviceCapabilities("Test", "slow", 4096, DeviceFlops(1.0, 2.0, 4.0), 20.0)
QUESTIONS = ["What is the capital of France?", "Name a primary colour."]


def _engines():
  from exo.inference.mlx_inference_engine import MLXInferenceEngine
  from exo.inference.tinygrad_inference_engine import TinygradInferenceEngine

  return {"tinygrad": TinygradInferenceEngine, "mlx": MLXInferenceEngine}


ENGINES = [
  pytest.param("dummy", id="dummy"),
  pytest.param("tinygrad", id="tinygrad", marks=pytest.mark.slow),
  pytest.param("mlx", id="mlx", marks=pytest.mark.slow),
]


def make_engine(name: str):
  return DummyInferenceEngine(eos_after=1000) if name == "dummy" else _engines()[name]()


class Held:
  """Holds the first request node a runs before its `hold_at`-th step until `release` is set (at the node's stage scheduler,
  outside the engine, which keeps serving other requests meanwhile), and records the most shards a's engine held at once."""

  def __init__(self, inner, hold_at: int = 3):
    self.inner, self.hold_at = inner, hold_at
    self.first: str | None = None
    self.steps = 0
    self.holding, self.release = asyncio.Event(), asyncio.Event()
    self.most_resident = 0

  def attach(self, node: Node) -> None:
    run = node.scheduler.run

    async def held_run(shard, step, stages=1):
      self.first = self.first or step.request_id
      if step.request_id == self.first:
        self.steps += 1
        if self.steps == self.hold_at:
          self.holding.set()
          await self.release.wait()
      out = await run(shard, step, stages)
      self.most_resident = max(self.most_resident, len(self.inner.resident_shards()))
      return out

    node.scheduler.run = held_run


async def alone(engine_name: str, prompts: list[str]) -> list[list[int]]:
  engine = make_engine(engine_name)
  return [await greedy_tokens(engine, WHOLE, await engine.encode(WHOLE, p), TOKENS, f"alone-{i}") for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def alone_tokens():
  """(engine, prompts) -> their tokens alone, computed once: both scenarios compare with the same references."""
  computed: dict[tuple[str, tuple[str, ...]], list[list[int]]] = {}

  def tokens(engine_name: str, prompts: list[str]) -> list[list[int]]:
    key = (engine_name, tuple(prompts))
    if key not in computed:
      computed[key] = asyncio.run(alone(engine_name, prompts))
    return computed[key]

  return tokens


async def chat_prompts(engine_name: str) -> list[str]:
  engine = make_engine(engine_name)
  return [await engine.apply_chat_template(WHOLE, [{"role": "user", "content": q}]) for q in QUESTIONS]


class AskedDiscovery(ManualDiscovery):
  """Manual discovery that tells each time its node asks for the live peers (each of the node's topology refreshes does)."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.asked = asyncio.Event()

  async def discover_peers(self, wait_for_peers: int = 0):
    self.asked.set()
    return await super().discover_peers(wait_for_peers)


async def until_planned_with(node: Node, discovery: AskedDiscovery, peer_id: str) -> None:
  """Until `peer_id` is in the topology `node` plans on, checked again at each of its refreshes (bounded: only a hang fails it)."""
  while True:
    discovery.asked.clear()
    if peer_id in node.planning_topology().nodes:
      return
    await asyncio.wait_for(discovery.asked.wait(), HANG_S)


def two_nodes(engine_name: str, tmp_path, objectives: tuple[str, str]) -> tuple[Node, Node, Held, AskedDiscovery]:
  """Nodes a and b (a's engine held by the Held returned), and a's discovery."""
  ports = {"a": free_port(), "b": free_port()}
  devices = {"a": FAST, "b": SLOW}
  peers = {"peers": {n: {"address": "127.0.0.1", "port": ports[n], "device_capabilities": devices[n].to_dict()} for n in ports}}
  (tmp_path / "peers.json").write_text(json.dumps(peers))
  held = Held(make_engine(engine_name))
  nodes, discoveries = [], []
  for (name, objective), engine in zip(zip("ab", objectives), (held.inner, make_engine(engine_name))):
    discovery = AskedDiscovery(name, tmp_path / "peers.json", peer_handles(name), poll_interval=0.1)
    discoveries.append(discovery)
    node = Node(
      name, engine, discovery, devices[name], MODEL, PlannerConfig(PlanRequest.of(objective=objective)), TOKENS, HANG_S, refresh_interval=0.2
    )
    node.server = GRPCServer(node, "127.0.0.1", ports[name])
    nodes.append(node)
  held.attach(nodes[0])
  return nodes[0], nodes[1], held, discoveries[0]


async def node_joins_mid_request(engine_name: str, tmp_path):
  a, b, held, a_discovery = two_nodes(engine_name, tmp_path, ("throughput", "throughput"))
  prompts = await chat_prompts(engine_name)
  await a.start()
  try:
    first = asyncio.create_task(a.generate(prompts[0]))
    await held.holding.wait()
    await b.start(wait_for_peers=1)
    await until_planned_with(a, a_discovery, "b")  # a's next refresh sees b
    second = await a.generate(prompts[1])
    held.release.set()
    return prompts, await first, second, held
  finally:
    await b.stop()
    await a.stop()


async def other_view_mid_request(engine_name: str, tmp_path):
  a, b, held, _ = two_nodes(engine_name, tmp_path, ("latency", "throughput"))  # a keeps every layer; b splits over both
  prompts = await chat_prompts(engine_name)
  await asyncio.gather(a.start(wait_for_peers=1), b.start(wait_for_peers=1))
  try:
    first = asyncio.create_task(a.generate(prompts[0]))
    await held.holding.wait()
    second = await b.generate(prompts[1])
    held.release.set()
    return prompts, await first, second, held
  finally:
    await b.stop()
    await a.stop()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("scenario", [node_joins_mid_request, other_view_mid_request], ids=["node-joins", "other-view"])
def test_second_layout_leaves_running_requests_intact(engine, scenario, tmp_path, alone_tokens):
  prompts, first, second, held = asyncio.run(scenario(engine, tmp_path))
  assert first.plan.ring() == [("a", MODEL.n_layers)]
  assert len(second.plan.ring()) == 2 and dict(second.plan.ring())["a"] < MODEL.n_layers  # another range on node a
  assert held.most_resident == 2  # both layouts were resident while both requests ran
  assert [first.tokens, second.tokens] == alone_tokens(engine, prompts)


async def state_lost_mid_request(tmp_path) -> str:
  a, b, held, _ = two_nodes("dummy", tmp_path, ("latency", "throughput"))  # b's requests run on a ring through a
  await asyncio.gather(a.start(wait_for_peers=1), b.start(wait_for_peers=1))
  try:
    asked = asyncio.create_task(b.generate(QUESTIONS[0]))
    await held.holding.wait()
    await held.inner.finish_request(held.first)  # as if node a had restarted: its state for the request is gone
    held.release.set()
    with pytest.raises(RequestFailed) as failure:
      await asked
    return str(failure.value)
  finally:
    await b.stop()
    await a.stop()


def test_a_step_a_node_cannot_place_fails_the_request_at_its_origin(tmp_path):
  """Never a silent restart at position 0: the refusal travels back to the node that asked, which fails the request."""
  message = asyncio.run(state_lost_mid_request(tmp_path))
  assert "'a'" in message and "its state is gone" in message
