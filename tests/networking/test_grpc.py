"""Calls through a live gRPC server on loopback: what each side sends arrives whole, health checks, reconnection, and the
sender each call names."""

import asyncio
import time

import grpc
import numpy as np
import pytest

from exo.networking.grpc import node_service_pb2 as pb
from exo.networking.grpc import node_service_pb2_grpc as pb_grpc
from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
from exo.networking.grpc.grpc_server import GRPCServer
from exo.networking.ports import free_port
from exo.networking.request_context import RequestContext
from tests.support.grpc_node import (
  CAPS,
  CONTEXT,
  MEMBER,
  PLAN,
  SHARD,
  FakeNode,
  sample_topology,
  tensor_request,
  with_server,
)
from tests.support.patience import STALL_S

# Round trips through a live server.


def test_prompt_round_trip():
  async def test(node, server, peer):
    await peer.send_prompt(SHARD, "hello ring", CONTEXT)
    assert node.calls == [("prompt", SHARD, "hello ring", CONTEXT)]

  with_server(test)


@pytest.mark.parametrize(
  "array",
  [
    np.random.default_rng(0).standard_normal((1, 7, 4096), dtype=np.float32),
    np.array([[0, -1, 2**62, -(2**63)]], dtype=np.int64),
    np.zeros((1, 0, 8), dtype=np.float16),
  ],
  ids=["float32", "int64", "empty-float16"],
)
def test_tensor_round_trip_is_exact(array):
  async def test(node, server, peer):
    await peer.send_tensor(SHARD, array, CONTEXT)
    [(kind, shard, received, context)] = node.calls
    assert (kind, shard, context) == ("tensor", SHARD, CONTEXT)
    assert received.dtype == array.dtype and received.shape == array.shape and np.array_equal(received, array)

  with_server(test)


def test_a_batch_of_tensors_arrives_whole_and_in_order():
  contexts = [RequestContext(f"req-{i}", "studio", PLAN, 64, position=5 + i) for i in range(3)]
  arrays = [np.full((1, 1, 8), i, dtype=np.float32) for i in range(3)]

  async def test(node, server, peer):
    await peer.send_tensors([(SHARD, a, c) for a, c in zip(arrays, contexts)])
    assert [(kind, shard, context) for kind, shard, _, context in node.calls] == [("tensor", SHARD, c) for c in contexts]
    assert all(np.array_equal(received, a) for (_, _, received, _), a in zip(node.calls, arrays))

  with_server(test)


def test_a_batch_with_one_malformed_tensor_is_rejected_whole():
  async def test(node, server, peer):
    batch = pb.TensorBatch(tensors=[tensor_request(), tensor_request(shape=[2, 4]), tensor_request()])
    async with grpc.aio.insecure_channel(peer.addr()) as channel:
      with pytest.raises(grpc.aio.AioRpcError) as raised:
        await pb_grpc.NodeServiceStub(channel).SendTensors(batch, timeout=STALL_S, metadata=MEMBER)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs 32" in raised.value.details()
    assert node.calls == []  # nothing half-done: not even the well-formed first step was handed on

  with_server(test)


def test_result_and_opaque_status_round_trip():
  async def test(node, server, peer):
    await peer.send_result("req-1", [1, 2, 128009], True, error="node air ran out of memory")
    await peer.send_result("req-2", [], False)
    await peer.send_opaque_status("req-1", '{"type": "progress"}')
    assert node.calls == [
      ("result", "req-1", [1, 2, 128009], True, "node air ran out of memory"),
      ("result", "req-2", [], False, ""),
      ("status", "req-1", '{"type": "progress"}'),
    ]

  with_server(test)


def test_collect_topology_round_trip_keeps_absent_measurements_absent():
  async def test(node, server, peer):
    topology = await peer.collect_topology({"studio", "mini"}, 3)
    assert node.calls == [("topology", {"studio", "mini"}, 3)]
    assert topology == sample_topology()
    assert topology.edges[("air", "studio")].rtt_ms is None and topology.edges[("air", "studio")].bandwidth_mbps is None
    assert topology.edges[("air", "phone")].rtt_ms is None and topology.edges[("air", "phone")].bandwidth_mbps == 0.0

  with_server(test)


def test_health_check_answers_for_the_named_node_only():
  async def test(node, server, peer):
    assert await peer.health_check()
    node.healthy = False
    assert not await peer.health_check()
    impostor = GRPCPeerHandle("studio", peer.addr(), CAPS)
    assert not await impostor.health_check()
    await impostor.disconnect()

  with_server(test)


def test_disconnect_then_reconnect_lazily():
  async def test(node, server, peer):
    assert await peer.health_check()
    await peer.disconnect()
    await peer.send_opaque_status("", "{}")  # reconnects lazily
    assert repr(peer) == f"GRPCPeerHandle(id='air', address='127.0.0.1:{server.port}')"

  with_server(test)


def test_health_check_is_false_quickly_without_a_server_and_recovers_when_it_starts():
  async def main():
    port = free_port()
    peer = GRPCPeerHandle("air", f"127.0.0.1:{port}", CAPS)
    started = time.monotonic()
    assert not await peer.health_check(timeout=STALL_S)
    assert time.monotonic() - started < STALL_S / 2  # refused at once, not at the timeout
    server = GRPCServer(FakeNode(), "127.0.0.1", port)
    await server.start()
    try:
      try:  # the channel the failed check opened connects again by itself (after its reconnect backoff)
        await asyncio.wait_for(peer.channel.channel_ready(), STALL_S)
      except asyncio.TimeoutError:
        raise AssertionError("the handle did not reconnect to a server that came up") from None
      assert await peer.health_check(timeout=STALL_S)
    finally:
      await peer.disconnect()
      await server.stop()

  asyncio.run(main())


# Membership: only calls with the cluster's token reach the node, which learns who sent each.


def test_every_call_names_its_sender_to_the_node():
  async def test(node, server, peer):
    member = GRPCPeerHandle(node.id, peer.addr(), CAPS, sender_id="studio-ü")  # any UTF-8 id
    try:
      await member.send_prompt(SHARD, "hi", CONTEXT)
      await member.send_tensors([(SHARD, np.ones((1, 1, 8), dtype=np.float32), CONTEXT)] * 2)
      await member.send_result("req-1", [1], False)
      await member.send_opaque_status("req-1", "{}")
      await peer.send_opaque_status("req-1", "{}")  # a handle that names no sender (a tool)
    finally:
      await member.disconnect()
    assert node.senders == ["studio-ü"] * 5 + [""]

  with_server(test)
