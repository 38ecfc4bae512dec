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
  (heads = n_heads for Q, n_kv_heads for K). Loading a GGUF undoes exactly that (unpermute_rope_rows), so both sources give the same
  arrays (up to the GGUF's quantization).

Only the shard's tensors are read: each is memory-mapped while it is converted or copied (gguf_header for GGUF files, the
safetensors reader here for the others), so the file itself never stays resident.

Nothing a file says is trusted before it is checked: a config (config.json's or the GGUF metadata's) in one place, `checked_config`
(each field's type and range, the fields against each other, then every tensor the config implies against the file's tensors and
their shapes); a safetensors header in one place, `safetensors_header` (its length against the file, each tensor's byte range
against the data); JSON files are read up to MAX_JSON_BYTES. A model that fails is a BadInput naming the file and the field.
"""

import dataclasses
import functools
import json
import math
import os
import reprlib
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from exo.base.errors import BadInput
from exo.base.files import open_regular, read_bytes
from exo.base.model_spec import CONTEXT_LIMIT, MAX_LAYERS
from exo.base.shard import Shard
from exo.inference.gguf_header import GGUFHeader, read_header
from exo.inference.quantized import KEPT_QUANTIZED, QuantizedMatrix, Weight, from_gguf_blocks, from_mlx, half

EMBED, NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
GGUF_PARTS = {  # Hugging Face layer part: llama.cpp's name for it
  "input_layernorm.weight": "attn_norm.weight",
  "self_attn.q_proj.weight": "attn_q.weight",
  "self_attn.k_proj.weight": "attn_k.weight",
  "self_attn.v_proj.weight": "attn_v.weight",
  "self_attn.o_proj.weight": "attn_output.weight",
  "post_attention_layernorm.weight": "ffn_norm.weight",
  "mlp.gate_proj.weight": "ffn_gate.weight",
  "mlp.up_proj.weight": "ffn_up.weight",
  "mlp.down_proj.weight": "ffn_down.weight",
  "self_attn.q_proj.bias": "attn_q.bias",
  "self_attn.k_proj.bias": "attn_k.bias",
  "self_attn.v_proj.bias": "attn_v.bias",
}
LAYER_PARTS = tuple(GGUF_PARTS)[:9]  # every family's
ATTENTION_BIASES = tuple(GGUF_PARTS)[9:]  # Qwen2's besides
ARCHITECTURES = ("llama", "qwen2")
GGUF_GLOBALS = {EMBED: "token_embd.weight", NORM: "output_norm.weight", LM_HEAD: "output.weight"}
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16, "U32": np.uint32}  # BF16: widened below
_ST_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
MAX_JSON_BYTES = 16 << 20  # config.json, model.safetensors.index.json, a safetensors header: a 405B model's are under 2 MB
MAX_DIM = 1 << 20  # hidden, intermediate and head sizes, head counts: the largest published models' are under 64k
MAX_VOCAB = 1 << 24
MLX_BITS, MLX_GROUP_SIZES = (2, 3, 4, 6, 8), (32, 64, 128)


@dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  rope_theta: float
  rms_norm_eps: float
  context_length: int
  tie_word_embeddings: bool
  rope_freq_factors: tuple[float, ...] | None = None  # per-frequency divisors (Llama 3.1+ "llama3" scaling); None: no scaling
  architecture: str = "llama"  # one of ARCHITECTURES
  attention_bias: bool = False  # biases on the Q, K and V projections (Qwen2)


def layer_parts(config: LlamaConfig) -> tuple[str, ...]:
  """The tensors of one decoder layer of this model."""
  return LAYER_PARTS + (ATTENTION_BIASES if config.attention_bias else ())


def layer_key(layer: int, part: str) -> str:
  return f"model.layers.{layer}.{part}"


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """(head_dim/2,) float64 inverse frequencies for rotate-half RoPE, scaling applied."""
  inv_freq = config.rope_theta ** (-np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim)
  return inv_freq if config.rope_freq_factors is None else inv_freq / np.asarray(config.rope_freq_factors, dtype=np.float64)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's `permute(w, n_heads)` of a Q or K projection: GGUF row h*hd + 2i + j becomes HF row h*hd + j*hd/2 + i."""
  return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
  """A GGUF tensor's data (raw blocks for quantized types) as a new float32 array, rows first: (out, in) for a matrix."""
  return np.array(gguf.quants.dequantize(data, qtype), dtype=np.float32)


