"""A Llama-family engine (Llama, Qwen2) in tinygrad: each node holds only its shard's layers, at the precision of the model
file, and keeps per request a KV cache for those layers.

The shard's forward pass (layers, attention, what a resident shard holds) is tinygrad_llama's; its matrix products, which
dequantize the file's packed weights inside their kernels, are tinygrad_matmul's.

Speed: a shard's step over a padded input length is one TinyJit function, captured once per shard and length and replayed;
the start position is a bound symbolic variable. BEAM=n in the environment searches kernel optimizations when a step is
captured, cached on disk in tinygrad's CACHEDB.

Determinism: the hidden state is realized after every layer, so a layer runs the same kernels on the same inputs whether its
shard holds 1 or 30 layers, and a model split over several engines gives exactly the greedy tokens of one engine (with BEAM, the
shared on-disk cache gives every engine on a machine the same kernel choices). A multi-row input runs in chunks of PREFILL_CHUNK
positions, the last one padded with zero rows, so a shard has two steps, one row and one chunk, whatever the prompt lengths: a
captured step holds its intermediates for good, and a chunk's are large (attention scores sized for the whole context, logits for
the whole vocabulary), so one step per length would hold tens of MB each. Padded rows sit after the real ones, the causal mask
hides them from real rows, and their cache entries are overwritten before a later position reads them.

Batched decode (continuous batching): the decode steps of B >= 2 requests waiting at a stage run in steps of BATCH_ROWS
requests (then 2, then 1), each captured once per shard: the B tokens' embeddings, each layer's norms and matrix products over the B rows (weights dequantized once per
BATCH_ROWS rows instead of once per row), RoPE and attention per request against its own cache at its own position (a bound
variable each), the head. Each row's sums run in the order of a lone row's, so each request's result is bit-identical to its
step alone; verified on the CPU through clang without BEAM only, elsewhere each request steps alone (see _batches).

KV cache: allocated per request, once, for the request's context: the plan's (what the planner reserved KV for, the step's
`context`), at most the engine's, the model's capped at MAX_CONTEXT. On the CPU the allocation stays untouched virtual memory until
positions are written, so a request occupies what it uses. A step is captured per cache size too (the cache is a JIT input, and
its size is in the kernels): a ring runs every request at its plan's context, so a shard normally has one size.

The tinygrad work runs off the event loop (which keeps serving) in ONE worker thread per process, shared by every engine in it:
tinygrad's kernel caches and JIT capture are process-global and not thread-safe, and its compile cache is an SQLite connection
that only the thread which opened it may use. Engines in one process (a simulated ring) therefore take turns, as they would on
one CPU anyway.
"""

import asyncio
import functools
import os
import platform
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tinygrad import Context, Device, Tensor, TinyJit, UOp
from tinygrad.device import LRUAllocator
from tinygrad.helpers import BEAM, DEV
from tinygrad.renderer.cstyle import ClangRenderer

from exo.base.model_spec import MAX_CONTEXT
from exo.base.shard import Shard
from exo.inference.gpu_presence import has_gpu
from exo.inference.heap import trim_heap
from exo.inference.llama_config import rope_inv_freq
from exo.inference.llama_layout import EMBED, LM_HEAD, NORM, layer_key, layer_parts
from exo.inference.llama_weights import load_shard_weights
from exo.inference.model_file_engine import ModelFileEngine
from exo.inference.model_files import locate_model
from exo.inference.sharded_engine import ModelDims
from exo.inference.tinygrad_llama import TinygradShard, embed
from exo.inference.tinygrad_matmul import BATCH_ROWS, host_view, to_device

PREFILL_CHUNK = 16  # rows of a prompt chunk; its step holds (chunk, context) attention scores: 9 MB each for SmolLM2
# All tinygrad work of the process runs on this one thread, for the life of the process: tinygrad is not thread-safe, and it
# keeps per-thread state (its kernel cache's SQLite connection) that a thread started later could not use. Idle, it costs
# nothing; the interpreter joins it at exit.
_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinygrad")


def _release_freed_memory(device: str) -> None:
  """Hand memory freed since the last call back to the OS: the device's cache of freed buffers, and (glibc) the heap's free
  pages, which glibc keeps when other allocations sit above them, as tinygrad's do above the loader's freed arrays."""
  allocator = Device[device].allocator
  if isinstance(allocator, LRUAllocator):
    allocator.free_cache()
  trim_heap()


def _positions(cache: list[Tensor]) -> int:
  """The positions a request's per-layer caches hold (each (2, n_kv_heads, positions, head_dim))."""
  return cache[0].shape[2]


