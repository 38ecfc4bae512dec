"""The conversions between exo's objects and the wire messages, and the generated stubs against the .proto."""

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from exo.base.device_capabilities import FileTransfer
from exo.base.topology import Topology
from exo.inference.sampling import GREEDY, Sampling
from exo.networking.grpc import conversions as conv
from exo.networking.grpc import node_service_pb2 as pb
from exo.networking.request_context import RequestContext, RingPlan, RingStage
from tests.support.grpc_node import CAPS, CONTEXT, MEASURED, PLAN, SHARD, sample_topology

ROOT = Path(__file__).resolve().parents[2]
PROTO = "exo/networking/grpc/node_service.proto"


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
  holding = replace(MEASURED, holdings={"m": ((0, 3), (7, 9))}, transfers=(FileTransfer("org/m/model.gguf", 5, 9, "hub"),))
  assert conv.device_capabilities_from_proto(conv.device_capabilities_to_proto(holding)) == holding
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
    (lambda: conv.device_capabilities_from_proto(pb.DeviceCapabilities(holdings={"m": pb.LayerRanges(first=[3], last=[1])})), r"holdings\['m'\]"),
    (lambda: conv.device_capabilities_from_proto(pb.DeviceCapabilities(holdings={"m": pb.LayerRanges(first=[0, 4], last=[2])})), "differ in number"),
    (
      lambda: conv.device_capabilities_from_proto(pb.DeviceCapabilities(transfers=[pb.FileTransfer(name="f", received_bytes=9, total_bytes=5)])),
      "received at most total",
    ),
    (lambda: conv.device_capabilities_from_proto(pb.DeviceCapabilities(transfers=[pb.FileTransfer()] * 65)), "at most 64 entries"),
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
