import asyncio
import logging
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from exo.base.device_capabilities import DeviceCapabilities, DeviceFlops, LayerTimes
from exo.base.shard import Shard
from exo.base.topology import Topology
from exo.inference.sampling import GREEDY, Sampling
from exo.networking.grpc import conversions as conv
from exo.networking.grpc import node_service_pb2 as pb
from exo.networking.grpc import node_service_pb2_grpc as pb_grpc
from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
from exo.networking.grpc.grpc_server import GRPCServer
from exo.networking.membership import TOKEN_METADATA, Membership, cluster_membership
from exo.networking.peer_handle import Refused
from exo.networking.ports import free_port
from exo.networking.request_context import RequestContext, RingPlan, RingStage
from tests.support.patience import STALL_S

ROOT = Path(__file__).resolve().parents[2]
PROTO = "exo/networking/grpc/node_service.proto"
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
    batch = pb.TensorBatch(tensors=[_tensor_request(), _tensor_request(shape=[2, 4]), _tensor_request()])
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
      deadline = time.monotonic() + STALL_S
      while not await peer.health_check(timeout=0.5):
        assert time.monotonic() < deadline, "the handle did not reconnect to a server that came up"
        await asyncio.sleep(0.1)
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


def _tensor_request(**tensor) -> pb.TensorRequest:
  good = conv.tensor_to_proto(np.ones((2, 3), dtype=np.float32))
  fields = {"tensor_data": good.tensor_data, "shape": good.shape, "dtype": good.dtype, **tensor}
  return pb.TensorRequest(shard=conv.shard_to_proto(SHARD), tensor=pb.Tensor(**fields), context=conv.context_to_proto(CONTEXT))


def _prompt_request(shard: Shard = SHARD, plan: RingPlan = PLAN, **context) -> pb.PromptRequest:
  ctx = conv.context_to_proto(CONTEXT)
  ctx.plan.CopyFrom(conv.plan_to_proto(plan))
  for key, value in context.items():
    setattr(ctx, key, value)
  return pb.PromptRequest(shard=conv.shard_to_proto(shard), prompt="hi", context=ctx)