def _batches(device: str) -> bool:
  """Whether a batched decode step is bit-identical to each request's step alone on `device`, as verified: kernels compiled
  through clang (the CPU's default) without BEAM. The identity rests on tinygrad choosing each row's reduction order for B rows
  as for one, and on its C rendering of paired sums (tinygrad_matmul.matmul): BEAM searches each kernel's order on its own, and on devices with
  local memory (GPUs) the heuristics split a reduction depending on the output's size (emulated, paired sums came out in another
  order)."""
  return isinstance(Device[device].renderer, ClangRenderer) and not BEAM.value


def default_device() -> str | None:
  """The device an engine runs on when none is named: the CPU on a Linux host with no GPU device node, where letting tinygrad
  choose would import every backend to probe it (~40 MB); else None, tinygrad's own choice (or DEV= from the environment)."""
  if os.environ.get("DEV") or platform.system() != "Linux" or has_gpu():
    return None
  return "CPU"


class TinygradInferenceEngine(ModelFileEngine):
  """`device`: a tinygrad device name (None: default_device()). `seed` drives sampling at temperature > 0. `jit`: replay captured kernels (False runs every op through tinygrad's
  scheduler: same kernels, same bits, slower). `memory_limit_bytes`: see ShardedEngine."""

  def __init__(self, device: str | None = None, seed: int = 0, jit: bool = True, memory_limit_bytes: int | None = None):
    super().__init__(seed, memory_limit_bytes)
    self.device = device or default_device()
    self.jit = jit

  @functools.cached_property
  def max_batch(self) -> int:
    """Two captured steps of BATCH_ROWS rows where batching is bit-identical (_batches), else one request at a time; asked of the
    device in the worker thread, as all tinygrad work is."""
    exact = _WORKER.submit(self._on_device, lambda: _batches(self.device or Device.DEFAULT)).result()
    return 2 * BATCH_ROWS if exact else 1

  async def _in_worker(self, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(_WORKER, self._on_device, fn, *args)

  def _on_device(self, fn, *args):
    """fn(*args) with tinygrad's default device set to this engine's where the environment (DEV) leaves it open: tinygrad
    creates constants on the default device, and choosing one imports every backend to probe it (~40 MB on a CPU-only host)."""
    if self.device is None or DEV.device:
      return fn(*args)
    with Context(DEV=self.device):
      return fn(*args)

  def held_array_bytes(self, shard: Shard) -> int:
    """Bytes the resident `shard` holds: its device tensors plus host arrays that are not views of them."""
    return self._models[shard].held_array_bytes()

  def close(self) -> None:
    """Drop every resident shard and request state once queued work is done (the worker thread is the process's)."""
    models = list(self._models.values())
    self._models.clear()
    self._states.clear()
    for model in models:
      _WORKER.submit(self._on_device, self._unload_model, model).result()

  # in the worker thread

  def _load_model(self, shard: Shard) -> TinygradShard:
    """The shard's weights moved to the device one by one, each host copy dropped once moved. O(shard weights)."""
    device = Device.canonicalize(self.device)
    config, weights = load_shard_weights(locate_model(shard.model_id), shard)
    capacity = min(config.context_length, MAX_CONTEXT)
    angles = np.arange(capacity, dtype=np.float64)[:, None] * rope_inv_freq(config)[None, :]
    cos, sin = (Tensor(f(angles).astype(np.float32), device=device).realize() for f in (np.cos, np.sin))

    def take(name: str):
      w = weights.pop(name)
      return to_device(w, device) if len(w.shape) == 2 else Tensor(w, device=device).realize()

    layers = []
    for i in range(shard.start_layer, shard.end_layer + 1):
      layers.append({part: take(layer_key(i, part)) for part in layer_parts(config)})
      _release_freed_memory(device)  # the layer's host arrays: else the host holds the shard twice by the end
    model = TinygradShard(config, device, capacity, layers, cos, sin)
    if shard.is_last_layer():
      model.norm, model.head = take(NORM), take(LM_HEAD)
    if shard.is_first_layer():
      tied_here = config.tie_word_embeddings and shard.is_last_layer()
      model.embedding_is_head = tied_here and device.split(":")[0] == "CPU"
      model.embedding = host_view(model.head) if model.embedding_is_head else weights.pop(EMBED)
    weights.clear()  # a tied embedding is left: on the device now, as the head
    _release_freed_memory(device)
    return model

  def _unload_model(self, model: TinygradShard) -> None:
    """Drop the model's tensors and captured steps, and hand the device's cached free buffers back."""
    model.steps.clear()
    model.layers, model.head, model.norm, model.embedding = [], None, None, None
    _release_freed_memory(model.device)

  def _new_cache(self, model: TinygradShard, shard: Shard, context: int) -> list[Tensor]:
    """Per layer, (2, n_kv_heads, context, head_dim) float32 rotated keys and values; allocated, not written."""
    c = model.config
    caches = [Tensor.empty(2, c.n_kv_heads, context, c.head_dim, device=model.device) for _ in model.layers]
    for cache in caches:
      cache.uop.buffer.ensure_allocated()  # a real buffer, as JIT inputs must be; Tensor.empty(...).realize() would not allocate it
    return caches

  def _dims(self, model: TinygradShard) -> ModelDims:
    return ModelDims(model.config.vocab_size, model.config.hidden_size, model.capacity)

  def _forward(self, model: TinygradShard, cache: list[Tensor], shard: Shard, x: np.ndarray, position: int) -> np.ndarray:
    h = embed(model.embedding, x) if shard.is_first_layer() else x
    outputs = [self._run_chunk(model, cache, h[lo : lo + PREFILL_CHUNK], position + lo) for lo in range(0, len(h), PREFILL_CHUNK)]
    return np.concatenate(outputs)[None]

  def _forward_batch(self, model: TinygradShard, caches: list, shard: Shard, xs: list[np.ndarray], positions: list[int]) -> list[np.ndarray]:
    """B >= 2 requests' decode steps (one row each) as steps of BATCH_ROWS (then 2) requests: every matrix product over their
    rows at once, attention per request. A step of more rows would take as long as those steps one after another (products run
    BATCH_ROWS rows to a kernel) while every new B costs a capture of tens of seconds. Each request's result is bit-identical to its own _forward. Other inputs, or where batching is not
    known to be bit-identical (_batches): one _forward each. O(shard weights + B * (hidden + attention over its positions))."""
    if len(xs) < 2 or any(len(x) != 1 for x in xs) or not _batches(model.device):
      return super()._forward_batch(model, caches, shard, xs, positions)
    sizes = [_positions(cache) for cache in caches]
    if len(set(sizes)) > 1:  # requests planned for different contexts: each size's batch on its own (a captured step has one)
      outputs: list = [None] * len(xs)
      for size in set(sizes):
        rows = [i for i, s in enumerate(sizes) if s == size]
        picked = self._forward_batch(model, [caches[i] for i in rows], shard, [xs[i] for i in rows], [positions[i] for i in rows])
        for i, out in zip(rows, picked):
          outputs[i] = out
      return outputs
    outputs, i = [], 0
    while i < len(xs):  # groups of BATCH_ROWS, then 2, then 1: three captured steps serve every B
      size = next(g for g in (BATCH_ROWS, 2, 1) if g <= len(xs) - i)
      group = slice(i, i + size)
      if size == 1:
        outputs += super()._forward_batch(model, caches[group], shard, xs[group], positions[group])
      else:
        outputs += self._decode_group(model, caches[group], shard, xs[group], positions[group])
      i += size
    return outputs

  def _decode_group(self, model: TinygradShard, caches: list, shard: Shard, xs: list[np.ndarray], positions: list[int]) -> list[np.ndarray]:
    h = embed(model.embedding, np.concatenate(xs)) if shard.is_first_layer() else np.concatenate(xs)
    size = _positions(caches[0])
    starts = [UOp.variable(f"start_pos_{i}", 0, size - 1).bind(p) for i, p in enumerate(positions)]
    out = self._run_step(model, (len(xs), len(xs), size), h, [c for cache in caches for c in cache], starts)
    return [row[None, None] for row in out]

  def _run_chunk(self, model: TinygradShard, cache: list[Tensor], h: np.ndarray, start: int) -> np.ndarray:
    """The shard over hidden states h (T, hidden) at positions start..start+T-1, one row or padded to a whole chunk."""
    t, size = len(h), _positions(cache)
    padded = 1 if t == 1 else min(PREFILL_CHUNK, size - start)
    position = UOp.variable("start_pos", 0, size - padded).bind(start)
    return self._run_step(model, (padded, 1, size), np.pad(h, ((0, padded - t), (0, 0))), cache, [position])[:t]

  def _run_step(self, model: TinygradShard, key: tuple[int, int, int], h: np.ndarray, caches: list[Tensor], starts: list[UOp]) -> np.ndarray:
    """model.step over h, through its step captured for `key` (captured on first use)."""
    if key not in model.steps:
      model.steps[key] = TinyJit(model.step) if self.jit else model.step
    step = model.steps[key]
    out = step(Tensor(h, device=model.device), caches, *starts).numpy()
    if getattr(step, "cnt", 0) in (1, 2):  # TinyJit's calls so far: it has just run uncaptured, or captured
      _release_freed_memory(model.device)  # those runs' intermediates, which the captured step does not reuse
    return out
