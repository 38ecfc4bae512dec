"""A gRPC server under bad calls: the caller gets a gRPC status naming the problem, nothing reaches the node, the server stays up
and logs the refusal."""

import logging

import grpc
import numpy as np
import pytest

from exo.base.shard import Shard
from exo.networking.grpc import conversions as conv
from exo.networking.grpc import node_service_pb2 as pb
from exo.networking.grpc import node_service_pb2_grpc as pb_grpc
from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
from exo.networking.grpc.grpc_server import GRPCServer
from exo.networking.membership import TOKEN_METADATA, Membership
from exo.networking.peer_handle import Refused
from exo.networking.request_context import RingPlan, RingStage
from tests.support.grpc_node import CAPS, CONTEXT, MEMBER, SHARD, FakeNode, prompt_request, tensor_request, with_server
from tests.support.patience import STALL_S

# Failures: the caller gets a gRPC status, the server stays up.


@pytest.mark.parametrize("client_mb", [1, 256], ids=["both-ends-1MiB", "server-only-1MiB"])
def test_oversized_tensor_is_resource_exhausted_and_server_survives(client_mb):
  async def test(node, server, peer):
    too_big = np.zeros(2**21 // 4, dtype=np.float32)  # 2 MiB
    with pytest.raises(Refused) as raised:
      await peer.send_tensor(SHARD, too_big, CONTEXT)
    assert raised.value.__cause__.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and str(raised.value).startswith("RESOURCE_EXHAUSTED: ")
    assert node.calls == []
    assert await peer.health_check()
    await peer.send_tensor(SHARD, too_big[:1000], CONTEXT)
    assert len(node.calls) == 1

  with_server(test, server_mb=1, client_mb=client_mb)


MALFORMED = {
  "wrong-byte-length": ("SendTensor", tensor_request(shape=[2, 4]), "24 bytes but shape [2, 4] of float32 needs 32"),
  "unknown-dtype": ("SendTensor", tensor_request(dtype="complex64"), "dtype 'complex64'"),
  "negative-dimension": ("SendTensor", tensor_request(shape=[-2, -3]), "negative dimension"),
  "plan-not-contiguous": ("SendPrompt", prompt_request(plan=RingPlan("m", 32, (RingStage("a", 0, 9), RingStage("b", 12, 31)))), "not contiguous"),
  "shard-end-past-model": ("SendPrompt", prompt_request(shard=Shard("llama-3.1-8b", 20, 32, 32)), "end_layer 32 must be below n_layers 32"),
  "empty-request-id": ("SendPrompt", prompt_request(request_id=""), "empty request_id"),
  "zero-max-tokens": ("SendPrompt", prompt_request(max_tokens=0), "max_tokens 0"),
  "negative-position": ("SendPrompt", prompt_request(position=-1), "position -1"),
  "missing-shard": ("SendPrompt", pb.PromptRequest(prompt="hi", context=conv.context_to_proto(CONTEXT)), "empty model_id"),
}


@pytest.mark.parametrize("rpc, request_msg, problem", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_request_is_invalid_argument_and_server_survives(rpc, request_msg, problem, caplog):
  async def test(node, server, peer):
    async with grpc.aio.insecure_channel(peer.addr()) as channel:
      with pytest.raises(grpc.aio.AioRpcError) as raised:
        await getattr(pb_grpc.NodeServiceStub(channel), rpc)(request_msg, timeout=STALL_S, metadata=MEMBER)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in raised.value.details()
    assert node.calls == [] and await peer.health_check()

  with caplog.at_level(logging.WARNING, logger="exo.networking.grpc.grpc_server"):
    with_server(test)
  assert any(r.levelno == logging.WARNING and problem in r.getMessage() for r in caplog.records)


def every_rpc() -> list[tuple[str, object]]:
  return [
    ("SendPrompt", prompt_request()),
    ("SendTensor", tensor_request()),
    ("SendTensors", pb.TensorBatch(tensors=[tensor_request()])),
    ("SendResult", pb.SendResultRequest(request_id="req-1", tokens=[1], is_finished=True)),
    ("SendOpaqueStatus", pb.SendOpaqueStatusRequest(request_id="req-1", status='{"type": "finish"}')),
    ("CollectTopology", pb.CollectTopologyRequest(max_depth=1)),
    ("HealthCheck", pb.HealthCheckRequest()),
  ]


def test_a_call_without_the_clusters_token_is_unauthenticated_reaches_nothing_and_is_logged_once(caplog):
  another_cluster = Membership("the-secret-of-another-cluster", "test")
  metadata = [(), ((TOKEN_METADATA, another_cluster.token()),), ((TOKEN_METADATA, "not a token"),)]

  async def test(node, server, peer):
    async with grpc.aio.insecure_channel(peer.addr()) as channel:
      stub = pb_grpc.NodeServiceStub(channel)
      for rpc, request_msg in every_rpc():
        for m in metadata:
          with pytest.raises(grpc.aio.AioRpcError) as raised:
            await getattr(stub, rpc)(request_msg, timeout=STALL_S, metadata=m)
          assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED, (rpc, m)
          assert "members of its cluster" in raised.value.details()
    assert node.calls == []  # nothing reached the node
    outsider = GRPCPeerHandle(node.id, peer.addr(), CAPS, membership=another_cluster)
    try:
      assert not await outsider.health_check()
      with pytest.raises(Refused, match="UNAUTHENTICATED"):
        await outsider.send_prompt(SHARD, "hi", CONTEXT)
    finally:
      await outsider.disconnect()
    assert node.calls == [] and await peer.health_check()  # a member still gets in

  with caplog.at_level(logging.WARNING):
    with_server(test)
  refusals = [r.getMessage() for r in caplog.records if r.name == "exo.networking.grpc.grpc_server"]
  assert len(refusals) == 1 and "refused SendPrompt from ipv4:127.0.0.1:" in refusals[0], refusals  # at most one a minute per caller
  assert any("started with different cluster secrets" in r.getMessage() for r in caplog.records if r.name.endswith("grpc_peer_handle"))


def test_node_failure_is_internal_and_server_survives(caplog):
  async def test(node, server, peer):
    node.fail_with = RuntimeError("engine crashed")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
      await peer.send_prompt(SHARD, "hi", CONTEXT)
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert raised.value.details() == "node air failed to handle SendPrompt: RuntimeError"
    assert await peer.health_check()

  with caplog.at_level(logging.ERROR, logger="exo.networking.grpc.grpc_server"):
    with_server(test)
  assert any(r.exc_info and "engine crashed" in str(r.exc_info[1]) for r in caplog.records)


def test_start_on_a_taken_port_raises_oserror():
  async def test(node, server, peer):
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{server.port}"):
      await GRPCServer(FakeNode(), "127.0.0.1", server.port).start()
    assert await peer.health_check()

  with_server(test)
