"""Fetching models from the Hugging Face Hub with huggingface_hub, into the cache that exo.inference.model_files searches
(`hub_cache_dir`): for `exo download MODEL`, and for a node that must run layers of a model it does not have.

What is fetched: a GGUF model's one file; a safetensors checkpoint's config and tokenizer files, and the weight files that hold
the layers asked for (model.safetensors.index.json's weight_map names them) or all of them. Each file listed with its hash
(exo.inference.hub_files) is asked of the node's cluster first (a `FileMirror`: exo.networking.peer_files), and fetched from the
hub only if no peer has it or is fetching it; its bytes go to a `.incomplete` blob that becomes the file only once whole and of
the hub's hash, so nothing half-written or corrupted looks complete. A transfer that broke off resumes where it stopped with an
HTTP Range request (huggingface_hub's http_get retries a dropped connection), or from a peer. A file the hub lists without a hash
comes through huggingface_hub's own download, from the hub.

What a node may fetch when a request, a peer or --run-model names a model it lacks (`exo download` fetches any repository):
EXO_ALLOW_DOWNLOADS (--allow-downloads): "builtin" (the default) the built-in models' repositories only (model_sources.BUILT_IN:
the repository, and for a GGUF build its one file), "any" any repository, "none" nothing. Anything else is refused before a
request reaches the hub.

The disk budget, checked before any file is fetched, against the sizes the hub lists for the files this download needs (a file
whose size it does not list is refused): with EXO_MODELS_MAX_GB (--models-max-gb) G, what the models folder holds (every file
under it) plus those sizes must be at most G * 10^9 bytes; without it, the disk holding the models folder must keep at least
10% of its size free after the download. In both cases the download must fit the disk's free space. Downloads run one at a
time within a node, each checked against what the one before left. A fetched file whose size is not the listed one fails the
download, so a download grows the models folder by the listed sizes at most.

A download that fails or is refused keeps nothing: the files, links, partial blobs and folders it created in the models folder
are removed, so the next attempt starts afresh.

Read when a download starts: HF_ENDPOINT (a mirror; default https://huggingface.co), HF_HUB_OFFLINE (nothing is requested: a
model not on this machine is an error), the cache directory (--models-dir, HF_HOME: model_files.hub_cache_dir), the two
settings above, and HF_TOKEN for gated repositories (huggingface_hub reads it).

Errors: a repository or file the hub does not have is ModelNotFound; no network or a transfer that keeps breaking off is
ClusterCannotServe (this node cannot get the model now); a download not allowed or beyond the disk budget, and a repository
holding no model exo reads, are BadInput.
"""

import contextlib
import errno
import logging
import math
import os
import shutil
import threading
from pathlib import Path

from exo.base.errors import BadInput, ClusterCannotServe, ModelNotFound
from exo.base.shard import Shard
from exo.inference.file_fetch import fetch_file
from exo.inference.hub_files import FileMirror
from exo.inference.model_files import downloaded, hub_cache_dir, locate_model, missing_files, snapshot_dir, weight_files, weight_map
from exo.inference.model_sources import BUILT_IN, ENGINE_FORMATS, Source, model_sources, ordered
from exo.inference.safetensors_model import safetensors_index

__all__ = [
  "ALLOW_CHOICES", "ALLOW_ENV", "DEFAULT_ENDPOINT", "MAX_GB_ENV", "allowed_downloads", "download", "ensure_model", "hub_endpoint", "may_download", "offline",
]  # fmt: skip

log = logging.getLogger(__name__)
DEFAULT_ENDPOINT = "https://huggingface.co"
ALLOW_ENV, MAX_GB_ENV = "EXO_ALLOW_DOWNLOADS", "EXO_MODELS_MAX_GB"
ALLOW_CHOICES = ("none", "builtin", "any")
FREE_FRACTION = 0.1  # of the disk that a download must leave free when no --models-max-gb is given
_ONE_AT_A_TIME = threading.Lock()
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


def allowed_downloads() -> str:
  """What this node may fetch: EXO_ALLOW_DOWNLOADS (--allow-downloads), "builtin" unless set."""
  value = os.environ.get(ALLOW_ENV) or "builtin"
  if value not in ALLOW_CHOICES:
    raise BadInput(f"{ALLOW_ENV} must be one of {', '.join(ALLOW_CHOICES)}, got {value[:40]!r}")
  return value


