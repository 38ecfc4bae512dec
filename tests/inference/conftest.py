"""Fixtures of the engine tests: a folder of model files each test module writes once, found through EXO_MODELS_DIR."""

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("models")


@pytest.fixture
def models(models_dir, monkeypatch) -> Path:
  monkeypatch.setenv("EXO_MODELS_DIR", str(models_dir))
  return models_dir
