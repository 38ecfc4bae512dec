"""Liveness: the one place peers are health-checked. Fake handles answer checks as told; rounds are driven by hand."""

import asyncio

from exo.base.device_capabilities import UNKNOWN_DEVICE_CAPABILITIES
from exo.base.models import model_spec
from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.networking.discovery import NoDiscovery
from exo.networking.liveness import Liveness
from exo.networking.manual_discovery import ManualDiscovery
from exo.orchestration.node import Node
from tests.support.health_only_peer import HealthOnlyPeer


class CheckedPeer(HealthOnlyPeer):
  """Answers health checks with `healthy`, after `delay_s`; counts checks and disconnects."""

  def __init__(self, peer_id: str, healthy: bool = True, delay_s: float = 0.0):
    self._id, self.healthy, self.delay_s = peer_id, healthy, delay_s
    self.checks = self.disconnects = 0

  def id(self):
    return self._id

  def addr(self):
    return f"{self._id}:1"

  def device_capabilities(self):
    return UNKNOWN_DEVICE_CAPABILITIES

  async def disconnect(self):
    self.disconnects += 1

  async def health_check(self, timeout=2.0):
    self.checks += 1
    await asyncio.sleep(self.delay_s)
    return self.healthy


def ids(handles) -> list[str]:
  return [h.id() for h in handles]


def test_a_peer_is_listed_from_its_first_healthy_answer_and_each_answer_is_an_rtt_sample():
  async def main():
    live = Liveness(check_timeout=1.0, evict_after=30)
    slow, down = CheckedPeer("slow", delay_s=0.02), CheckedPeer("down", healthy=False)
    live.track("slow", slow)
    live.track("down", down)
    assert live.listed() == [] and live.rtt_ms("slow") is None
    assert await live.check() == {"down"}
    assert ids(live.listed()) == ["slow"]
    await live.check()
    assert len(live.peers["slow"].rtt.samples) == 2
    assert live.rtt_ms("slow") >= 20.0
    assert live.rtt_ms("down") is None and live.rtt_ms("nobody") is None

  asyncio.run(main())


def test_a_known_peer_is_kept_through_failures_shorter_than_the_timeout_and_evicted_after():
  async def main():
    live = Liveness(check_timeout=1.0, evict_after=3600)
    peer = CheckedPeer("b")
    live.track("b", peer)
    await live.check()
    peer.healthy = False
    for _ in range(3):
      await live.check()
    assert ids(live.listed()) == ["b"] and peer.disconnects == 0
    live.evict_after = 0.0
    await live.check()
    assert "b" not in live.peers and peer.disconnects == 1

  asyncio.run(main())


def test_a_peer_that_fails_a_check_after_a_request_failed_is_a_suspect_until_it_answers_again():
  async def main():
    live = Liveness(check_timeout=1.0, evict_after=3600)
    b, c = CheckedPeer("b"), CheckedPeer("c")
    live.track("b", b)
    live.track("c", c)
    await live.check()
    b.healthy = False
    assert await live.suspect_unless_healthy(["b", "c", "gone"]) == {"b", "gone"}
    assert ids(live.listed()) == ["c"]
    assert "b" in live.peers and b.disconnects == 0  # kept until evicted: it may come back
    await live.check()
    assert ids(live.listed()) == ["c"]  # still failing: still a suspect
    b.healthy = True
    await live.check()
    assert ids(live.listed()) == ["b", "c"]

  asyncio.run(main())


def test_a_check_that_ends_after_its_peer_was_replaced_leaves_the_new_handle_alone():
  async def main():
    live = Liveness(check_timeout=1.0, evict_after=0.0)
    old = CheckedPeer("b", healthy=False, delay_s=0.05)
    live.track("b", old)
    round_ = asyncio.create_task(live.check())
    await asyncio.sleep(0)
    live.forget("b", "moved")
    new = live.track("b", CheckedPeer("b"))
    await round_
    assert live.peers["b"] is new and not new.known

  asyncio.run(main())


def test_a_node_takes_rtt_from_discovery_and_does_not_check_its_peers_again(tmp_path):
  """Discovery's round is the only health check: refreshing the node's topology sends none, and its edge to each peer
  carries discovery's RTT estimate."""
  peers = {"b": CheckedPeer("b", delay_s=0.01), "c": CheckedPeer("c")}
  path = tmp_path / "peers.json"
  path.write_text('{"peers": {"b": {"address": "127.0.0.1", "port": 1}, "c": {"address": "127.0.0.1", "port": 2}}}')

  async def main():
    discovery = ManualDiscovery("a", str(path), lambda peer_id, addr, caps: peers[peer_id], poll_interval=3600)
    node = Node("a", DummyInferenceEngine(), discovery, UNKNOWN_DEVICE_CAPABILITIES, model_spec("llama-3.2-1b"))
    await discovery.start()
    try:
      await node.cluster.refresh(wait_for_peers=2)
      checks = {i: p.checks for i, p in peers.items()}
      for _ in range(3):
        await node.cluster.refresh(0)
      assert {i: p.checks for i, p in peers.items()} == checks == {"b": 1, "c": 1}
      assert node.topology.edges[("a", "b")].rtt_ms == discovery.rtt_ms("b") >= 10.0
      peers["b"].healthy = False
      assert await node.cluster.check(["a", "b", "c"]) == ["b"]
      assert sorted(node.peers) == ["c"] and "b" not in node.planning_topology().nodes
    finally:
      await discovery.stop()

  asyncio.run(main())


def test_a_discovery_without_liveness_checks_the_peers_it_lists():
  async def main():
    assert await NoDiscovery().check_now(["b"]) == {"b"}

  asyncio.run(main())
