"""Manual discovery against fake peer handles: the peers file, followed as it changes, and the peers' health checks."""

import asyncio
import json
import logging
import re

import pytest

from exo.base.device_capabilities import UNKNOWN_DEVICE_CAPABILITIES, DeviceCapabilities
from exo.base.errors import ExoError
from exo.networking.manual_discovery import ManualDiscovery
from tests.support.fake_net import AIR, STUDIO, WAIT_S, FakeNet, addrs_are, ids, ids_are


def peer_entry(port: int, caps: DeviceCapabilities | None = None) -> dict:
  entry = {"address": "127.0.0.1", "port": port}
  if caps is not None:
    entry["device_capabilities"] = caps.to_dict()
  return entry


def write_peers(path, peers: dict) -> None:
  path.write_text(json.dumps({"peers": peers}))


def manual(path, net: FakeNet, node_id: str = "node1", discovery_timeout: float = 0.3) -> ManualDiscovery:
  return ManualDiscovery(node_id, str(path), net, discovery_timeout=discovery_timeout, poll_interval=0.05, health_check_timeout=0.1)


def test_manual_finds_the_peers_in_the_file_and_skips_itself(tmp_path):
  path, net = tmp_path / "peers.json", FakeNet()
  write_peers(path, {"node1": peer_entry(50051, STUDIO), "node2": peer_entry(50052, STUDIO), "node3": peer_entry(50053)})

  async def main():
    d = manual(path, net)
    await d.start()
    try:
      peers = await asyncio.wait_for(d.discover_peers(2), WAIT_S)
    finally:
      await d.stop()
    assert [(p.id(), p.addr(), p.device_capabilities()) for p in peers] == [
      ("node2", "127.0.0.1:50052", STUDIO),
      ("node3", "127.0.0.1:50053", UNKNOWN_DEVICE_CAPABILITIES),
    ]
    assert peers[0].device_capabilities().memory_bandwidth == 800.0
    assert net.made("node1") == []

  asyncio.run(main())


def test_manual_lists_a_peer_only_after_a_healthy_answer_and_waits_for_it(tmp_path):
  path, net = tmp_path / "peers.json", FakeNet()
  net.healthy["node2"] = False
  write_peers(path, {"node2": peer_entry(50052)})

  async def main():
    d = manual(path, net)
    await d.start()
    try:
      waiting = asyncio.create_task(d.discover_peers(1))
      await net.until(lambda: sum(h.checks for h in net.made("node2")) >= 3, "node2 was checked 3 times")
      assert not waiting.done()
      assert await ids(d) == []
      net.healthy["node2"] = True
      assert [p.id() for p in await asyncio.wait_for(waiting, WAIT_S)] == ["node2"]
      assert len(net.made("node2")) == 1  # one handle, reused across polls
    finally:
      await d.stop()

  asyncio.run(main())


def test_manual_keeps_a_peer_through_failed_checks_shorter_than_the_timeout(tmp_path):
  path, net = tmp_path / "peers.json", FakeNet()
  write_peers(path, {"node2": peer_entry(50052)})

  async def main():
    d = manual(path, net, discovery_timeout=WAIT_S)
    await d.start()
    try:
      [handle] = await asyncio.wait_for(d.discover_peers(1), WAIT_S)
      net.healthy["node2"], checks = False, handle.checks
      await net.until(lambda: handle.checks >= checks + 3, "3 more failed checks")
      assert await ids(d) == ["node2"]
      assert handle.disconnects == 0
    finally:
      await d.stop()

  asyncio.run(main())


def test_manual_evicts_a_peer_that_stops_answering(tmp_path):
  path, net = tmp_path / "peers.json", FakeNet()
  write_peers(path, {"node2": peer_entry(50052), "node3": peer_entry(50053)})

  async def main():
    d = manual(path, net)
    await d.start()
    try:
      peers = await asyncio.wait_for(d.discover_peers(2), WAIT_S)
      net.healthy["node2"] = False
      await net.until(lambda: ids_are(d, ["node3"]), "node2 is evicted")
      assert peers[0].disconnects == 1
      net.healthy["node2"] = True  # back, with a fresh handle
      await net.until(lambda: ids_are(d, ["node2", "node3"]), "node2 is back")
      assert len(net.made("node2")) == 2
    finally:
      await d.stop()

  asyncio.run(main())


