"""A node's model files shared with its cluster: it serves its peers what it holds of a file (whole, or as it arrives), and gets
a file it needs from them before the hub (`obtain`: exo.inference.downloads's FileMirror).

Getting a file, in rounds (each asks every peer once):
  1. claim it (exo.networking.fetch_claims) and ask every peer what it holds of it, with the claim;
  2. peers holding all of it: what is missing goes in CHUNK-byte pieces streamed from up to MAX_SOURCES of them at once, each
     written at its place; else the peer holding the most of it streams it, as it arrives there;
  3. no peer has any of it: the node holding the earliest claim fetches it from the hub, the others wait until it has started
     and stream from it, so the hub serves the file once to the cluster;
  4. the whole file must hash to the hub's hash before it is used: bytes that do not are deleted and their peers not asked for
     the file again. A peer that leaves or stalls mid-file is replaced by another, or by the hub, resuming after the bytes here.

Serving: only blobs of the models folder, looked up by repository id and hash (hub_files.held), only to members of the cluster
(the gRPC server refuses other callers). Bytes of a file still arriving here are sent as they arrive; a file that stops growing
for STALL_S seconds ends the stream.
"""

import asyncio
import bisect
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from exo.base.errors import BadInput, ClusterCannotServe, ModelNotFound
from exo.inference.hub_files import HubFile, held, install, partial_path
from exo.inference.model_files import hub_cache_dir
from exo.networking.fetch_claims import FetchClaims
from exo.networking.peer_handle import FileState, PeerHandle

log = logging.getLogger(__name__)

__all__ = ["Arrival", "PeerFiles"]

CHUNK = 16 << 20  # bytes of one piece of a file got from several peers at once
PIECE = 1 << 20  # bytes of one message of a stream
MAX_SOURCES = 4
STALL_S = 20.0  # a served file that does not grow for this long (its transfer here stalled) ends the stream
POLL_S = 0.05  # how often a served file still arriving is looked at
WAIT_S = 0.2  # how often a node waiting for the hub's fetcher to start asks again
ASK_TIMEOUT_S = 5.0


@dataclass
class Arrival:
  """A file arriving at this node: from `source` (peer ids, or "hub"), `received` bytes so far in this transfer."""

  file: HubFile
  prefix: int | None = None  # bytes from its start written; None: its partial file's size (the hub's transfer appends)
  received: int = 0
  source: str = ""
  started: float = field(default_factory=time.monotonic)