def models_max_bytes() -> int | None:
  """EXO_MODELS_MAX_GB (--models-max-gb) in bytes, or None when not set."""
  text = os.environ.get(MAX_GB_ENV)
  if not text:
    return None
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not 0 < value < math.inf:
    raise BadInput(f"{MAX_GB_ENV} must be a number of gigabytes above 0, got {text[:40]!r}")
  return int(value * 1e9)


def may_download(model_id: str, formats: tuple[str, ...] = ENGINE_FORMATS["tinygrad"]) -> bool:
  """Whether this node would fetch `model_id` from the hub now if asked to serve it: it has a source, the node is not offline,
  and --allow-downloads lets it (a malformed setting lets nothing)."""
  sources = model_sources(model_id)
  try:
    allow = allowed_downloads()
  except BadInput:
    return False
  return bool(sources) and not offline() and _may_fetch(ordered(sources, formats)[0], allow)


def _may_fetch(source: Source, allow: str) -> bool:
  if allow != "builtin":
    return allow == "any"
  return any(b.repo == source.repo and b.filename in (None, source.filename) for sources in BUILT_IN.values() for b in sources)


def ensure_model(
  model_id: str,
  shard: Shard | None = None,
  weights: bool = True,
  formats: tuple[str, ...] = ENGINE_FORMATS["tinygrad"],
  progress: bool | None = None,
  allow: str | None = None,
  mirror: FileMirror | None = None,
  command: bool = False,
) -> Path:
  """The model's GGUF file or directory on this machine, holding what `shard` needs (None: the whole model; weights=False: its
  config and tokenizer only), once what is missing has been downloaded (from the first of the model's sources in `formats`
  order; `progress` and `mirror` as for `download`) if `allow` (default: the node's allowed_downloads()) lets it. A model that has no source
  (a path, an unknown id) or that lives in a directory of the user's own is used as it is. command: `exo download` itself asks,
  so its errors cannot advise running it."""
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
    fix = "unset HF_HUB_OFFLINE, which turns downloads off, and run the download again" if command else f"unset it and run `exo download {model_id}`"
    raise ModelNotFound(f"model {model_id!r} is not on this machine and HF_HUB_OFFLINE is set, so it is not downloaded from {source}; {fix}")
  allow = allow or allowed_downloads()
  if not _may_fetch(source, allow):
    only = "downloads are turned off (--allow-downloads none)" if allow == "none" else "only the built-in models' are (--allow-downloads builtin)"
    raise BadInput(
      f"downloads of {model_id[:200]!r} are not allowed: {only}; start the node with --allow-downloads any, or fetch it first with `exo download`"
    )
  return download(source, shard, weights, progress, mirror)


def download(
  source: Source, shard: Shard | None = None, weights: bool = True, progress: bool | None = True, mirror: FileMirror | None = None
) -> Path:
  """Fetch `source` (what `shard` needs of it, or all of it) into the hub cache; returns the GGUF file or snapshot directory.
  progress: True shows huggingface_hub's bar per file on stderr, None only when stderr is a terminal, False never. mirror: where
  each file is asked for before the hub (None: the hub only)."""
  if offline():
    raise ModelNotFound(f"HF_HUB_OFFLINE is set, so {source} is not downloaded; unset HF_HUB_OFFLINE to download it")
  from huggingface_hub import HfApi  # imported here: only a download needs it

  endpoint, cache = hub_endpoint(), hub_cache_dir()
  bar = _bar_class(progress)

  def fetch(filename: str) -> Path:
    return fetch_file(source, info, filename, endpoint, cache, bar, mirror)

  with _ONE_AT_A_TIME, _kept_only_if_whole(cache, source.repo), _hub_errors(source, endpoint, cache):
    info = HfApi(endpoint=endpoint).model_info(source.repo, files_metadata=True)
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    snapshot = snapshot_dir(source.repo)
    current = snapshot if snapshot is not None and snapshot.name == info.sha else None  # a repo updated since: fetch it afresh

    def have(filename: str) -> bool:
      return current is not None and (current / filename).is_file()

    gguf = _gguf_file(source, sizes)
    if gguf is not None:
      files, path = [gguf], None
    else:
      metadata = [f for f in METADATA_FILES if f in sizes and not have(f)]
      # without an index, the weight files are all the .safetensors files: checked with the metadata, before anything is fetched
      unindexed = weights and "model.safetensors.index.json" not in sizes
      _check_space(source, metadata + [f for f in _safetensors_files(sizes) if unindexed and not have(f)], sizes, cache)
      for filename in metadata:
        fetch(filename)
      path = snapshot_dir(source.repo)  # config.json is there: _gguf_file checked the repository has one
      files = []
      if weights:
        index = weight_map(path)
        files = _safetensors_files(sizes) if index is None else sorted(weight_files(index, path, shard))
    todo = [f for f in files if not have(f)]
    _check_space(source, todo, sizes, cache)
    if todo:
      total = sum(sizes.get(f, 0) for f in todo)
      origin = endpoint if mirror is None else f"this node's peers, else {endpoint}"
      log.warning("downloading %s from %s: %d file(s), %s, into %s", source, origin, len(todo), _size(total), cache)
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


