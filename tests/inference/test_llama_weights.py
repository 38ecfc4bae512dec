"""The model loader (llama_weights) on hand-built GGUF blocks, on tiny random models written as llama.cpp, Hugging Face and MLX
write them (one convention whatever the file, weights held at the file's precision), and on the real SmolLM2 file (its config,
a shard reads only its layers)."""

import dataclasses

import gguf
import numpy as np
import pytest

from exo.base.errors import ExoError
from exo.base.shard import Shard
from exo.inference import gguf_model
from exo.inference.gguf_model import dequantize, unpermute_rope_rows
from exo.inference.llama_config import LlamaConfig, rope_inv_freq, rope_scaling_factors
from exo.inference.llama_layout import EMBED, LAYER_PARTS, LM_HEAD, NORM, layer_key, layer_parts
from exo.inference.llama_weights import load_config, load_shard_weights
from exo.inference.quantized import QuantizedMatrix, from_gguf_blocks, from_mlx
from tests.inference.numpy_llama import apply_rope, forward
from tests.inference.tiny_models import TINY, TINY_QWEN2, llama_cpp_permute, mlx_quantize, tiny_weights, write_gguf, write_hf_dir, write_safetensors

SMOLLM = "smollm2-135m"
Q = gguf.GGMLQuantizationType


# Dequantization against blocks built byte by byte (ggml's layouts: an fp16 scale d, for Q4_1 an fp16 minimum m, then 32 quants;
# a Q4 byte j holds quant j in its low nibble and quant j + 16 in its high nibble)


def _f16(x: float) -> bytes:
  return np.float16(x).tobytes()


def _nibbles(q: list[int]) -> bytes:
  return bytes(q[j] | q[j + 16] << 4 for j in range(16))


Q4 = [(5 * j + 3) % 16 for j in range(32)]
Q8 = [7 * j - 100 for j in range(32)]
BLOCKS = {  # type: (two blocks' bytes, their 64 values)
  Q.Q4_0: (_f16(0.5) + _nibbles(Q4) + _f16(-2.0) + _nibbles(Q4[::-1]), [(q - 8) * 0.5 for q in Q4] + [(q - 8) * -2.0 for q in Q4[::-1]]),
  Q.Q4_1: (
    _f16(0.25) + _f16(-1.5) + _nibbles(Q4) + _f16(3.0) + _f16(0.125) + _nibbles(Q4),
    [q * 0.25 - 1.5 for q in Q4] + [q * 3.0 + 0.125 for q in Q4],
  ),
  Q.Q8_0: (_f16(0.125) + np.int8(Q8).tobytes() + _f16(-4.0) + np.int8(Q8).tobytes(), [q * 0.125 for q in Q8] + [q * -4.0 for q in Q8]),
  Q.F16: (np.float16([j / 4 - 7 for j in range(64)]).tobytes(), [j / 4 - 7 for j in range(64)]),
  Q.F32: (np.float32([j / 3 for j in range(64)]).tobytes(), [np.float32(j / 3) for j in range(64)]),
}


@pytest.mark.parametrize("qtype", list(BLOCKS), ids=lambda t: t.name)
def test_dequantize_hand_built_blocks(qtype):
  raw, expected = BLOCKS[qtype]
  rows = np.frombuffer(raw, dtype=np.uint8).reshape(2, -1)  # one block per row, as GGUFReader hands quantized data
  values = dequantize(rows, qtype)
  assert values.dtype == np.float32 and values.shape == (2, 32)
  np.testing.assert_array_equal(values.ravel(), np.float32(expected))
  if qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0):  # kept quantized: the same values from the affine groups
    held = from_gguf_blocks(rows.reshape(1, -1), qtype)
    assert held.shape == (1, 64) and held.nbytes == 64 * (held.bits + 1) // 8
    np.testing.assert_array_equal(held.dequantize().ravel(), np.float32(expected))


# Conventions, on tiny random models written as llama.cpp, Hugging Face and MLX would write them (tests/inference/tiny_models.py)

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def ggml_rope(x: np.ndarray, positions: np.ndarray, config: LlamaConfig) -> np.ndarray:
  """GGML's normal (non-NeoX) rope on x (heads, T, head_dim): rotates adjacent pairs (2i, 2i+1) by position * inv_freq[i]."""
  angles = positions[:, None] * rope_inv_freq(config)[None, :]
  even, odd = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = even * np.cos(angles) - odd * np.sin(angles), even * np.sin(angles) + odd * np.cos(angles)
  return out