class PeerFiles:
  def __init__(
    self,
    node_id: str,
    peers: Callable[[], list[PeerHandle]],
    cache: Callable[[], Path] = hub_cache_dir,
    measured: Callable[[str, float], None] = lambda peer_id, mbps: None,
  ):
    """`peers`: the live peers, asked when a file is needed; `cache`: the models folder (read when used); `measured(peer id,
    Mbit/s)`: told the rate of every piece got from a peer (a measured link bandwidth)."""
    self.claims = FetchClaims(node_id)
    self.peers, self.cache, self.measured = peers, cache, measured
    self.arrivals: dict[str, Arrival] = {}  # by file key
    self.loop: asyncio.AbstractEventLoop | None = None  # the node's: where peers are called from; set when the node starts

  def progress(self) -> list[tuple[HubFile, int, str]]:
    """The files arriving at this node: (file, bytes of it here from its start, source)."""
    out = []
    for arrival in list(self.arrivals.values()):
      here = arrival.prefix if arrival.prefix is not None else partial_size(self.cache(), arrival.file)
      out.append((arrival.file, min(here, arrival.file.size), arrival.source))
    return out

  # ---------- serving ----------

  def _available(self, file: HubFile) -> tuple[Path, bool, int] | None:
    """(path, whole, bytes from the start that may be sent) of what this node holds of `file`, or None."""
    found = held(self.cache(), file.repo, file.sha)
    if found is None:
      return None
    path, whole = found
    size = path.stat().st_size
    arrival = self.arrivals.get(file.key)
    if not whole and arrival is not None and arrival.prefix is not None:
      size = min(size, arrival.prefix)
    return path, whole, size

  def status(self, file: HubFile, claim: int) -> FileState:
    """What this node holds of `file`, for a peer that claims it with `claim`."""
    self.claims.heard(claim)
    available = self._available(file)
    held_bytes = 0 if available is None else min(available[2], file.size)
    whole = available is not None and available[1]
    return FileState(held_bytes, whole, file.key in self.arrivals, self.claims.own.get(file.key, 0))

  async def chunks(self, file: HubFile, offset: int, length: int) -> AsyncIterator[tuple[int, bytes]]:
    """The bytes of `file` from `offset` (`length` of them, 0: to its end) as they are here or arrive; ModelNotFound if this
    node holds none of it, ClusterCannotServe if it stops arriving."""
    if not 0 <= offset <= file.size or length < 0:
      raise BadInput(f"bytes {offset}+{length} are not within {file} ({file.size} bytes)")
    end = file.size if length == 0 else min(file.size, offset + length)
    since = time.monotonic()
    while (available := self._available(file)) is None:  # a transfer here that has not written yet
      if file.key not in self.arrivals or time.monotonic() - since > STALL_S:
        raise ModelNotFound(f"this node does not hold {file}")
      await asyncio.sleep(POLL_S)
    fd = os.open(available[0], os.O_RDONLY)
    try:
      pos = offset
      while pos < end:
        _, whole, size = available
        if size > pos:
          data = os.pread(fd, min(PIECE, size - pos, end - pos), pos)
          if not data:
            raise ClusterCannotServe(f"{file} is shorter here than it was")
          yield pos, data
          pos, since = pos + len(data), time.monotonic()
          available = self._available(file) or available
          continue
        if whole or file.key not in self.arrivals:
          raise ClusterCannotServe(f"{file} stopped arriving at this node after {size} bytes")
        if time.monotonic() - since > STALL_S:
          raise ClusterCannotServe(f"{file} has not grown at this node for {STALL_S:g} s")
        await asyncio.sleep(POLL_S)
        available = self._available(file) or available  # the partial file became the blob: the same file, whole
    finally:
      os.close(fd)

  # ---------- getting ----------

  def obtain(self, file: HubFile, cache: Path, from_hub: Callable[[], None]) -> None:
    """Make `file` whole and installed in `cache`: from peers, else from the hub through `from_hub` (which fills the partial
    file, resuming after the bytes it holds). Called from a worker thread, never the node's event loop; without a running node
    (no loop) it is the hub's."""
    loop = self.loop
    if loop is None or not loop.is_running() or _running_loop() is loop:  # no node running, or called on its loop: it cannot wait
      from_hub()
      return

    def run(coroutine):
      return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    arrival, shunned = Arrival(file), set()
    try:
      while True:
        states = run(self._ask(file, shunned))
        sources = _sources(states, partial_size(cache, file))
        if sources:
          ids = [p.id() for p in sources]
          failed, whole = run(self._stream(file, cache, arrival, sources))
          shunned |= failed
          if whole:
            try:
              install(cache, file)
            except ValueError as e:
              log.warning("%s from peer(s) %s: %s; not asking them for it again", file, ", ".join(ids), e)
              shunned |= set(ids)
              continue
            log.warning("got %s (%.1f MB) from peer(s) %s in %.1f s", file, file.size / 1e6, ", ".join(ids), time.monotonic() - arrival.started)
            return
        elif self.claims.earliest(file.key, {p.id(): s.claim for p, s in states.items()}):
          arrival.prefix, arrival.source = None, "hub"
          run(self._arriving(arrival))
          from_hub()
          return
        else:
          time.sleep(WAIT_S)  # the peer that fetches it from the hub has not started: in this worker thread, not the loop
    finally:
      run(self._done(file))

  async def _arriving(self, arrival: Arrival) -> None:
    self.arrivals[arrival.file.key] = arrival

  async def _done(self, file: HubFile) -> None:
    self.arrivals.pop(file.key, None)
    self.claims.release(file.key)

  async def _ask(self, file: HubFile, shunned: set[str]) -> dict[PeerHandle, FileState]:
    claim = self.claims.claim(file.key)
    peers = [p for p in self.peers() if p.id() not in shunned]
    answers = await asyncio.gather(*(_state(p, file, claim) for p in peers))
    return {p: state for p, state in zip(peers, answers) if state is not None}

  async def _stream(self, file: HubFile, cache: Path, arrival: Arrival, sources: list[PeerHandle]) -> tuple[set[str], bool]:
    """Fill `file`'s partial file from `sources`, each taking the next missing piece until none is left; returns the peers that
    failed and whether the file is all here. What is left short is cut back to the bytes here from the start."""
    partial = partial_path(cache, file)
    partial.parent.mkdir(parents=True, exist_ok=True)
    start = partial_size(cache, file)
    arrival.prefix, arrival.source = start, ", ".join(p.id() for p in sources)
    self.arrivals[file.key] = arrival  # a node waiting to start a transfer is not arriving: peers never wait on each other
    missing = [(at, min(at + CHUNK, file.size)) for at in range(start, file.size, CHUNK)]
    finished: dict[int, int] = {}  # pieces written away from the prefix: start -> end
    failed: set[str] = set()
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT, 0o644)

    def advance(begin: int, end: int) -> None:
      if begin <= arrival.prefix < end:
        arrival.prefix = end
      elif begin > arrival.prefix:
        finished[begin] = end
      while arrival.prefix in finished:
        arrival.prefix = finished.pop(arrival.prefix)

    async def take(peer: PeerHandle) -> None:
      while missing:
        begin, end = missing.pop(0)
        pos, started = begin, time.monotonic()
        try:
          async for at, data in peer.fetch_file(file, begin, end - begin):
            if at != pos or pos + len(data) > end:
              raise ValueError(f"sent bytes at {at}+{len(data)} where {pos} to {end} were asked")
            os.pwrite(fd, data, at)
            pos += len(data)
            arrival.received += len(data)
            if begin <= arrival.prefix < pos:
              advance(begin, pos)
          if pos != end:
            raise ValueError(f"ended the stream at {pos} of {end}")
        except Exception as e:
          log.warning("getting %s from peer %s broke off at byte %d: %s", file, peer.id(), pos, e)
          failed.add(peer.id())
          if pos > begin:
            advance(begin, pos)
          bisect.insort(missing, (pos, end))
          return
        advance(begin, end)
        if (elapsed := time.monotonic() - started) > 0:
          self.measured(peer.id(), (end - begin) * 8 / elapsed / 1e6)

    try:
      await asyncio.gather(*(take(p) for p in sources))
      if missing:
        os.ftruncate(fd, arrival.prefix)
        self.arrivals.pop(file.key, None)
    finally:
      os.close(fd)
    return failed, not missing


