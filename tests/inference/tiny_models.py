"""Small random-weight models of each family (Llama, Qwen2), written as llama.cpp's converter, a Hugging Face checkpoint or an
MLX quantized export would write them, so the loaders and engines are tested on every format without downloading anything."""

import dataclasses
import json
import struct
from pathlib import Path

import gguf
import numpy as np

from exo.inference.llama_config import LlamaConfig
from exo.inference.llama_layout import EMBED, gguf_name, tensor_shapes
from exo.inference.quantized import pack_quants

Q = gguf.GGMLQuantizationType
TINY = LlamaConfig(
  vocab_size=40, hidden_size=64, intermediate_size=128, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, rope_theta=500000.0,
  rms_norm_eps=1e-5, context_length=1024, tie_word_embeddings=False,
)  # fmt: skip
TINY_QWEN2 = dataclasses.replace(TINY, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, architecture="qwen2", attention_bias=True)


def tiny_weights(config: LlamaConfig = TINY, seed: int = 0) -> dict[str, np.ndarray]:
  """float32 weights, Hugging Face names and layout; no lm head when the embedding is tied."""
  rng = np.random.default_rng(seed)

  def draw(name: str, shape: tuple) -> np.ndarray:
    if name.endswith(".bias"):
      return 0.3 * rng.standard_normal(shape)
    return 1 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else rng.standard_normal(shape) / np.sqrt(shape[-1])

  return {name: draw(name, shape).astype(np.float32) for name, shape in tensor_shapes(config).items()}


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """convert_hf_to_gguf.py's LlamaModel.permute: per head, rows (2, head_dim/2) -> (head_dim/2, 2)."""
  return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGML_QUANTIZED = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)  # gguf-py reads these but cannot write them: ggml quantizes them


def ggml_quantize(w: np.ndarray, kind: Q) -> np.ndarray:
  """The (rows, bytes per row) blocks of `kind` that ggml's own quantizer makes of float32 rows."""
  import ggml  # noqa: PLC0415 (only the files of these types need it)

  w = np.ascontiguousarray(w, dtype=np.float32)
  rows, n = w.shape
  out = np.empty((rows, ggml.ggml_row_size(int(kind), n)), dtype=np.uint8)
  ggml.ggml_quantize_chunk(int(kind), w.ctypes.data_as(ggml.ctypes.POINTER(ggml.ctypes.c_float)), out.ctypes.data, 0, rows, n, None)
  return out


