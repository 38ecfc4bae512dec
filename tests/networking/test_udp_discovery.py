"""UDP discovery against fake peer handles. UDP traffic stays on loopback: nodes bind 127.255.255.255 and broadcast there (on
Linux a socket bound to 127.0.0.1 hears no broadcasts), and the LAN defaults are never used."""

import asyncio
import json
import logging
import socket
import time
from collections import namedtuple

import pytest

from exo.base.device_capabilities import DeviceCapabilities, LayerTimes
from exo.base.errors import ExoError
from exo.networking import udp_discovery
from exo.networking.membership import ANNOUNCEMENT_MAX_AGE_S, Membership, cluster_membership
from exo.networking.udp_discovery import UDPDiscovery, parse_announcement
from tests.support.fake_net import AIR, STUDIO, WAIT_S, FakeNet, addrs_are, has_addr, ids, ids_are

LOOPBACK_BROADCAST = "127.255.255.255"
default_broadcast_addresses = udp_discovery.default_broadcast_addresses


def free_udp_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def udp(node_id: str, grpc_port: int, port: int, net: FakeNet, caps: DeviceCapabilities, discovery_timeout: float = 0.3, **kwargs) -> UDPDiscovery:
  """A node announcing every 0.05 s on loopback only; listen and broadcast port are both `port`."""
  kwargs = {"broadcast_addresses": [LOOPBACK_BROADCAST], "listen_host": LOOPBACK_BROADCAST, "health_check_timeout": 0.1, **kwargs}
  return UDPDiscovery(node_id, grpc_port, port, port, net, caps, broadcast_interval=0.05, discovery_timeout=discovery_timeout, **kwargs)


def sealed(message: dict, now: float | None = None) -> bytes:
  """An announcement as a node of the suite's cluster sends it (stamped `now`, default the current time)."""
  return cluster_membership().seal(message, now)


def send(port: int, *packets: bytes) -> None:
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    for packet in packets:
      s.sendto(packet, (LOOPBACK_BROADCAST, port))


def test_udp_nodes_on_loopback_find_each_other_with_their_capabilities():
  port, net = free_udp_port(), FakeNet()

  async def main():
    a, b = udp("a", 50061, port, net, STUDIO), udp("b", 50062, port, net, AIR)
    await a.start()
    await b.start()
    try:
      [b_seen_by_a] = await asyncio.wait_for(a.discover_peers(1), WAIT_S)
      [a_seen_by_b] = await asyncio.wait_for(b.discover_peers(1), WAIT_S)
    finally:
      await a.stop()
      await b.stop()
    assert (b_seen_by_a.id(), b_seen_by_a.addr(), b_seen_by_a.device_capabilities()) == ("b", "127.0.0.1:50062", AIR)
    assert (a_seen_by_b.id(), a_seen_by_b.addr(), a_seen_by_b.device_capabilities()) == ("a", "127.0.0.1:50061", STUDIO)
    assert a_seen_by_b.device_capabilities().memory_bandwidth == 800.0
    assert len(net.made("a")) == len(net.made("b")) == 1  # one handle each, reused across announcements

  asyncio.run(main())


def test_udp_ignores_malformed_packets(caplog):
  port, net = free_udp_port(), FakeNet()
  good = {"type": "discovery", "node_id": "x", "grpc_port": 1, "device_capabilities": AIR.to_dict(), "priority": 1}
  bad = [
    b"\xff\xfe not utf-8",
    b"{truncated",
    b"[1, 2]",
    b"[" * 5000,
    sealed({**good, "type": "other"}),
    sealed({**good, "node_id": ""}),
    sealed({**good, "grpc_port": "50052"}),
    sealed({**good, "grpc_port": 0}),
    sealed({**good, "device_capabilities": {"memory": "lots"}}),
    sealed({**good, "device_capabilities": [1]}),
  ]

  async def main():
    a = udp("a", 50061, port, net, STUDIO)
    await a.start()
    try:
      with caplog.at_level(logging.DEBUG, logger="exo.networking.udp_discovery"), net.hearing("exo.networking.udp_discovery"):
        send(port, *bad)
        await net.until(lambda: sum("malformed" in r.getMessage() for r in caplog.records) >= len(bad), "every bad packet is logged")
      b = udp("b", 50062, port, net, AIR)
      await b.start()
      try:
        assert [p.id() for p in await asyncio.wait_for(a.discover_peers(1), WAIT_S)] == ["b"]
      finally:
        await b.stop()
    finally:
      await a.stop()
    assert net.made("x") == []

  asyncio.run(main())