def _running_loop() -> asyncio.AbstractEventLoop | None:
  try:
    return asyncio.get_running_loop()
  except RuntimeError:
    return None


def partial_size(cache: Path, file: HubFile) -> int:
  """Bytes of `file` here from its start (0 if none; a partial file longer than the file is none of it)."""
  try:
    size = partial_path(cache, file).stat().st_size
  except FileNotFoundError:
    return 0
  return size if size <= file.size else 0


def _sources(states: dict[PeerHandle, FileState], have: int) -> list[PeerHandle]:
  """The peers to get a file from: up to MAX_SOURCES holding all of it; else the one with the most beyond the `have` bytes
  here (one still receiving it first); none if no peer has more."""
  whole = sorted((p for p, s in states.items() if s.whole), key=lambda p: p.id())
  if whole:
    return whole[:MAX_SOURCES]
  partial = [(s.arriving, s.held_bytes, p.id(), p) for p, s in states.items() if s.arriving or s.held_bytes > have]
  return [max(partial, key=lambda entry: entry[:3])[3]] if partial else []


async def _state(peer: PeerHandle, file: HubFile, claim: int) -> FileState | None:
  try:
    return await asyncio.wait_for(peer.file_status(file, claim), ASK_TIMEOUT_S)
  except Exception as e:  # a peer that does not answer has nothing to give
    log.debug("%r did not say what it holds of %s: %s", peer, file, e)
    return None
