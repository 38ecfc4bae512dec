"""The topology a node reports (`exo topology`, the API's /v1/topology) holds this node and its live peers only: a node that left
is dropped even while another peer still lists it (until its own discovery timeout), as planning leaves it out."""

import asyncio

from exo.base.device_capabilities import DeviceCapabilities, DeviceFlops
from exo.base.models import model_spec
from exo.base.topology import Topology
from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.networking.discovery import NoDiscovery
from exo.orchestration.node import Node

DEVICE = DeviceCapabilities("Test Box", "Test Chip", 16384.0, DeviceFlops(10.0, 20.0, 40.0), 200.0)
PEER_DEVICE = DeviceCapabilities("Peer Box", "Peer Chip", 8192.0, DeviceFlops(5.0, 10.0, 20.0), 100.0)


class ViewPeer:
  """A peer whose own view still lists `gone`, a node that left."""

  def __init__(self, peer_id: str):
    self.peer_id = peer_id

  def id(self) -> str:
    return self.peer_id

  def device_capabilities(self) -> DeviceCapabilities:
    return PEER_DEVICE

  async def collect_topology(self, visited: set[str], max_depth: int) -> Topology:
    view = Topology()
    for node_id, caps in (("me", DEVICE), (self.peer_id, PEER_DEVICE), ("gone", DeviceCapabilities())):
      view.update_node(node_id, caps)
    view.add_edge(self.peer_id, "me", 2.0)
    view.add_edge(self.peer_id, "gone", 3.0)
    return view


def test_a_node_that_left_is_not_in_the_reported_topology():
  node = Node("me", DummyInferenceEngine(), NoDiscovery(), DEVICE, model_spec("llama-3.2-1b"))
  node.peers = {"peer": ViewPeer("peer")}
  topology = asyncio.run(node.collect_topology({"me"}, max_depth=1))
  assert set(topology.nodes) == {"me", "peer"} and topology.nodes["peer"] == PEER_DEVICE
  assert set(topology.edges) == {("me", "peer"), ("peer", "me")}
