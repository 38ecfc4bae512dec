"""A Llama-family engine (Llama, Qwen2) in tinygrad: each node holds only its shard's layers, at the precision of the model
file, and keeps per request a KV cache for those layers.

Per layer: h = x + Attention(RMSNorm(x)); out = h + SwiGLU(RMSNorm(h)), with rotate-half RoPE (llama_weights' convention),
grouped-query attention (query head j reads key/value head j // (n_heads / n_kv_heads)), Qwen2's biases on Q, K and V, and a
causal mask within a prompt.

Weights stay as the file stores them (exo.inference.quantized): quantized matrices as packed 4- or 8-bit quants plus a scale and
a bias per group, 16-bit ones as float16, float32 ones as float32. A decode step dequantizes inside each product's kernel (mask
or shift the quants, multiply by the group's scale, add its bias, multiply by the input, accumulate), so no float32 copy of a
weight exists. A prompt chunk, whose rows would each dequantize the weights again, dequantizes a layer matrix once into a float32
temporary of the step (the head excepted: its temporary would outweigh the model). The embedding lookup runs in numpy on the rows
it needs; on the CPU a tied embedding is the head's own memory.

Speed: a shard's step over a padded input length is one TinyJit function, captured once per shard and length and replayed;
the start position is a bound symbolic variable. Products accumulate into LANES interleaved partial sums, then across them: the
CPU overlaps independent adds, where a single running sum would wait on each one. BEAM=n in the environment searches kernel
optimizations when a step is captured, cached on disk in tinygrad's CACHEDB.

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
import math
import os
import platform
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tinygrad import Context, Device, Tensor, TinyJit, UOp, dtypes
from tinygrad.device import LRUAllocator
from tinygrad.helpers import BEAM, DEV
from tinygrad.renderer.cstyle import ClangRenderer

from exo.base.model_spec import MAX_CONTEXT
from exo.base.shard import Shard
from exo.inference.gpu_presence import has_gpu
from exo.inference.heap import trim_heap
from exo.inference.llama_weights import EMBED, LM_HEAD, NORM, LlamaConfig, layer_key, layer_parts, load_shard_weights, rope_inv_freq
from exo.inference.model_file_engine import ModelFileEngine
from exo.inference.model_files import locate_model
from exo.inference.quantized import QuantizedMatrix, Weight
from exo.inference.sharded_engine import ModelDims

PREFILL_CHUNK = 16  # rows of a prompt chunk; its step holds (chunk, context) attention scores: 9 MB each for SmolLM2
LANES = 16  # partial sums per output of a matrix product
BATCH_ROWS = 4  # rows of a batched decode step per product kernel
# All tinygrad work of the process runs on this one thread, for the life of the process: tinygrad is not thread-safe, and it
# keeps per-thread state (its kernel cache's SQLite connection) that a thread started later could not use. Idle, it costs
# nothing; the interpreter joins it at exit.
_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinygrad")
_F32 = dtypes.float32


def _release_freed_memory(device: str) -> None:
  """Hand memory freed since the last call back to the OS: the device's cache of freed buffers, and (glibc) the heap's free
  pages, which glibc keeps when other allocations sit above them, as tinygrad's do above the loader's freed arrays."""
  allocator = Device[device].allocator
  if isinstance(allocator, LRUAllocator):
    allocator.free_cache()
  trim_heap()


@dataclass(frozen=True, eq=False)
class _Matrix:
  """An (out, in) weight on the device as its file holds it. bits 32 or 16: tensors = (w,) float32 or float16. bits 8 or 4:
  tensors = (packed uint8 (out, in * bits / 8), scales, biases (out, in / group)), w = scale * q + bias per group."""

  tensors: tuple[Tensor, ...]
  bits: int
  shape: tuple[int, int]
  group: int = 0


def _to_device(w: Weight, device: str) -> _Matrix:
  if isinstance(w, QuantizedMatrix):
    arrays, bits, group = (w.packed, w.scales, w.biases), w.bits, w.group_size
  else:
    arrays, bits, group = (w,), 16 if w.dtype == np.float16 else 32, 0
  tensors = tuple(Tensor(np.ascontiguousarray(a), device=device).realize() for a in arrays)
  return _Matrix(tensors, bits, w.shape, group)


def _half_to_float(w: Tensor) -> Tensor:
  """float16 -> float32 with integer ops: the exponent field moves up 13 bits and the result is scaled by 2**(127 - 15), which
  is exact for every finite value, subnormals included. Unlike a per-element conversion instruction it vectorizes. O(size)."""
  bits = w.bitcast(dtypes.uint16).cast(dtypes.uint32)
  return (((bits & 0x8000) << 16) | ((bits & 0x7FFF) << 13)).bitcast(_F32) * 2.0**112


def _affine(m: _Matrix, q: Tensor) -> Tensor:
  """Quants q (out, in / group, k) of a quantized matrix as float32 values: scale * q + bias with the group's scale and bias."""
  _, scales, biases = m.tensors
  return q.cast(_F32) * scales.cast(_F32).unsqueeze(-1) + biases.cast(_F32).unsqueeze(-1)


