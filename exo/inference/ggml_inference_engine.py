"""A Llama-family engine (Llama, Qwen2) on ggml, llama.cpp's own tensor library: GGUF files as they are, every type ggml
computes with (F32, F16, BF16, Q4_0 ... Q8_0, the K-quants, the IQ types), at llama.cpp's speed.

Weights: a node reads only its shard's tensors (plus the embedding on the first stage, the final norm and head on the last)
as ggml tensors of the file's own types. On the CPU they are the file's pages, mapped: nothing is copied or widened, and only
the pages a step reads count towards the process's memory (the embedding's rows a prompt looks up, not the whole table). On a
GPU backend each tensor is copied to the device once. The rows of Llama's Q and K projections stay in llama.cpp's order, so
RoPE rotates adjacent pairs (ggml's normal mode); Qwen2's rotate halves (NEOX mode). Llama 3's per-frequency divisors and
linear scaling reach RoPE as its frequency factors; Qwen2's Q, K and V biases are added.

Per layer: h = x + Attention(RMSNorm(x)); out = h + SwiGLU(RMSNorm(h)); attention is ggml's flash attention over the
request's KV cache (float16, as llama.cpp's), computed in float32.

KV cache: per request and shard, (K, V) each (n_kv_heads * head_dim, context, layers) float16, for the request's context
(the plan's, at most the model's capped at MAX_CONTEXT), allocated at its first step and not written until positions are:
untouched memory costs nothing. Attention reads a window of the cache, its first multiple of WINDOW cells that holds every
position so far; the cells of a window are zeroed when it first grows over them (masked cells still enter ggml's tiled
products), so a request holds the cache of the positions it reached, rounded up to WINDOW.

Graphs: one engine call is one ggml graph over every step in it: the rows of all its requests go through each matrix product
together (the weights are read once for the batch), each request's rows attend to its own cache at its own positions.
Building a graph costs thousands of calls through Python, so graphs are kept and reused (up to GRAPHS of them): a graph
depends on its requests' caches, rows and windows, and everything that changes from step to step (token ids or hidden
states, positions, the cache rows written, the attention masks, which rows the head reads) is an input tensor written before
each run. A decode step therefore costs one input copy and one graph run; a request's graph is rebuilt only when its window
grows. A prompt runs in chunks of at most PREFILL_CHUNK rows.

The engine's work runs off the event loop in one thread of its own (ggml's CPU backend runs `threads` threads inside it).
"""

import asyncio
import ctypes
import itertools
import logging
import mmap
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import ggml
import numpy as np

from exo.base.errors import BadInput
from exo.base.files import open_regular
from exo.base.model_spec import MAX_CONTEXT
from exo.base.shard import Shard
from exo.inference.ggml_library import TYPE_NAMES, Backend, default_threads, get_output, metadata_context, set_input
from exo.inference.heap import trim_heap
from exo.inference.llama_weights import EMBED, GGUF_GLOBALS, GGUF_PARTS, LM_HEAD, NORM, LlamaConfig, gguf_metadata, layer_parts, load_config
from exo.inference.model_file_engine import ModelFileEngine
from exo.inference.model_files import locate_model
from exo.inference.model_sources import ENGINE_FORMATS
from exo.inference.sharded_engine import ModelDims

log = logging.getLogger(__name__)
WINDOW = 64  # cache cells a request's attention window grows by (each growth builds its graphs again: a few ms)
PREFILL_CHUNK = 256  # rows of a prompt per graph: bounds the intermediate tensors (a chunk's logits are chunk x vocabulary)
BATCH = 16  # one-row steps per graph
GRAPHS = 16  # graphs kept for reuse, the least recently used dropped first
_SERIAL = itertools.count()


@dataclass(eq=False)
class _Cache:
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
class _Graph:
  """A built graph and its input tensors; `caches` keeps the caches it writes alive while it exists."""

  ctx: int
  graph: object
  inputs: object  # token ids (N,) int32 on the first shard, else hidden states (hidden, N) float32
  positions: object  # (N,) int32
  cache_rows: list  # per request (T_i,) int64: the cache cells its rows write
  masks: list  # per request (window_i, T_i padded) float16: 0 where a row may attend, -inf elsewhere
  head_rows: object | None  # (R,) int32: the rows whose logits the head computes, on the last shard
  output: object
  caches: list[_Cache]

  def __del__(self):
    ggml.ggml_free(self.ctx)


@dataclass(eq=False)
class _ShardModel:
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
  names = [f"blk.{i}.{GGUF_PARTS[part]}" for i in range(shard.start_layer, shard.end_layer + 1) for part in layer_parts(config)]
  if shard.is_first_layer():
    names.append(GGUF_GLOBALS[EMBED])
  if shard.is_last_layer():
    names += [GGUF_GLOBALS[NORM], GGUF_GLOBALS[EMBED] if config.tie_word_embeddings else GGUF_GLOBALS[LM_HEAD]]
  return list(dict.fromkeys(names))


