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
"""

import functools
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from exo.errors import BadInput
from exo.inference.gguf_header import GGUFHeader, read_header
from exo.inference.quantized import KEPT_QUANTIZED, QuantizedMatrix, Weight, from_gguf_blocks, from_mlx, half
from exo.inference.shard import Shard

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
  path = Path(path)
  return _gguf_config(path, gguf_metadata(str(path))) if path.suffix == ".gguf" else _hf_config(path)


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


def _gguf_config(path: Path, metadata: GGUFHeader) -> LlamaConfig:
  arch = gguf_field(metadata, "general.architecture")
  if arch not in ARCHITECTURES:
    raise BadInput(f"GGUF architecture {arch!r} is not supported; expected one of {', '.join(ARCHITECTURES)}")
  tensors = metadata.tensors

  def meta(key, default=None):
    value = gguf_field(metadata, f"{arch}.{key}", default)
    if value is None:
      raise BadInput(f"GGUF file {path} lacks {arch}.{key}; expected a llama.cpp-converted {arch} model")
    return value

  hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
  head_dim = int(meta("attention.key_length", hidden // heads))
  theta = _from_f32(meta("rope.freq_base", 10000.0))
  if int(meta("rope.dimension_count", head_dim)) != head_dim:
    raise BadInput(f"GGUF rope.dimension_count {meta('rope.dimension_count')} is not supported; expected the head size {head_dim}")
  factors = None
  if "rope_freqs.weight" in tensors:  # llama.cpp stores Llama 3.1+ scaling as these per-frequency divisors
    t = tensors["rope_freqs.weight"]
    factors = tuple(float(f) for f in dequantize(t.data, t.tensor_type))
  elif (kind := gguf_field(metadata, f"{arch}.rope.scaling.type", "none")) != "none":
    factors = rope_scaling_factors({"rope_type": kind, "factor": gguf_field(metadata, f"{arch}.rope.scaling.factor", 1.0)}, theta, head_dim)
  return LlamaConfig(
    vocab_size=int(meta("vocab_size", int(tensors["token_embd.weight"].shape[-1]))),
    hidden_size=hidden,
    intermediate_size=int(meta("feed_forward_length")),
    n_layers=int(meta("block_count")),
    n_heads=heads,
    n_kv_heads=int(meta("attention.head_count_kv", heads)),
    head_dim=head_dim,
    rope_theta=theta,
    rms_norm_eps=_from_f32(meta("attention.layer_norm_rms_epsilon")),
    context_length=int(meta("context_length")),
    tie_word_embeddings="output.weight" not in tensors,
    rope_freq_factors=factors,
    architecture=arch,
    attention_bias="blk.0.attn_q.bias" in tensors,
  )


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


def rope_scaling_factors(scaling: dict | None, theta: float, head_dim: int) -> tuple[float, ...] | None:
  """Per-frequency divisors of inv_freq for a config.json `rope_scaling`, computed as transformers and llama.cpp do."""
  kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
  if kind in ("default", "none"):
    return None
  n = head_dim // 2
  if kind == "linear":
    return (float(scaling["factor"]),) * n
  if kind != "llama3":
    raise BadInput(f"rope scaling {kind!r} is not supported; expected 'llama3', 'linear' or none")
  factor, low, high = scaling.get("factor", 8.0), scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
  old_context = scaling.get("original_max_position_embeddings", 8192)
  factors = []
  for freq in theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim):
    wavelen = 2 * math.pi / freq
    if wavelen < old_context / high:
      factors.append(1.0)
    elif wavelen > old_context / low:
      factors.append(float(factor))
    else:
      smooth = (old_context / wavelen - low) / (high - low)
      factors.append(1 / ((1 - smooth) / factor + smooth))
  return tuple(factors)


@functools.lru_cache(maxsize=4)
def safetensors_index(directory: str) -> dict[str, tuple[Path, dict, int]]:
  """Tensor name: (file, header entry, offset of the file's data section), over every *.safetensors file in the directory."""
  index = {}
  for file in sorted(Path(directory).glob("*.safetensors")):
    with open(file, "rb") as f:
      (size,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    index.update({name: (file, entry, 8 + size) for name, entry in header.items()})
  return index


def _checkpoint_tensors(directory: Path):
  """The checkpoint's tensor names: its index's (model.safetensors.index.json), which also names those of weight files a node
  did not download (it fetches its layers' files only), or else its safetensors files' own."""
  index = directory / "model.safetensors.index.json"
  return json.loads(index.read_text())["weight_map"] if index.is_file() else safetensors_index(str(directory))


def _hf_config(directory: Path) -> LlamaConfig:
  c = json.loads((directory / "config.json").read_text())
  arch = c.get("model_type")
  if arch not in ARCHITECTURES or (arch == "llama" and (c.get("attention_bias") or c.get("mlp_bias"))):
    raise BadInput(f"model {directory} is a {arch!r} model (or a Llama with biases); expected one of {', '.join(ARCHITECTURES)}")
  heads = c["num_attention_heads"]
  head_dim = c.get("head_dim") or c["hidden_size"] // heads
  theta = float(c.get("rope_theta", 10000.0))
  return LlamaConfig(
    vocab_size=c["vocab_size"],
    hidden_size=c["hidden_size"],
    intermediate_size=c["intermediate_size"],
    n_layers=c["num_hidden_layers"],
    n_heads=heads,
    n_kv_heads=c.get("num_key_value_heads") or heads,
    head_dim=head_dim,
    rope_theta=theta,
    rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
    context_length=c.get("max_position_embeddings", 2048),
    tie_word_embeddings=bool(c.get("tie_word_embeddings", False)) or LM_HEAD not in _checkpoint_tensors(directory),
    rope_freq_factors=rope_scaling_factors(c.get("rope_scaling"), theta, head_dim),
    architecture=arch,
    attention_bias=arch == "qwen2",
  )


def _mlx_quantization(directory: Path) -> dict:
  """config.json's `quantization` of an MLX export ({"group_size": 64, "bits": 4, per-module overrides...}); {} if none."""
  return json.loads((directory / "config.json").read_text()).get("quantization") or {}


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
      settings = quantization.get(module, quantization)
      if not isinstance(settings, dict) or "bits" not in settings:
        raise BadInput(f"model {directory} quantizes {module} but config.json's quantization does not give its bits and group size")
      scales, biases = (_held(raw(f"{module}.{part}"), index[f"{module}.{part}"][1]["dtype"] in ("F16", "BF16")) for part in ("scales", "biases"))
      return from_mlx(raw(name), scales, biases, int(settings["bits"]), int(settings["group_size"]))
    return _held(raw(name), index[name][1]["dtype"] in ("F16", "BF16"))

  return read
