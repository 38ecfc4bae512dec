"""A plain numpy Llama forward pass, the reference the real engines are tested against; clear rather than fast.

Weights follow exo.inference.llama_weights: Hugging Face names with global layer indices, (out, in) matrices (y = x @ W.T),
rotate-half RoPE, at any held precision (quantized matrices are dequantized once, then computed with in float32), with the Q, K
and V biases of a Qwen2 where the weights have them. Per layer: h = x + Attention(RMSNorm(x)); out = h + SwiGLU(RMSNorm(h)). Attention is grouped-query (query
head j reads key/value head j // (n_heads / n_kv_heads)) with a causal mask. The KV cache is an explicit dict
{layer: (keys, values)}, keys and values shaped (n_kv_heads, positions, head_dim) and already rotated, so a model split into
shards, each with its own cache dict, computes exactly what the whole model does.
"""

import functools
import math

import numpy as np

from exo.inference.llama_config import LlamaConfig, rope_inv_freq
from exo.inference.llama_layout import EMBED, LM_HEAD, NORM, layer_key
from exo.inference.quantized import QuantizedMatrix


@functools.lru_cache(maxsize=1024)
def _dequantized(w: QuantizedMatrix) -> np.ndarray:
  return w.dequantize()


def dense(w) -> np.ndarray:
  """A held weight as float32."""
  return _dequantized(w) if isinstance(w, QuantizedMatrix) else np.asarray(w, dtype=np.float32)


def _w(weights: dict, name: str) -> np.ndarray:
  return dense(weights[name])


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rotate_half(x: np.ndarray) -> np.ndarray:
  """(x1, x2) -> (-x2, x1) over the two halves of the last axis: dimension d rotates with d + head_dim/2."""
  half = x.shape[-1] // 2
  return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: np.ndarray, positions: np.ndarray, config: LlamaConfig) -> np.ndarray:
  """x: (heads, T, head_dim) at absolute `positions` (T,)."""
  angles = positions[:, None].astype(np.float64) * rope_inv_freq(config)[None, :]  # (T, head_dim/2)
  angles = np.concatenate([angles, angles], axis=-1)
  return (x * np.cos(angles) + rotate_half(x) * np.sin(angles)).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def attention(x: np.ndarray, weights: dict, layer: int, config: LlamaConfig, positions: np.ndarray, cache: dict) -> np.ndarray:
  t, hd = x.shape[0], config.head_dim

  def project(name: str, heads: int) -> np.ndarray:  # (T, hidden) -> (heads, T, head_dim)
    y = x @ _w(weights, layer_key(layer, f"self_attn.{name}.weight")).T
    if (bias := layer_key(layer, f"self_attn.{name}.bias")) in weights:
      y = y + _w(weights, bias)
    return y.reshape(t, heads, hd).transpose(1, 0, 2)

  q = apply_rope(project("q_proj", config.n_heads), positions, config)
  k = apply_rope(project("k_proj", config.n_kv_heads), positions, config)
  v = project("v_proj", config.n_kv_heads)
  if layer in cache:
    k, v = np.concatenate([cache[layer][0], k], axis=1), np.concatenate([cache[layer][1], v], axis=1)
  cache[layer] = (k, v)
  group = config.n_heads // config.n_kv_heads
  k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)  # query head j uses kv head j // group
  scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)  # (heads, T, S); key s sits at position s (math.sqrt: a Python float keeps float32)
  visible = np.arange(k.shape[1])[None, :] <= positions[:, None]  # causal: a query sees keys at or before its position
  out = softmax(np.where(visible[None], scores, -np.inf)) @ v  # (heads, T, head_dim)
  return out.transpose(1, 0, 2).reshape(t, config.n_heads * hd) @ _w(weights, layer_key(layer, "self_attn.o_proj.weight")).T


def mlp(x: np.ndarray, weights: dict, layer: int) -> np.ndarray:
  gate = x @ _w(weights, layer_key(layer, "mlp.gate_proj.weight")).T
  up = x @ _w(weights, layer_key(layer, "mlp.up_proj.weight")).T
  return (gate / (1 + np.exp(-gate)) * up) @ _w(weights, layer_key(layer, "mlp.down_proj.weight")).T  # SiLU(gate) * up


def forward(weights: dict, config: LlamaConfig, x: np.ndarray, start_layer: int, end_layer: int, cache: dict | None = None) -> np.ndarray:
  """Layers start_layer..end_layer (inclusive). x: token ids (T,) when start_layer is 0, else hidden states (T, hidden_size).
  Returns hidden states (T, hidden_size), or logits (T, vocab_size) when end_layer is the last layer. The new tokens' positions
  continue from what `cache` holds for start_layer; `cache` is updated in place (pass None for a one-off pass)."""
  cache = {} if cache is None else cache
  start = cache[start_layer][0].shape[1] if start_layer in cache else 0
  h = _w(weights, EMBED)[np.asarray(x)] if start_layer == 0 else np.asarray(x, dtype=np.float32)
  positions = np.arange(start, start + h.shape[0])
  for layer in range(start_layer, end_layer + 1):
    h = h + attention(
      rms_norm(h, _w(weights, layer_key(layer, "input_layernorm.weight")), config.rms_norm_eps), weights, layer, config, positions, cache
    )
    h = h + mlp(rms_norm(h, _w(weights, layer_key(layer, "post_attention_layernorm.weight")), config.rms_norm_eps), weights, layer)
  if end_layer == config.n_layers - 1:
    return rms_norm(h, _w(weights, NORM), config.rms_norm_eps) @ _w(weights, LM_HEAD).T
  return h


def generate(weights: dict, config: LlamaConfig, prompt: list[int], max_tokens: int, eos_token_ids: set[int]) -> list[int]:
  """Greedy decoding with the whole model: the prompt in one pass, then one token at a time from the KV cache."""
  cache: dict = {}
  logits = forward(weights, config, np.array(prompt), 0, config.n_layers - 1, cache)
  tokens: list[int] = []
  while len(tokens) < max_tokens:
    tokens.append(int(np.argmax(logits[-1])))
    if tokens[-1] in eos_token_ids:
      break
    logits = forward(weights, config, np.array(tokens[-1:]), 0, config.n_layers - 1, cache)
  return tokens
