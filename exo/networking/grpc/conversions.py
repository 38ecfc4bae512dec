"""Proto <-> domain conversions for NodeService messages. Every *_from_proto validates and raises ValueError naming the problem."""

import math
from dataclasses import replace

import numpy as np

from exo.base.device_capabilities import DeviceCapabilities, DeviceFlops, LayerTimes, non_negative_number
from exo.base.model_spec import MAX_LAYERS
from exo.base.shard import Shard
from exo.base.topology import Topology
from exo.inference.hub_files import HubFile
from exo.inference.sampling import GREEDY, Sampling
from exo.networking.grpc import node_service_pb2 as pb
from exo.networking.request_context import RequestContext, RingPlan, RingStage

# Hidden states and token ids. bfloat16 has no numpy dtype; an engine casts it before sending.
TENSOR_DTYPES = ("float16", "float32", "float64", "int32", "int64")
MAX_TENSOR_DIMS = 4  # token ids are (P,) or (1, P), hidden states and logits (1, P, width)


def shard_to_proto(shard: Shard) -> pb.Shard:
  return pb.Shard(model_id=shard.model_id, start_layer=shard.start_layer, end_layer=shard.end_layer, n_layers=shard.n_layers)


def shard_from_proto(msg: pb.Shard) -> Shard:
  if not msg.model_id:
    raise ValueError("shard has an empty model_id")
  if msg.start_layer < 0:
    raise ValueError(f"shard start_layer {msg.start_layer} is negative")
  if msg.end_layer < msg.start_layer:
    raise ValueError(f"shard end_layer {msg.end_layer} is before start_layer {msg.start_layer}")
  if msg.end_layer >= msg.n_layers:
    raise ValueError(f"shard end_layer {msg.end_layer} must be below n_layers {msg.n_layers}")
  if msg.n_layers > MAX_LAYERS:
    raise ValueError(f"shard n_layers {msg.n_layers} is beyond {MAX_LAYERS}, more than any model has")
  return Shard(msg.model_id, msg.start_layer, msg.end_layer, msg.n_layers)


def plan_to_proto(plan: RingPlan) -> pb.RingPlan:
  stages = [pb.RingStage(node_id=s.node_id, start_layer=s.start_layer, end_layer=s.end_layer) for s in plan.stages]
  return pb.RingPlan(model_id=plan.model_id, n_layers=plan.n_layers, stages=stages, context_tokens=plan.context_tokens)


def plan_from_proto(msg: pb.RingPlan) -> RingPlan:
  if not msg.model_id:
    raise ValueError("ring plan has an empty model_id")
  if any(not s.node_id for s in msg.stages):
    raise ValueError("ring plan has a stage with an empty node_id")
  if msg.n_layers > MAX_LAYERS or len(msg.stages) > MAX_LAYERS:
    raise ValueError(f"ring plan has {msg.n_layers} layers in {len(msg.stages)} stages; a model has at most {MAX_LAYERS} layers")
  stages = tuple(RingStage(s.node_id, s.start_layer, s.end_layer) for s in msg.stages)
  plan = RingPlan(msg.model_id, msg.n_layers, stages, msg.context_tokens)
  plan.validate()
  return plan


def context_to_proto(context: RequestContext) -> pb.RequestContext:
  return pb.RequestContext(
    request_id=context.request_id,
    origin_node_id=context.origin_node_id,
    plan=plan_to_proto(context.plan),
    max_tokens=context.max_tokens,
    position=context.position,
    sampling=sampling_to_proto(context.sampling),
  )


def context_from_proto(msg: pb.RequestContext) -> RequestContext:
  if not msg.request_id:
    raise ValueError("request context has an empty request_id")
  if not msg.origin_node_id:
    raise ValueError(f"request {msg.request_id!r} has an empty origin_node_id")
  if msg.max_tokens < 1:
    raise ValueError(f"request {msg.request_id!r} has max_tokens {msg.max_tokens}; expected at least 1")
  if msg.position < 0:
    raise ValueError(f"request {msg.request_id!r} has position {msg.position}; expected at least 0")
  sampling = sampling_from_proto(msg.sampling, msg.request_id) if msg.HasField("sampling") else GREEDY
  return RequestContext(msg.request_id, msg.origin_node_id, plan_from_proto(msg.plan), msg.max_tokens, msg.position, sampling)


