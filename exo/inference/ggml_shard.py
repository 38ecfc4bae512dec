"""A shard of a GGUF model resident in ggml: its tensors as ggml tensors of the file's own types, and its requests' KV caches.

Weights: a node reads only its shard's tensors (plus the embedding on the first stage, the final norm and head on the last)
as ggml tensors of the file's own types. On the CPU they are the file's pages, mapped: nothing is copied or widened, and only
the pages a step reads count towards the process's memory (the embedding's rows a prompt looks up, not the whole table). On a
GPU backend each tensor is copied to the device once. The rows of Llama's Q and K projections stay in llama.cpp's order, so
RoPE rotates adjacent pairs (ggml's normal mode); Qwen2's rotate halves (NEOX mode). Llama 3's per-frequency divisors and
linear scaling reach RoPE as its frequency factors; Qwen2's Q, K and V biases are added.

KV cache (KVCache): per request and shard, (K, V) each (n_kv_heads * head_dim, context, layers) float16, as llama.cpp's, in a
buffer of its own that is not written until positions are: untouched memory costs nothing. Its cells are zeroed as the engine's
attention window first grows over them (masked cells still enter ggml's tiled products).
"""

import ctypes
import itertools
import mmap
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import ggml
import numpy as np

from exo.base.errors import BadInput
from exo.base.files import open_regular
from exo.base.model_spec import MAX_CONTEXT
from exo.base.shard import Shard
from exo.inference.ggml_library import TYPE_NAMES, Backend, metadata_context, set_input
from exo.inference.gguf_model import gguf_metadata
from exo.inference.llama_config import LlamaConfig
from exo.inference.llama_layout import EMBED, GGUF_GLOBALS, LM_HEAD, NORM, gguf_name, layer_key, layer_parts
from exo.inference.llama_weights import load_config

_SERIAL = itertools.count()


@dataclass(eq=False)
class KVCache:
  """One request's KV cache at one shard: K and V (n_kv_heads * head_dim, context, layers) float16 in a backend buffer of
  their own; `zeroed`: the cells [0, zeroed) of every layer hold written or zeroed values."""

  context: int
  ctx: int
  k: object
  v: object
  buffer: int
  serial: int = field(default_factory=lambda: next(_SERIAL))  # a graph's key: never reused, unlike a freed address
  zeroed: int = 0

  def zero_to(self, cells: int) -> None:
    for tensor in (self.k, self.v):
      nb = tensor.contents.nb
      for layer in range(tensor.contents.ne[2]):
        ggml.ggml_backend_tensor_memset(tensor, 0, layer * nb[2] + self.zeroed * nb[1], (cells - self.zeroed) * nb[1])
    self.zeroed = cells

  def __del__(self):
    ggml.ggml_backend_buffer_free(self.buffer)
    ggml.ggml_free(self.ctx)


@dataclass(eq=False)
class GGMLShard:
  """A resident shard: its tensors (by GGUF name) in a ggml context whose data is the mapped file (CPU) or a device buffer."""

  config: LlamaConfig
  shard: Shard
  capacity: int  # the most positions a request may hold: the model's context, capped at MAX_CONTEXT
  ctxs: list[int]  # ggml contexts: the file's tensors, then the engine's own
  buffers: list[int]
  tensors: dict[str, object]
  mapping: mmap.mmap | None
  rope_factors: object | None = None
  graphs: OrderedDict = field(default_factory=OrderedDict)

  def free(self) -> None:
    self.graphs.clear()
    for buffer in self.buffers:
      ggml.ggml_backend_buffer_free(buffer)
    for ctx in self.ctxs:
      ggml.ggml_free(ctx)
    self.ctxs, self.buffers, self.tensors = [], [], {}
    if self.mapping is not None:
      self.mapping.close()


