"""Fixtures of the inference tests: a folder of model files each test module writes once, found through EXO_MODELS_DIR, and the
path of the real SmolLM2 model."""

from pathlib import Path

import pytest

from exo.inference.model_files import locate_model


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("models")


@pytest.fixture
def models(models_dir, monkeypatch) -> Path:
  monkeypatch.setenv("EXO_MODELS_DIR", str(models_dir))
  return models_dir


@pytest.fixture(scope="module")
def smollm_path() -> Path:
  """The real SmolLM2-135M GGUF as locate_model finds it with no models folder and no home directory to search."""
  with pytest.MonkeyPatch.context() as mp:
    mp.delenv("EXO_MODELS_DIR", raising=False)
    mp.setenv("HOME", "/nonexistent")
    return locate_model("smollm2-135m")


@pytest.fixture
def mlx_engines():
  """mlx_engines(n, **options): n fresh MLX engines, closed after the test."""
  from exo.inference.mlx_inference_engine import MLXInferenceEngine  # noqa: PLC0415 (only the MLX tests load MLX)

  made: list[MLXInferenceEngine] = []

  def make(n: int, **options) -> list[MLXInferenceEngine]:
    made.extend(MLXInferenceEngine(**options) for _ in range(n))
    return made[-n:]

  yield make
  for engine in made:
    engine.close()
