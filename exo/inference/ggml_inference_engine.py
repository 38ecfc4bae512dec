"""A Llama-family engine (Llama, Qwen2) on ggml, llama.cpp's own tensor library: GGUF files as they are, every type ggml
computes with (F32, F16, BF16, Q4_0 ... Q8_0, the K-quants, the IQ types), at llama.cpp's speed.

A resident shard's tensors and its requests' KV caches are ggml_shard's; the graph of a call, ggml_graph's. This module keeps
the requests' caches, windows and graphs, and runs the calls.

KV cache: per request and shard, for the request's context (the plan's, at most the model's capped at MAX_CONTEXT), allocated
at its first step. Attention reads a window of the cache, its first multiple of WINDOW cells that holds every position so far;
the cells of a window are zeroed when it first grows over them, so a request holds the cache of the positions it reached,
rounded up to WINDOW.

Graphs: one engine call is one ggml graph over every step in it (ggml_graph). Building a graph costs thousands of calls
through Python, so graphs are kept and reused (up to GRAPHS of them): a graph depends on its requests' caches, rows and
windows, and everything else is an input tensor written before each run. A decode step therefore costs one input copy and one
graph run; a request's graph is rebuilt only when its window grows. ggml places a graph's intermediate tensors in the
allocator's buffer on its first run and keeps them there, so when a larger graph grows that buffer every other kept graph is
dropped (it would write into freed memory). A prompt runs in chunks of at most PREFILL_CHUNK rows.

The engine's work runs off the event loop in one thread of its own (ggml's CPU backend runs `threads` threads inside it).
"""

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ggml
import numpy as np

from exo.base.shard import Shard
from exo.inference.ggml_graph import Graph, attention_mask, build
from exo.inference.ggml_library import Backend, default_threads, get_output, metadata_context, set_input
from exo.inference.ggml_shard import GGMLShard, KVCache, load_shard
from exo.inference.heap import trim_heap
from exo.inference.model_file_engine import ModelFileEngine
from exo.inference.model_files import locate_model
from exo.inference.model_sources import ENGINE_FORMATS
from exo.inference.sharded_engine import ModelDims

log = logging.getLogger(__name__)
WINDOW = 64  # cache cells a request's attention window grows by (each growth builds its graphs again: a few ms)
PREFILL_CHUNK = 256  # rows of a prompt per graph: bounds the intermediate tensors (a chunk's logits are chunk x vocabulary)
BATCH = 16  # requests per graph
PROMPT_ROWS = 128  # prompt rows a call takes beside its decode steps (the stage scheduler's budget)
GRAPHS = 16  # graphs kept for reuse, the least recently used dropped first