def test_manual_follows_edits_to_the_file(tmp_path):
  path, net = tmp_path / "peers.json", FakeNet()
  write_peers(path, {"node2": peer_entry(50052)})

  async def main():
    d = manual(path, net)
    await d.start()
    try:
      [node2] = await asyncio.wait_for(d.discover_peers(1), WAIT_S)
      write_peers(path, {"node2": peer_entry(50052), "node3": peer_entry(50053, AIR)})
      await net.until(lambda: ids_are(d, ["node2", "node3"]), "node3 is added")
      write_peers(path, {"node3": peer_entry(50053, AIR)})
      await net.until(lambda: ids_are(d, ["node3"]), "node2 is dropped")
      assert node2.disconnects == 1
      write_peers(path, {"node3": peer_entry(60000, AIR)})
      await net.until(lambda: addrs_are(d, ["127.0.0.1:60000"]), "node3 moves")
      assert [h.addr() for h in net.made("node3")] == ["127.0.0.1:50053", "127.0.0.1:60000"]
      assert net.made("node3")[0].disconnects == 1
    finally:
      await d.stop()

  asyncio.run(main())


def test_manual_keeps_the_last_good_file_and_warns_once(tmp_path, caplog):
  path, net = tmp_path / "peers.json", FakeNet()
  write_peers(path, {"node2": peer_entry(50052)})

  async def main():
    d = manual(path, net, discovery_timeout=WAIT_S)
    await d.start()
    try:
      [node2] = await asyncio.wait_for(d.discover_peers(1), WAIT_S)
      with caplog.at_level(logging.WARNING, logger="exo.networking.manual_discovery"):
        path.write_text("{not json")
        checks = node2.checks
        await net.until(lambda: node2.checks >= checks + 5, "5 polls of the bad file")
        assert await ids(d) == ["node2"]
        path.unlink()
        checks = node2.checks
        await net.until(lambda: node2.checks >= checks + 5, "5 polls of the missing file")
        assert await ids(d) == ["node2"]
      warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
      assert len(warnings) == 2, warnings  # one per problem, not one per poll
      assert "not valid JSON" in warnings[0] and str(path) in warnings[0]
      assert "cannot read" in warnings[1] and str(path) in warnings[1]
      write_peers(path, {"node3": peer_entry(50053)})
      await net.until(lambda: ids_are(d, ["node3"]), "the fixed file is read")
    finally:
      await d.stop()

  asyncio.run(main())


@pytest.mark.parametrize(
  "content, problem",
  [
    (None, "cannot read peers file"),
    ("{", "not valid JSON"),
    ('["node2"]', "expected a JSON object"),
    ('{"nodes": {}}', "unknown key 'nodes'"),
    ('{"peers": {"node2": {"address": "127.0.0.1"}}}', "peers.node2.port must be an integer"),
    ('{"peers": {"node2": {"address": "127.0.0.1", "port": 70000}}}', "peers.node2.port must be an integer from 1 to 65535, got 70000"),
    ('{"peers": {"node2": {"address": "", "port": 1}}}', "peers.node2.address must be"),
    ('{"peers": {"node2": {"address": "h", "port": 1, "device_capabilities": {"memory": -1}}}}', "peers.node2.device_capabilities.memory"),
  ],
)
def test_manual_bad_file_at_start_is_a_one_line_error_naming_the_file(tmp_path, content, problem):
  path, net = tmp_path / "peers.json", FakeNet()
  if content is not None:
    path.write_text(content)
  with pytest.raises(ExoError, match=re.escape(problem)) as e:
    asyncio.run(manual(path, net).start())
  assert str(path) in str(e.value) and "\n" not in str(e.value)
  assert net.handles == []