def write_gguf(
  path: Path,
  weights: dict[str, np.ndarray],
  config: LlamaConfig,
  qtype: Q = Q.F32,
  embed_qtype: Q | None = None,
  rope_factors=None,
  fields: dict[str, int] | None = None,
):
  """As convert_hf_to_gguf.py writes the model: llama.cpp names, a Llama's Q and K rows permuted (a Qwen2's not), matrices in
  `qtype` (the embedding in `embed_qtype`, default `qtype`), vectors float32; `fields`: uint32 metadata written over the
  config's (for malformed files)."""
  arch = config.architecture
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(config.n_layers)
  writer.add_context_length(config.context_length)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.n_heads)
  writer.add_head_count_kv(config.n_kv_heads)
  writer.add_rope_freq_base(config.rope_theta)
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  writer.add_vocab_size(config.vocab_size)
  for key, value in (fields or {}).items():
    writer.add_uint32(key, value)
  for name, w in weights.items():
    target = gguf_name(name)
    if arch == "llama" and name.endswith((".self_attn.q_proj.weight", ".self_attn.k_proj.weight")):
      w = llama_cpp_permute(w, config.n_heads if "q_proj" in name else config.n_kv_heads)
    kind = (embed_qtype or qtype) if name == EMBED else qtype
    if w.ndim == 1 or kind == Q.F32:
      writer.add_tensor(target, w.astype(np.float32))
    elif kind == Q.F16:
      writer.add_tensor(target, w.astype(np.float16))
    elif kind in GGML_QUANTIZED:
      writer.add_tensor(target, ggml_quantize(w, kind), raw_dtype=kind)
    else:
      writer.add_tensor(target, gguf.quants.quantize(w, kind), raw_dtype=kind)
  if rope_factors is not None:
    writer.add_tensor("rope_freqs.weight", np.asarray(rope_factors, dtype=np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def _bf16_bytes(w: np.ndarray) -> bytes:
  return (w.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()


_ENCODERS = {
  "F32": lambda w: w.astype(np.float32).tobytes(),
  "F16": lambda w: w.astype(np.float16).tobytes(),
  "BF16": _bf16_bytes,
  "U32": lambda w: w.astype("<u4").tobytes(),
}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtypes: dict[str, str] | None = None):
  """The safetensors format by hand: u64 header size, JSON header of dtypes, shapes and byte ranges, then the raw data.
  `dtypes`: name -> F32 (default), F16, BF16 or U32."""
  header, blobs, offset = {}, [], 0
  for name, w in tensors.items():
    dtype = (dtypes or {}).get(name, "U32" if w.dtype == np.uint32 else "F32")
    data = _ENCODERS[dtype](w)
    header[name] = {"dtype": dtype, "shape": list(w.shape), "data_offsets": [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
  encoded = json.dumps(header).encode()
  encoded += b" " * (-len(encoded) % 8)
  path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def mlx_quantize(w: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Affine quantization as mx.quantize does it, in numpy: per group, scale = (max - min) / (2**bits - 1), bias = min.
  Returns (uint32 packed weight, float16 scales, float16 biases)."""
  rows, cols = w.shape
  groups = w.reshape(rows, cols // group_size, group_size)
  low, high = groups.min(-1), groups.max(-1)
  scales = np.maximum(high - low, 1e-8) / (2**bits - 1)
  scales, biases = scales.astype(np.float16), low.astype(np.float16)
  q = np.clip(np.round((groups - biases[..., None]) / scales[..., None].astype(np.float32)), 0, 2**bits - 1).astype(np.uint8)
  return pack_quants(q.reshape(rows, cols), bits).view("<u4"), scales, biases


def write_hf_dir(
  directory: Path,
  weights: dict[str, np.ndarray],
  config: LlamaConfig,
  rope_scaling: dict | None = None,
  dtype: str = "F32",
  mlx_bits: int | None = None,
  group_size: int = 32,
):
  """A Hugging Face checkpoint in two safetensors files (as large checkpoints are split): every tensor in `dtype`, or, with
  `mlx_bits`, matrices quantized as an MLX community export (weight, scales, biases; config.json's quantization)."""
  directory.mkdir()
  hf_config = {
    "model_type": config.architecture, "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
    "intermediate_size": config.intermediate_size, "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
    "num_key_value_heads": config.n_kv_heads, "rope_theta": config.rope_theta, "rms_norm_eps": config.rms_norm_eps,
    "max_position_embeddings": config.context_length, "tie_word_embeddings": config.tie_word_embeddings, "rope_scaling": rope_scaling,
  }  # fmt: skip
  tensors: dict[str, np.ndarray] = {}
  dtypes: dict[str, str] = {}
  for name, w in weights.items():
    if mlx_bits and w.ndim == 2:
      module = name.removesuffix(".weight")
      tensors[name], tensors[f"{module}.scales"], tensors[f"{module}.biases"] = mlx_quantize(w, mlx_bits, group_size)
      dtypes.update({f"{module}.scales": "F16", f"{module}.biases": "F16"})
    else:
      tensors[name], dtypes[name] = w, dtype
  if mlx_bits:
    hf_config["quantization"] = {"group_size": group_size, "bits": mlx_bits}
  (directory / "config.json").write_text(json.dumps(hf_config))
  names = list(tensors)
  write_safetensors(directory / "model-00001-of-00002.safetensors", {n: tensors[n] for n in names[::2]}, dtypes)
  write_safetensors(directory / "model-00002-of-00002.safetensors", {n: tensors[n] for n in names[1::2]}, dtypes)


FAMILIES = {"llama": TINY, "qwen2": TINY_QWEN2}
FILE_FORMATS = {  # name: how the model directory is written
  "gguf-q4_0": lambda d, w, c: write_gguf(d / "model.gguf", w, c, qtype=Q.Q4_0),
  "gguf-q4_1": lambda d, w, c: write_gguf(d / "model.gguf", w, c, qtype=Q.Q4_1),
  "gguf-q8_0": lambda d, w, c: write_gguf(d / "model.gguf", w, c, qtype=Q.Q8_0),
  "gguf-f16": lambda d, w, c: write_gguf(d / "model.gguf", w, c, qtype=Q.F16),
  "hf-f32": lambda d, w, c: write_hf_dir(d, w, c, dtype="F32"),
  "hf-bf16": lambda d, w, c: write_hf_dir(d, w, c, dtype="BF16"),
  "mlx-4bit": lambda d, w, c: write_hf_dir(d, w, c, mlx_bits=4, group_size=32),
  "mlx-8bit-g64": lambda d, w, c: write_hf_dir(d, w, c, mlx_bits=8, group_size=64),
}


def tiny_model(root: Path, family: str, fmt: str, config=None) -> str:
  """Write (once) the tiny `family` model in format `fmt` (a FILE_FORMATS name) under root; returns its model id."""
  config = config or FAMILIES[family]
  model_id = f"tiny-{family}-{fmt}-{config.n_layers}-layers-{config.context_length}-positions"
  directory = root / model_id
  if not directory.exists():
    if fmt.startswith("gguf"):
      directory.mkdir()
    FILE_FORMATS[fmt](directory, tiny_weights(config, seed=1), config)
    (directory / "tokenizer.json").write_text("{}")  # only the weights are used
  return model_id