def sampling_to_proto(sampling: Sampling) -> pb.Sampling:
  msg = pb.Sampling(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
  if sampling.seed is not None:
    msg.seed = sampling.seed
  return msg


def sampling_from_proto(msg: pb.Sampling, request_id: str) -> Sampling:
  top_p = msg.top_p if msg.HasField("top_p") else 1.0
  try:
    return Sampling(msg.temperature, top_p, msg.top_k, msg.seed if msg.HasField("seed") else None)
  except ValueError as e:
    raise ValueError(f"request {request_id!r}: {e}") from None


def tensor_to_proto(array: np.ndarray) -> pb.Tensor:
  array = np.asarray(array)
  if array.dtype.name not in TENSOR_DTYPES:
    raise ValueError(f"cannot send a tensor of dtype {array.dtype.name}; expected one of {', '.join(TENSOR_DTYPES)}")
  # Little-endian C order on the wire, whatever the sender's layout and byte order.
  data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes(order="C")
  return pb.Tensor(tensor_data=data, shape=array.shape, dtype=array.dtype.name)


def tensor_from_proto(msg: pb.Tensor) -> np.ndarray:
  if msg.dtype not in TENSOR_DTYPES:
    raise ValueError(f"tensor dtype {msg.dtype!r} is not one of {', '.join(TENSOR_DTYPES)}")
  shape = tuple(msg.shape)
  if len(shape) > MAX_TENSOR_DIMS:
    raise ValueError(f"tensor shape {list(shape)[:8]} has {len(shape)} dimensions; at most {MAX_TENSOR_DIMS}")
  if any(d < 0 for d in shape):
    raise ValueError(f"tensor shape {list(shape)} has a negative dimension")
  wire = np.dtype(msg.dtype).newbyteorder("<")
  expected = math.prod(shape) * wire.itemsize
  if len(msg.tensor_data) != expected:
    raise ValueError(f"tensor data is {len(msg.tensor_data)} bytes but shape {list(shape)} of {msg.dtype} needs {expected} bytes")
  # astype copies: the result is writable and native-endian, since engines may work in place on it.
  return np.frombuffer(msg.tensor_data, dtype=wire).reshape(shape).astype(wire.newbyteorder("="))


def device_capabilities_to_proto(caps: DeviceCapabilities) -> pb.DeviceCapabilities:
  flops = pb.DeviceFlops(fp32=caps.flops.fp32, fp16=caps.flops.fp16, int8=caps.flops.int8)
  layer_times = {model_id: pb.LayerTimes(decode_ms=t.decode_ms, token_ms=t.token_ms) for model_id, t in caps.layer_times.items()}
  holdings = {model_id: pb.LayerRanges(first=[a for a, _ in r], last=[b for _, b in r]) for model_id, r in caps.holdings.items()}
  transfers = [pb.FileTransfer(name=t.name, received_bytes=t.received_bytes, total_bytes=t.total_bytes, source=t.source) for t in caps.transfers]
  return pb.DeviceCapabilities(
    model=caps.model, chip=caps.chip, memory=caps.memory, flops=flops, memory_bandwidth=caps.memory_bandwidth, layer_times=layer_times,
    holdings=holdings, transfers=transfers,
  )  # fmt: skip


def device_capabilities_from_proto(msg: pb.DeviceCapabilities, where: str = "device") -> DeviceCapabilities:
  flops = DeviceFlops(*(non_negative_number(getattr(msg.flops, k), f"{where}.flops.{k}", speed=True) for k in ("fp32", "fp16", "int8")))
  memory = non_negative_number(msg.memory, f"{where}.memory")
  bandwidth = non_negative_number(msg.memory_bandwidth, f"{where}.memory_bandwidth", speed=True)
  if "" in msg.layer_times:
    raise ValueError(f"{where}.layer_times has an empty model id")
  layer_times = {model_id: layer_times_from_proto(t, f"{where}.layer_times[{model_id!r}]") for model_id, t in msg.layer_times.items()}
  return replace(
    DeviceCapabilities.from_dict(_files_dict(msg), where), model=msg.model, chip=msg.chip, memory=memory, flops=flops, memory_bandwidth=bandwidth,
    layer_times=layer_times,
  )  # fmt: skip


def _files_dict(msg: pb.DeviceCapabilities) -> dict:
  """The holdings and transfers of a device message in their JSON form, which DeviceCapabilities.from_dict checks."""
  if any(len(r.first) != len(r.last) for r in msg.holdings.values()):
    raise ValueError("a holding's first and last layers differ in number")
  holdings = {model_id: [[a, b] for a, b in zip(r.first, r.last)] for model_id, r in msg.holdings.items()}
  transfers = [{"name": t.name, "received_bytes": t.received_bytes, "total_bytes": t.total_bytes, "source": t.source} for t in msg.transfers]
  return {"holdings": holdings, "transfers": transfers}


def layer_times_from_proto(msg: pb.LayerTimes, where: str) -> LayerTimes:
  """One model's measured times, validated as in topology JSON: finite, decode_ms > 0, token_ms >= 0."""
  return LayerTimes.from_dict({"decode_ms": msg.decode_ms, "token_ms": msg.token_ms}, where)


def topology_to_proto(topology: Topology) -> pb.Topology:
  edges = []
  for _, e in sorted(topology.edges.items()):
    measured = {k: v for k, v in (("rtt_ms", e.rtt_ms), ("bandwidth_mbps", e.bandwidth_mbps)) if v is not None}
    edges.append(pb.Edge(from_id=e.from_id, to_id=e.to_id, **measured))
  return pb.Topology(nodes={node_id: device_capabilities_to_proto(caps) for node_id, caps in topology.nodes.items()}, edges=edges)


def topology_from_proto(msg: pb.Topology) -> Topology:
  topology = Topology()
  for node_id, caps in msg.nodes.items():
    if not node_id:
      raise ValueError("topology has a node with an empty id")
    topology.update_node(node_id, device_capabilities_from_proto(caps, f"node {node_id!r}"))
  for e in msg.edges:
    where = f"edge {e.from_id!r} -> {e.to_id!r}"
    if not e.from_id or not e.to_id:
      raise ValueError(f"topology {where} has an empty node id")
    rtt = non_negative_number(e.rtt_ms, f"{where} rtt_ms") if e.HasField("rtt_ms") else None
    bandwidth = non_negative_number(e.bandwidth_mbps, f"{where} bandwidth_mbps", speed=True) if e.HasField("bandwidth_mbps") else None
    topology.add_edge(e.from_id, e.to_id, rtt, bandwidth)
  return topology


def hub_file_to_proto(file: HubFile) -> pb.HubFile:
  return pb.HubFile(repo=file.repo, commit=file.commit, filename=file.filename, size=file.size, sha=file.sha)


def hub_file_from_proto(msg: pb.HubFile) -> HubFile:
  """ValueError naming the field for a file no repository holds (a path, a size or hash out of form)."""
  return HubFile(msg.repo, msg.commit, msg.filename, msg.size, msg.sha)