def load_shard(path: Path, shard: Shard, backend: Backend) -> _ShardModel:
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
  model = _ShardModel(config, shard, min(config.context_length, MAX_CONTEXT), [ctx], [], tensors, None)
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


def _own_tensor(model: _ShardModel, backend: Backend, values: np.ndarray):
  """A small float32 vector the engine makes (not from the file), in a buffer of its own on the backend."""
  ctx = metadata_context(1)
  model.ctxs.append(ctx)
  tensor = ggml.ggml_new_tensor_1d(ctx, ggml.GGML_TYPE_F32, len(values))
  model.buffers.append(ggml.ggml_backend_alloc_ctx_tensors(ctx, backend.handle))
  set_input(tensor, values)
  return tensor


def _padded(rows: int) -> int:
  """A mask's rows: ggml's flash attention reads masks padded to GGML_KQ_MASK_PAD rows."""
  pad = ggml.GGML_KQ_MASK_PAD
  return -(-rows // pad) * pad


def _build(model: _ShardModel, caches: list[_Cache], rows: list[int], windows: list[int], head_rows: int) -> _Graph:
  """The graph of one call: request i's rows[i] rows (in order, one after another) at the cache cells its inputs name,
  attending over the first windows[i] cells of caches[i]; on the last shard, logits for `head_rows` rows the input names.
  O(layers x requests) ggml calls."""
  c, shard, t = model.config, model.shard, model.tensors
  hd, heads, kv_heads, n = c.head_dim, c.n_heads, c.n_kv_heads, sum(rows)
  nodes = 64 + shard.get_layer_count() * (32 + 16 * len(caches))  # a layer makes about 22 nodes, and 13 more per request
  ctx = metadata_context(nodes, nodes)
  graph = ggml.ggml_new_graph_custom(ctx, nodes, False)

  def new_input(kind: int, *shape: int):
    tensor = {1: ggml.ggml_new_tensor_1d, 2: ggml.ggml_new_tensor_2d}[len(shape)](ctx, kind, *shape)
    ggml.ggml_set_input(tensor)
    return tensor

  if shard.is_first_layer():
    inputs = new_input(ggml.GGML_TYPE_I32, n)
    x = ggml.ggml_get_rows(ctx, t[GGUF_GLOBALS[EMBED]], inputs)
  else:
    inputs = x = new_input(ggml.GGML_TYPE_F32, c.hidden_size, n)
  positions = new_input(ggml.GGML_TYPE_I32, n)
  cache_rows = [new_input(ggml.GGML_TYPE_I64, r) for r in rows]
  masks = [new_input(ggml.GGML_TYPE_F16, w, _padded(r)) for w, r in zip(windows, rows)]
  mode = ggml.GGML_ROPE_TYPE_NORMAL if c.architecture == "llama" else ggml.GGML_ROPE_TYPE_NEOX
  scale = 1.0 / hd**0.5

  def rope(y):
    return ggml.ggml_rope_ext(ctx, y, positions, model.rope_factors, hd, mode, c.context_length, c.rope_theta, 1.0, 0.0, 1.0, 0.0, 0.0)

  def project(h, name: str, layer: int):
    y = ggml.ggml_mul_mat(ctx, t[f"blk.{layer}.{name}.weight"], h)
    bias = t.get(f"blk.{layer}.{name}.bias")
    return y if bias is None else ggml.ggml_add(ctx, y, bias)

  def norm(y, weight):
    return ggml.ggml_mul(ctx, ggml.ggml_rms_norm(ctx, y, c.rms_norm_eps), weight)

  for j, layer in enumerate(range(shard.start_layer, shard.end_layer + 1)):
    h = norm(x, t[f"blk.{layer}.attn_norm.weight"])
    q = rope(ggml.ggml_reshape_3d(ctx, project(h, "attn_q", layer), hd, heads, n))
    k = ggml.ggml_reshape_2d(ctx, rope(ggml.ggml_reshape_3d(ctx, project(h, "attn_k", layer), hd, kv_heads, n)), hd * kv_heads, n)
    v = project(h, "attn_v", layer)
    attention, first = None, 0
    for cache, r, window, written, mask in zip(caches, rows, windows, cache_rows, masks):
      for source, target in ((k, cache.k), (v, cache.v)):
        nb = target.contents.nb
        cells = ggml.ggml_view_2d(ctx, target, hd * kv_heads, cache.context, nb[1], j * nb[2])
        step = ggml.ggml_view_2d(ctx, source, hd * kv_heads, r, source.contents.nb[1], first * source.contents.nb[1])
        ggml.ggml_build_forward_expand(graph, ggml.ggml_set_rows(ctx, cells, step, written))
      keys, values = (ggml.ggml_view_3d(ctx, m, hd, window, kv_heads, m.contents.nb[1], hd * 2, j * m.contents.nb[2]) for m in (cache.k, cache.v))
      query = ggml.ggml_view_3d(ctx, q, hd, heads, r, q.contents.nb[1], q.contents.nb[2], first * q.contents.nb[2])
      out = ggml.ggml_flash_attn_ext(ctx, ggml.ggml_permute(ctx, query, 0, 2, 1, 3), keys, values, mask, scale, 0.0, 0.0)
      ggml.ggml_flash_attn_ext_set_prec(out, ggml.GGML_PREC_F32)
      out = ggml.ggml_reshape_2d(ctx, out, hd * heads, r)
      attention = out if attention is None else ggml.ggml_concat(ctx, attention, out, 1)
      first += r
    x = ggml.ggml_add(ctx, x, project(attention, "attn_output", layer))
    h = norm(x, t[f"blk.{layer}.ffn_norm.weight"])
    gated = ggml.ggml_swiglu_split(ctx, project(h, "ffn_gate", layer), project(h, "ffn_up", layer))
    x = ggml.ggml_add(ctx, x, project(gated, "ffn_down", layer))
  selected = None
  if shard.is_last_layer():
    selected = new_input(ggml.GGML_TYPE_I32, head_rows)
    head = t[GGUF_GLOBALS[EMBED] if c.tie_word_embeddings else GGUF_GLOBALS[LM_HEAD]]
    x = ggml.ggml_mul_mat(ctx, head, norm(ggml.ggml_get_rows(ctx, x, selected), t[GGUF_GLOBALS[NORM]]))
  ggml.ggml_set_output(x)
  ggml.ggml_build_forward_expand(graph, x)
  return _Graph(ctx, graph, inputs, positions, cache_rows, masks, selected, x, list(caches))


def _mask(start: int, rows: int, window: int) -> np.ndarray:
  """Row i (the position start + i) may attend to cells 0..start + i; padding rows to none."""
  cells = np.arange(window)
  allowed = cells[None, :] <= start + np.arange(_padded(rows))[:, None]
  allowed[rows:] = False
  return np.where(allowed, np.float16(0), np.float16(-np.inf))


class GGMLInferenceEngine(ModelFileEngine):
  """`threads`: the CPU backend's threads (None: the machine's physical cores). `seed` drives sampling at temperature > 0.
  `memory_limit_bytes`: see ShardedEngine."""

  formats = ENGINE_FORMATS["ggml"]

  def __init__(self, threads: int | None = None, seed: int = 0, memory_limit_bytes: int | None = None):
    super().__init__(seed, memory_limit_bytes)
    self.threads = threads or default_threads()
    self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ggml")
    self._backend: Backend | None = None  # made in the worker, on the first load

  async def _in_worker(self, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

  def close(self) -> None:
    """Drop every request's cache and resident shard, then the backend, once queued work is done."""
    self._worker.submit(self._release).result()
    self._worker.shutdown()

  # in the worker thread

  def _release(self) -> None:
    self._states.clear()
    for model in self._models.values():
      model.free()
    self._models.clear()
    if self._backend is not None:
      self._backend.free()
      self._backend = None

  def _load_model(self, shard: Shard) -> _ShardModel:
    if self._backend is None:
      self._backend = Backend(self.threads)
      log.info("ggml computes on %s (%d threads on a CPU)", self._backend.name, self.threads)
    model = load_shard(Path(locate_model(shard.model_id)), shard, self._backend)
    trim_heap()  # the header's values, read to check the file
    return model

  def _unload_model(self, model: _ShardModel) -> None:
    model.free()

  def _new_cache(self, model: _ShardModel, shard: Shard, context: int) -> _Cache:
    c = model.config
    ctx = metadata_context(2)
    k, v = (ggml.ggml_new_tensor_3d(ctx, ggml.GGML_TYPE_F16, c.head_dim * c.n_kv_heads, context, shard.get_layer_count()) for _ in range(2))
    buffer = ggml.ggml_backend_alloc_ctx_tensors(ctx, self._backend.handle)
    if not buffer:
      ggml.ggml_free(ctx)
      raise MemoryError(f"ggml could not allocate a KV cache of {context} positions")
    return _Cache(context, ctx, k, v, buffer)

  def _dims(self, model: _ShardModel) -> ModelDims:
    return ModelDims(model.config.vocab_size, model.config.hidden_size, model.capacity)

  def _forward(self, model: _ShardModel, cache: _Cache, shard: Shard, x: np.ndarray, position: int) -> np.ndarray:
    return self._forward_steps(model, [cache], shard, [x], [position], [False])[0]

  def _forward_batch(self, model: _ShardModel, caches: list, shard: Shard, xs: list[np.ndarray], positions: list[int]) -> list[np.ndarray]:
    return self._forward_steps(model, caches, shard, xs, positions, [False] * len(xs))

  def _forward_steps(
    self, model: _ShardModel, caches: list, shard: Shard, xs: list[np.ndarray], positions: list[int], last_only: list[bool]
  ) -> list[np.ndarray]:
    """The one-row steps together, BATCH requests to a graph; every longer input alone, in chunks of PREFILL_CHUNK rows (where
    only its last row's output is wanted, the head runs on that row of the last chunk only).
    O(shard weights x graphs + each request's attention over its window)."""
    outputs: list = [None] * len(xs)
    decoding = [i for i, x in enumerate(xs) if len(x) == 1]
    for lo in range(0, len(decoding), BATCH):
      group = decoding[lo : lo + BATCH]
      outs = self._call(model, [caches[i] for i in group], [xs[i] for i in group], [positions[i] for i in group], [False] * len(group))
      for i, out in zip(group, outs):
        outputs[i] = out
    for i in [i for i, x in enumerate(xs) if len(x) > 1]:
      starts = range(0, len(xs[i]), PREFILL_CHUNK)
      chunks = [self._call(model, [caches[i]], [xs[i][lo : lo + PREFILL_CHUNK]], [positions[i] + lo], [last_only[i]])[0] for lo in starts]
      outputs[i] = chunks[-1] if last_only[i] else np.concatenate(chunks, axis=1)
    return outputs

  def _call(self, model: _ShardModel, caches: list[_Cache], xs: list[np.ndarray], positions: list[int], last_only: list[bool]) -> list[np.ndarray]:
    """One graph run over the requests' rows; each request's (1, rows, hidden) states, or its (1, rows, vocab) logits (one row
    where last_only)."""
    rows = [len(x) for x in xs]
    windows = [min(cache.context, -(-(p + r) // WINDOW) * WINDOW) for cache, p, r in zip(caches, positions, rows)]
    for cache, window in zip(caches, windows):
      if window > cache.zeroed:
        cache.zero_to(window)
    bounds = np.cumsum([0] + rows)
    last = model.shard.is_last_layer()
    kept = [np.arange(hi - 1 if only and last else lo, hi) for lo, hi, only in zip(bounds[:-1], bounds[1:], last_only)]
    graph = self._graph(model, caches, rows, windows, sum(len(k) for k in kept))
    self._backend.allocate(graph.graph)
    spans = [np.arange(p, p + r) for p, r in zip(positions, rows)]
    set_input(graph.inputs, np.concatenate(xs).astype(np.int32 if model.shard.is_first_layer() else np.float32))
    set_input(graph.positions, np.concatenate(spans).astype(np.int32))
    for tensor, mask, span, p, r, window in zip(graph.cache_rows, graph.masks, spans, positions, rows, windows):
      set_input(tensor, span.astype(np.int64))
      set_input(mask, _mask(p, r, window))
    if graph.head_rows is not None:
      set_input(graph.head_rows, np.concatenate(kept).astype(np.int32))
    self._backend.run(graph.graph)
    if not last:
      out = get_output(graph.output, (bounds[-1], model.config.hidden_size))
      return [out[lo:hi][None] for lo, hi in zip(bounds[:-1], bounds[1:])]
    out = get_output(graph.output, (sum(len(k) for k in kept), model.config.vocab_size))
    ends = np.cumsum([0] + [len(k) for k in kept])
    return [out[lo:hi][None] for lo, hi in zip(ends[:-1], ends[1:])]

  def _graph(self, model: _ShardModel, caches: list[_Cache], rows: list[int], windows: list[int], head_rows: int) -> _Graph:
    """The call's graph: a kept one for the same caches, rows, windows and head rows, else built (dropping the least recently
    used)."""
    key = (tuple(cache.serial for cache in caches), tuple(rows), tuple(windows), head_rows)
    graph = model.graphs.get(key)
    if graph is None:
      graph = model.graphs[key] = _build(model, caches, rows, windows, head_rows)
      while len(model.graphs) > GRAPHS:
        model.graphs.popitem(last=False)
    model.graphs.move_to_end(key)
    return graph

  async def finish_request(self, request_id: str) -> None:
    """Release the request's caches, and the kept graphs that write them."""
    await super().finish_request(request_id)
    await self._in_worker(self._drop_finished_graphs)

  def _drop_finished_graphs(self) -> None:
    live = {state.cache.serial for state in self._states.values()}
    for model in self._models.values():
      for key in [key for key in model.graphs if not set(key[0]) <= live]:
        del model.graphs[key]
