"""The NodeService gRPC server: refuses calls without the cluster's token, decodes and validates each request, then hands it to
the node with the id of the node that sent it."""

import functools
import logging

import grpc

from exo.base.errors import ExoError
from exo.networking.grpc import node_service_pb2 as pb
from exo.networking.grpc import node_service_pb2_grpc as pb_grpc
from exo.networking.grpc.conversions import context_from_proto, hub_file_from_proto, shard_from_proto, tensor_from_proto, topology_to_proto
from exo.networking.membership import SENDER_METADATA, TOKEN_METADATA, Membership, RateLimitedLog, cluster_membership
from exo.networking.server import RingNode, Server

logger = logging.getLogger(__name__)

# gRPC's default 4 MiB cap is far too small: the hidden states of a 2k-token prompt through a 405B model (hidden size 16384,
# fp16) are 64 MiB per hop. Both ends must raise it, since the sender enforces its send limit and the receiver its receive limit.
MAX_MESSAGE_MB = 256
STOP_GRACE_S = 0.5


def message_size_options(max_message_mb: int) -> list[tuple[str, int]]:
  size = max_message_mb * 2**20
  return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]


def _guarded(rpc):
  """Abort with the status an ExoError carries (a malformed request INVALID_ARGUMENT, a missing model NOT_FOUND, ...), a
  message that does not parse with INVALID_ARGUMENT, and a node failure with INTERNAL; either way the server stays up."""

  @functools.wraps(rpc)
  async def handler(self: "GRPCServer", request, context: grpc.aio.ServicerContext):
    try:
      return await rpc(self, request, context)
    except ExoError as e:
      logger.warning("rejected %s from %s: %s", rpc.__name__, context.peer(), e)
      await context.abort(grpc.StatusCode[e.grpc_code], str(e))
    except ValueError as e:
      logger.warning("rejected %s from %s: %s", rpc.__name__, context.peer(), e)
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except Exception as e:
      logger.exception("%s from %s failed", rpc.__name__, context.peer())
      await context.abort(grpc.StatusCode.INTERNAL, f"node {self.node.id} failed to handle {rpc.__name__}: {type(e).__name__}")

  return handler


def sender(context: grpc.aio.ServicerContext) -> str:
  """The id the caller gives as its own ("" if none)."""
  value = next((value for key, value in context.invocation_metadata() or () if key == SENDER_METADATA), b"")
  return value.decode("utf-8", errors="replace")


class MembersOnly(grpc.aio.ServerInterceptor):
  """Refuses a call without the cluster's token (UNAUTHENTICATED) before its message is decoded, and logs it, once a minute at most
  for each caller's address."""

  def __init__(self, membership: Membership):
    self.membership, self.refusals = membership, RateLimitedLog(logger)

  async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
    token = next((value for key, value in details.invocation_metadata or () if key == TOKEN_METADATA), None)
    if self.membership.accepts_token(token):
      return await continuation(details)

    async def refuse(requests, context: grpc.aio.ServicerContext):
      address = context.peer()
      self.refusals.warning(
        address.rsplit(":", 1)[0],
        "refused %s from %s: %s (a node of another cluster, or one started without this cluster's secret)",
        details.method.rsplit("/", 1)[-1],
        address,
        "no cluster token" if token is None else "a wrong cluster token",
      )
      await context.abort(
        grpc.StatusCode.UNAUTHENTICATED, "this node takes calls only from members of its cluster: give the caller the cluster's secret"
      )

    return grpc.stream_unary_rpc_method_handler(refuse)  # a stream, never read: the message is refused unread


