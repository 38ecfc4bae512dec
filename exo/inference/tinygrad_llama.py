"""A Llama-family shard's forward pass in tinygrad (Llama, Qwen2): what a resident shard holds and its step over hidden states.

Per layer: h = x + Attention(RMSNorm(x)); out = h + SwiGLU(RMSNorm(h)), with rotate-half RoPE (llama_weights' convention),
grouped-query attention (query head j reads key/value head j // (n_heads / n_kv_heads)), Qwen2's biases on Q, K and V, and a
causal mask within a prompt. Each request attends over a KV cache of its own; a batch of decode rows runs every matrix product
over its rows at once (tinygrad_matmul.batch_matmul) and attention per request, each row bit-identical to its request's step
alone. The hidden state is realized after every layer, so a layer runs the same kernels on the same inputs whatever the shard
holds. The embedding lookup runs in numpy on the rows it needs.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tinygrad import Tensor

from exo.inference.llama_config import LlamaConfig
from exo.inference.quantized import QuantizedMatrix, Weight
from exo.inference.tinygrad_matmul import Matrix, batch_matmul, lane_sum, matmul


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
  scores = lane_sum(q.unsqueeze(-2) * keys.unsqueeze(-3)) / math.sqrt(hd)  # (kv, group, T, S)
  if t > 1:  # query i sits at start + i and sees keys at or before it
    scores = scores + Tensor.full((t, start + t), float("-inf"), device=q.device).triu(start + 1)
  return (scores.softmax(-1) @ values).permute(2, 0, 1, 3).reshape(t, config.n_heads * hd)


def _layer(config: LlamaConfig, weights: dict, h: Tensor, caches: list[Tensor], starts: list, cos: Tensor, sin: Tensor) -> Tensor:
  """One decoder layer over hidden states h (T, hidden). One cache: one request's positions starts[0]..starts[0]+T-1. T caches
  (a batch of decode steps): row i is request i's step at position starts[i], attending over its own cache; every matrix
  product runs over the T rows at once (batch_matmul), and each row's reductions run in the order of a lone row's, so each
  row's result is bit-identical to that request's step alone.
  O(T * layer weights + attention over each request's positions)."""
  batch = len(caches) > 1
  product = batch_matmul if batch else matmul
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
class TinygradShard:
  """What a resident shard holds: its layers' weights on the device, the embedding (first shard) on the host for lookups, the
  final norm and head (last shard), RoPE tables, and its captured steps by (input rows, requests, cache positions): (padded
  length, 1, C) for one request, (B, B, C) for B requests' decode steps, whose caches hold C positions each."""

  config: LlamaConfig
  device: str
  capacity: int  # the most KV cache positions a request may have: the engine's context (and the RoPE tables' length)
  layers: list[dict[str, Tensor | Matrix]]
  cos: Tensor
  sin: Tensor
  embedding: Weight | None = None
  embedding_is_head: bool = False  # the embedding's arrays are views of the head's device memory (tied, on the CPU)
  norm: Tensor | None = None
  head: Matrix | None = None
  steps: dict[tuple[int, int, int], Callable] = field(default_factory=dict)

  def device_tensors(self) -> list[Tensor]:
    parts = [w for layer in self.layers for w in layer.values()] + [self.cos, self.sin, self.norm, self.head]
    return [t for w in parts if w is not None for t in (w.tensors if isinstance(w, Matrix) else (w,))]

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
      x = (batch_matmul(x, self.head) if len(starts) > 1 else matmul(x, self.head, fused=True)).realize()
    return x


def embed(embedding: Weight, tokens: np.ndarray) -> np.ndarray:
  """Rows `tokens` of the embedding as float32 (T, hidden): only those rows are dequantized. O(T * hidden)."""
  if isinstance(embedding, QuantizedMatrix):
    return embedding.take_rows(tokens).dequantize()
  return np.asarray(embedding[tokens], dtype=np.float32)
