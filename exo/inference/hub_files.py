"""One file of a Hugging Face repository in this node's models folder, laid out as a Hugging Face cache:

  models--OWNER--NAME/blobs/HASH                  the file once whole and checked (HASH: the hub's hash of its content)
  models--OWNER--NAME/blobs/HASH.incomplete       the bytes arrived so far, from the start of the file (a transfer resumes there)
  models--OWNER--NAME/snapshots/COMMIT/FILENAME   a link to the blob
  models--OWNER--NAME/refs/main                   COMMIT

A file is named by the hub's hash of its content: the LFS sha256 of a large file, the git blob sha1 of a small one (the hub
lists both in a repository's file metadata). Bytes from anywhere (a peer, the hub) become the blob only if they hash to it, so a
corrupted or truncated transfer is never loaded.

What a peer may read (`held`) is looked up by the repository's id and the hash alone, each checked against a strict pattern
before it names a path, and the path found must lie inside the models folder: no path from a request reaches the file system.
"""

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from exo.base.device_capabilities import MAX_FILE_BYTES

__all__ = ["FileMirror", "HubFile", "held", "install", "matches_hash", "partial_path"]

_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_HASH = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_FILENAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,199}")
_READ = 1 << 20


@dataclass(frozen=True)
class HubFile:
  """A file of `repo` at `commit`, as the hub lists it: its size and its hash (sha256 or git blob sha1, lower-case hex)."""

  repo: str
  commit: str
  filename: str
  size: int
  sha: str

  def __post_init__(self):
    """ValueError naming the field, for a file a peer or the hub describes outside what a real repository holds."""
    if not _REPO.fullmatch(self.repo) or ".." in self.repo:
      raise ValueError(f"not a repository id: {self.repo[:100]!r}")
    if not _COMMIT.fullmatch(self.commit):
      raise ValueError(f"not a commit hash: {self.commit[:100]!r}")
    parts = self.filename.split("/")
    if len(self.filename) > 500 or not all(_FILENAME_PART.fullmatch(p) and p != ".." for p in parts):
      raise ValueError(f"not a file name of a repository: {self.filename[:100]!r}")
    if not _HASH.fullmatch(self.sha):
      raise ValueError(f"not a sha256 or git sha1 hash: {self.sha[:100]!r}")
    if not 0 <= self.size <= MAX_FILE_BYTES:
      raise ValueError(f"file size {self.size} is out of range")

  @property
  def key(self) -> str:
    return f"{self.repo}/{self.filename}@{self.sha[:12]}"

  def __str__(self) -> str:
    return f"{self.filename} of {self.repo}"


class FileMirror(Protocol):
  """Where a node gets a file before it asks the hub: its cluster's peers (exo.networking.peer_files)."""

  def obtain(self, file: HubFile, cache: Path, from_hub: Callable[[], None]) -> None:
    """Make `file` whole in `cache` (installed): from peers where they have it, else by calling `from_hub` (which fills its
    partial file from the hub); raises what `from_hub` raises, or ClusterCannotServe."""


def repo_folder(cache: Path, repo: str) -> Path:
  return cache / f"models--{repo.replace('/', '--')}"


def blob_path(cache: Path, file: HubFile) -> Path:
  return repo_folder(cache, file.repo) / "blobs" / file.sha


def partial_path(cache: Path, file: HubFile) -> Path:
  """Where `file`'s bytes arrive until it is whole: appended from its start, so its size is where a transfer resumes."""
  return repo_folder(cache, file.repo) / "blobs" / f"{file.sha}.incomplete"


def snapshot_path(cache: Path, file: HubFile) -> Path:
  return repo_folder(cache, file.repo) / "snapshots" / file.commit / file.filename


def matches_hash(path: Path, sha: str) -> bool:
  """Whether the file at `path` hashes to `sha`: sha256 of its bytes (64 hex digits), or git's blob sha1 (40)."""
  digest = hashlib.sha256() if len(sha) == 64 else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
  with open(path, "rb") as f:
    while chunk := f.read(_READ):
      digest.update(chunk)
  return digest.hexdigest() == sha


def install(cache: Path, file: HubFile) -> Path:
  """Make the whole partial file of `file` its blob, linked into the snapshot of its commit (and that commit the repository's
  main), and return the link. A partial file of another size or hash is deleted and ValueError raised: nothing of it is kept."""
  partial, blob = partial_path(cache, file), blob_path(cache, file)
  if not blob.is_file():
    size = partial.stat().st_size
    if size != file.size or not matches_hash(partial, file.sha):
      partial.unlink(missing_ok=True)
      got = f"{size} bytes" if size != file.size else "bytes of another hash"
      raise ValueError(f"{file} arrived as {got} (expected {file.size} bytes hashing to {file.sha[:12]}...); it was deleted")
    os.replace(partial, blob)
  link = snapshot_path(cache, file)
  link.parent.mkdir(parents=True, exist_ok=True)
  if not link.is_file():
    link.unlink(missing_ok=True)  # a dangling link
    link.symlink_to(os.path.relpath(blob, link.parent))
  refs = repo_folder(cache, file.repo) / "refs" / "main"
  refs.parent.mkdir(parents=True, exist_ok=True)
  if not refs.is_file() or refs.read_text().strip() != file.commit:
    refs.write_text(file.commit)
  return link


def held(cache: Path, repo: str, sha: str) -> tuple[Path, bool] | None:
  """The file of `repo` with hash `sha` that this node holds, for a peer to read: (path, whole) for its blob or its partial
  file, or None (also for a repository id or hash that is not one, or a path that leads outside `cache`)."""
  if not _REPO.fullmatch(repo) or ".." in repo or not _HASH.fullmatch(sha):
    return None
  root = cache.resolve()
  folder = repo_folder(cache, repo) / "blobs"
  for path, whole in ((folder / sha, True), (folder / f"{sha}.incomplete", False)):
    real = path.resolve()
    if real.is_relative_to(root) and real.is_file():
      return real, whole
  return None
