"""One shard's weights of a Llama-family model (Llama, or Qwen2: Llama plus biases on the Q, K and V projections) at the
precision its file stores them, from a GGUF file or a Hugging Face safetensors directory, in ONE convention.

The convention engines can rely on, whatever the source:
- Names are Hugging Face's, with global layer indices: `model.embed_tokens.weight` (first shard only),
  `model.layers.{i}.{part}` for every part in layer_parts(config) and every i in [start_layer, end_layer], and `model.norm.weight` plus
  `lm_head.weight` (last shard only; when the embedding is tied, `lm_head.weight` IS the embedding matrix, so engines never
  special-case tying).
- Matrices are (out_features, in_features), so y = x @ W.T; the embedding and lm head are (vocab_size, hidden_size).
- Precision is the file's (exo.inference.quantized): GGUF Q4_0 / Q4_1 / Q8_0 and MLX-quantized safetensors are QuantizedMatrix;
  F16 and BF16 matrices are float16 (BF16 widened to float32 only where a value exceeds float16's range); F32 matrices float32;
  other GGUF types float16; vectors (norms, biases) float32. as_float32 widens any of them for a reference computation.
- Q and K follow Hugging Face's rotate-half RoPE: within each head, dimension d (d < head_dim/2) pairs with d + head_dim/2, and
  inv_freq[d] = rope_theta ** (-2d / head_dim) / rope_freq_factors[d] (see rope_inv_freq). llama.cpp's converter permutes the
  rows of q_proj and k_proj of a Llama (not of a Qwen2) so that GGML's rope can rotate adjacent pairs (2i, 2i+1) instead: per head it reshapes the rows to
  (2, head_dim/2), transposes to (head_dim/2, 2) and flattens, i.e. GGUF row h*head_dim + 2i + j = HF row h*head_dim + j*head_dim/2 + i
  (heads = n_heads for Q, n_kv_heads for K). Loading a GGUF undoes exactly that (gguf_model.unpermute_rope_rows), so both sources give the same
  arrays (up to the GGUF's quantization).

Only the shard's tensors are read: each is memory-mapped while it is converted or copied (gguf_model for GGUF files,
safetensors_model for the others), so the file itself never stays resident.

Nothing a file says is trusted before it is checked: a config (config.json's or the GGUF metadata's) in one place,
llama_config's `checked_config` (each field's type and range, the fields against each other), then every tensor the config
implies against the file's tensors and their shapes (llama_layout's `check_tensors`); a safetensors header in one place,
safetensors_model's `safetensors_header` (its length against the file, each tensor's byte range against the data); JSON files
are read up to MAX_JSON_BYTES (model_file_checks). A model that fails is a BadInput naming the file and the field.

This module is the entry point: load_config and load_shard_weights pick the reader for the file's format.
"""

from pathlib import Path

from exo.base.errors import BadInput
from exo.base.shard import Shard
from exo.inference.gguf_model import gguf_config, gguf_metadata, gguf_tensor_reader
from exo.inference.llama_config import LlamaConfig
from exo.inference.llama_layout import EMBED, LM_HEAD, NORM, layer_key, layer_parts
from exo.inference.quantized import Weight
from exo.inference.safetensors_model import hf_config, hf_tensor_reader


def shard_tensor_names(config: LlamaConfig, shard: Shard) -> list[str]:
  """The names load_shard_weights returns for `shard`."""
  names = [EMBED] if shard.is_first_layer() else []
  names += [layer_key(i, part) for i in range(shard.start_layer, shard.end_layer + 1) for part in layer_parts(config)]
  return names + ([NORM, LM_HEAD] if shard.is_last_layer() else [])


def load_config(path: Path | str) -> LlamaConfig:
  """The model's config, checked against its file (checked_config): a BadInput naming the field if it does not hold."""
  path = Path(path)
  return gguf_config(path, gguf_metadata(str(path))) if path.suffix == ".gguf" else hf_config(path)


def load_shard_weights(path: Path | str, shard: Shard) -> tuple[LlamaConfig, dict[str, Weight]]:
  """The model's config and `shard`'s weights at file precision (names and conventions in the module docstring)."""
  path = Path(path)
  config = load_config(path)
  if shard.n_layers != config.n_layers or not 0 <= shard.start_layer <= shard.end_layer < config.n_layers:
    raise BadInput(f"shard layers {shard.start_layer}..{shard.end_layer} of {shard.n_layers} do not fit {path}, which has {config.n_layers} layers")
  read = gguf_tensor_reader(path, config) if path.suffix == ".gguf" else hf_tensor_reader(path, config)
  weights: dict[str, Weight] = {}
  for name in shard_tensor_names(config, shard):
    source = EMBED if name == LM_HEAD and config.tie_word_embeddings else name
    weights[name] = weights[source] if source in weights else read(source)
  return config, weights
