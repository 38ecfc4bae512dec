"""Fetching models from the Hugging Face Hub with huggingface_hub, into the cache that exo.inference.model_files searches
(`hub_cache_dir`): for `exo download MODEL`, and for a node that must run layers of a model it does not have.

What is fetched: a GGUF model's one file; a safetensors checkpoint's config and tokenizer files, and the weight files that hold
the layers asked for (model.safetensors.index.json's weight_map names them) or all of them. huggingface_hub writes each file to
a `.incomplete` blob and links it into the snapshot only once whole, so nothing half-written looks complete; a transfer that
broke off resumes where it stopped with an HTTP Range request, in the same call (huggingface_hub retries a dropped connection)
or the next one.

Read when a download starts: HF_ENDPOINT (a mirror; default https://huggingface.co), HF_HUB_OFFLINE (nothing is requested: a
model not on this machine is an error), the cache directory (--models-dir, HF_HOME: model_files.hub_cache_dir), and HF_TOKEN
for gated repositories (huggingface_hub reads it).

Errors: a repository or file the hub does not have is ModelNotFound; no network, a transfer that keeps breaking off or a full
disk is ClusterCannotServe (this node cannot get the model now); a repository holding no model exo reads is BadInput.
"""

import contextlib
import errno
import logging
import os
import shutil
from pathlib import Path

from exo.errors import BadInput, ClusterCannotServe, ModelNotFound
from exo.inference.llama_weights import safetensors_index
from exo.inference.model_files import downloaded, hub_cache_dir, locate_model, missing_files, snapshot_dir, weight_files, weight_map
from exo.inference.model_sources import ENGINE_FORMATS, Source, model_sources, ordered
from exo.inference.shard import Shard

__all__ = ["DEFAULT_ENDPOINT", "download", "ensure_model", "hub_endpoint", "offline"]

log = logging.getLogger(__name__)
DEFAULT_ENDPOINT = "https://huggingface.co"
METADATA_FILES = (
  "config.json",
  "generation_config.json",
  "model.safetensors.index.json",
  "special_tokens_map.json",
  "tokenizer.json",
  "tokenizer_config.json",
)


def hub_endpoint() -> str:
  """The hub downloads come from: $HF_ENDPOINT (a mirror), read at each download rather than when huggingface_hub is imported."""
  return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
  """HF_HUB_OFFLINE, as huggingface_hub reads it: nothing is downloaded."""
  return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "true", "yes")


def ensure_model(
  model_id: str, shard: Shard | None = None, weights: bool = True, formats: tuple[str, ...] = ENGINE_FORMATS["tinygrad"], progress: bool | None = None
) -> Path:
  """The model's GGUF file or directory on this machine, holding what `shard` needs (None: the whole model; weights=False: its
  config and tokenizer only), once what is missing has been downloaded (from the first of the model's sources in `formats`
  order; `progress` as for `download`). A model that has no source (a path, an unknown id) or that lives in a directory of the
  user's own is used as it is."""
  try:
    path, not_found = locate_model(model_id), None
  except ModelNotFound as e:
    path, not_found = None, e
  if path is not None and not missing_files(path, shard, weights):
    return path
  sources = model_sources(model_id)
  if path is not None:
    source = next((s for s in sources if downloaded(s) == path), None)
    if source is None:
      return path  # the user's own directory: the loader names what it lacks
  elif not sources:
    raise not_found
  else:
    source = ordered(sources, formats)[0]
  if offline():
    raise ModelNotFound(
      f"model {model_id!r} is not on this machine and HF_HUB_OFFLINE is set, so it is not downloaded from {source}; "
      f"unset HF_HUB_OFFLINE, or fetch it first with `exo download {model_id}`"
    )
  return download(source, shard, weights, progress)


def download(source: Source, shard: Shard | None = None, weights: bool = True, progress: bool | None = True) -> Path:
  """Fetch `source` (what `shard` needs of it, or all of it) into the hub cache; returns the GGUF file or snapshot directory.
  progress: True shows huggingface_hub's bar per file on stderr, None only when stderr is a terminal, False never."""
  if offline():
    raise ModelNotFound(f"HF_HUB_OFFLINE is set: {source} is not downloaded")
  from huggingface_hub import HfApi, hf_hub_download  # imported here: only a download needs it

  endpoint, cache = hub_endpoint(), hub_cache_dir()
  bar = _bar_class(progress)

  def fetch(filename: str) -> Path:
    return Path(hf_hub_download(source.repo, filename, cache_dir=cache, endpoint=endpoint, tqdm_class=bar))

  with _hub_errors(source, endpoint, cache):
    info = HfApi(endpoint=endpoint).model_info(source.repo, files_metadata=True)
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    snapshot = snapshot_dir(source.repo)
    current = snapshot if snapshot is not None and snapshot.name == info.sha else None  # a repo updated since: fetch it afresh

    def have(filename: str) -> bool:
      return current is not None and (current / filename).is_file()

    gguf = _gguf_file(source, sizes)
    if gguf is not None:
      files, path = [gguf], None
    else:
      metadata = [f for f in METADATA_FILES if f in sizes and not have(f)]
      _check_space(source, metadata, sizes, cache)
      for filename in metadata:
        fetch(filename)
      path = snapshot_dir(source.repo)  # config.json is there: _gguf_file checked the repository has one
      files = []
      if weights:
        index = weight_map(path)
        files = sorted(f for f in sizes if f.endswith(".safetensors") and "/" not in f) if index is None else sorted(weight_files(index, path, shard))
    todo = [f for f in files if not have(f)]
    _check_space(source, todo, sizes, cache)
    if todo:
      total = sum(sizes.get(f, 0) for f in todo)
      log.warning("downloading %s from %s: %d file(s), %s, into %s", source, endpoint, len(todo), _size(total), cache)
    fetched = [fetch(f) for f in todo]
  safetensors_index.cache_clear()  # the directory may hold more weight files than when it was last indexed
  if gguf is not None:
    return fetched[0] if fetched else snapshot_dir(source.repo) / gguf
  return path


