"""Model figures from a file's metadata equal what the loader really holds, and SmolLM2's equal a hand calculation."""

import gguf
import numpy as np
import pytest

from exo.base.errors import ExoError
from exo.base.shard import Shard
from exo.inference.llama_weights import load_shard_weights
from exo.inference.model_figures import held_tensor_bytes, model_spec_from_file, shard_held_bytes
from exo.inference.model_files import locate_model
from tests.inference.tiny_models import TINY, TINY_QWEN2, tiny_weights, write_gguf, write_hf_dir

Q = gguf.GGMLQuantizationType
FORMATS = {
  "gguf-q4_0": lambda d, w, c: write_gguf(d / "m.gguf", w, c, qtype=Q.Q4_0),
  "gguf-q4_1-q8_0-embed": lambda d, w, c: write_gguf(d / "m.gguf", w, c, qtype=Q.Q4_1, embed_qtype=Q.Q8_0),
  "gguf-f16": lambda d, w, c: write_gguf(d / "m.gguf", w, c, qtype=Q.F16),
  "gguf-f32": lambda d, w, c: write_gguf(d / "m.gguf", w, c),
  "hf-bf16": lambda d, w, c: write_hf_dir(d / "hf", w, c, dtype="BF16"),
  "hf-mlx-4bit": lambda d, w, c: write_hf_dir(d / "hf", w, c, dtype="F16", mlx_bits=4, group_size=64),
}


def loaded_bytes(path, shard: Shard) -> int:
  """Bytes of what the loader returns for the shard, each array counted once (a tied head is the embedding)."""
  _, weights = load_shard_weights(path, shard)
  return sum(w.nbytes for w in {id(w): w for w in weights.values()}.values())


@pytest.mark.parametrize("config", [TINY, TINY_QWEN2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_shard_bytes_from_metadata_equal_what_the_loader_holds(tmp_path, fmt, config):
  FORMATS[fmt](tmp_path, tiny_weights(config, seed=1), config)
  path = next(tmp_path.iterdir())
  for start, end in ((0, 2), (0, 0), (1, 1), (2, 2), (1, 2)):
    shard = Shard("m", start, end, 3)
    assert shard_held_bytes(path, shard) == loaded_bytes(path, shard), (start, end)
  assert set(held_tensor_bytes(path)) >= set(tiny_weights(config))


def test_half_the_layers_hold_half_the_layer_bytes():
  spec = model_spec_from_file(locate_model("smollm2-135m"))
  path = locate_model("smollm2-135m")
  middle = shard_held_bytes(path, Shard("smollm2-135m", 5, 19, 30))
  assert middle == 15 * spec.layer_bytes == spec.n_layers * spec.layer_bytes / 2


def test_smollm2_figures_by_hand():
  """SmolLM2-135M Q4_1: 30 layers of hidden 576, MLP 1536, 9 query and 3 KV heads of 64; layer matrices Q4_1 (20 bytes per 32
  weights), the tied 49152 x 576 embedding Q8_0 (held as 36 bytes per 32), norms float32."""
  spec = model_spec_from_file(locate_model("smollm2-135m"), "smollm2-135m")
  matrix_weights = 2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536
  assert spec.id == "smollm2-135m" and spec.n_layers == 30
  assert spec.layer_bytes == matrix_weights * 20 / 32 + 2 * 576 * 4
  assert spec.layer_flops == 2 * matrix_weights
  assert spec.embed_bytes == 49152 * 576 * 36 / 32
  assert spec.head_bytes == spec.embed_bytes + 576 * 4 and spec.tied_embeddings
  assert spec.activation_bytes == 576 * 4
  assert spec.kv_bytes_per_layer == 2 * 3 * 64 * 8192 * 4
  whole = spec.embed_bytes + 30 * spec.layer_bytes + 576 * 4  # tied: one node holding everything holds the matrix once
  assert whole == shard_held_bytes(locate_model("smollm2-135m"), Shard("smollm2-135m", 0, 29, 30))
  assert abs(whole - locate_model("smollm2-135m").stat().st_size) / whole < 0.01  # the file's own size, within its header


def test_untied_model_has_its_own_head(tmp_path):
  weights = tiny_weights(TINY, seed=2)
  write_gguf(tmp_path / "m.gguf", weights, TINY, qtype=Q.Q8_0)
  spec = model_spec_from_file(tmp_path / "m.gguf")
  assert spec.id == "m" and not spec.tied_embeddings
  assert spec.embed_bytes == spec.head_bytes - TINY.hidden_size * 4 == TINY.vocab_size * TINY.hidden_size * 36 / 32
  assert np.isclose(spec.layer_bytes * 3 + spec.embed_bytes + spec.head_bytes, shard_held_bytes(tmp_path / "m.gguf", Shard("m", 0, 2, 3)))


def test_a_file_that_is_not_gguf_is_one_clear_error(tmp_path):
  (tmp_path / "junk.gguf").write_bytes(b"not a model at all")
  with pytest.raises(ExoError, match="junk.gguf is not a readable GGUF file") as e:
    model_spec_from_file(tmp_path / "junk.gguf")
  assert "\n" not in str(e.value)
