"""A peer reached over gRPC: a lazily opened channel, per-call timeouts, and a health check that never raises. Every call carries
the cluster's token and the id of the node that makes it (exo.networking.membership)."""

import asyncio
import logging

import grpc
import numpy as np

from exo.base.device_capabilities import DeviceCapabilities
from exo.base.shard import Shard
from exo.base.topology import Topology
from exo.inference.hub_files import HubFile
from exo.networking.grpc import node_service_pb2 as pb
from exo.networking.grpc import node_service_pb2_grpc as pb_grpc
from exo.networking.grpc.conversions import context_to_proto, hub_file_to_proto, shard_to_proto, tensor_to_proto, topology_from_proto
from exo.networking.grpc.grpc_server import MAX_MESSAGE_MB, message_size_options
from exo.networking.membership import SENDER_METADATA, TOKEN_METADATA, Membership, RateLimitedLog, cluster_membership
from exo.networking.peer_handle import FileState, PeerHandle, Refused
from exo.networking.request_context import RequestContext

logger = logging.getLogger(__name__)
refused = RateLimitedLog(logger)

CALL_TIMEOUT_S = 10.0
PIECE_TIMEOUT_S = 30.0  # a file stream whose next piece takes longer has stalled (the server ends a stalled one after 20 s)
# While a channel backs off after a failed connect every call fails at once, and gRPC's backoff grows to 120 s by default:
# cap it so a restarted peer passes health checks again within seconds.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]
# the statuses of a peer that answered but does not take a ring message (from a server: a message too large for the client is
# RESOURCE_EXHAUSTED too, without the server's word)
REFUSALS = {
  grpc.StatusCode.INVALID_ARGUMENT,
  grpc.StatusCode.PERMISSION_DENIED,
  grpc.StatusCode.UNAUTHENTICATED,
  grpc.StatusCode.RESOURCE_EXHAUSTED,
  grpc.StatusCode.FAILED_PRECONDITION,
  grpc.StatusCode.NOT_FOUND,
}