def test_ggml_rope_on_permuted_rows_equals_rotate_half_on_hugging_face_rows():
  """Why the loader unpermutes: llama.cpp's permutation turns rotate-half RoPE into GGML's adjacent-pair RoPE."""
  rng = np.random.default_rng(1)
  w, x, positions = rng.standard_normal((TINY.n_heads * TINY.head_dim, 32)), rng.standard_normal((5, 32)), np.arange(3, 8)
  hf = apply_rope((x @ w.T).reshape(5, TINY.n_heads, TINY.head_dim).transpose(1, 0, 2).astype(np.float32), positions, TINY)
  permuted = llama_cpp_permute(w, TINY.n_heads)
  ggml = ggml_rope((x @ permuted.T).reshape(5, TINY.n_heads, TINY.head_dim).transpose(1, 0, 2), positions, TINY)
  hf_rows, ggml_rows = hf.transpose(1, 0, 2).reshape(5, -1).T, ggml.transpose(1, 0, 2).reshape(5, -1).T  # (heads * head_dim, T)
  np.testing.assert_allclose(llama_cpp_permute(hf_rows, TINY.n_heads), ggml_rows, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(unpermute_rope_rows(permuted, TINY.n_heads), w)


def test_gguf_and_hugging_face_files_load_to_the_same_weights(tmp_path):
  weights = tiny_weights()
  hf_config = dataclasses.replace(TINY, rope_freq_factors=rope_scaling_factors(LLAMA3_SCALING, TINY.rope_theta, TINY.head_dim))
  write_gguf(tmp_path / "tiny.gguf", weights, TINY, rope_factors=np.array(hf_config.rope_freq_factors))
  write_hf_dir(tmp_path / "hf", weights, TINY, rope_scaling=LLAMA3_SCALING)
  whole = Shard("tiny", 0, 2, 3)
  from_gguf, gguf_weights = load_shard_weights(tmp_path / "tiny.gguf", whole)
  from_hf, hf_weights = load_shard_weights(tmp_path / "hf", whole)
  assert from_hf == hf_config
  assert dataclasses.replace(from_gguf, rope_freq_factors=None) == TINY
  np.testing.assert_allclose(from_gguf.rope_freq_factors, hf_config.rope_freq_factors, rtol=1e-6)  # stored as float32
  assert hf_config.rope_freq_factors[0] == 1.0 and hf_config.rope_freq_factors[-1] == 8.0  # fastest kept, slowest divided by factor
  assert gguf_weights.keys() == hf_weights.keys() == weights.keys()
  for name, w in weights.items():
    np.testing.assert_array_equal(gguf_weights[name], w, err_msg=name)
    np.testing.assert_array_equal(hf_weights[name], w, err_msg=name)
    assert gguf_weights[name].dtype == hf_weights[name].dtype == np.float32


def test_qwen2_gguf_and_hugging_face_files_load_to_the_same_weights(tmp_path):
  """Qwen2: Q, K and V biases, and Q and K rows NOT permuted by llama.cpp's converter (its rope is NeoX's rotate-half)."""
  weights = tiny_weights(TINY_QWEN2)
  write_gguf(tmp_path / "qwen.gguf", weights, TINY_QWEN2)
  write_hf_dir(tmp_path / "hf", weights, TINY_QWEN2)
  for path in (tmp_path / "qwen.gguf", tmp_path / "hf"):
    config, loaded = load_shard_weights(path, Shard("qwen", 0, 2, 3))
    assert config == TINY_QWEN2
    assert set(loaded) == set(weights) | {LM_HEAD} and loaded[LM_HEAD] is loaded[EMBED]
    for name, w in weights.items():
      np.testing.assert_array_equal(loaded[name], w, err_msg=f"{path.name}: {name}")
  assert set(layer_parts(TINY_QWEN2)) - set(LAYER_PARTS) == {f"self_attn.{p}_proj.bias" for p in "qkv"}


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda t: t.name)
def test_quantized_gguf_stays_quantized(tmp_path, qtype):
  """Held as affine groups of 32 that dequantize to exactly what llama.cpp's dequantization gives, Q and K rows unpermuted."""
  weights = tiny_weights(seed=3)
  write_gguf(tmp_path / "tiny.gguf", weights, TINY, qtype=qtype)
  _, loaded = load_shard_weights(tmp_path / "tiny.gguf", Shard("tiny", 0, 2, 3))
  reader = gguf.GGUFReader(tmp_path / "tiny.gguf")
  files = {t.name: t for t in reader.tensors}
  bits = 8 if qtype == Q.Q8_0 else 4
  for name in (EMBED, layer_key(1, "self_attn.q_proj.weight"), layer_key(2, "mlp.down_proj.weight")):
    held = loaded[name]
    assert isinstance(held, QuantizedMatrix) and (held.bits, held.group_size) == (bits, 32) and held.shape == weights[name].shape
    assert held.scales.dtype == np.float16 and held.nbytes == held.shape[0] * held.shape[1] * (bits + 1) // 8  # + 2 fp16 per 32
    source = "token_embd.weight" if name == EMBED else f"blk.{name.split('.')[2]}.{'attn_q' if 'q_proj' in name else 'ffn_down'}.weight"
    expected = gguf.quants.dequantize(files[source].data, qtype)
    if "q_proj" in name:
      expected = unpermute_rope_rows(expected, TINY.n_heads)
    np.testing.assert_array_equal(held.dequantize(), expected, err_msg=name)
  assert loaded[layer_key(0, "input_layernorm.weight")].dtype == np.float32


