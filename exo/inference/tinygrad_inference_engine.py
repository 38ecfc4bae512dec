"""A Llama engine in tinygrad: each node loads only its shard's layers and keeps, per request, a KV cache for those layers.

Per layer: h = x + Attention(RMSNorm(x)); out = h + SwiGLU(RMSNorm(h)), with rotate-half RoPE (llama_weights' convention),
grouped-query attention (query head j reads key/value head j // (n_heads / n_kv_heads)) and a causal mask within a prompt.

Speed without losing determinism: a layer's computation is one TinyJit function of (hidden states, its KV cache, the start
position as a bound symbolic variable, its weights), captured once per (padded length, cache capacity) and replayed for every
layer, every shard layout and every request. The hidden state is realized after every layer, so a layer computes the same bits
whether its shard holds 1 or 30 layers, and a model split over several engines gives exactly the greedy tokens of one engine.
Inputs run in chunks of at most PREFILL_CHUNK positions, each padded with zero rows to a power of two, and caches grow in powers
of two, so kernels compile once per bucket, not once per length; padded rows sit after the real ones, so the causal mask hides
them from real rows, and their cache entries are overwritten before any later position can see them.

The tinygrad work runs off the event loop (which keeps serving) in ONE worker thread per process, shared by every engine in it:
tinygrad's kernel caches and JIT capture are process-global and not thread-safe, and its compile cache is an SQLite connection
that only the thread which opened it may use. Engines in one process (a simulated ring) therefore take turns, as they would on
one CPU anyway.
"""

import asyncio
import functools
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tinygrad import Tensor, TinyJit, UOp

from exo.inference.inference_engine import InferenceEngine
from exo.inference.llama_weights import EMBED, LAYER_PARTS, LM_HEAD, NORM, LlamaConfig, layer_key, load_shard_weights, rope_inv_freq
from exo.inference.model_files import locate_model
from exo.inference.sampling import sample_last
from exo.inference.shard import Shard
from exo.inference.tokenizer import Tokenizer, load_tokenizer

MIN_CAPACITY = 256  # KV cache positions allocated for a new request; doubled as needed
PREFILL_CHUNK = 512  # longer inputs run in chunks of this many positions, bounding the (T, S) attention scores and the JIT variants
_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinygrad")  # all tinygrad work in this process


def _pow2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
  return x * (x.square().mean(-1, keepdim=True) + eps).rsqrt() * weight


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
  """Rotate-half RoPE: dimension d rotates with d + head_dim/2. x: (..., T, head_dim); cos, sin: (T, head_dim/2)."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  return (x1 * cos - x2 * sin).cat(x2 * cos + x1 * sin, dim=-1)


def layer_forward(config: LlamaConfig, h: Tensor, cache: Tensor, start, cos: Tensor, sin: Tensor, *weights: Tensor) -> Tensor:
  """One decoder layer over hidden states h (T, hidden) at positions start..start+T-1 (start: an int or a bound variable).
  Writes the new keys and values into cache (2, n_kv_heads, capacity, head_dim) and attends over its first start+T positions.
  cos, sin: (capacity, head_dim/2) RoPE tables. weights: the layer's tensors in LAYER_PARTS order."""
  ln1, wq, wk, wv, wo, ln2, wg, wu, wd = weights
  t, hd, kv = h.shape[0], config.head_dim, config.n_kv_heads
  group = config.n_heads // kv
  x = rms_norm(h, ln1, config.rms_norm_eps)
  q = (x @ wq.T).reshape(t, kv, group, hd).permute(1, 2, 0, 3)  # (kv, group, T, hd): query head j = kv head j // group
  k = (x @ wk.T).reshape(t, kv, hd).transpose(0, 1)  # (kv, T, hd)
  v = (x @ wv.T).reshape(t, kv, hd).transpose(0, 1)
  cos, sin = cos[start : start + t], sin[start : start + t]
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  cache[:, :, start : start + t].assign(Tensor.stack(k, v))
  keys, values = cache[0, :, 0 : start + t].unsqueeze(1), cache[1, :, 0 : start + t].unsqueeze(1)  # (kv, 1, S, hd)
  scores = q @ keys.transpose(-1, -2) / math.sqrt(hd)  # (kv, group, T, S)
  if t > 1:  # query i sits at start + i and sees keys at or before it
    scores = scores + Tensor.full((t, start + t), float("-inf"), device=h.device).triu(start + 1)
  attn = (scores.softmax(-1) @ values).permute(2, 0, 1, 3).reshape(t, config.n_heads * hd)
  h = h + attn @ wo.T
  x = rms_norm(h, ln2, config.rms_norm_eps)
  return (h + ((x @ wg.T).silu() * (x @ wu.T)) @ wd.T).contiguous()


