import json

import pytest

from exo.base.errors import ExoError
from exo.base.model_spec import ModelSpec
from exo.base.models import MODELS, model_spec


def test_llama_8b_figures_follow_from_its_architecture():
  spec = model_spec("llama-3.1-8b-bf16")
  # hidden 4096, intermediate 14336, 32 heads of 128, 8 KV heads: q,o 4096^2 each; k,v 4096*1024 each; MLP 3*4096*14336; 2 norms
  params = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
  assert spec.n_layers == 32
  assert spec.layer_bytes == params * 2
  assert spec.layer_flops == 2 * params
  assert spec.activation_bytes == 4096 * 4  # the runtime sends float32 hidden states
  assert spec.kv_bytes_per_layer == 2 * 8 * 128 * 8192 * 4  # K and V, 8 heads of 128, 8192 tokens, float32
  assert spec.embed_bytes == 128256 * 4096 * 2
  assert spec.head_bytes == 4096 * 4 + 128256 * 4096 * 2  # float32 final norm + its own (untied) output matrix
  assert not spec.tied_embeddings


def test_smollm2_figures_match_the_gguf_the_wheel_ships():
  spec = model_spec("smollm2-135m")
  # Q8_0 token embedding: 34 bytes per block of 32 weights, 49152 x 576 / 32 blocks = 30,081,024 bytes (the file's token_embd.weight)
  assert spec.embed_bytes == 49152 * 576 // 32 * 34 == 30_081_024
  assert spec.head_bytes == 576 * 4 + 30_081_024  # float32 output_norm + the tied embedding matrix, held by the last stage too
  assert spec.tied_embeddings
  assert spec.activation_bytes == 576 * 4
  assert spec.kv_bytes_per_layer == 2 * 3 * 64 * 8192 * 4  # 3 KV heads of 576 / 9 = 64
  assert spec.layer_bytes == (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576) * 5 / 8  # Q4_1 layers


def test_llama_1b_figures():
  spec = model_spec("llama-3.2-1b")
  # 4-bit with an fp16 scale and bias per 64 weights: 4.5 bits; the embedding is quantised like the layers
  assert spec.embed_bytes == 128256 * 2048 * 4.5 / 8 == 147_750_912
  assert spec.head_bytes == 2048 * 4 + 147_750_912
  assert spec.tied_embeddings
  assert spec.activation_bytes == 2048 * 4


def test_upstream_ids_name_the_4bit_builds():
  assert model_spec("llama-3.1-70b").layer_bytes == pytest.approx(model_spec("llama-3.1-70b-bf16").layer_bytes * 4.5 / 16)
  assert model_spec("llama-3.1-405b").n_layers == 126
  for required in ["smollm2-135m", "llama-3.2-1b", "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-70b-bf16", "llama-3.1-405b"]:
    assert required in MODELS


def test_unknown_model_lists_the_known_ones():
  with pytest.raises(ExoError, match="unknown model 'gpt-5'.*llama-3.1-70b"):
    model_spec("gpt-5")


def test_model_spec_json_without_the_v2_figures_loads_with_defaults(tmp_path):
  path = tmp_path / "m.json"
  path.write_text('{"id": "x", "n_layers": 32, "layer_bytes": 135000000, "layer_flops": 436000000, "activation_bytes": 8192}')
  spec = ModelSpec.load(path)
  assert spec == ModelSpec("x", 32, 135e6, 436e6, 8192, 0)
  assert (spec.embed_bytes, spec.head_bytes, spec.tied_embeddings) == (0, 0, False)


def test_design_example_loads(tmp_path):
  path = tmp_path / "m.json"
  path.write_text("""{"id": "llama-3.1-8b-q4", "n_layers": 32, "layer_bytes": 135000000,
    "layer_flops": 436000000, "activation_bytes": 8192, "kv_bytes_per_layer": 0,
    "embed_bytes": 295000000, "head_bytes": 295000000, "tied_embeddings": false}""")
  assert ModelSpec.load(path) == ModelSpec("llama-3.1-8b-q4", 32, 135e6, 436e6, 8192, 0, 295e6, 295e6, False)


@pytest.mark.parametrize("model_id", ["smollm2-135m", "llama-3.1-70b"])
def test_json_round_trip(model_id):
  spec = model_spec(model_id)
  data = json.loads(json.dumps(spec.to_dict()))
  assert {"embed_bytes", "head_bytes", "tied_embeddings"} <= set(data)
  assert ModelSpec.from_dict(data) == spec


GOOD = {"id": "x", "n_layers": 2, "layer_bytes": 1, "layer_flops": 1, "activation_bytes": 1}


@pytest.mark.parametrize(
  "data, message",
  [
    ({"id": "x", "n_layers": 0, "layer_bytes": 1, "layer_flops": 1, "activation_bytes": 1}, "n_layers must be a whole number from 1 to 10000"),
    (
      {"id": "x", "n_layers": 2.5, "layer_bytes": 1, "layer_flops": 1, "activation_bytes": 1},
      "n_layers must be a whole number from 1 to 10000, got 2.5",
    ),
    ({"id": "x", "n_layers": 2, "layer_flops": 1, "activation_bytes": 1}, "missing 'layer_bytes'"),
    ({"id": "x", "n_layers": 2, "layer_bytes": 1, "layer_flops": 1, "activation_bytes": 1, "vocab": 5}, "unknown key 'vocab'"),
    ({"id": "x", "n_layers": 2, "layer_bytes": -1, "layer_flops": 1, "activation_bytes": 1}, "layer_bytes must be a number from 0 to 1e\\+15"),
    ({"id": "x", "n_layers": 2, "layer_bytes": 0, "layer_flops": 1, "activation_bytes": 1}, "layer_bytes must be > 0"),
    ({**GOOD, "embed_bytes": -1}, "embed_bytes must be a number from 0 to 1e\\+15, got -1"),
    ({**GOOD, "head_bytes": "big"}, "head_bytes must be a number, got 'big'"),
    ({**GOOD, "head_bytes": True}, "head_bytes must be a number, got True"),
    ({**GOOD, "tied_embeddings": "true"}, "tied_embeddings must be true or false, got 'true'"),
    ({**GOOD, "tied_embeddings": 1}, "tied_embeddings must be true or false, got 1"),
    ({**GOOD, "tied_embeddings": None}, "tied_embeddings must be true or false, got None"),
    ({**GOOD, "tied": True}, "unknown key 'tied'.*embed_bytes, file_bytes, head_bytes.*tied_embeddings"),
  ],
)
def test_bad_model_spec(data, message):
  with pytest.raises(ExoError, match=message) as error:
    ModelSpec.from_dict(data)
  assert "\n" not in str(error.value)