def test_f16_gguf_and_bf16_safetensors_stay_16_bit(tmp_path):
  weights = tiny_weights(seed=4)
  write_gguf(tmp_path / "tiny.gguf", weights, TINY, qtype=Q.F16)
  write_hf_dir(tmp_path / "hf", weights, TINY, dtype="BF16")
  name = layer_key(0, "mlp.up_proj.weight")
  for path, rounded in ((tmp_path / "tiny.gguf", weights[name].astype(np.float16)), (tmp_path / "hf", _bf16(weights[name]))):
    _, loaded = load_shard_weights(path, Shard("tiny", 0, 0, 3))
    assert loaded[name].dtype == np.float16 and loaded[layer_key(0, "input_layernorm.weight")].dtype == np.float32
    np.testing.assert_allclose(loaded[name].astype(np.float32), rounded, rtol=2**-10, atol=2**-24)


def test_bf16_beyond_float16_range_stays_float32(tmp_path):
  weights = tiny_weights(seed=5)
  name = layer_key(0, "mlp.gate_proj.weight")
  weights[name][3, 7] = 1e6
  write_hf_dir(tmp_path / "hf", weights, TINY, dtype="BF16")
  _, loaded = load_shard_weights(tmp_path / "hf", Shard("tiny", 0, 0, 3))
  assert loaded[name].dtype == np.float32 and loaded[name][3, 7] == _bf16(np.float32([1e6]))[0]


def _bf16(w: np.ndarray) -> np.ndarray:
  """BF16 is float32's top half."""
  return (w.astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)


@pytest.mark.parametrize("bits, group_size", [(4, 32), (4, 64), (8, 64)])
def test_mlx_quantized_export_loads_as_it_is(tmp_path, bits, group_size):
  """An MLX community export (uint32 weight, scales, biases) is held as it is and dequantizes as MLX itself dequantizes it."""
  weights = tiny_weights(seed=6)
  write_hf_dir(tmp_path / "mlx", weights, TINY, dtype="F16", mlx_bits=bits, group_size=group_size)
  _, loaded = load_shard_weights(tmp_path / "mlx", Shard("tiny", 0, 2, 3))
  name = layer_key(2, "mlp.down_proj.weight")
  held = loaded[name]
  assert isinstance(held, QuantizedMatrix) and (held.bits, held.group_size, held.shape) == (bits, group_size, weights[name].shape)
  packed, scales, biases = mlx_quantize(weights[name], bits, group_size)
  groups = np.repeat(scales.astype(np.float32), group_size, axis=1), np.repeat(biases.astype(np.float32), group_size, axis=1)
  step = groups[0]
  np.testing.assert_array_less(np.abs(held.dequantize() - weights[name]), step / 2 + 1e-6)  # rounding: within half a step
  mx = pytest.importorskip("mlx.core")
  by_mlx = mx.dequantize(mx.array(packed), mx.array(scales), mx.array(biases), group_size=group_size, bits=bits)
  np.testing.assert_allclose(held.dequantize(), np.array(by_mlx.astype(mx.float32)), rtol=1e-3, atol=1e-3)
  assert loaded[layer_key(0, "input_layernorm.weight")].dtype == np.float32 and loaded[NORM].dtype == np.float32


def test_mlx_packing_matches_mx_quantize():
  """The byte layout of QuantizedMatrix is mx.quantize's uint32 layout read as little-endian bytes."""
  mx = pytest.importorskip("mlx.core")
  w = np.random.default_rng(7).standard_normal((8, 128)).astype(np.float32)
  for bits in (4, 8):
    q, scales, biases = mx.quantize(mx.array(w), group_size=32, bits=bits)
    held = from_mlx(np.array(q), np.array(scales), np.array(biases), bits, 32)
    expected = mx.dequantize(q, scales, biases, group_size=32, bits=bits)
    np.testing.assert_allclose(held.dequantize(), np.array(expected), rtol=1e-3, atol=1e-3)