MALFORMED = {
  "wrong-byte-length": ("SendTensor", _tensor_request(shape=[2, 4]), "24 bytes but shape [2, 4] of float32 needs 32"),
  "unknown-dtype": ("SendTensor", _tensor_request(dtype="complex64"), "dtype 'complex64'"),
  "negative-dimension": ("SendTensor", _tensor_request(shape=[-2, -3]), "negative dimension"),
  "plan-not-contiguous": ("SendPrompt", _prompt_request(plan=RingPlan("m", 32, (RingStage("a", 0, 9), RingStage("b", 12, 31)))), "not contiguous"),
  "shard-end-past-model": ("SendPrompt", _prompt_request(shard=Shard("llama-3.1-8b", 20, 32, 32)), "end_layer 32 must be below n_layers 32"),
  "empty-request-id": ("SendPrompt", _prompt_request(request_id=""), "empty request_id"),
  "zero-max-tokens": ("SendPrompt", _prompt_request(max_tokens=0), "max_tokens 0"),
  "negative-position": ("SendPrompt", _prompt_request(position=-1), "position -1"),
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
    ("SendPrompt", _prompt_request()),
    ("SendTensor", _tensor_request()),
    ("SendTensors", pb.TensorBatch(tensors=[_tensor_request()])),
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


# Conversions.


def test_domain_objects_round_trip():
  assert conv.shard_from_proto(conv.shard_to_proto(SHARD)) == SHARD
  assert conv.plan_from_proto(conv.plan_to_proto(PLAN)) == PLAN
  assert conv.context_from_proto(conv.context_to_proto(CONTEXT)) == CONTEXT
  assert conv.context_from_proto(conv.context_to_proto(CONTEXT.at(37))).position == 37
  sampled = replace(CONTEXT, sampling=Sampling(0.7, 0.9, 40, 2**63 - 1)).at(5)
  assert conv.context_from_proto(conv.context_to_proto(sampled)) == sampled and sampled.sampling.seed == 2**63 - 1
  assert conv.device_capabilities_from_proto(conv.device_capabilities_to_proto(CAPS)) == CAPS
  assert conv.device_capabilities_from_proto(conv.device_capabilities_to_proto(MEASURED)) == MEASURED
  assert conv.topology_from_proto(conv.topology_to_proto(sample_topology())) == sample_topology()
  assert conv.topology_from_proto(conv.topology_to_proto(Topology())) == Topology()


@pytest.mark.parametrize("dtype", conv.TENSOR_DTYPES)
def test_tensor_round_trip_any_layout_and_byte_order(dtype):
  array = np.arange(24, dtype=dtype).reshape(2, 3, 4)
  for sent in (array, array.transpose(2, 0, 1), array.astype(array.dtype.newbyteorder(">")), np.asarray(array[0, 0, 0])):
    received = conv.tensor_from_proto(conv.tensor_to_proto(sent))
    assert received.dtype.name == dtype and received.flags.writeable and np.array_equal(received, sent)


def with_sampling(sampling: pb.Sampling) -> pb.RequestContext:
  msg = conv.context_to_proto(CONTEXT)
  msg.sampling.CopyFrom(sampling)
  return msg


def test_a_context_without_sampling_is_greedy_and_unset_fields_are_the_defaults():
  msg = conv.context_to_proto(CONTEXT)
  msg.ClearField("sampling")  # as a node that predates sampling sends it
  assert conv.context_from_proto(msg).sampling == GREEDY
  assert conv.context_from_proto(with_sampling(pb.Sampling(temperature=0.5))).sampling == Sampling(0.5, 1.0, 0, None)
  msg = conv.context_to_proto(CONTEXT)
  msg.plan.ClearField("context_tokens")  # as a node that predates the planned context sends it: the model's default
  assert conv.context_from_proto(msg).plan == replace(PLAN, context_tokens=0)


@pytest.mark.parametrize(
  "make, problem",
  [
    (lambda: conv.tensor_to_proto(np.zeros(3, dtype=np.complex64)), "dtype complex64"),
    (lambda: conv.shard_from_proto(pb.Shard(model_id="m", start_layer=-1, end_layer=3, n_layers=8)), "start_layer -1 is negative"),
    (lambda: conv.shard_from_proto(pb.Shard(model_id="m", start_layer=4, end_layer=3, n_layers=8)), "end_layer 3 is before start_layer 4"),
    (lambda: conv.shard_from_proto(pb.Shard(start_layer=0, end_layer=3, n_layers=8)), "empty model_id"),
    (lambda: conv.plan_from_proto(conv.plan_to_proto(RingPlan("m", 32, (RingStage("a", 0, 20),)))), "covers 21 of 32 layers"),
    (lambda: conv.plan_from_proto(conv.plan_to_proto(RingPlan("m", 8, (RingStage("a", 0, 3), RingStage("a", 4, 7))))), "names a node twice"),
    (lambda: conv.plan_from_proto(conv.plan_to_proto(replace(PLAN, context_tokens=-1))), "context of -1 tokens"),
    (lambda: conv.shard_from_proto(pb.Shard(model_id="m", start_layer=0, end_layer=2**31 - 2, n_layers=2**31 - 1)), "beyond 10000"),
    (lambda: conv.plan_from_proto(conv.plan_to_proto(RingPlan("m", 2**31 - 1, (RingStage("a", 0, 2**31 - 2),)))), "a model has at most 10000"),
    (lambda: conv.tensor_from_proto(pb.Tensor(tensor_data=b"", shape=[1, 1, 1, 1, 0], dtype="float32")), "5 dimensions; at most 4"),
    (lambda: conv.context_from_proto(conv.context_to_proto(RequestContext("r", "", PLAN, 1))), "empty origin_node_id"),
    (lambda: conv.context_from_proto(with_sampling(pb.Sampling(temperature=-1))), "request 'req-1': temperature must be"),
    (lambda: conv.context_from_proto(with_sampling(pb.Sampling(temperature=1, top_p=0))), "top_p must be"),
    (lambda: conv.context_from_proto(with_sampling(pb.Sampling(temperature=1, seed=-5))), "seed must be"),
    (lambda: conv.device_capabilities_from_proto(pb.DeviceCapabilities(memory=-1)), "device.memory"),
    (
      lambda: conv.device_capabilities_from_proto(pb.DeviceCapabilities(layer_times={"m": pb.LayerTimes(token_ms=1)})),
      r"\['m'\].decode_ms must be > 0",
    ),
    (
      lambda: conv.device_capabilities_from_proto(pb.DeviceCapabilities(layer_times={"m": pb.LayerTimes(decode_ms=1, token_ms=float("inf"))})),
      r"\['m'\].token_ms must be a number from 0 to 1e\+15",
    ),
    (lambda: conv.device_capabilities_from_proto(pb.DeviceCapabilities(layer_times={"": pb.LayerTimes(decode_ms=1)})), "empty model id"),
    (lambda: conv.topology_from_proto(pb.Topology(edges=[pb.Edge(from_id="a", to_id="b", rtt_ms=float("nan"))])), "rtt_ms"),
    (lambda: conv.topology_from_proto(pb.Topology(edges=[pb.Edge(from_id="a", to_id="a")])), "two different nodes"),
  ],
)
def test_invalid_messages_raise_value_error_naming_the_problem(make, problem):
  with pytest.raises(ValueError, match=problem):
    make()


# The generators' own versions, which the generated files state (and check at import) but which change nothing else: a newer
# grpcio-tools or protoc writes the same code with other numbers in these places (each replaced line by line).
GENERATOR_VERSIONS = [
  (re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M), "GRPC_GENERATED_VERSION = '<version>'"),
  (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: <version>"),
  (re.compile(r"(_runtime_version\.Domain\.PUBLIC,\s*)\d+(,\s*)\d+(,\s*)\d+(,\s*)'[^']*',"), r"\1<major>\2<minor>\3<patch>\4'<suffix>',"),
]


def without_generator_versions(code: str) -> str:
  for pattern, replacement in GENERATOR_VERSIONS:
    code = pattern.sub(replacement, code)
  return code


@pytest.mark.parametrize("name, versions", [("node_service_pb2.py", 5), ("node_service_pb2_grpc.py", 1)])
def test_only_the_generator_versions_are_normalised(name, versions):
  code = (ROOT / PROTO.replace("node_service.proto", name)).read_text().splitlines()
  normalised = without_generator_versions("\n".join(code)).splitlines()
  changed = [(old, new) for old, new in zip(code, normalised, strict=True) if old != new]
  assert len(changed) == versions, changed  # the version lines, found; nothing else touched
  assert all(re.search(r"<(version|major|minor|patch|suffix)>", new) for _, new in changed), changed


def test_generated_stubs_are_up_to_date(tmp_path):
  """The committed stubs are what the installed grpcio-tools generates from the .proto: the messages (the serialized file
  descriptor) and the service code, compared except for the generators' version strings."""
  result = subprocess.run(
    [sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", PROTO],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stderr
  for name in ("node_service_pb2.py", "node_service_pb2_grpc.py"):
    generated, committed = tmp_path / PROTO.replace("node_service.proto", name), ROOT / PROTO.replace("node_service.proto", name)
    assert without_generator_versions(generated.read_text()) == without_generator_versions(committed.read_text()), (
      f"{name} is stale: run scripts/generate_proto.sh"
    )