def head_forward(config: LlamaConfig, h: Tensor, norm: Tensor, lm_head: Tensor) -> Tensor:
  return (rms_norm(h, norm, config.rms_norm_eps) @ lm_head.T).contiguous()


class _Request:
  def __init__(self):
    self.length = 0  # positions this node has processed
    self.capacity = 0
    self.caches: dict[int, Tensor] = {}  # layer -> (2, n_kv_heads, capacity, head_dim) rotated keys and values


class TinygradInferenceEngine(InferenceEngine):
  """`device`: a tinygrad device name (None: tinygrad's default). `seed` drives sampling at temperature > 0. `jit`: replay
  captured kernels (False runs every op through tinygrad's scheduler: same kernels, same bits, several times slower)."""

  def __init__(self, device: str | None = None, seed: int = 0, jit: bool = True):
    self.device = device
    self.jit = jit
    self._sampler = np.random.default_rng(seed)
    self.shard: Shard | None = None
    self.config: LlamaConfig | None = None
    self.weights: dict[str, Tensor] = {}  # the shard's tensors except the embedding
    self.embedding: np.ndarray | None = None  # first shard only: a lookup is a row copy, so it stays in numpy
    self._requests: dict[str, _Request] = {}
    self._jits: dict[tuple, object] = {}
    self._rope: dict[int, tuple[Tensor, Tensor]] = {}
    self._tokenizers: dict[str, Tokenizer] = {}

  # tokenizer

  def _tokenizer(self, model_id: str) -> Tokenizer:
    if model_id not in self._tokenizers:
      self._tokenizers[model_id] = load_tokenizer(locate_model(model_id))
    return self._tokenizers[model_id]

  async def _tokenizer_async(self, shard: Shard) -> Tokenizer:
    if shard.model_id in self._tokenizers:
      return self._tokenizers[shard.model_id]
    return await asyncio.get_running_loop().run_in_executor(_WORKER, self._tokenizer, shard.model_id)

  async def encode(self, shard: Shard, prompt: str) -> np.ndarray:
    return np.array((await self._tokenizer_async(shard)).encode(prompt), dtype=np.int64)

  async def decode(self, shard: Shard, tokens: list[int]) -> str:
    return (await self._tokenizer_async(shard)).decode([int(t) for t in tokens])

  async def apply_chat_template(self, shard: Shard, messages: list[dict]) -> str:
    return (await self._tokenizer_async(shard)).apply_chat_template(messages)

  def eos_token_ids(self, shard: Shard) -> set[int]:
    return set(self._tokenizer(shard.model_id).eos_token_ids)

  async def sample(self, logits: np.ndarray, temperature: float = 0.0) -> int:
    return sample_last(logits, temperature, self._sampler)

  # requests

  async def infer_tensor(self, request_id: str, shard: Shard, input_data: np.ndarray) -> np.ndarray:
    """Token ids ((P,) or (1, P) ints) on the first shard, else hidden states (1, P, hidden_size) float32. Returns hidden states
    (1, P, hidden_size) float32, or logits (1, P, vocab_size) float32 on the last shard."""
    return await asyncio.get_running_loop().run_in_executor(_WORKER, self._infer, request_id, shard, input_data)

  async def finish_request(self, request_id: str) -> None:
    # through the worker, so it lands after any call for the request still queued there
    await asyncio.get_running_loop().run_in_executor(_WORKER, self._requests.pop, request_id, None)

  def active_requests(self) -> set[str]:
    """Ids of the requests whose state this engine holds."""
    return set(self._requests)

  def loaded_tensor_names(self) -> set[str]:
    """Names of the weights this engine holds: exactly its shard's."""
    return set(self.weights) | ({EMBED} if self.embedding is not None else set())

  def load_shard(self, shard: Shard) -> None:
    """Load `shard` now rather than on its first infer_tensor; blocks until done (not for use on the event loop)."""
    _WORKER.submit(self._load_shard, shard).result()

  def close(self) -> None:
    """Drop the loaded shard's weights and every request's state once queued work is done (the worker thread is the process's)."""
    _WORKER.submit(self._unload).result()

  # in the worker thread

  def _unload(self) -> None:
    self.shard, self.config, self.weights, self.embedding = None, None, {}, None
    self._requests.clear()
    self._jits.clear()
    self._rope.clear()

  def _load_shard(self, shard: Shard) -> None:
    """Load `shard`'s weights unless they are loaded; another shard replaces them and drops every request's state."""
    if shard == self.shard:
      return
    self._unload()
    config, arrays = load_shard_weights(locate_model(shard.model_id), shard)
    self.embedding = arrays.pop(EMBED, None)
    self.weights = {name: Tensor(a, device=self.device) for name, a in arrays.items()}
    Tensor.realize(*self.weights.values())
    self.shard, self.config = shard, config

  def _infer(self, request_id: str, shard: Shard, input_data: np.ndarray) -> np.ndarray:
    self._load_shard(shard)
    config = self.config
    if shard.is_first_layer():
      tokens = np.asarray(input_data)
      if not np.issubdtype(tokens.dtype, np.integer) or tokens.ndim not in (1, 2) or (tokens.ndim == 2 and tokens.shape[0] != 1) or tokens.size == 0:
        raise ValueError(f"the first shard takes (P,) or (1, P) token ids, got {tokens.dtype} {tokens.shape}")
      tokens = tokens.reshape(-1)
      if tokens.min() < 0 or tokens.max() >= config.vocab_size:
        raise ValueError(f"token ids must lie in [0, {config.vocab_size}), got {tokens.min()}..{tokens.max()}")
      h = self.embedding[tokens]
    else:
      h = np.asarray(input_data)
      if h.ndim != 3 or h.shape[0] != 1 or h.shape[1] == 0 or h.shape[2] != config.hidden_size:
        raise ValueError(f"shard {shard} takes hidden states (1, P, {config.hidden_size}), got {h.shape}")
      h = h[0].astype(np.float32)
    request = self._requests.get(request_id) or _Request()  # stored only once the call succeeds
    start, t = request.length, len(h)
    if start + t > config.context_length:
      raise ValueError(
        f"request {request_id!r} would reach {start + t} positions; expected at most the model's context length {config.context_length}"
      )
    outputs = [self._run_chunk(request, h[lo : lo + PREFILL_CHUNK], start + lo) for lo in range(0, t, PREFILL_CHUNK)]
    request.length = start + t
    self._requests[request_id] = request
    return np.concatenate(outputs)[None]

  def _run_chunk(self, request: _Request, h: np.ndarray, start: int) -> np.ndarray:
    """The shard's layers (and head, on the last shard) over hidden states h (T, hidden) at positions start..start+T-1."""
    t, shard = len(h), self.shard
    padded = 1 if t == 1 else min(_pow2(t), _pow2(self.config.context_length) - start)
    self._reserve(request, start + padded)
    x = Tensor(np.pad(h, ((0, padded - t), (0, 0))), device=self.device).realize()
    cos, sin = self._rope_tables(request.capacity)
    position = UOp.variable("start_pos", 0, request.capacity - padded).bind(start)
    layer = self._compiled("layer", padded, request.capacity)
    for i in range(shard.start_layer, shard.end_layer + 1):
      x = layer(x, request.caches[i], position, cos, sin, *(self.weights[layer_key(i, part)] for part in LAYER_PARTS))
    if shard.is_last_layer():
      x = self._compiled("head", padded)(x, self.weights[NORM], self.weights[LM_HEAD])
    return x.numpy()[:t]

  def _compiled(self, kind: str, *key: int):
    """The layer or head function, captured by TinyJit once per padded length (and cache capacity)."""
    if (kind, *key) not in self._jits:
      fn = functools.partial(layer_forward if kind == "layer" else head_forward, self.config)
      self._jits[(kind, *key)] = TinyJit(fn) if self.jit else lambda *args: fn(*args).realize()
    return self._jits[(kind, *key)]

  def _rope_tables(self, capacity: int) -> tuple[Tensor, Tensor]:
    if capacity not in self._rope:
      angles = np.arange(capacity, dtype=np.float64)[:, None] * rope_inv_freq(self.config)[None, :]
      self._rope[capacity] = tuple(Tensor(f(angles).astype(np.float32), device=self.device).realize() for f in (np.cos, np.sin))
    return self._rope[capacity]

  def _reserve(self, request: _Request, positions: int) -> None:
    """Grow the request's caches (keeping their contents) to hold `positions`."""
    if positions <= request.capacity:
      return
    capacity = max(MIN_CAPACITY, _pow2(positions))
    shape = (2, self.config.n_kv_heads, capacity, self.config.head_dim)
    for i in range(self.shard.start_layer, self.shard.end_layer + 1):
      old = request.caches.get(i)
      grown = Tensor.zeros(*shape, device=self.device) if old is None else old.pad(((0, 0), (0, 0), (0, capacity - old.shape[2]), (0, 0)))
      request.caches[i] = grown.contiguous().realize()
    request.capacity = capacity