class GRPCServer(pb_grpc.NodeServiceServicer, Server):
  def __init__(self, node: RingNode, host: str, port: int, max_message_mb: int = MAX_MESSAGE_MB, membership: Membership | None = None):
    """`membership`: the cluster whose members it serves (default: this machine's, `cluster_membership()`)."""
    self.node, self.host, self.port, self.max_message_mb = node, host, port, max_message_mb
    self.membership = membership or cluster_membership()
    self.server: grpc.aio.Server | None = None

  async def start(self) -> None:
    """Listen on host:port (port 0 picks a free one, stored in self.port); OSError if the address cannot be bound."""
    if self.server is not None:
      return
    # so_reuseport off: a second node on the same port must fail here, not silently share (and steal) its traffic.
    options = [*message_size_options(self.max_message_mb), ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options, interceptors=[MembersOnly(self.membership)])
    pb_grpc.add_NodeServiceServicer_to_server(self, server)
    address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
    try:
      bound = server.add_insecure_port(address)
    except RuntimeError:
      bound = 0
    if not bound:
      raise OSError(f"cannot listen on {address}: the port is in use or the address is not local")
    await server.start()
    self.server, self.port = server, bound
    logger.info("node %s listening on %s:%d", self.node.id, self.host, bound)

  async def stop(self) -> None:
    if self.server is not None:
      server, self.server = self.server, None
      await server.stop(STOP_GRACE_S)

  @_guarded
  async def SendPrompt(self, request: pb.PromptRequest, context) -> pb.Ack:
    await self.node.process_prompt(shard_from_proto(request.shard), request.prompt, context_from_proto(request.context), sender=sender(context))
    return pb.Ack()

  @_guarded
  async def SendTensor(self, request: pb.TensorRequest, context) -> pb.Ack:
    shard, tensor, ctx = shard_from_proto(request.shard), tensor_from_proto(request.tensor), context_from_proto(request.context)
    await self.node.process_tensor(shard, tensor, ctx, sender=sender(context))
    return pb.Ack()

  @_guarded
  async def SendTensors(self, request: pb.TensorBatch, context) -> pb.Ack:
    """Every step is decoded before any is handed on: a malformed one rejects the whole batch, and the node receives the rest
    in order within one turn of its event loop (so they can share its next engine call)."""
    steps = [(shard_from_proto(t.shard), tensor_from_proto(t.tensor), context_from_proto(t.context)) for t in request.tensors]
    for shard, tensor, ctx in steps:
      await self.node.process_tensor(shard, tensor, ctx, sender=sender(context))
    return pb.Ack()

  @_guarded
  async def SendResult(self, request: pb.SendResultRequest, context) -> pb.Ack:
    if not request.request_id:
      raise ValueError("result has an empty request_id")
    self.node.process_result(request.request_id, list(request.tokens), request.is_finished, request.error, sender=sender(context))
    return pb.Ack()

  @_guarded
  async def SendOpaqueStatus(self, request: pb.SendOpaqueStatusRequest, context) -> pb.Ack:
    # No request_id check: node-wide statuses (download progress, node status) are broadcast with an empty one.
    self.node.process_opaque_status(request.request_id, request.status, sender=sender(context))
    return pb.Ack()

  @_guarded
  async def CollectTopology(self, request: pb.CollectTopologyRequest, context) -> pb.Topology:
    return topology_to_proto(await self.node.collect_topology(set(request.visited), request.max_depth))

  @_guarded
  async def HealthCheck(self, request: pb.HealthCheckRequest, context) -> pb.HealthCheckResponse:
    return pb.HealthCheckResponse(is_healthy=bool(self.node.is_healthy()), node_id=self.node.id)

  @_guarded
  async def FileStatus(self, request: pb.FileStatusRequest, context) -> pb.FileStatusReply:
    state = self.node.file_status(hub_file_from_proto(request.file), max(0, request.claim))
    return pb.FileStatusReply(held_bytes=state.held_bytes, whole=state.whole, arriving=state.arriving, claim=state.claim)

  async def FetchFile(self, request: pb.FetchFileRequest, context: grpc.aio.ServicerContext):
    """The file's bytes as FileChunk messages; a bad request or a file not held ends the stream with the status of its error
    (as _guarded does for a single answer)."""
    try:
      async for offset, data in self.node.file_chunks(hub_file_from_proto(request.file), request.offset, request.length):
        yield pb.FileChunk(offset=offset, data=data)
    except ExoError as e:
      logger.info("FetchFile from %s ended: %s", context.peer(), e)
      await context.abort(grpc.StatusCode[e.grpc_code], str(e))
    except ValueError as e:
      logger.warning("rejected FetchFile from %s: %s", context.peer(), e)
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