def test_udp_keeps_a_silent_healthy_peer_and_evicts_it_once_unhealthy():
  port, net = free_udp_port(), FakeNet()

  async def main():
    a, b = udp("a", 50061, port, net, STUDIO), udp("b", 50062, port, net, AIR)
    await a.start()
    await b.start()
    try:
      [handle] = await asyncio.wait_for(a.discover_peers(1), WAIT_S)
      await b.stop()  # no more announcements, but its server still answers
      checks = handle.checks
      await net.until(lambda: handle.checks >= checks + 10, "10 more health checks")  # over 0.5 s > discovery_timeout
      assert await ids(a) == ["b"]
      net.healthy["b"] = False
      await net.until(lambda: ids_are(a, []), "b is evicted")
      assert handle.disconnects == 1
    finally:
      await a.stop()
      await b.stop()

  asyncio.run(main())


def test_udp_uses_the_advertised_host_and_keeps_a_working_address():
  port, net = free_udp_port(), FakeNet()
  announce = {"type": "discovery", "node_id": "b", "grpc_port": 50062, "device_capabilities": AIR.to_dict(), "priority": 1}

  async def main():
    a = udp("a", 50061, port, net, STUDIO, discovery_timeout=WAIT_S)
    await a.start()
    try:
      send(port, sealed({**announce, "advertised_host": "10.0.0.2"}))
      [handle] = await asyncio.wait_for(a.discover_peers(1), WAIT_S)
      assert handle.addr() == "10.0.0.2:50062"
      # the same node reached on another interface, at the same priority: keep the address that works
      # then a marker node's announcement, from the same socket: once the marker is seen, the two before it were handled
      marker = {**announce, "node_id": "m", "advertised_host": "10.0.0.9"}
      send(port, sealed({**announce, "advertised_host": "10.0.0.3"}), sealed(announce), sealed(marker))
      await net.until(lambda: has_addr(a, "10.0.0.9:50062"), "the marker announcement is handled")
      assert [p.addr() for p in await a.discover_peers() if p.id() == "b"] == ["10.0.0.2:50062"]
      # once that address fails its health check, the next announcement's address replaces it
      net.healthy["10.0.0.2:50062"] = False
      checks = handle.checks
      await net.until(lambda: handle.checks >= checks + 2, "a failed check, applied")  # the 2nd starts after the 1st's result
      send(port, sealed({**announce, "advertised_host": "10.0.0.3"}))
      await net.until(lambda: addrs_are(a, ["10.0.0.3:50062", "10.0.0.9:50062"]), "b moves to 10.0.0.3 (m stays)")
      assert handle.disconnects == 1
    finally:
      await a.stop()

  asyncio.run(main())


def test_udp_ignores_announcements_not_sealed_with_the_clusters_secret_and_logs_them_once(caplog):
  port, net = free_udp_port(), FakeNet()
  announce = {"type": "discovery", "device_capabilities": AIR.to_dict(), "priority": 1, "grpc_port": 50062}
  tampered = json.loads(sealed({**announce, "node_id": "tampered"}))
  tampered["grpc_port"] = 50099  # changed after sealing: the hmac no longer matches
  stranger = Membership("a-secret-of-another-cluster", "test")
  refused = [
    json.dumps({**announce, "node_id": "unsigned"}).encode(),
    json.dumps({**announce, "node_id": "unsigned", "timestamp": time.time(), "hmac": "0" * 64}).encode(),
    stranger.seal({**announce, "node_id": "stranger"}),
    json.dumps(tampered).encode(),
  ]

  async def main():
    a = udp("a", 50061, port, net, STUDIO, discovery_timeout=WAIT_S)
    await a.start()
    try:
      with caplog.at_level(logging.DEBUG, logger="exo.networking.udp_discovery"):
        send(port, *refused, sealed({**announce, "node_id": "marker"}))  # from one socket, in order: the marker comes last
        await net.until(lambda: has_addr(a, "127.0.0.1:50062"), "the marker announcement is handled")
    finally:
      await a.stop()
    assert [h.id() for h in net.handles] == ["marker"]  # no handle made, no health check sent, for the others
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "ignoring discovery announcements from 127.0.0.1" in warnings[0], warnings  # one a minute per sender

  asyncio.run(main())


