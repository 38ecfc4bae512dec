"""One file of a repository on the hub into the models folder (exo.inference.hub_files lays it out): asked of the node's
cluster first (a FileMirror), then fetched from the hub with huggingface_hub's http_get, resuming after the bytes already here;
installed only if it hashes to the hub's hash. A file the hub lists without a hash comes through huggingface_hub's own download.
"""

from pathlib import Path

from exo.base.errors import ClusterCannotServe
from exo.inference.hub_files import FileMirror, HubFile, install, partial_path
from exo.inference.model_sources import Source

__all__ = ["fetch_file"]


def fetch_file(source: Source, info, filename: str, endpoint: str, cache: Path, bar, mirror: FileMirror | None) -> Path:
  """`filename` of `source` (whose listing is `info`) fetched into the cache: through `mirror`, then the hub, if the hub lists its
  hash; by huggingface_hub's download from the hub if not."""
  from huggingface_hub import hf_hub_download

  file = _hub_file(source.repo, info, filename)
  if file is None:
    path = Path(hf_hub_download(source.repo, filename, cache_dir=cache, endpoint=endpoint, tqdm_class=bar))
    if (got := path.stat().st_size) != file_size(info, filename):
      raise ClusterCannotServe(
        f"{filename} of {source} came as {got} bytes where {endpoint} listed {file_size(info, filename)}; nothing of {source} was kept"
      )
    return path

  def from_hub() -> None:
    _from_hub(file, endpoint, cache, bar)

  if mirror is not None:
    mirror.obtain(file, cache, from_hub)
  else:
    from_hub()
  try:
    return install(cache, file)
  except ValueError as e:
    raise ClusterCannotServe(f"{e}, of {source} from {endpoint}; run it again") from None


def file_size(info, filename: str) -> int | None:
  return next((s.size for s in info.siblings or [] if s.rfilename == filename), None)


def _hub_file(repo: str, info, filename: str) -> HubFile | None:
  """`filename` of the repository `info` lists, with its hash (its LFS sha256, else its git blob id); None if it lists none."""
  sibling = next((s for s in info.siblings or [] if s.rfilename == filename), None)
  if sibling is None or not isinstance(sibling.size, int):
    return None
  try:
    return HubFile(repo, info.sha, filename, sibling.size, sibling.lfs.sha256 if sibling.lfs else sibling.blob_id or "")
  except (ValueError, TypeError):
    return None


def _from_hub(file: HubFile, endpoint: str, cache: Path, bar) -> None:
  """Fill `file`'s partial file from the hub, resuming after the bytes it holds (huggingface_hub's http_get: a Range request,
  retried when the connection drops)."""
  from huggingface_hub.file_download import hf_hub_url, http_get
  from huggingface_hub.utils import build_hf_headers

  partial = partial_path(cache, file)
  partial.parent.mkdir(parents=True, exist_ok=True)
  if partial.exists() and partial.stat().st_size > file.size:
    partial.unlink()  # more than the file: not a prefix of it
  url = hf_hub_url(file.repo, file.filename, revision=file.commit, endpoint=endpoint)
  try:
    with open(partial, "ab") as out:
      http_get(
        url, out, resume_size=out.tell(), headers=build_hf_headers(), expected_size=file.size, displayed_filename=file.filename, tqdm_class=bar
      )
  except OSError as e:
    if "Consistency check failed" not in str(e):
      raise
    got = partial.stat().st_size
    partial.unlink()
    raise ClusterCannotServe(f"{file} came as {got} bytes where {endpoint} listed {file.size}; nothing of it was kept") from None
