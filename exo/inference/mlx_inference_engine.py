"""A Llama engine on MLX: one shard's layers, a per-request KV cache, float32 throughout.

Per layer: h = x + Attention(RMSNorm(x)); out = h + SwiGLU(RMSNorm(h)), with rotate-half RoPE (rope_inv_freq) and grouped-query
attention, causal over the prompt; weights and conventions are exo.inference.llama_weights'. The hidden state (and the layer's KV
cache) is evaluated after every layer, so each layer's arithmetic is the same whichever shard holds it and a model split over any
number of engines gives bit-identical outputs to one engine holding every layer.

MLX binds streams to the thread that creates them (an array made in one thread cannot be evaluated in another), so every MLX call
of an engine, weight conversion and freeing included, runs in the engine's own single worker thread; the event loop only awaits it.
"""

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from exo.inference.inference_engine import InferenceEngine
from exo.inference.llama_weights import EMBED, LM_HEAD, NORM, LlamaConfig, layer_key, load_shard_weights, rope_inv_freq
from exo.inference.model_files import locate_model
from exo.inference.sampling import sample_last
from exo.inference.shard import Shard
from exo.inference.tokenizer import Tokenizer, load_tokenizer


class _Request:
  def __init__(self):
    self.position = 0  # positions this shard has processed for the request
    self.cache: dict = {}  # layer -> (keys, values), each (1, n_kv_heads, position, head_dim), already rotated