def _file_names(config: LlamaConfig, shard: Shard) -> list[str]:
  """The GGUF tensors the shard computes with."""
  names = [gguf_name(layer_key(i, part)) for i in range(shard.start_layer, shard.end_layer + 1) for part in layer_parts(config)]
  if shard.is_first_layer():
    names.append(GGUF_GLOBALS[EMBED])
  if shard.is_last_layer():
    names += [GGUF_GLOBALS[NORM], GGUF_GLOBALS[EMBED] if config.tie_word_embeddings else GGUF_GLOBALS[LM_HEAD]]
  return list(dict.fromkeys(names))


def load_shard(path: Path, shard: Shard, backend: Backend) -> GGMLShard:
  """The shard's tensors as ggml tensors of the file's types: the file's mapped pages on the CPU, else copies on the device.
  Each tensor's type, shape and size are checked against ggml before it is placed: a BadInput names the first that fails.
  O(shard tensors) calls; on the CPU no weight byte is read until a step reads it."""
  if path.suffix != ".gguf":
    raise BadInput(f"the ggml engine reads GGUF files; {path} is not one (use --inference-engine tinygrad or mlx for this model)")
  config = load_config(path)
  if shard.n_layers != config.n_layers:
    raise BadInput(f"shard layers {shard.start_layer}..{shard.end_layer} of {shard.n_layers} do not fit {path}, which has {config.n_layers} layers")
  header = gguf_metadata(str(path))
  names = _file_names(config, shard)
  ctx = metadata_context(len(names) + 1)
  tensors = {}
  for name in names:
    t = header.tensors[name]
    kind = int(t.tensor_type)
    if kind not in TYPE_NAMES or ggml.ggml_blck_size(kind) <= 0 or t.shape[0] % ggml.ggml_blck_size(kind):
      raise BadInput(f"GGUF file {path}: tensor {name} has type {t.tensor_type.name} and shape {list(t.shape)}, which ggml cannot compute with")
    tensor = ggml.ggml_new_tensor(ctx, kind, len(t.shape), (ctypes.c_int64 * 4)(*t.shape, *[1] * (4 - len(t.shape))))
    if ggml.ggml_nbytes(tensor) != t.n_bytes:
      raise BadInput(f"GGUF file {path}: tensor {name} holds {t.n_bytes} bytes; its type and shape take {ggml.ggml_nbytes(tensor)}")
    tensors[name] = tensor
  model = GGMLShard(config, shard, min(config.context_length, MAX_CONTEXT), [ctx], [], tensors, None)
  try:
    with open_regular(path, "model file") as file:
      mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    view = np.frombuffer(mapping, dtype=np.uint8)
    base = view.ctypes.data
    if backend.is_cpu:
      model.mapping = mapping
      model.buffers.append(ggml.ggml_backend_cpu_buffer_from_ptr(base, len(mapping)))
      for name, tensor in tensors.items():
        ggml.ggml_backend_tensor_alloc(model.buffers[0], tensor, base + header.tensors[name].offset)
    else:
      model.buffers.append(ggml.ggml_backend_alloc_ctx_tensors(ctx, backend.handle))
      for name, tensor in tensors.items():
        ggml.ggml_backend_tensor_set(tensor, base + header.tensors[name].offset, 0, header.tensors[name].n_bytes)
      del view
      mapping.close()
    if config.rope_freq_factors is not None:
      model.rope_factors = _own_tensor(model, backend, np.asarray(config.rope_freq_factors, dtype=np.float32))
  except BaseException:
    model.free()
    raise
  return model


def _own_tensor(model: GGMLShard, backend: Backend, values: np.ndarray):
  """A small float32 vector the engine makes (not from the file), in a buffer of its own on the backend."""
  ctx = metadata_context(1)
  model.ctxs.append(ctx)
  tensor = ggml.ggml_new_tensor_1d(ctx, ggml.GGML_TYPE_F32, len(values))
  model.buffers.append(ggml.ggml_backend_alloc_ctx_tensors(ctx, backend.handle))
  set_input(tensor, values)
  return tensor