class GRPCPeerHandle(PeerHandle):
  def __init__(
    self,
    peer_id: str,
    address: str,
    device_capabilities: DeviceCapabilities,
    max_message_mb: int = MAX_MESSAGE_MB,
    membership: Membership | None = None,
    sender_id: str = "",
  ):
    """`membership`: the cluster whose token the calls carry (default: this machine's, `cluster_membership()`); `sender_id`: the
    id of the node that calls (a tool that is no node leaves it empty: the peer then takes no results or statuses from it)."""
    self._id, self.address, self._device_capabilities, self.max_message_mb = peer_id, address, device_capabilities, max_message_mb
    token = (TOKEN_METADATA, (membership or cluster_membership()).token())
    self.metadata = (token, (SENDER_METADATA, sender_id.encode())) if sender_id else (token,)
    self.channel: grpc.aio.Channel | None = None
    self.stub: pb_grpc.NodeServiceStub | None = None

  def id(self) -> str:
    return self._id

  def addr(self) -> str:
    return self.address

  def device_capabilities(self) -> DeviceCapabilities:
    return self._device_capabilities

  def _stub(self) -> pb_grpc.NodeServiceStub:
    """The stub, opening the channel on first use; gRPC connects in the background and reconnects by itself."""
    if self.channel is None:
      self.channel = grpc.aio.insecure_channel(self.address, options=[*message_size_options(self.max_message_mb), *RECONNECT_OPTIONS])
      self.stub = pb_grpc.NodeServiceStub(self.channel)
    return self.stub

  async def disconnect(self) -> None:
    if self.channel is not None:
      channel, self.channel, self.stub = self.channel, None, None
      await channel.close()

  async def health_check(self, timeout: float = 2.0) -> bool:
    """True if the peer answers healthy, as the node this handle names, within `timeout` seconds."""
    try:
      response = await self._stub().HealthCheck(pb.HealthCheckRequest(), timeout=timeout, metadata=self.metadata)
    except grpc.aio.AioRpcError as e:
      if e.code() == grpc.StatusCode.UNAUTHENTICATED:
        refused.warning(self.address, "%r refuses this node's cluster token: the two were started with different cluster secrets", self)
      logger.debug("health check of %r failed: %s", self, e)
      return False
    except Exception as e:  # the verdict is all callers need: any failure (refused, timeout, bad address) is unhealthy
      logger.debug("health check of %r failed: %s", self, e)
      return False
    if response.node_id != self._id:
      logger.debug("health check of %r answered by node %r", self, response.node_id)
      return False
    return response.is_healthy

  async def send_prompt(self, shard: Shard, prompt: str, context: RequestContext) -> None:
    request = pb.PromptRequest(shard=shard_to_proto(shard), prompt=prompt, context=context_to_proto(context))
    await self._ring_call(self._stub().SendPrompt, request)

  async def send_tensor(self, shard: Shard, tensor: np.ndarray, context: RequestContext) -> None:
    request = pb.TensorRequest(shard=shard_to_proto(shard), tensor=tensor_to_proto(tensor), context=context_to_proto(context))
    await self._ring_call(self._stub().SendTensor, request)

  async def send_tensors(self, tensors: list[tuple[Shard, np.ndarray, RequestContext]]) -> None:
    batch = pb.TensorBatch(
      tensors=[pb.TensorRequest(shard=shard_to_proto(s), tensor=tensor_to_proto(t), context=context_to_proto(c)) for s, t, c in tensors]
    )
    await self._ring_call(self._stub().SendTensors, batch)

  async def _ring_call(self, rpc, request) -> None:
    """A ring message; Refused (naming the peer and its reason) if the peer answers that it does not take it."""
    try:
      await rpc(request, timeout=CALL_TIMEOUT_S, metadata=self.metadata)
    except grpc.aio.AioRpcError as e:
      if e.code() in REFUSALS:
        raise Refused(f"{e.code().name}: {e.details()}") from e
      raise

  async def send_result(self, request_id: str, tokens: list[int], is_finished: bool, error: str = "") -> None:
    request = pb.SendResultRequest(request_id=request_id, tokens=tokens, is_finished=is_finished, error=error)
    await self._stub().SendResult(request, timeout=CALL_TIMEOUT_S, metadata=self.metadata)

  async def send_opaque_status(self, request_id: str, status: str) -> None:
    await self._stub().SendOpaqueStatus(
      pb.SendOpaqueStatusRequest(request_id=request_id, status=status), timeout=CALL_TIMEOUT_S, metadata=self.metadata
    )

  async def collect_topology(self, visited: set[str], max_depth: int) -> Topology:
    request = pb.CollectTopologyRequest(visited=sorted(visited), max_depth=max_depth)
    return topology_from_proto(await self._stub().CollectTopology(request, timeout=CALL_TIMEOUT_S, metadata=self.metadata))

  async def file_status(self, file: HubFile, claim: int) -> FileState:
    request = pb.FileStatusRequest(file=hub_file_to_proto(file), claim=claim)
    reply = await self._stub().FileStatus(request, timeout=CALL_TIMEOUT_S, metadata=self.metadata)
    return FileState(max(0, reply.held_bytes), reply.whole, reply.arriving, max(0, reply.claim))

  async def fetch_file(self, file: HubFile, offset: int, length: int):
    call = self._stub().FetchFile(pb.FetchFileRequest(file=hub_file_to_proto(file), offset=offset, length=length), metadata=self.metadata)
    try:
      while (chunk := await asyncio.wait_for(call.read(), PIECE_TIMEOUT_S)) is not grpc.aio.EOF:
        yield chunk.offset, chunk.data
    finally:
      call.cancel()

  def __repr__(self) -> str:
    return f"GRPCPeerHandle(id={self._id!r}, address={self.address!r})"


def peer_handles(node_id: str, membership: Membership | None = None):
  """The discoveries' `create_peer_handle` for node `node_id` of the cluster `membership` (default: this machine's): handles whose
  calls carry its token and the node's id."""
  membership = membership or cluster_membership()

  def create(peer_id: str, address: str, device_capabilities: DeviceCapabilities) -> GRPCPeerHandle:
    return GRPCPeerHandle(peer_id, address, device_capabilities, membership=membership, sender_id=node_id)

  return create
