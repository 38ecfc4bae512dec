"""A llama.cpp GGUF file as a Llama-family model: its config from the file's metadata, checked against its tensors, and its
tensors one by one at their held precision in llama_weights' convention (Hugging Face names, (out, in) matrices, a Llama's Q and
K rows unpermuted back to rotate-half order)."""

import dataclasses
import functools
import math
from pathlib import Path

import gguf
import numpy as np

from exo.base.errors import BadInput
from exo.inference.gguf_header import GGUFHeader, read_header
from exo.inference.llama_config import ARCHITECTURES, LlamaConfig, checked_config
from exo.inference.llama_layout import EMBED, GGUF_GLOBALS, LM_HEAD, check_tensors, gguf_name
from exo.inference.model_file_checks import shown
from exo.inference.quantized import KEPT_QUANTIZED, QuantizedMatrix, Weight, from_gguf_blocks, held

_GGUF_KEYS = {  # LlamaConfig field: its GGUF key, after "ARCH."
  "vocab_size": "vocab_size",
  "hidden_size": "embedding_length",
  "intermediate_size": "feed_forward_length",
  "n_layers": "block_count",
  "n_heads": "attention.head_count",
  "n_kv_heads": "attention.head_count_kv",
  "head_dim": "attention.key_length",
  "rope_theta": "rope.freq_base",
  "rms_norm_eps": "attention.layer_norm_rms_epsilon",
  "context_length": "context_length",
}
_GGUF_REQUIRED = ("hidden_size", "intermediate_size", "n_layers", "n_heads", "rms_norm_eps", "context_length")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's `permute(w, n_heads)` of a Q or K projection: GGUF row h*hd + 2i + j becomes HF row h*hd + j*hd/2 + i."""
  return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
  """A GGUF tensor's data (raw blocks for quantized types) as a new float32 array, rows first: (out, in) for a matrix."""
  return np.array(gguf.quants.dequantize(data, qtype), dtype=np.float32)


@functools.lru_cache(maxsize=4)
def gguf_metadata(path: str) -> GGUFHeader:
  """The GGUF file's header, read once and cached, less the tokenizer's fields: a vocabulary's tokens and merges take ~8 MB
  as Python values, and the tokenizer reads them once, with read_header."""
  header = read_header(path)
  return GGUFHeader({k: v for k, v in header.fields.items() if not k.startswith("tokenizer.")}, header.tensors)


def gguf_field(metadata: GGUFHeader, key: str, default=None):
  return metadata.fields.get(key, default)


def _from_f32(value: float) -> float:
  """The shortest decimal that a GGUF float32 stands for (1e-5, not 9.99999974e-06), so both sources give equal configs."""
  return float(str(np.float32(value)))


def gguf_config(path: Path, metadata: GGUFHeader) -> LlamaConfig:
  """The model's config from the GGUF metadata, checked against the file's tensors (checked_config, check_tensors)."""
  arch = gguf_field(metadata, "general.architecture")
  if arch not in ARCHITECTURES:
    raise BadInput(f"GGUF file {path}: general.architecture is not supported; expected one of {', '.join(ARCHITECTURES)}")
  tensors, where = metadata.tensors, f"GGUF file {path}"
  names = {field: f"{arch}.{key}" for field, key in _GGUF_KEYS.items()} | {"tie_word_embeddings": "output.weight"}
  values = {field: gguf_field(metadata, key) for field, key in names.items() if field != "tie_word_embeddings"}
  for field in _GGUF_REQUIRED:
    if values[field] is None:
      raise BadInput(f"{where} lacks {names[field]}; expected a llama.cpp-converted {arch} model")
  if values["vocab_size"] is None:
    if GGUF_GLOBALS[EMBED] not in tensors:
      raise BadInput(f"{where} lacks tensor {GGUF_GLOBALS[EMBED]}; expected a complete llama.cpp-converted {arch} model")
    values["vocab_size"] = int(tensors[GGUF_GLOBALS[EMBED]].shape[-1])
  for field in ("rope_theta", "rms_norm_eps"):
    if isinstance(values[field], float):
      values[field] = _from_f32(values[field])
  values |= {"architecture": arch, "tie_word_embeddings": GGUF_GLOBALS[LM_HEAD] not in tensors, "attention_bias": "blk.0.attn_q.bias" in tensors}
  kind = gguf_field(metadata, f"{arch}.rope.scaling.type", "none")
  scaling = None if kind == "none" else {"rope_type": kind, "factor": gguf_field(metadata, f"{arch}.rope.scaling.factor", 1.0)}
  config = checked_config(values, names, where, scaling)
  dimensions = gguf_field(metadata, f"{arch}.rope.dimension_count", config.head_dim)
  if dimensions != config.head_dim:
    raise BadInput(f"{where}: {arch}.rope.dimension_count {shown(dimensions)} is not supported; expected the head size {config.head_dim}")

  def shape_of(name: str):
    file_name = gguf_name(name)
    t = tensors.get(file_name)
    return file_name, (False if t is None else tuple(reversed(t.shape)))

  check_tensors(config, where, shape_of)
  if "rope_freqs.weight" in tensors:  # llama.cpp stores Llama 3.1+ scaling as these per-frequency divisors
    t = tensors["rope_freqs.weight"]
    if t.shape != (config.head_dim // 2,):
      raise BadInput(f"{where}: tensor rope_freqs.weight has shape {list(t.shape)}; expected [{config.head_dim // 2}] (half the head size)")
    factors = tuple(float(f) for f in dequantize(t.data, t.tensor_type))
    if not all(0 < f < math.inf for f in factors):
      raise BadInput(f"{where}: tensor rope_freqs.weight must hold numbers above 0")
    config = dataclasses.replace(config, rope_freq_factors=factors)
  return config


def _gguf_tensor(t) -> Weight:
  """A GGUF tensor at its held precision (llama_weights' docstring), rows first: (out, in) for a matrix."""
  if t.tensor_type in KEPT_QUANTIZED:
    return from_gguf_blocks(t.data, t.tensor_type)
  if t.tensor_type == gguf.GGMLQuantizationType.F16:
    return held(np.asarray(t.data), True)
  if t.tensor_type == gguf.GGMLQuantizationType.F32:
    return held(np.asarray(t.data), False)
  return held(dequantize(t.data, t.tensor_type), True)


def _take_rows(w: Weight, index: np.ndarray) -> Weight:
  return w.take_rows(index) if isinstance(w, QuantizedMatrix) else w[index]


def gguf_tensor_reader(path: Path, config: LlamaConfig):
  """read(name): the tensor of Hugging Face name `name` from the GGUF file, memory-mapped only while it is converted."""
  tensors = gguf_metadata(str(path)).tensors
  unpermute_heads = {"self_attn.q_proj.weight": config.n_heads, "self_attn.k_proj.weight": config.n_kv_heads}
  if config.architecture != "llama":  # only the Llama converter permutes Q and K
    unpermute_heads = {}

  def read(name: str) -> Weight:
    source = gguf_name(name)
    if source not in tensors:
      raise BadInput(f"GGUF file {path} lacks tensor {source}; expected a complete llama.cpp-converted {config.architecture} model")
    w = _gguf_tensor(tensors[source])  # GGUF lists dims innermost first ([in, out]); the data is already (out, in) row-major
    heads = next((n for part, n in unpermute_heads.items() if name.endswith(f".{part}")), None)
    return w if heads is None else _take_rows(w, unpermute_rope_rows(np.arange(w.shape[0]), heads))

  return read
