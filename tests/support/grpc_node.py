"""A fake node behind a live gRPC server on loopback, and the messages the gRPC tests send it: shared by the round-trip, failure and
conversion tests."""

import asyncio

import numpy as np

from exo.base.device_capabilities import DeviceCapabilities, DeviceFlops, LayerTimes
from exo.base.shard import Shard
from exo.base.topology import Topology
from exo.networking.grpc import conversions as conv
from exo.networking.grpc import node_service_pb2 as pb
from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
from exo.networking.grpc.grpc_server import GRPCServer
from exo.networking.membership import TOKEN_METADATA, cluster_membership
from exo.networking.request_context import RequestContext, RingPlan, RingStage

CAPS = DeviceCapabilities("Mac Studio", "Apple M2 Ultra", 196608.0, DeviceFlops(27.2, 54.4, 108.8), 800.0)
MEASURED = CAPS.with_layer_times("llama-3.1-8b", LayerTimes(0.21, 0.004)).with_layer_times("smollm2-135m", LayerTimes(0.02, 0.0))
PLAN = RingPlan("llama-3.1-8b", 32, (RingStage("studio", 0, 19), RingStage("air", 20, 31)), context_tokens=3072)
CONTEXT = RequestContext("req-1", "studio", PLAN, 64)
SHARD = PLAN.shard(1)
MEMBER = ((TOKEN_METADATA, cluster_membership().token()),)  # the metadata of a call from a member (the suite's cluster)


def sample_topology() -> Topology:
  topology = Topology()
  topology.update_node("studio", MEASURED)
  topology.update_node("air", DeviceCapabilities("MacBook Air", "Apple M2", 16384.0, DeviceFlops(3.6, 7.1, 14.2), 100.0))
  topology.add_edge("studio", "air", rtt_ms=3.1, bandwidth_mbps=1000.0)
  topology.add_edge("air", "studio")
  topology.add_edge("air", "phone", bandwidth_mbps=0.0)
  return topology


class FakeNode:
  """Records every call; `fail_with` makes the request-handling methods raise it."""

  def __init__(self, node_id: str = "air"):
    self.id, self.calls, self.healthy, self.fail_with = node_id, [], True, None
    self.senders = []  # the sender the server named with each ring message, result and status

  def _from(self, sender):
    self.senders.append(sender)

  def _record(self, *call):
    if self.fail_with is not None:
      raise self.fail_with
    self.calls.append(call)

  async def process_prompt(self, shard, prompt, context, sender=None):
    self._record("prompt", shard, prompt, context)
    self._from(sender)

  async def process_tensor(self, shard, tensor, context, sender=None):
    self._record("tensor", shard, tensor, context)
    self._from(sender)

  def process_result(self, request_id, tokens, is_finished, error, sender=None):
    self._record("result", request_id, tokens, is_finished, error)
    self._from(sender)

  def process_opaque_status(self, request_id, status, sender=None):
    self._record("status", request_id, status)
    self._from(sender)

  async def collect_topology(self, visited, max_depth):
    self._record("topology", visited, max_depth)
    return sample_topology()

  def is_healthy(self):
    return self.healthy


def with_server(test, server_mb: int = 256, client_mb: int = 256):
  """Run `await test(node, server, peer)` against a live server on a free port of 127.0.0.1."""

  async def main():
    node = FakeNode()
    server = GRPCServer(node, "127.0.0.1", 0, max_message_mb=server_mb)
    await server.start()
    peer = GRPCPeerHandle(node.id, f"127.0.0.1:{server.port}", CAPS, max_message_mb=client_mb)
    try:
      await test(node, server, peer)
    finally:
      await peer.disconnect()
      await server.stop()

  asyncio.run(main())


def tensor_request(**tensor) -> pb.TensorRequest:
  good = conv.tensor_to_proto(np.ones((2, 3), dtype=np.float32))
  fields = {"tensor_data": good.tensor_data, "shape": good.shape, "dtype": good.dtype, **tensor}
  return pb.TensorRequest(shard=conv.shard_to_proto(SHARD), tensor=pb.Tensor(**fields), context=conv.context_to_proto(CONTEXT))


def prompt_request(shard: Shard = SHARD, plan: RingPlan = PLAN, **context) -> pb.PromptRequest:
  ctx = conv.context_to_proto(CONTEXT)
  ctx.plan.CopyFrom(conv.plan_to_proto(plan))
  for key, value in context.items():
    setattr(ctx, key, value)
  return pb.PromptRequest(shard=conv.shard_to_proto(shard), prompt="hi", context=ctx)
