"""A node measures its own engine: it publishes calibrated layer times at start (in its capabilities, its topology entry and its
announcements), starts without them when calibration fails, and refines them from real requests, so that a node whose engine
gets slower, which nothing declares, is given fewer layers after a few requests."""

import asyncio
import json
import logging

import pytest

from exo.base.device_capabilities import DeviceCapabilities, DeviceFlops
from exo.base.model_spec import ModelSpec
from exo.inference.dummy_inference_engine import HIDDEN_SIZE, DummyInferenceEngine
from exo.inference.engine_wrapper import EngineWrapper
from exo.inference.paced_inference_engine import PacedInferenceEngine
from exo.inference.slowed_engine import SlowedEngine
from exo.networking.discovery import NoDiscovery
from exo.networking.grpc.grpc_peer_handle import peer_handles
from exo.networking.grpc.grpc_server import GRPCServer
from exo.networking.manual_discovery import ManualDiscovery
from exo.networking.ports import free_port
from exo.orchestration.node import Node
from exo.orchestration.planner_driver import PlannerConfig
from exo.topology.cost_model import device_pacing
from exo.topology.plan_request import PlanRequest
from tests.cluster.harness import wait_for_local_mesh
from tests.support.no_server import NoServer

MODEL = ModelSpec("paced", n_layers=12, layer_bytes=1e6, layer_flops=2e6, activation_bytes=4 * HIDDEN_SIZE)
# Both nodes declare the same device: 9 MB holds 8 layers, so neither holds the model alone, and at 1 GB/s a layer takes 1 ms
# (asyncio sleeps last at least about a millisecond, so shorter paced steps would all take about as long).
DEVICE = DeviceCapabilities("Test", "paced", 9, DeviceFlops(0.5, 1.0, 2.0), 1.0)
PROMPT = "Which node is slow?"
MAX_REQUESTS = 10


class Announced(NoDiscovery):
  def __init__(self):
    self.announced = []

  def announce(self, capabilities):
    self.announced.append(capabilities)


def lone_node(engine) -> tuple[Node, Announced]:
  discovery = Announced()
  node = Node("solo", engine, discovery, DEVICE, MODEL, measure_layer_times=True)
  node.server = NoServer()
  return node, discovery


def test_a_measuring_node_publishes_its_calibrated_layer_times_at_start():
  node, discovery = lone_node(DummyInferenceEngine())
  asyncio.run(node.start())
  try:
    measured = node.capabilities.layer_times[MODEL.id]
    assert measured.decode_ms > 0
    assert node.topology.nodes["solo"].layer_times == {MODEL.id: measured}
    assert discovery.announced == [node.capabilities]
  finally:
    asyncio.run(node.stop())


def test_a_node_whose_calibration_fails_starts_and_publishes_nothing(caplog):
  class Broken(EngineWrapper):
    async def infer_tensor(self, request_id, shard, input_data, position=0):
      raise RuntimeError("no such device")

  node, discovery = lone_node(Broken(DummyInferenceEngine()))
  with caplog.at_level(logging.WARNING, logger="exo.orchestration"):
    asyncio.run(node.start())
  try:
    assert node.capabilities.layer_times == {} and discovery.announced == []
    assert any("could not measure the engine on paced" in r.getMessage() and "no such device" in r.getMessage() for r in caplog.records)
  finally:
    asyncio.run(node.stop())


def two_nodes(tmp_path) -> list[Node]:
  """a and b over gRPC on loopback, each engine the dummy paced to DEVICE; a's runs twice as long from the start, b's at full
  speed until the test slows it down."""
  ports = {"a": free_port(), "b": free_port()}
  peers = {"peers": {n: {"address": "127.0.0.1", "port": ports[n], "device_capabilities": DEVICE.to_dict()} for n in ports}}
  (tmp_path / "peers.json").write_text(json.dumps(peers))
  nodes = []
  for name, factor in (("a", 2.0), ("b", 1.0)):
    engine = SlowedEngine(PacedInferenceEngine(DummyInferenceEngine(eos_after=8), device_pacing(MODEL, DEVICE)), factor)
    discovery = ManualDiscovery(name, tmp_path / "peers.json", peer_handles(name), poll_interval=0.1)
    node = Node(
      name,
      engine,
      discovery,
      DEVICE,
      MODEL,
      PlannerConfig(PlanRequest.of("flops-latency", "latency")),
      refresh_interval=0.1,
      measure_layer_times=True,
    )
    node.server = GRPCServer(node, "127.0.0.1", ports[name])
    nodes.append(node)
  return nodes


async def layers_of_b_as_it_slows_down(tmp_path) -> tuple[int, list[int]]:
  a, b = two_nodes(tmp_path)
  await asyncio.gather(a.start(wait_for_peers=1), b.start(wait_for_peers=1))
  try:
    await wait_for_local_mesh([a, b])
    before = dict((await a.generate(PROMPT)).plan.ring())["b"]
    b.engine.factor = 5.0  # from now on b is 2.5 times slower than a, which nothing declares
    after = []
    while len(after) < MAX_REQUESTS and (not after or after[-1] >= before):
      after.append(dict((await a.generate(PROMPT)).plan.ring())["b"])
    return before, after
  finally:
    await b.stop()
    await a.stop()


def test_a_node_whose_engine_gets_slower_is_given_fewer_layers_after_a_few_requests(tmp_path):
  before, after = asyncio.run(layers_of_b_as_it_slows_down(tmp_path))
  assert before > MODEL.n_layers // 2  # b measured faster than a: it held most layers
  assert after[-1] < before, f"b kept {before} layers: {after}"


def test_a_node_told_to_ignore_layer_times_plans_from_the_roofline_and_still_measures():
  """The same measured node plans with its layer times, or from its declared device's roofline alone with ignore_layer_times."""
  node, _ = lone_node(DummyInferenceEngine())
  asyncio.run(node.start())
  try:
    measured = node.capabilities.layer_times[MODEL.id]
    node.cluster.publish(DEVICE.with_layer_times(MODEL.id, measured))
    small = ModelSpec("paced", n_layers=4, layer_bytes=1e6, layer_flops=2e6, activation_bytes=4 * HIDDEN_SIZE)  # fits alone
    # roofline of the declared device: 1e6 bytes at 1 GB/s = 1 ms a layer, 4 ms a token; measured: 4 x decode_ms
    assert node.plan(small).prediction.tpot_s == pytest.approx(measured.decode_ms * 4 / 1000)
    node.planner.config, node.planner.current_plan = PlannerConfig(ignore_layer_times=True), None
    assert node.plan(small).prediction.tpot_s == pytest.approx(4e-3)
    assert node.planning_topology().nodes["solo"].layer_times == {} and node.capabilities.layer_times == {MODEL.id: measured}
  finally:
    asyncio.run(node.stop())
