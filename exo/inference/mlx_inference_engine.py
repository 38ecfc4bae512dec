"""A Llama-family engine on MLX and mlx-lm's model code, holding each shard's weights at the precision of its file.

A node builds only its shard: the embedding on the first shard, mlx-lm's TransformerBlocks (llama, or qwen2 with its Q/K/V
biases) for layers start_layer..end_layer, and the final norm and output head on the last shard; the full model is never made.
Weights come from exo.inference.llama_weights: quantized matrices (GGUF Q4_0/Q4_1/Q8_0, MLX exports) go into QuantizedLinear and
QuantizedEmbedding as they are, since their packing is mx.quantize's, and 16-bit matrices stay float16, so a shard takes about its
share of the file's bytes. Activations, the KV cache (mlx-lm's KVCache, one per layer per request) and the hidden states sent
between nodes are float32: MLX's CPU quantized matmul is fast with float32 inputs and very slow with float16 ones.

RoPE runs at llama_weights' inverse frequencies (rotate-half, any Llama 3.1 scaling applied) in every layer. The whole shard is
one lazy graph, evaluated once per call; its per-op arithmetic does not depend on where the graph is cut, so a model split over
several engines gives one engine's outputs.

MLX binds a lazy array to the thread that made it (another thread cannot evaluate it), so every MLX call of an engine, loading
and freeing included, runs in the engine's own single worker thread; the event loop only awaits it.
"""

import asyncio
import importlib
import importlib.util
import sys
import types
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from exo.base.shard import Shard
from exo.inference.llama_config import LlamaConfig, rope_inv_freq
from exo.inference.llama_layout import EMBED, LM_HEAD
from exo.inference.llama_weights import load_shard_weights
from exo.inference.model_file_engine import ModelFileEngine
from exo.inference.model_files import locate_model
from exo.inference.model_sources import ENGINE_FORMATS
from exo.inference.quantized import QuantizedMatrix, Weight
from exo.inference.sharded_engine import ModelDims


def _import_mlx_lm_models(*names: str) -> list[types.ModuleType]:
  """mlx-lm's model modules without running mlx_lm/__init__.py, which imports transformers for loading and generation helpers
  this engine does not use (about 55 MB resident and a second at start). The package stands in as a bare namespace while its
  submodules load and is then forgotten, so a later plain `import mlx_lm` still runs the real package."""
  if "mlx_lm" in sys.modules:
    return [importlib.import_module(f"mlx_lm.models.{n}") for n in names]
  spec = importlib.util.find_spec("mlx_lm")
  package = types.ModuleType("mlx_lm")
  package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
  sys.modules["mlx_lm"] = package
  try:
    return [importlib.import_module(f"mlx_lm.models.{n}") for n in names]
  finally:
    for name in [m for m in sys.modules if m == "mlx_lm" or m.startswith("mlx_lm.")]:
      del sys.modules[name]  # this engine keeps its modules; the package, imported later, loads whole


llama, qwen2, _base, _cache = _import_mlx_lm_models("llama", "qwen2", "base", "cache")
create_attention_mask, KVCache = _base.create_attention_mask, _cache.KVCache
_FAMILIES = {"llama": llama, "qwen2": qwen2}
_LAYERS = "model.layers."


def _local_name(name: str, start_layer: int) -> str:
  """A loader name as the shard module names it: layer i is the module's layer i - start_layer."""
  if name.startswith(_LAYERS):
    layer, part = name.removeprefix(_LAYERS).split(".", 1)
    return f"layers.{int(layer) - start_layer}.{part}"
  return name.removeprefix("model.")


def _global_name(name: str, start_layer: int) -> str:
  if name.startswith("layers."):
    layer, part = name.removeprefix("layers.").split(".", 1)
    return f"{_LAYERS}{int(layer) + start_layer}.{part}"
  return name if name.startswith("lm_head.") else f"model.{name}"


def _model_args(config: LlamaConfig):
  """mlx-lm's ModelArgs for the config's family."""
  args = dict(
    model_type=config.architecture,
    hidden_size=config.hidden_size,
    num_hidden_layers=config.n_layers,
    intermediate_size=config.intermediate_size,
    num_attention_heads=config.n_heads,
    num_key_value_heads=config.n_kv_heads,
    rms_norm_eps=config.rms_norm_eps,
    vocab_size=config.vocab_size,
    max_position_embeddings=config.context_length,
    rope_theta=config.rope_theta,
    tie_word_embeddings=config.tie_word_embeddings,
  )
  if config.architecture == "llama":
    return llama.ModelArgs(**args, head_dim=config.head_dim)
  if config.head_dim * config.n_heads != config.hidden_size:
    raise ValueError(f"a qwen2 model needs head_dim * n_heads == hidden_size, got {config.head_dim} * {config.n_heads} != {config.hidden_size}")
  return qwen2.ModelArgs(**args)


def _arrays(name: str, w: Weight) -> list[tuple[str, mx.array]]:
  """A weight as MLX arrays (copied), a quantized matrix as mx.quantize's weight, scales and biases."""
  if isinstance(w, QuantizedMatrix):
    module = name.removesuffix(".weight")
    return [(name, mx.array(w.packed.view(np.uint32))), (f"{module}.scales", mx.array(w.scales)), (f"{module}.biases", mx.array(w.biases))]
  return [(name, mx.array(w))]