def test_udp_ignores_a_replayed_or_stale_announcement():
  port, net = free_udp_port(), FakeNet()
  announce = {"type": "discovery", "node_id": "b", "grpc_port": 50062, "device_capabilities": AIR.to_dict(), "priority": 1}
  now = time.time()

  async def main():
    a = udp("a", 50061, port, net, STUDIO, discovery_timeout=WAIT_S)
    await a.start()
    try:
      send(port, sealed({**announce, "advertised_host": "10.0.0.2"}, now))
      [handle] = await asyncio.wait_for(a.discover_peers(1), WAIT_S)
      net.healthy["10.0.0.2:50062"] = False  # now a newer announcement's address would replace it (see the test above)
      checks = handle.checks
      await net.until(lambda: handle.checks >= checks + 2, "a failed check, applied")
      # an older announcement of b (a copy replayed from elsewhere), one stamped beyond the allowed age, then a marker
      old = sealed({**announce, "advertised_host": "10.0.0.3"}, now - 1)
      stale = sealed({**announce, "advertised_host": "10.0.0.4"}, time.time() + 2 * ANNOUNCEMENT_MAX_AGE_S)
      send(port, old, stale, sealed({**announce, "node_id": "m", "advertised_host": "10.0.0.9"}))
      await net.until(lambda: has_addr(a, "10.0.0.9:50062"), "the marker announcement is handled")
      assert [h.addr() for h in net.made("b")] == ["10.0.0.2:50062"]
      send(port, sealed({**announce, "advertised_host": "10.0.0.3"}, now + 1))  # a newer one does move it
      await net.until(lambda: [h.addr() for h in net.made("b")] == ["10.0.0.2:50062", "10.0.0.3:50062"], "b moves to 10.0.0.3")
    finally:
      await a.stop()

  asyncio.run(main())


def test_parse_announcement_round_trips_an_announcement():
  d = udp("a", 50061, 1, FakeNet(), STUDIO, advertised_host="studio.local")
  ann = parse_announcement(json.dumps(d.announcement()).encode())
  assert ann == udp_discovery.Announcement("a", 50061, STUDIO, 1, "studio.local")
  assert d.announcement()["device_capabilities"]["memory_bandwidth"] == 800.0
  # upstream's announcement: no memory_bandwidth, extra fields of later versions are ignored
  upstream = {
    "type": "discovery",
    "node_id": "u",
    "grpc_port": 5,
    "device_capabilities": {"model": "m", "chip": "c", "memory": 8.0},
    "interface_type": "wifi",
  }
  assert parse_announcement(json.dumps(upstream).encode()).device_capabilities == DeviceCapabilities("m", "c", 8.0)


def test_announcements_carry_the_layer_times_last_announced():
  d = udp("a", 50061, 1, FakeNet(), STUDIO)
  measured = STUDIO.with_layer_times("smollm2-135m", LayerTimes(1.6, 0.85))
  d.announce(measured)
  assert d.announcement()["device_capabilities"]["layer_times"] == {"smollm2-135m": {"decode_ms": 1.6, "token_ms": 0.85}}
  assert parse_announcement(json.dumps(d.announcement()).encode()).device_capabilities == measured
  bad = {**d.announcement(), "device_capabilities": {**measured.to_dict(), "layer_times": {"m": {"decode_ms": 0, "token_ms": 1}}}}
  with pytest.raises(ExoError, match="decode_ms must be > 0"):
    parse_announcement(json.dumps(bad).encode())


def test_udp_peer_with_new_layer_times_keeps_its_handle_and_connection():
  port, net = free_udp_port(), FakeNet()

  async def main():
    a, b = udp("a", 50061, port, net, STUDIO), udp("b", 50062, port, net, AIR)
    await a.start()
    await b.start()
    try:
      [handle] = await asyncio.wait_for(a.discover_peers(1), WAIT_S)
      for decode_ms in (1.0, 2.0):
        measured = AIR.with_layer_times("smollm2-135m", LayerTimes(decode_ms, 0.5))
        b.announce(measured)
        await net.until(lambda m=measured: a._announced["b"].caps == m, f"a hears b's layer times of {decode_ms} ms")
      assert await a.discover_peers() == [handle] and handle.disconnects == 0 and net.made("b") == [handle]
    finally:
      await a.stop()
      await b.stop()

  asyncio.run(main())


Addr = namedtuple("Addr", "family address netmask broadcast ptp")


def test_default_broadcast_addresses_reads_the_interfaces(monkeypatch):
  fake = {
    "lo": [Addr(socket.AF_INET, "127.0.0.1", "255.0.0.0", None, None)],
    "eth0": [Addr(socket.AF_INET, "192.168.1.12", "255.255.255.0", "192.168.1.255", None), Addr(socket.AF_INET6, "fe80::1", None, None, None)],
    "wlan0": [Addr(socket.AF_INET, "10.1.2.3", "255.255.0.0", None, None)],
    "tun0": [Addr(socket.AF_INET, "10.8.0.2", "255.255.255.255", None, "10.8.0.1")],
  }
  monkeypatch.setattr(udp_discovery.psutil, "net_if_addrs", lambda: fake)
  assert default_broadcast_addresses() == ["10.1.255.255", "192.168.1.255"]