def _gguf_file(source: Source, sizes: dict[str, int]) -> str | None:
  """The one .gguf file to fetch of `source`, or None for its safetensors checkpoint; BadInput for a repository with neither."""
  if source.filename:
    if source.filename not in sizes:
      ggufs = sorted(f for f in sizes if f.endswith(".gguf"))
      raise ModelNotFound(f"repository {source.repo!r} has no file {source.filename!r}; its .gguf files: {', '.join(ggufs) or 'none'}")
    return source.filename
  if "config.json" in sizes and any(f.endswith(".safetensors") for f in sizes):
    return None
  ggufs = sorted(f for f in sizes if f.endswith(".gguf") and "/" not in f)
  if len(ggufs) == 1 and source.format is None:
    return ggufs[0]
  if len(ggufs) > 1 and source.format is None:
    raise BadInput(f"repository {source.repo!r} holds {len(ggufs)} .gguf files ({', '.join(ggufs)}); name one as {source.repo}/FILE.gguf")
  raise BadInput(f"repository {source.repo!r} holds no model exo reads: expected one .gguf file, or config.json and *.safetensors")


def _check_space(source: Source, files: list[str], sizes: dict[str, int], cache: Path) -> None:
  need = sum(sizes.get(f, 0) for f in files)
  if need and need > (free := _free_bytes(cache)):
    raise ClusterCannotServe(f"not enough disk space for {source}: it needs {_size(need)} and {cache} has {_size(free)} free")


def _free_bytes(path: Path) -> int:
  while not path.exists() and path != path.parent:
    path = path.parent
  return shutil.disk_usage(path).free


def _size(n: int) -> str:
  return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _bar_class(progress: bool | None):
  """huggingface_hub's progress bar, shown also when stderr is not a terminal (progress=True; HF_HUB_DISABLE_PROGRESS_BARS
  still hides it) or never (False); None: its own default, shown on a terminal only."""
  if progress is None:
    return None
  from huggingface_hub.utils import tqdm

  class Bar(tqdm):
    def __init__(self, *args, **kwargs):
      kwargs["disable"] = not progress
      super().__init__(*args, **kwargs)

  return Bar


@contextlib.contextmanager
def _hub_errors(source: Source, endpoint: str, cache: Path):
  """huggingface_hub's and the network's errors as exo's: one sentence naming the repository and what to do."""
  import httpx2
  from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

  try:
    yield
  except RepositoryNotFoundError:
    raise ModelNotFound(f"there is no model repository {source.repo!r} at {endpoint} (or it is private or gated: set HF_TOKEN)") from None
  except (RemoteEntryNotFoundError, RevisionNotFoundError):
    raise ModelNotFound(f"repository {source.repo!r} at {endpoint} has no file of {source}") from None
  except LocalEntryNotFoundError as e:  # the metadata request failed for want of a network
    raise ClusterCannotServe(
      f"could not reach {endpoint} to download {source}: {_reason(e)}; check the network, or set HF_ENDPOINT to a mirror"
    ) from None
  except HfHubHTTPError as e:
    status = e.response.status_code if e.response is not None else "an error"
    raise ClusterCannotServe(f"{endpoint} answered {status} to the download of {source}; try again later, or set HF_ENDPOINT to a mirror") from None
  except (httpx2.ConnectError, httpx2.TimeoutException) as e:
    raise ClusterCannotServe(f"could not reach {endpoint} to download {source}: {e}; check the network, or set HF_ENDPOINT to a mirror") from None
  except httpx2.TransportError as e:
    raise ClusterCannotServe(f"the download of {source} from {endpoint} broke off ({e}); run it again to resume where it stopped") from None
  except OSError as e:
    if e.errno == errno.ENOSPC:
      raise ClusterCannotServe(f"the disk holding {cache} filled up while downloading {source}; free space and run it again to resume") from None
    if "Consistency check failed" in str(e):
      raise ClusterCannotServe(f"the download of {source} from {endpoint} broke off; run it again to resume where it stopped") from None
    raise


def _reason(e: BaseException) -> str:
  cause = e.__cause__ or e.__context__
  return f"{type(cause).__name__}: {cause}" if cause is not None else str(e).split("\n")[0]
