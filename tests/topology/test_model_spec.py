import pytest

from exo.errors import PlanError
from exo.models import MODELS, model_spec
from exo.topology.model_spec import ModelSpec


def test_llama_8b_figures_follow_from_its_architecture():
  spec = model_spec("llama-3.1-8b-bf16")
  # hidden 4096, intermediate 14336, 32 heads of 128, 8 KV heads: q,o 4096^2 each; k,v 4096*1024 each; MLP 3*4096*14336; 2 norms
  params = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
  assert spec.n_layers == 32
  assert spec.layer_bytes == params * 2
  assert spec.layer_flops == 2 * params
  assert spec.activation_bytes == 4096 * 2
  assert spec.kv_bytes_per_layer == 2 * 8 * 128 * 8192 * 2  # K and V, 8 heads of 128, 8192 tokens, fp16


def test_upstream_ids_name_the_4bit_builds():
  assert model_spec("llama-3.1-70b").layer_bytes == pytest.approx(model_spec("llama-3.1-70b-bf16").layer_bytes * 4.5 / 16)
  assert model_spec("llama-3.1-405b").n_layers == 126
  for required in ["smollm2-135m", "llama-3.2-1b", "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-70b-bf16", "llama-3.1-405b"]:
    assert required in MODELS


def test_unknown_model_lists_the_known_ones():
  with pytest.raises(PlanError, match="unknown model 'gpt-5'.*llama-3.1-70b"):
    model_spec("gpt-5")


def test_model_spec_json(tmp_path):
  path = tmp_path / "m.json"
  path.write_text('{"id": "x", "n_layers": 32, "layer_bytes": 135000000, "layer_flops": 436000000, "activation_bytes": 8192}')
  assert ModelSpec.load(path) == ModelSpec("x", 32, 135e6, 436e6, 8192, 0)


@pytest.mark.parametrize(
  "data, message",
  [
    ({"id": "x", "n_layers": 0, "layer_bytes": 1, "layer_flops": 1, "activation_bytes": 1}, "n_layers must be an integer >= 1"),
    ({"id": "x", "n_layers": 2.5, "layer_bytes": 1, "layer_flops": 1, "activation_bytes": 1}, "n_layers must be an integer"),
    ({"id": "x", "n_layers": 2, "layer_flops": 1, "activation_bytes": 1}, "missing 'layer_bytes'"),
    ({"id": "x", "n_layers": 2, "layer_bytes": 1, "layer_flops": 1, "activation_bytes": 1, "vocab": 5}, "unknown key 'vocab'"),
    ({"id": "x", "n_layers": 2, "layer_bytes": -1, "layer_flops": 1, "activation_bytes": 1}, "layer_bytes must be a finite number >= 0"),
    ({"id": "x", "n_layers": 2, "layer_bytes": 0, "layer_flops": 1, "activation_bytes": 1}, "layer_bytes must be > 0"),
  ],
)
def test_bad_model_spec(data, message):
  with pytest.raises(PlanError, match=message):
    ModelSpec.from_dict(data)