def shard_tensor_names(config: LlamaConfig, shard: Shard) -> list[str]:
  """The names load_shard_weights returns for `shard`."""
  names = [EMBED] if shard.is_first_layer() else []
  names += [layer_key(i, part) for i in range(shard.start_layer, shard.end_layer + 1) for part in layer_parts(config)]
  return names + ([NORM, LM_HEAD] if shard.is_last_layer() else [])


def load_config(path: Path | str) -> LlamaConfig:
  """The model's config, checked against its file (checked_config): a BadInput naming the field if it does not hold."""
  path = Path(path)
  return _gguf_config(path, gguf_metadata(str(path))) if path.suffix == ".gguf" else _hf_config(path)


def read_json(path: Path, what: str) -> dict:
  """A JSON object file of a model (config.json, the safetensors index, tokenizer_config.json) of at most MAX_JSON_BYTES."""
  return parse_json_object(read_bytes(path, what, MAX_JSON_BYTES), f"{what} {str(path)!r}")


def parse_json_object(data: bytes, where: str) -> dict:
  try:
    value = json.loads(data)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BadInput(f"{where} is not valid JSON: {e}") from None
  except RecursionError:
    raise BadInput(f"{where} nests arrays or objects too deeply") from None
  if not isinstance(value, dict):
    raise BadInput(f"{where} must hold a JSON object, got {type(value).__name__}")
  return value


def _shown(value) -> str:
  return reprlib.repr(value)  # bounded: a value from a file is never echoed whole