class _Rope(nn.Module):
  """Rotate-half RoPE at given inverse frequencies, in place of mlx-lm's, so plain and scaled models share one path."""

  def __init__(self, head_dim: int, inv_freq: np.ndarray):
    super().__init__()
    self.head_dim = head_dim
    self._periods = mx.array(1.0 / inv_freq, dtype=mx.float32)

  def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
    return mx.fast.rope(x, self.head_dim, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._periods)


class _MLXShardModel(nn.Module):
  """Layers start_layer..end_layer of a model, the embedding if first, the final norm and head if last. `quantized`: module
  path -> {"bits", "group_size"} of the modules whose weights are quantized. `tied`: the shard is first and last and the head is
  the embedding matrix, held once."""

  def __init__(self, config: LlamaConfig, shard: Shard, quantized: dict[str, dict], tied: bool):
    super().__init__()
    self.config, self.shard, self.tied = config, shard, tied
    args = _model_args(config)
    if shard.is_first_layer():
      self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
    self.layers = [_FAMILIES[config.architecture].TransformerBlock(args) for _ in range(shard.get_layer_count())]
    rope = _Rope(config.head_dim, rope_inv_freq(config))
    for block in self.layers:
      block.self_attn.rope = rope
    if shard.is_last_layer():
      self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
      if not tied:
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    nn.quantize(self, class_predicate=lambda path, _: quantized.get(path, False))

  def embed(self, ids: mx.array) -> mx.array:
    """Embedding rows in float32 (a quantized table dequantized in float32, as the matmuls compute)."""
    e = self.embed_tokens
    if isinstance(e, nn.QuantizedEmbedding):
      scales, biases = e.scales[ids].astype(mx.float32), e.biases[ids].astype(mx.float32)
      return mx.dequantize(e.weight[ids], scales, biases, group_size=e.group_size, bits=e.bits)
    return e(ids).astype(mx.float32)

  def __call__(self, x: mx.array, cache: list[KVCache]) -> mx.array:
    h = (self.embed(x) if self.shard.is_first_layer() else x)[None]
    mask = create_attention_mask(h, cache[0])
    for block, layer_cache in zip(self.layers, cache):
      h = block(h, mask, layer_cache)
    if not self.shard.is_last_layer():
      return h
    h = self.norm(h)
    return self.embed_tokens.as_linear(h) if self.tied else self.lm_head(h)


class MLXInferenceEngine(ModelFileEngine):
  """`seed` drives sampling at temperature > 0; `memory_limit_bytes` bounds the shards resident at once (ShardedEngine)."""

  formats = ENGINE_FORMATS["mlx"]  # MLX community exports first

  def __init__(self, seed: int = 0, memory_limit_bytes: int | None = None):
    super().__init__(seed, memory_limit_bytes)
    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-engine")

  async def _in_worker(self, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

  def close(self) -> None:
    """Stop the worker thread once queued work is done. MLX wants each thread that used it to destroy its streams before it
    ends (else the process may abort as it exits), so the worker does that last."""

    def release() -> None:
      ModelFileEngine.close(self)
      mx.clear_streams()

    self._executor.submit(release).result()
    self._executor.shutdown(wait=True)

  def held_arrays(self, shard: Shard) -> dict[str, mx.array]:
    """The arrays a resident shard holds, by loader name with global layer indices (a quantized matrix's as .weight, .scales
    and .biases)."""
    return {_global_name(name, shard.start_layer): a for name, a in tree_flatten(self._models[shard].parameters())}

  def held_array_bytes(self, shard: Shard) -> int:
    """What the arrays of a resident shard take (held_bytes gives the file's figures for every resident shard)."""
    return sum(a.nbytes for a in self.held_arrays(shard).values())

  # the worker thread's side

  def _load_model(self, shard: Shard) -> _MLXShardModel:
    config, weights = load_shard_weights(locate_model(shard.model_id), shard)
    tied = shard.is_first_layer() and shard.is_last_layer() and weights[LM_HEAD] is weights[EMBED]
    if tied:
      del weights[LM_HEAD]
    quantized = {
      _local_name(name, shard.start_layer).removesuffix(".weight"): {"bits": w.bits, "group_size": w.group_size}
      for name, w in weights.items()
      if isinstance(w, QuantizedMatrix)
    }
    model = _MLXShardModel(config, shard, quantized, tied)  # its initial weights are lazy and never computed: these replace them
    arrays = []
    for name in list(weights):  # each numpy copy is dropped once MLX holds its own
      arrays += _arrays(_local_name(name, shard.start_layer), weights.pop(name))
    model.load_weights(arrays)
    mx.eval(model.parameters())
    return model

  def _unload_model(self, model: _MLXShardModel) -> None:
    model.clear()
    mx.clear_cache()

  def _new_cache(self, model: _MLXShardModel, shard: Shard, context: int) -> list[KVCache]:
    """mlx-lm's KVCache grows with the positions written (in steps of 256), so a request holds what it uses of its `context`
    (which ShardedEngine enforces)."""
    return [KVCache() for _ in model.layers]

  def _forward(self, model: _MLXShardModel, cache: list[KVCache], shard: Shard, x: np.ndarray, position: int) -> np.ndarray:
    try:
      out = model(mx.array(x.astype(np.int32) if shard.is_first_layer() else x), cache)
      mx.eval(out, [(c.keys, c.values) for c in cache])
    except BaseException:
      for c in cache:  # the request stays at `position`: drop whatever the failed step appended
        c.trim(c.offset - position)
      raise
    return np.array(out, dtype=np.float32)

  def _dims(self, model: _MLXShardModel) -> ModelDims:
    return ModelDims(model.config.vocab_size, model.config.hidden_size, model.config.context_length)