def test_hugging_face_tied_embeddings(tmp_path):
  weights = tiny_weights()
  del weights[LM_HEAD]
  write_hf_dir(tmp_path / "hf", weights, dataclasses.replace(TINY, tie_word_embeddings=True))
  config, loaded = load_shard_weights(tmp_path / "hf", Shard("tiny", 2, 2, 3))
  assert config.tie_word_embeddings and set(loaded) == {NORM, LM_HEAD} | {layer_key(2, p) for p in LAYER_PARTS}
  np.testing.assert_array_equal(loaded[LM_HEAD], weights[EMBED])


def test_safetensors_writer_matches_the_library(tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float32([1.5, -2]), "c": np.uint32([[1, 2**31]])}
  write_safetensors(tmp_path / "mine.safetensors", tensors, {"b": "F16"})
  loaded = safetensors_numpy.load_file(tmp_path / "mine.safetensors")
  assert loaded["b"].dtype == np.float16 and loaded["c"].dtype == np.uint32
  assert {k: v.tolist() for k, v in loaded.items()} == {k: v.tolist() for k, v in tensors.items()}


def test_tiny_model_runs_the_same_from_either_file(tmp_path):
  weights = tiny_weights(seed=2)
  write_gguf(tmp_path / "tiny.gguf", weights, TINY)
  write_hf_dir(tmp_path / "hf", weights, TINY)
  tokens = np.array([3, 1, 4, 1, 5, 9, 2, 6])
  logits = []
  for path in (tmp_path / "tiny.gguf", tmp_path / "hf"):
    config, weights = load_shard_weights(path, Shard("tiny", 0, 2, 3))
    logits.append(forward(weights, config, tokens, 0, 2))
  np.testing.assert_array_equal(logits[0], logits[1])
  assert logits[0].shape == (8, TINY.vocab_size) and np.isfinite(logits[0]).all()


# The real SmolLM2 file


def test_smollm_config(smollm_path):
  config = load_config(smollm_path)
  assert (config.n_layers, config.hidden_size, config.intermediate_size, config.n_heads, config.n_kv_heads, config.head_dim) == (
    30,
    576,
    1536,
    9,
    3,
    64,
  )
  assert config.vocab_size == 49152 and config.rope_theta == 100000.0 and config.tie_word_embeddings and config.rope_freq_factors is None


def test_shard_loads_only_its_layers_at_file_size(smollm_path, monkeypatch):
  read = []
  real = gguf_model._gguf_tensor
  monkeypatch.setattr(gguf_model, "_gguf_tensor", lambda t: read.append(t.name) or real(t))
  config, weights = load_shard_weights(smollm_path, Shard(SMOLLM, 3, 5, 30))
  assert set(weights) == {layer_key(i, part) for i in (3, 4, 5) for part in LAYER_PARTS}
  assert len(read) == 27  # nothing else was read
  assert weights[layer_key(4, "self_attn.q_proj.weight")].shape == (576, 576)
  assert weights[layer_key(4, "self_attn.k_proj.weight")].shape == (192, 576)
  assert weights[layer_key(4, "mlp.down_proj.weight")].shape == (576, 1536)
  matrices = [w for w in weights.values() if isinstance(w, QuantizedMatrix)]
  assert len(matrices) == 21 and all((w.bits, w.group_size) == (4, 32) for w in matrices)
  files = {t.name: t for t in gguf.GGUFReader(smollm_path).tensors if t.name.startswith(("blk.3.", "blk.4.", "blk.5."))}
  assert sum(w.nbytes for w in weights.values()) == sum(int(t.n_bytes) for t in files.values())  # Q4_1 is held at its file size


def test_first_and_last_shards(smollm_path):
  _, first = load_shard_weights(smollm_path, Shard(SMOLLM, 0, 0, 30))
  _, last = load_shard_weights(smollm_path, Shard(SMOLLM, 29, 29, 30))
  assert EMBED in first and NORM not in first and LM_HEAD not in first and first[EMBED].shape == (49152, 576)
  assert EMBED not in last and NORM in last
  np.testing.assert_array_equal(last[LM_HEAD].dequantize(), first[EMBED].dequantize())  # tied: the lm head is the embedding
  assert first[EMBED].bits == 8 and first[EMBED].nbytes == 49152 * 576 * 9 // 8  # the file's Q8_0, plus 2 bytes per 32


def test_shard_for_another_model_is_refused(smollm_path):
  with pytest.raises(ExoError, match="30 layers"):
    load_shard_weights(smollm_path, Shard(SMOLLM, 0, 15, 16))