class GGMLInferenceEngine(ModelFileEngine):
  """`threads`: the CPU backend's threads (None: the machine's physical cores). `seed` drives sampling at temperature > 0.
  `memory_limit_bytes`: see ShardedEngine."""

  formats = ENGINE_FORMATS["ggml"]
  max_batch = BATCH
  prompt_rows = PROMPT_ROWS

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

  def _load_model(self, shard: Shard) -> GGMLShard:
    if self._backend is None:
      self._backend = Backend(self.threads)
      log.info("ggml computes on %s (%d threads on a CPU)", self._backend.name, self.threads)
    model = load_shard(Path(locate_model(shard.model_id)), shard, self._backend)
    trim_heap()  # the header's values, read to check the file
    return model

  def _unload_model(self, model: GGMLShard) -> None:
    model.free()

  def _new_cache(self, model: GGMLShard, shard: Shard, context: int) -> KVCache:
    c = model.config
    ctx = metadata_context(2)
    k, v = (ggml.ggml_new_tensor_3d(ctx, ggml.GGML_TYPE_F16, c.head_dim * c.n_kv_heads, context, shard.get_layer_count()) for _ in range(2))
    buffer = ggml.ggml_backend_alloc_ctx_tensors(ctx, self._backend.handle)
    if not buffer:
      ggml.ggml_free(ctx)
      raise MemoryError(f"ggml could not allocate a KV cache of {context} positions")
    return KVCache(context, ctx, k, v, buffer)

  def _dims(self, model: GGMLShard) -> ModelDims:
    return ModelDims(model.config.vocab_size, model.config.hidden_size, model.capacity)

  def _forward(self, model: GGMLShard, cache: KVCache, shard: Shard, x: np.ndarray, position: int) -> np.ndarray:
    return self._forward_steps(model, [cache], shard, [x], [position], [False])[0]

  def _forward_batch(self, model: GGMLShard, caches: list, shard: Shard, xs: list[np.ndarray], positions: list[int]) -> list[np.ndarray]:
    return self._forward_steps(model, caches, shard, xs, positions, [False] * len(xs))

  def _forward_steps(
    self, model: GGMLShard, caches: list, shard: Shard, xs: list[np.ndarray], positions: list[int], last_only: list[bool]
  ) -> list[np.ndarray]:
    """The steps of at most PREFILL_CHUNK rows together, in order, up to BATCH requests and PREFILL_CHUNK + BATCH rows to a
    graph (decode steps and prompt chunks of different requests alike); every longer input alone, in chunks of PREFILL_CHUNK
    rows. Where only a step's last row is wanted, the head runs on that row only.
    O(shard weights x graphs + each request's attention over its window)."""
    outputs: list = [None] * len(xs)
    groups, rows = [[]], 0
    for i in [i for i, x in enumerate(xs) if len(x) <= PREFILL_CHUNK]:
      if groups[-1] and (len(groups[-1]) == BATCH or rows + len(xs[i]) > PREFILL_CHUNK + BATCH):
        groups.append([])
        rows = 0
      groups[-1].append(i)
      rows += len(xs[i])
    for group in [g for g in groups if g]:
      outs = self._call(model, [caches[i] for i in group], [xs[i] for i in group], [positions[i] for i in group], [last_only[i] for i in group])
      for i, out in zip(group, outs):
        outputs[i] = out
    for i in [i for i, x in enumerate(xs) if len(x) > PREFILL_CHUNK]:
      starts = range(0, len(xs[i]), PREFILL_CHUNK)
      chunks = [self._call(model, [caches[i]], [xs[i][lo : lo + PREFILL_CHUNK]], [positions[i] + lo], [last_only[i]])[0] for lo in starts]
      outputs[i] = chunks[-1] if last_only[i] else np.concatenate(chunks, axis=1)
    return outputs

  def _call(self, model: GGMLShard, caches: list[KVCache], xs: list[np.ndarray], positions: list[int], last_only: list[bool]) -> list[np.ndarray]:
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
    if self._backend.allocate(graph.graph):
      self._drop_graphs_but(graph)
    spans = [np.arange(p, p + r) for p, r in zip(positions, rows)]
    set_input(graph.inputs, np.concatenate(xs).astype(np.int32 if model.shard.is_first_layer() else np.float32))
    set_input(graph.positions, np.concatenate(spans).astype(np.int32))
    for tensor, mask, span, p, r, window in zip(graph.cache_rows, graph.masks, spans, positions, rows, windows):
      set_input(tensor, span.astype(np.int64))
      set_input(mask, attention_mask(p, r, window))
    if graph.head_rows is not None:
      set_input(graph.head_rows, np.concatenate(kept).astype(np.int32))
    self._backend.run(graph.graph)
    if not last:
      out = get_output(graph.output, (bounds[-1], model.config.hidden_size))
      return [out[lo:hi][None] for lo, hi in zip(bounds[:-1], bounds[1:])]
    out = get_output(graph.output, (sum(len(k) for k in kept), model.config.vocab_size))
    ends = np.cumsum([0] + [len(k) for k in kept])
    return [out[lo:hi][None] for lo, hi in zip(ends[:-1], ends[1:])]

  def _graph(self, model: GGMLShard, caches: list[KVCache], rows: list[int], windows: list[int], head_rows: int) -> Graph:
    """The call's graph: a kept one for the same caches, rows, windows and head rows, else built (dropping the least recently
    used)."""
    key = (tuple(cache.serial for cache in caches), tuple(rows), tuple(windows), head_rows)
    graph = model.graphs.get(key)
    if graph is None:
      graph = model.graphs[key] = build(model, caches, rows, windows, head_rows)
      while len(model.graphs) > GRAPHS:
        model.graphs.popitem(last=False)
    model.graphs.move_to_end(key)
    return graph

  def _drop_graphs_but(self, kept: Graph) -> None:
    """Drop every kept graph but `kept`: the allocator's buffer grew, and their tensors lie in the freed one."""
    for model in self._models.values():
      for key in [key for key, graph in model.graphs.items() if graph is not kept]:
        del model.graphs[key]

  async def finish_request(self, request_id: str) -> None:
    """Release the request's caches, and the kept graphs that write them."""
    await super().finish_request(request_id)
    await self._in_worker(self._drop_finished_graphs)

  def _drop_finished_graphs(self) -> None:
    live = {state.cache.serial for state in self._states.values()}
    for model in self._models.values():
      for key in [key for key in model.graphs if not set(key[0]) <= live]:
        del model.graphs[key]