def _whole(value, name: str, where: str, low: int, high: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
    raise BadInput(f"{where}: {name} must be a whole number from {low} to {high}, got {_shown(value)}")
  return value


def _positive(value, name: str, where: str, below: float = math.inf) -> float:
  if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < below:  # NaN fails too
    raise BadInput(f"{where}: {name} must be a number above 0{f' and below {below:g}' if below < math.inf else ''}, got {_shown(value)}")
  return float(value)


def _given(values: dict, field: str, default):
  return default if values.get(field) is None else values[field]


def checked_config(values: dict, names: dict[str, str], where: str, rope_scaling=None) -> LlamaConfig:
  """A LlamaConfig from a file's raw values (keyed by LlamaConfig's fields; None: absent, for those with a default), each checked
  for type and range and against the others; `names` gives each field's name in the file, for the error; `rope_scaling` is a
  config.json's, or the GGUF's rope.scaling.* as one."""

  def whole(field: str, low: int, high: int, default=None) -> int:
    return _whole(_given(values, field, default), names[field], where, low, high)

  hidden, heads = whole("hidden_size", 1, MAX_DIM), whole("n_heads", 1, MAX_DIM)
  if values.get("head_dim") is None and hidden % heads:
    raise BadInput(f"{where}: {names['hidden_size']} {hidden} is not a multiple of {names['n_heads']} {heads} (and no head size is given)")
  head_dim = whole("head_dim", 2, MAX_DIM, hidden // heads)
  if head_dim % 2:
    raise BadInput(f"{where}: the head size must be even (RoPE rotates pairs), got {head_dim}")
  kv_heads = whole("n_kv_heads", 1, heads, heads)
  if heads % kv_heads:
    raise BadInput(f"{where}: {names['n_heads']} {heads} is not a multiple of {names['n_kv_heads']} {kv_heads}")
  theta = _positive(_given(values, "rope_theta", 10000.0), names["rope_theta"], where)
  tied = _given(values, "tie_word_embeddings", False)
  if not isinstance(tied, bool):
    raise BadInput(f"{where}: {names['tie_word_embeddings']} must be true or false, got {_shown(tied)}")
  return LlamaConfig(
    vocab_size=whole("vocab_size", 1, MAX_VOCAB),
    hidden_size=hidden,
    intermediate_size=whole("intermediate_size", 1, MAX_DIM),
    n_layers=whole("n_layers", 1, MAX_LAYERS),
    n_heads=heads,
    n_kv_heads=kv_heads,
    head_dim=head_dim,
    rope_theta=theta,
    rms_norm_eps=_positive(_given(values, "rms_norm_eps", 1e-6), names["rms_norm_eps"], where, below=1),
    context_length=whole("context_length", 1, CONTEXT_LIMIT, 2048),
    tie_word_embeddings=tied,
    rope_freq_factors=rope_scaling_factors(rope_scaling, theta, head_dim, where),
    architecture=values["architecture"],
    attention_bias=values.get("attention_bias", values["architecture"] == "qwen2"),
  )


def tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor the model's config implies, by Hugging Face name, with its shape (rows first)."""
  c, attn, kv = config, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
  parts = {
    "input_layernorm.weight": (c.hidden_size,),
    "self_attn.q_proj.weight": (attn, c.hidden_size),
    "self_attn.k_proj.weight": (kv, c.hidden_size),
    "self_attn.v_proj.weight": (kv, c.hidden_size),
    "self_attn.o_proj.weight": (c.hidden_size, attn),
    "post_attention_layernorm.weight": (c.hidden_size,),
    "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
    "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
    "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
    "self_attn.q_proj.bias": (attn,),
    "self_attn.k_proj.bias": (kv,),
    "self_attn.v_proj.bias": (kv,),
  }
  shapes = {EMBED: (c.vocab_size, c.hidden_size), NORM: (c.hidden_size,)}
  if not c.tie_word_embeddings:
    shapes[LM_HEAD] = (c.vocab_size, c.hidden_size)
  shapes.update({layer_key(i, part): parts[part] for i in range(c.n_layers) for part in layer_parts(c)})
  return shapes


def check_tensors(config: LlamaConfig, where: str, shape_of) -> None:
  """Every tensor the config implies is in the file with its shape: `shape_of(name)` gives the file's name for it and its shape
  (None: not in the file; a shape of None: not known here, as for a weight file not downloaded)."""
  for name, shape in tensor_shapes(config).items():
    file_name, found = shape_of(name)
    if found is False:
      raise BadInput(f"{where} lacks tensor {file_name}; expected a complete {config.architecture} model of {config.n_layers} layers")
    if found is not None and tuple(found) != shape:
      raise BadInput(f"{where}: tensor {file_name} has shape {list(found)}, but its config implies {list(shape)}")


def load_shard_weights(path: Path | str, shard: Shard) -> tuple[LlamaConfig, dict[str, Weight]]:
  """The model's config and `shard`'s weights at file precision (names and conventions in the module docstring)."""
  path = Path(path)
  config = load_config(path)
  if shard.n_layers != config.n_layers or not 0 <= shard.start_layer <= shard.end_layer < config.n_layers:
    raise BadInput(f"shard layers {shard.start_layer}..{shard.end_layer} of {shard.n_layers} do not fit {path}, which has {config.n_layers} layers")
  read = _gguf_tensor_reader(path, config) if path.suffix == ".gguf" else _hf_tensor_reader(path, config)
  weights: dict[str, Weight] = {}
  for name in shard_tensor_names(config, shard):
    source = EMBED if name == LM_HEAD and config.tie_word_embeddings else name
    weights[name] = weights[source] if source in weights else read(source)
  return config, weights


# GGUF


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


def _gguf_config(path: Path, metadata: GGUFHeader) -> LlamaConfig:
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
    raise BadInput(f"{where}: {arch}.rope.dimension_count {_shown(dimensions)} is not supported; expected the head size {config.head_dim}")

  def shape_of(name: str):
    if name in GGUF_GLOBALS:
      file_name = GGUF_GLOBALS[name]
    else:
      layer, part = name.removeprefix("model.layers.").split(".", 1)
      file_name = f"blk.{layer}.{GGUF_PARTS[part]}"
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


def _held(w: np.ndarray, sixteen_bit: bool) -> np.ndarray:
  """A dense tensor at the precision it is held: vectors float32, 16-bit matrices float16 where they fit, float32 ones as they are."""
  if w.ndim == 1:
    return np.asarray(w, dtype=np.float32)
  return half(w) if sixteen_bit else np.array(w, dtype=np.float32)


def _gguf_tensor(t) -> Weight:
  """A GGUF tensor at its held precision (module docstring), rows first: (out, in) for a matrix."""
  if t.tensor_type in KEPT_QUANTIZED:
    return from_gguf_blocks(t.data, t.tensor_type)
  if t.tensor_type == gguf.GGMLQuantizationType.F16:
    return _held(np.asarray(t.data), True)
  if t.tensor_type == gguf.GGMLQuantizationType.F32:
    return _held(np.asarray(t.data), False)
  return _held(dequantize(t.data, t.tensor_type), True)


def _take_rows(w: Weight, index: np.ndarray) -> Weight:
  return w.take_rows(index) if isinstance(w, QuantizedMatrix) else w[index]


def _gguf_tensor_reader(path: Path, config: LlamaConfig):
  tensors = gguf_metadata(str(path)).tensors
  unpermute_heads = {"self_attn.q_proj.weight": config.n_heads, "self_attn.k_proj.weight": config.n_kv_heads}
  if config.architecture != "llama":  # only the Llama converter permutes Q and K
    unpermute_heads = {}

  def read(name: str) -> Weight:
    if name in GGUF_GLOBALS:
      source, part = GGUF_GLOBALS[name], None
    else:
      layer, part = name.removeprefix("model.layers.").split(".", 1)
      source = f"blk.{layer}.{GGUF_PARTS[part]}"
    if source not in tensors:
      raise BadInput(f"GGUF file {path} lacks tensor {source}; expected a complete llama.cpp-converted {config.architecture} model")
    w = _gguf_tensor(tensors[source])  # GGUF lists dims innermost first ([in, out]); the data is already (out, in) row-major
    if part in unpermute_heads:
      return _take_rows(w, unpermute_rope_rows(np.arange(w.shape[0]), unpermute_heads[part]))
    return w

  return read


# Hugging Face safetensors


def rope_scaling_factors(scaling, theta: float, head_dim: int, where: str = "config.json") -> tuple[float, ...] | None:
  """Per-frequency divisors of inv_freq for a config.json `rope_scaling`, computed as transformers and llama.cpp do; a BadInput
  naming the field for a kind not supported or a value out of range."""
  if scaling is None:
    return None
  if not isinstance(scaling, dict):
    raise BadInput(f"{where}: rope_scaling must be an object or null, got {_shown(scaling)}")
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind in ("default", "none"):
    return None
  if kind not in ("linear", "llama3"):
    raise BadInput(f"{where}: rope_scaling type {_shown(kind)} is not supported; expected 'llama3', 'linear' or none")
  factor = _positive(scaling.get("factor", 8.0 if kind == "llama3" else None), "rope_scaling.factor", where)
  n = head_dim // 2
  if kind == "linear":
    return (factor,) * n
  low = _positive(scaling.get("low_freq_factor", 1.0), "rope_scaling.low_freq_factor", where)
  high = _positive(scaling.get("high_freq_factor", 4.0), "rope_scaling.high_freq_factor", where)
  if not high > low:
    raise BadInput(f"{where}: rope_scaling.high_freq_factor ({high:g}) must be above rope_scaling.low_freq_factor ({low:g})")
  old_context = _whole(
    scaling.get("original_max_position_embeddings", 8192), "rope_scaling.original_max_position_embeddings", where, 1, CONTEXT_LIMIT
  )
  factors = []
  for freq in theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim):
    wavelen = 2 * math.pi / freq
    if wavelen < old_context / high:
      factors.append(1.0)
    elif wavelen > old_context / low:
      factors.append(factor)
    else:
      smooth = (old_context / wavelen - low) / (high - low)
      factors.append(1 / ((1 - smooth) / factor + smooth))
  return tuple(factors)


def safetensors_header(file: Path) -> tuple[dict[str, dict], int]:
  """A safetensors file's tensors (name: {"dtype", "shape", "data_offsets"}) and where its data starts, each checked against the
  file before use: the header's length against the file and MAX_JSON_BYTES, each tensor's byte range against the data and,
  for a known dtype, against its shape."""
  where = f"safetensors file {str(file)!r}"
  with open_regular(file, "safetensors file") as f:
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
      raise BadInput(f"{where} is shorter than the 8 bytes that give its header's length")
    (length,) = struct.unpack("<Q", head)
    if length > size - 8:
      raise BadInput(f"{where}: its header length {length} runs past the end of the file ({size} bytes; a truncated download?)")
    if length > MAX_JSON_BYTES:
      raise BadInput(f"{where}: its header is {length} bytes; at most {MAX_JSON_BYTES} are read")
    header = parse_json_object(f.read(length), f"the header of {where}")
  header.pop("__metadata__", None)
  data_bytes = size - 8 - length
  for name, entry in header.items():
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
      raise BadInput(f"{where}: tensor {_shown(name)} must be an object with a dtype, got {_shown(entry)}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or len(shape) > 8 or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in shape):
      raise BadInput(f"{where}: tensor {_shown(name)} has shape {_shown(shape)}; expected a list of at most 8 sizes >= 0")
    if (
      not isinstance(offsets, list)
      or len(offsets) != 2
      or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
      or not 0 <= offsets[0] <= offsets[1] <= data_bytes
    ):
      raise BadInput(
        f"{where}: tensor {_shown(name)} has data_offsets {_shown(offsets)}; expected [start, end] within its {data_bytes} bytes of data"
      )
    if entry["dtype"] in _ST_ITEM_BYTES and offsets[1] - offsets[0] != math.prod(shape) * _ST_ITEM_BYTES[entry["dtype"]]:
      raise BadInput(
        f"{where}: tensor {_shown(name)} has {offsets[1] - offsets[0]} bytes of data, not the {list(shape)} {entry['dtype']} its header gives"
      )
  return header, 8 + length


@functools.lru_cache(maxsize=4)
def safetensors_index(directory: str) -> dict[str, tuple[Path, dict, int]]:
  """Tensor name: (file, header entry, offset of the file's data section), over every *.safetensors file in the directory."""
  index = {}
  for file in sorted(Path(directory).glob("*.safetensors")):
    header, data_start = safetensors_header(file)
    index.update({name: (file, entry, data_start) for name, entry in header.items()})
  return index


def read_weight_map(directory: Path) -> dict[str, str] | None:
  """model.safetensors.index.json's tensor -> file map (each file a *.safetensors name in the directory), or None for a
  checkpoint without one (a single file)."""
  path = directory / "model.safetensors.index.json"
  if not path.is_file():
    return None
  files = read_json(path, "safetensors index").get("weight_map")
  where = f"safetensors index {str(path)!r}"
  if not isinstance(files, dict):
    raise BadInput(f"{where} has no weight_map object")
  for name, file in files.items():
    if not isinstance(file, str) or not file.endswith(".safetensors") or "/" in file or "\\" in file or file.startswith("."):
      raise BadInput(f"{where}: tensor {_shown(name)} is in {_shown(file)}; expected the name of a .safetensors file beside it")
  return files


def _checkpoint_tensors(directory: Path):
  """The checkpoint's tensor names: its index's (model.safetensors.index.json), which also names those of weight files a node
  did not download (it fetches its layers' files only), or else its safetensors files' own."""
  files = read_weight_map(directory)
  return files if files is not None else safetensors_index(str(directory))


_HF_KEYS = {  # LlamaConfig field: its config.json key
  "vocab_size": "vocab_size",
  "hidden_size": "hidden_size",
  "intermediate_size": "intermediate_size",
  "n_layers": "num_hidden_layers",
  "n_heads": "num_attention_heads",
  "n_kv_heads": "num_key_value_heads",
  "head_dim": "head_dim",
  "rope_theta": "rope_theta",
  "rms_norm_eps": "rms_norm_eps",
  "context_length": "max_position_embeddings",
  "tie_word_embeddings": "tie_word_embeddings",
}
_HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads")


def _hf_config(directory: Path) -> LlamaConfig:
  c, where = read_json(directory / "config.json", "config.json"), f"config.json of {directory}"
  arch = c.get("model_type")
  if arch not in ARCHITECTURES or (arch == "llama" and (c.get("attention_bias") or c.get("mlp_bias"))):
    raise BadInput(f"{where}: model_type is not supported; expected one of {', '.join(ARCHITECTURES)} (a Llama without biases)")
  for field in _HF_REQUIRED:
    if c.get(_HF_KEYS[field]) is None:
      raise BadInput(f"{where} lacks {_HF_KEYS[field]}; expected a Hugging Face {arch} config")
  values = {field: c.get(key) for field, key in _HF_KEYS.items()} | {"architecture": arch}
  config = checked_config(values, _HF_KEYS, where, c.get("rope_scaling"))
  names = _checkpoint_tensors(directory)
  if LM_HEAD not in names:
    config = dataclasses.replace(config, tie_word_embeddings=True)
  present, quantization = safetensors_index(str(directory)), _mlx_quantization(directory)

  def shape_of(name: str):
    if name not in names:
      return name, False
    if name not in present:
      return name, None  # in a weight file not downloaded
    shape, module = tuple(present[name][1]["shape"]), name.removesuffix(".weight")
    if name.endswith(".weight") and f"{module}.scales" in present and shape:  # an MLX export's packed quants: 32 // bits a uint32
      shape = (*shape[:-1], shape[-1] * 32 // _mlx_settings(quantization, module, directory)[0])
    return name, shape

  check_tensors(config, f"model {directory}", shape_of)
  return config


def _mlx_quantization(directory: Path) -> dict:
  """config.json's `quantization` of an MLX export ({"group_size": 64, "bits": 4, per-module overrides...}); {} if none."""
  return read_json(directory / "config.json", "config.json").get("quantization") or {}


def _mlx_settings(quantization, module: str, directory: Path) -> tuple[int, int]:
  """The bits and group size an MLX export quantizes `module` with."""
  settings = quantization.get(module, quantization) if isinstance(quantization, dict) else None
  bits, group = (settings.get("bits"), settings.get("group_size")) if isinstance(settings, dict) else (None, None)
  if bits not in MLX_BITS or group not in MLX_GROUP_SIZES or isinstance(bits, bool) or isinstance(group, bool):
    raise BadInput(
      f"model {directory} quantizes {module} but config.json's quantization gives bits {_shown(bits)} and group_size {_shown(group)}; "
      f"expected bits in {MLX_BITS} and group_size in {MLX_GROUP_SIZES}"
    )
  return bits, group


def _hf_tensor_reader(directory: Path, config: LlamaConfig):
  index = safetensors_index(str(directory))
  quantization = _mlx_quantization(directory)

  def raw(name: str) -> np.ndarray:
    if name not in index:
      raise BadInput(f"model {directory} lacks tensor {name}; expected a complete Hugging Face {config.architecture} checkpoint")
    file, entry, data_start = index[name]
    if entry["dtype"] not in _ST_DTYPES:
      raise BadInput(f"tensor {name} in {file} has dtype {entry['dtype']}; expected F32, F16, BF16 or an MLX-quantized U32")
    start, end = entry["data_offsets"]
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=data_start + start, shape=(end - start,)).view(_ST_DTYPES[entry["dtype"]])
    data = (data.astype(np.uint32) << 16).view(np.float32) if entry["dtype"] == "BF16" else data
    return data.reshape(entry["shape"])

  def read(name: str) -> Weight:
    module = name.removesuffix(".weight")
    if name.endswith(".weight") and f"{module}.scales" in index:
      bits, group = _mlx_settings(quantization, module, directory)
      packed = raw(name)
      scales, biases = (_held(raw(f"{module}.{part}"), index[f"{module}.{part}"][1]["dtype"] in ("F16", "BF16")) for part in ("scales", "biases"))
      groups = (packed.shape[0], packed.shape[-1] * 32 // bits // group)
      if packed.ndim != 2 or scales.shape != groups or biases.shape != groups:
        raise BadInput(
          f"model {directory}: {module}'s scales and biases have shapes {list(scales.shape)}, {list(biases.shape)}; expected {list(groups)}"
        )
      return from_mlx(packed, scales, biases, bits, group)
    return _held(raw(name), index[name][1]["dtype"] in ("F16", "BF16"))

  return read