def _nibbles(m: _Matrix) -> tuple[Tensor, Tensor]:
  """A 4-bit matrix's even and odd columns as float32, each (out, in / group, group / 2): byte b of a row holds column 2b in
  its low nibble and 2b + 1 in its high one."""
  out, n = m.shape
  p = m.tensors[0].reshape(out, n // m.group, m.group // 2)
  return _affine(m, p & 15), _affine(m, p >> 4)


def _dequantized(m: _Matrix) -> Tensor:
  """The (out, in) float32 matrix as a lazy expression of its held tensors (nothing is computed until a kernel reads it)."""
  out, n = m.shape
  if m.bits == 32:
    return m.tensors[0]
  if m.bits == 16:
    return _half_to_float(m.tensors[0])
  if m.bits == 8:
    return _affine(m, m.tensors[0].reshape(out, n // m.group, m.group)).reshape(out, n)
  return Tensor.stack(*_nibbles(m), dim=-1).reshape(out, n)


def _matmul(x: Tensor, m: _Matrix, fused: bool = False, paired: bool = False) -> Tensor:
  """x (T, in) @ W.T -> (T, out) float32. O(T * out * in).
  One row (a decode step), or `fused`: W is dequantized inside the product's kernel and the products are summed into LANES
  interleaved partial sums, then across them, so the CPU overlaps independent adds (one running sum would wait on each). A 4-bit
  matrix multiplies x's even and odd columns by its low and high nibbles, as interleaving the nibbles costs a select per element.
  `paired` (rows of a batch): an 8- or 32-bit matrix likewise adds a lane's products two at a time, the compiler then vectorizes
  the rows' lanes; tinygrad renders lane + (a + b) as lane + a + b, which C adds in the order of one at a time, so the sums are
  bit-identical to unpaired ones. Not a 16-bit one: tinygrad takes its conversion's power-of-two scale out of an unpaired sum
  only, so paired sums would round differently.
  Several rows: W is first dequantized once into a float32 temporary, as each row would dequantize it again."""
  t, (out, n) = x.shape[0], m.shape
  if t > 1 and not fused:
    return (x @ _dequantized(m).contiguous().T).contiguous()
  if m.bits == 4:
    low, high = _nibbles(m)
    columns = x.reshape(t, 1, n // m.group, m.group // 2, 2)
    products, n = columns[..., 0] * low + columns[..., 1] * high, n // 2
  elif paired and m.bits != 16 and n % (2 * LANES) == 0:
    columns, w = x.reshape(t, 1, n // (2 * LANES), 2, LANES), _dequantized(m).reshape(out, n // (2 * LANES), 2, LANES)
    products, n = columns[..., 0, :] * w[..., 0, :] + columns[..., 1, :] * w[..., 1, :], n // 2
  else:
    products = x.reshape(t, 1, n) * _dequantized(m)
  return _lane_sum(products.reshape(t, out, n)).contiguous()  # else a consumer's kernel recomputes it for each of its outputs


def _batch_matmul(x: Tensor, m: _Matrix) -> Tensor:
  """x (B, in) @ W.T -> (B, out) float32 for B requests' decode steps, each row's result bit-identical to _matmul of that row
  alone. O(B * out * in) operations, W read once per BATCH_ROWS rows.
  The rows run BATCH_ROWS to a product kernel (the last group padded with zero rows), which dequantizes each weight once for
  all of them; given more rows, tinygrad's heuristics also unroll outputs and the partial sums spill out of the registers
  (slower per row than one row alone). A 4-bit matrix reads x from a copy that holds, per quantization group, its even columns
  and then its odd ones: each lane's inputs are adjacent, so the compiler vectorizes the rows' lanes (interleaved columns leave
  it scalar, 2-3 times slower). Both change only where values sit, not which products are summed in which order."""
  b, n = x.shape[0], m.shape[1]
  rows = -(-b // BATCH_ROWS) * BATCH_ROWS
  x = x.pad(((0, rows - b), (0, 0)))
  if m.bits == 4:
    x = x.reshape(rows, n // m.group, m.group // 2, 2).permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2).reshape(rows, n)
  else:
    x = x.contiguous()
  return Tensor.cat(*[_matmul(x[i : i + BATCH_ROWS], m, fused=True, paired=True) for i in range(0, rows, BATCH_ROWS)])[:b]


def _lane_sum(products: Tensor) -> Tensor:
  """The sum over the last axis, in LANES interleaved partial sums and then across them (when the axis divides evenly)."""
  n = products.shape[-1]
  lanes = LANES if n % LANES == 0 else 1
  return products.reshape(*products.shape[:-1], n // lanes, lanes).sum(-2).sum(-1)


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
  return x * (x.square().mean(-1, keepdim=True) + eps).rsqrt() * weight


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
  """Rotate-half RoPE: dimension d rotates with d + head_dim/2. x: (..., T, head_dim); cos, sin: (T, head_dim/2)."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  return (x1 * cos - x2 * sin).cat(x2 * cos + x1 * sin, dim=-1)


def _project(x: Tensor, weights: dict, name: str, product: Callable) -> Tensor:
  y = product(x, weights[f"self_attn.{name}.weight"])
  bias = weights.get(f"self_attn.{name}.bias")
  return y if bias is None else y + bias


def _attention(config: LlamaConfig, q: Tensor, k: Tensor, v: Tensor, cache: Tensor, start, cos: Tensor, sin: Tensor) -> Tensor:
  """One request's attention at positions start..start+T-1 (start: an int or a bound variable): q (n_kv_heads, group, T,
  head_dim) rotated (query head j = key/value head j // group), k and v (T, n_kv_heads * head_dim) unrotated. Writes the rotated
  keys and the values into cache (2, n_kv_heads, capacity, head_dim) and attends over its first start+T positions; returns
  (T, n_heads * head_dim). cos, sin: (capacity, head_dim/2) RoPE tables. O(T * (start + T) * n_heads * head_dim)."""
  t, hd, kv = k.shape[0], config.head_dim, config.n_kv_heads
  k, v = k.reshape(t, kv, hd).transpose(0, 1), v.reshape(t, kv, hd).transpose(0, 1)  # (kv, T, hd)
  cache[:, :, start : start + t].assign(Tensor.stack(_rope(k, cos[start : start + t], sin[start : start + t]), v))
  keys, values = cache[0, :, 0 : start + t].unsqueeze(1), cache[1, :, 0 : start + t].unsqueeze(1)  # (kv, 1, S, hd)
  scores = _lane_sum(q.unsqueeze(-2) * keys.unsqueeze(-3)) / math.sqrt(hd)  # (kv, group, T, S)
  if t > 1:  # query i sits at start + i and sees keys at or before it
    scores = scores + Tensor.full((t, start + t), float("-inf"), device=q.device).triu(start + 1)
  return (scores.softmax(-1) @ values).permute(2, 0, 1, 3).reshape(t, config.n_heads * hd)


def _layer(config: LlamaConfig, weights: dict, h: Tensor, caches: list[Tensor], starts: list, cos: Tensor, sin: Tensor) -> Tensor:
  """One decoder layer over hidden states h (T, hidden). One cache: one request's positions starts[0]..starts[0]+T-1. T caches
  (a batch of decode steps): row i is request i's step at position starts[i], attending over its own cache; every matrix
  product runs over the T rows at once (_batch_matmul), and each row's reductions run in the order of a lone row's, so each
  row's result is bit-identical to that request's step alone.
  O(T * layer weights + attention over each request's positions)."""
  batch = len(caches) > 1
  product = _batch_matmul if batch else _matmul
  x = _rms_norm(h, weights["input_layernorm.weight"], config.rms_norm_eps).contiguous()  # inputs of products: computed once
  q, k, v = (_project(x, weights, name, product) for name in ("q_proj", "k_proj", "v_proj"))
  t, kv, hd = h.shape[0], config.n_kv_heads, config.head_dim
  if batch:  # every request's queries rotated in one kernel, each at its own position, request i's (kv, group, 1, hd) at [i]
    rows = [Tensor.cat(*[table[start : start + 1] for start in starts]).reshape(t, 1, 1, 1, hd // 2) for table in (cos, sin)]
    q = _rope(q.reshape(t, kv, config.n_heads // kv, 1, hd), *rows).contiguous()
    attn = [_attention(config, q[i], k[i : i + 1], v[i : i + 1], cache, start, cos, sin) for i, (cache, start) in enumerate(zip(caches, starts))]
    attn = Tensor.cat(*attn).contiguous()
  else:
    start = starts[0]
    q = _rope(q.reshape(t, kv, config.n_heads // kv, hd).permute(1, 2, 0, 3), cos[start : start + t], sin[start : start + t]).contiguous()
    attn = _attention(config, q, k, v, caches[0], start, cos, sin)
  h = h + product(attn, weights["self_attn.o_proj.weight"])
  x = _rms_norm(h, weights["post_attention_layernorm.weight"], config.rms_norm_eps).contiguous()
  gate, up = product(x, weights["mlp.gate_proj.weight"]), product(x, weights["mlp.up_proj.weight"])
  return h + product((gate.silu() * up).contiguous(), weights["mlp.down_proj.weight"])


@dataclass(eq=False)
class _ShardModel:
  """What a resident shard holds: its layers' weights on the device, the embedding (first shard) on the host for lookups, the
  final norm and head (last shard), RoPE tables, and its captured steps by (input rows, requests, cache positions): (padded
  length, 1, C) for one request, (B, B, C) for B requests' decode steps, whose caches hold C positions each."""

  config: LlamaConfig
  device: str
  capacity: int  # the most KV cache positions a request may have: the engine's context (and the RoPE tables' length)
  layers: list[dict[str, Tensor | _Matrix]]
  cos: Tensor
  sin: Tensor
  embedding: Weight | None = None
  embedding_is_head: bool = False  # the embedding's arrays are views of the head's device memory (tied, on the CPU)
  norm: Tensor | None = None
  head: _Matrix | None = None
  steps: dict[tuple[int, int, int], Callable] = field(default_factory=dict)

  def device_tensors(self) -> list[Tensor]:
    parts = [w for layer in self.layers for w in layer.values()] + [self.cos, self.sin, self.norm, self.head]
    return [t for w in parts if w is not None for t in (w.tensors if isinstance(w, _Matrix) else (w,))]

  def held_array_bytes(self) -> int:
    """Bytes of its device tensors, plus the host embedding unless it is a view of them."""
    host = 0
    if self.embedding is not None and not self.embedding_is_head:
      host = self.embedding.nbytes
    return sum(t.nbytes() for t in self.device_tensors()) + host

  def step(self, x: Tensor, caches: list[Tensor], *starts) -> Tensor:
    """The shard's layers (and the head, on the last shard) over x (T, hidden); each layer's output realized on its own. One
    start: one request's rows, caches its per-layer caches. B starts (T = B): row i is request i's decode step at starts[i],
    caches[i * layers + j] its cache of layer j (flat: TinyJit finds input tensors in a flat list only)."""
    n = len(self.layers)
    for j, weights in enumerate(self.layers):
      x = _layer(self.config, weights, x, caches[j::n], list(starts), self.cos, self.sin).realize()
    if self.head is not None:
      # fused at every length: a float32 temporary of the head would be as large as the whole model's quantized weights
      x = _rms_norm(x, self.norm, self.config.rms_norm_eps).contiguous()
      x = (_batch_matmul(x, self.head) if len(starts) > 1 else _matmul(x, self.head, fused=True)).realize()
    return x


def _host_view(m: _Matrix) -> Weight:
  """A CPU matrix's device memory as numpy arrays, without copying (valid while the tensors live)."""
  arrays = [np.frombuffer(t.uop.buffer.as_memoryview(allow_zero_copy=True), dtype=t.dtype.fmt).reshape(t.shape) for t in m.tensors]
  return QuantizedMatrix(*arrays, m.bits, m.group) if m.bits in (4, 8) else arrays[0]


def _positions(cache: list[Tensor]) -> int:
  """The positions a request's per-layer caches hold (each (2, n_kv_heads, positions, head_dim))."""
  return cache[0].shape[2]


def _embed(embedding: Weight, tokens: np.ndarray) -> np.ndarray:
  """Rows `tokens` of the embedding as float32 (T, hidden): only those rows are dequantized. O(T * hidden)."""
  if isinstance(embedding, QuantizedMatrix):
    return embedding.take_rows(tokens).dequantize()
  return np.asarray(embedding[tokens], dtype=np.float32)


def _batches(device: str) -> bool:
  """Whether a batched decode step is bit-identical to each request's step alone on `device`, as verified: kernels compiled
  through clang (the CPU's default) without BEAM. The identity rests on tinygrad choosing each row's reduction order for B rows
  as for one, and on its C rendering of paired sums (_matmul): BEAM searches each kernel's order on its own, and on devices with
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

  def _load_model(self, shard: Shard) -> _ShardModel:
    """The shard's weights moved to the device one by one, each host copy dropped once moved. O(shard weights)."""
    device = Device.canonicalize(self.device)
    config, weights = load_shard_weights(locate_model(shard.model_id), shard)
    capacity = min(config.context_length, MAX_CONTEXT)
    angles = np.arange(capacity, dtype=np.float64)[:, None] * rope_inv_freq(config)[None, :]
    cos, sin = (Tensor(f(angles).astype(np.float32), device=device).realize() for f in (np.cos, np.sin))

    def take(name: str):
      w = weights.pop(name)
      return _to_device(w, device) if len(w.shape) == 2 else Tensor(w, device=device).realize()

    layers = []
    for i in range(shard.start_layer, shard.end_layer + 1):
      layers.append({part: take(layer_key(i, part)) for part in layer_parts(config)})
      _release_freed_memory(device)  # the layer's host arrays: else the host holds the shard twice by the end
    model = _ShardModel(config, device, capacity, layers, cos, sin)
    if shard.is_last_layer():
      model.norm, model.head = take(NORM), take(LM_HEAD)
    if shard.is_first_layer():
      tied_here = config.tie_word_embeddings and shard.is_last_layer()
      model.embedding_is_head = tied_here and device.split(":")[0] == "CPU"
      model.embedding = _host_view(model.head) if model.embedding_is_head else weights.pop(EMBED)
    weights.clear()  # a tied embedding is left: on the device now, as the head
    _release_freed_memory(device)
    return model

  def _unload_model(self, model: _ShardModel) -> None:
    """Drop the model's tensors and captured steps, and hand the device's cached free buffers back."""
    model.steps.clear()
    model.layers, model.head, model.norm, model.embedding = [], None, None, None
    _release_freed_memory(model.device)

  def _new_cache(self, model: _ShardModel, shard: Shard, context: int) -> list[Tensor]:
    """Per layer, (2, n_kv_heads, context, head_dim) float32 rotated keys and values; allocated, not written."""
    c = model.config
    caches = [Tensor.empty(2, c.n_kv_heads, context, c.head_dim, device=model.device) for _ in model.layers]
    for cache in caches:
      cache.uop.buffer.ensure_allocated()  # a real buffer, as JIT inputs must be; Tensor.empty(...).realize() would not allocate it
    return caches

  def _dims(self, model: _ShardModel) -> ModelDims:
    return ModelDims(model.config.vocab_size, model.config.hidden_size, model.capacity)

  def _forward(self, model: _ShardModel, cache: list[Tensor], shard: Shard, x: np.ndarray, position: int) -> np.ndarray:
    h = _embed(model.embedding, x) if shard.is_first_layer() else x
    outputs = [self._run_chunk(model, cache, h[lo : lo + PREFILL_CHUNK], position + lo) for lo in range(0, len(h), PREFILL_CHUNK)]
    return np.concatenate(outputs)[None]

  def _forward_batch(self, model: _ShardModel, caches: list, shard: Shard, xs: list[np.ndarray], positions: list[int]) -> list[np.ndarray]:
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

  def _decode_group(self, model: _ShardModel, caches: list, shard: Shard, xs: list[np.ndarray], positions: list[int]) -> list[np.ndarray]:
    h = _embed(model.embedding, np.concatenate(xs)) if shard.is_first_layer() else np.concatenate(xs)
    size = _positions(caches[0])
    starts = [UOp.variable(f"start_pos_{i}", 0, size - 1).bind(p) for i, p in enumerate(positions)]
    out = self._run_step(model, (len(xs), len(xs), size), h, [c for cache in caches for c in cache], starts)
    return [row[None, None] for row in out]

  def _run_chunk(self, model: _ShardModel, cache: list[Tensor], h: np.ndarray, start: int) -> np.ndarray:
    """The shard over hidden states h (T, hidden) at positions start..start+T-1, one row or padded to a whole chunk."""
    t, size = len(h), _positions(cache)
    padded = 1 if t == 1 else min(PREFILL_CHUNK, size - start)
    position = UOp.variable("start_pos", 0, size - padded).bind(start)
    return self._run_step(model, (padded, 1, size), np.pad(h, ((0, padded - t), (0, 0))), cache, [position])[:t]

  def _run_step(self, model: _ShardModel, key: tuple[int, int, int], h: np.ndarray, caches: list[Tensor], starts: list[UOp]) -> np.ndarray:
    """model.step over h, through its step captured for `key` (captured on first use)."""
    if key not in model.steps:
      model.steps[key] = TinyJit(model.step) if self.jit else model.step
    step = model.steps[key]
    out = step(Tensor(h, device=model.device), caches, *starts).numpy()
    if getattr(step, "cnt", 0) in (1, 2):  # TinyJit's calls so far: it has just run uncaptured, or captured
      _release_freed_memory(model.device)  # those runs' intermediates, which the captured step does not reuse
    return out