def _safetensors_files(sizes: dict[str, int | None]) -> list[str]:
  return sorted(f for f in sizes if f.endswith(".safetensors") and "/" not in f)


def _check_space(source: Source, files: list[str], sizes: dict[str, int | None], cache: Path) -> None:
  """The disk budget (module docstring), before `files` are fetched: a BadInput if they do not fit it."""
  if unsized := [f for f in files if not isinstance(sizes.get(f), int)]:
    raise BadInput(f"the hub does not list the size of {unsized[0]} of {source}, so its download is refused")
  need = sum(sizes[f] for f in files)
  if not need:
    return
  disk = _disk_usage(cache)
  if need > disk.free:
    raise BadInput(f"not enough disk space for {source}: it needs {_size(need)} and {cache} has {_size(disk.free)} free")
  cap = models_max_bytes()
  if cap is None and disk.free - need < FREE_FRACTION * disk.total:
    raise BadInput(
      f"not enough disk space for {source}: it needs {_size(need)} and {cache} has {_size(disk.free)} free, of which "
      f"{FREE_FRACTION:.0%} of the disk ({_size(int(FREE_FRACTION * disk.total))}) stays free; free space, or set --models-max-gb"
    )
  if cap is not None and (held := _folder_bytes(cache)) + need > cap:
    raise BadInput(
      f"not enough room for {source} within --models-max-gb {cap / 1e9:g}: it needs {_size(need)} and the models folder {cache} holds {_size(held)}"
    )


def _disk_usage(path: Path):
  while not path.exists() and path != path.parent:
    path = path.parent
  return shutil.disk_usage(path)


def _folder_bytes(folder: Path) -> int:
  """Bytes of the files under `folder` (links not followed: a snapshot's links point at blobs counted once)."""
  total = 0
  for root, _, files in os.walk(folder):
    for name in files:
      with contextlib.suppress(OSError):
        total += os.lstat(os.path.join(root, name)).st_size
  return total


def _tree(folder: Path) -> set[Path]:
  """`folder` and every path under it (links not followed); empty if it does not exist."""
  if not folder.exists():
    return set()
  found = {folder}
  for root, dirs, files in os.walk(folder):
    found.update(Path(root) / name for name in (*dirs, *files))
  return found


@contextlib.contextmanager
def _kept_only_if_whole(cache: Path, repo: str):
  """On any failure of the download of `repo`, remove what it created in the models folder: new files, links and partial
  (.incomplete) blobs under the repository's folder and its lock folder, files it put in the models folder itself (the cache's
  CACHEDIR.TAG), and the folders it made."""
  folder = f"models--{repo.replace('/', '--')}"

  def present() -> set[Path]:  # the folders above the repository's, what is directly in the models folder, the repository's trees
    above = {path for path in (cache, cache / ".locks") if path.exists()}
    return above | (set(cache.iterdir()) if cache.is_dir() else set()) | _tree(cache / folder) | _tree(cache / ".locks" / folder)

  before = present()
  try:
    yield
  except BaseException:
    created = present() - before
    for path in sorted(created, key=lambda p: len(p.parts), reverse=True):  # what is inside a folder before the folder
      with contextlib.suppress(OSError):
        path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
    raise


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