class MLXInferenceEngine(InferenceEngine):
  """`seed` drives sampling at temperature > 0."""

  def __init__(self, seed: int = 0):
    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-engine")
    self._sampler = np.random.default_rng(seed)
    self._tokenizers: dict[str, Tokenizer] = {}
    self.shard: Shard | None = None  # the shard whose weights are loaded
    self._config: LlamaConfig | None = None
    self._weights: dict = {}  # name -> mx.array, the loaded shard's only; matrices transposed to (in, out), the embedding not
    self._freqs = None  # mx.fast.rope's per-dimension periods, 1 / inv_freq
    self._requests: dict[str, _Request] = {}

  async def _run(self, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

  def close(self) -> None:
    """Stop the worker thread once queued work is done."""
    self._executor.shutdown(wait=True)

  # tokenizer

  def _tokenizer(self, model_id: str) -> Tokenizer:
    if model_id not in self._tokenizers:
      self._tokenizers[model_id] = load_tokenizer(locate_model(model_id))
    return self._tokenizers[model_id]

  async def _tokenizer_async(self, model_id: str) -> Tokenizer:
    return self._tokenizers.get(model_id) or await self._run(self._tokenizer, model_id)

  async def encode(self, shard: Shard, prompt: str) -> np.ndarray:
    return np.array((await self._tokenizer_async(shard.model_id)).encode(prompt), dtype=np.int64)

  async def decode(self, shard: Shard, tokens: list[int]) -> str:
    return (await self._tokenizer_async(shard.model_id)).decode([int(t) for t in tokens])

  async def apply_chat_template(self, shard: Shard, messages: list[dict]) -> str:
    return (await self._tokenizer_async(shard.model_id)).apply_chat_template(messages)

  def eos_token_ids(self, shard: Shard) -> set[int]:
    return set(self._tokenizer(shard.model_id).eos_token_ids)

  async def sample(self, logits: np.ndarray, temperature: float = 0.0) -> int:
    return sample_last(logits, temperature, self._sampler)

  # requests

  async def finish_request(self, request_id: str) -> None:
    await self._run(self._requests.pop, request_id, None)  # in the worker: the cache's arrays are freed on their own stream

  def active_requests(self) -> set[str]:
    """Ids of the requests whose state this engine holds."""
    return set(self._requests)

  def loaded_tensor_names(self) -> set[str]:
    """Names of the weights this engine holds: exactly its shard's."""
    return set(self._weights)

  async def infer_tensor(self, request_id: str, shard: Shard, input_data: np.ndarray) -> np.ndarray:
    """Token ids ((P,) or (1, P) ints) on the first shard, else hidden states (1, P, hidden_size) float32. Returns hidden states
    (1, P, hidden_size) float32, or logits (1, P, vocab_size) float32 on the last shard."""
    return await self._run(self._infer, request_id, shard, np.asarray(input_data))

  # the worker thread's side

  def _load(self, shard: Shard) -> None:
    import mlx.core as mx

    if shard == self.shard:
      return
    self.shard, self._weights, self._requests = None, {}, {}  # a half-loaded shard must never look loaded
    config, weights = load_shard_weights(locate_model(shard.model_id), shard)
    converted = {}
    for name, w in weights.items():  # matrices to (in, out): MLX's CPU matmul is ~2x faster on them than on a transposed view
      if name == LM_HEAD and EMBED in weights and w is weights[EMBED]:  # tied, on a shard that also embeds: a view, not a copy
        converted[name] = converted[EMBED].T
      else:
        converted[name] = mx.array(w if w.ndim == 1 or name == EMBED else np.ascontiguousarray(w.T))
    mx.eval(list(converted.values()))
    self._config, self._weights = config, converted
    self._freqs = mx.array(1.0 / rope_inv_freq(config), dtype=mx.float32)
    self.shard = shard

  def _infer(self, request_id: str, shard: Shard, x: np.ndarray) -> np.ndarray:
    import mlx.core as mx

    self._load(shard)
    config = self._config
    if shard.is_first_layer():
      if not np.issubdtype(x.dtype, np.integer) or x.ndim not in (1, 2) or x.size == 0 or (x.ndim == 2 and x.shape[0] != 1):
        raise ValueError(f"the first shard takes (P,) or (1, P) token ids, got {x.dtype} {x.shape}")
      if x.min() < 0 or x.max() >= config.vocab_size:
        raise ValueError(f"token ids must lie in [0, {config.vocab_size}), got {x.min()}..{x.max()}")
      h = self._weights[EMBED][mx.array(x.reshape(-1).astype(np.int32))][None]
    else:
      if x.ndim != 3 or x.shape[0] != 1 or x.shape[1] == 0 or x.shape[2] != config.hidden_size:
        raise ValueError(f"shard {shard} takes hidden states (1, P, {config.hidden_size}), got {x.shape}")
      h = mx.array(x, dtype=mx.float32)
    request, cache = self._requests.get(request_id) or _Request(), {}  # stored only once every layer has run
    for layer in range(shard.start_layer, shard.end_layer + 1):
      h, cache[layer] = self._layer(h, layer, request)
    request.cache.update(cache)
    request.position += h.shape[1]
    self._requests[request_id] = request
    if shard.is_last_layer():
      h = mx.fast.rms_norm(h, self._weights[NORM], config.rms_norm_eps) @ self._weights[LM_HEAD]
    return np.array(h, dtype=np.float32)

  def _layer(self, h, layer: int, request: _Request):
    import mlx.core as mx

    c, w = self._config, lambda part: self._weights[layer_key(layer, part)]
    t = h.shape[1]
    x = mx.fast.rms_norm(h, w("input_layernorm.weight"), c.rms_norm_eps)

    def heads(name: str, n: int):  # (1, T, hidden) -> (1, n, T, head_dim)
      return (x @ w(f"self_attn.{name}.weight")).reshape(1, t, n, c.head_dim).transpose(0, 2, 1, 3)

    def rope(a):
      return mx.fast.rope(a, c.head_dim, traditional=False, base=None, scale=1.0, offset=request.position, freqs=self._freqs)

    q, k, v = rope(heads("q_proj", c.n_heads)), rope(heads("k_proj", c.n_kv_heads)), heads("v_proj", c.n_kv_heads)
    if layer in request.cache:
      k, v = mx.concatenate([request.cache[layer][0], k], axis=2), mx.concatenate([request.cache[layer][1], v], axis=2)
    # "causal" aligns the last query with the last key, so new tokens see the whole cache and each other causally
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(c.head_dim), mask="causal" if t > 1 else None)
    h = h + out.transpose(0, 2, 1, 3).reshape(1, t, c.n_heads * c.head_dim) @ w("self_attn.o_proj.weight")
    x = mx.fast.rms_norm(h, w("post_attention_layernorm.weight"), c.rms_norm_eps)
    gate = x @ w("mlp.gate_proj.weight")
    h = h + (gate * mx.sigmoid(gate) * (x @ w("mlp.up_proj.weight"))) @ w("mlp.down_proj.weight")
    mx.eval(h, k, v)  # per layer: the same arithmetic whatever the split
    return h, (k, v)
