"""A Hugging Face Hub on 127.0.0.1 for the download tests and benchmarks, serving repositories held in memory as huggingface_hub
expects:

  GET  /api/models/OWNER/NAME[/revision/REV]     the model info: "sha" and "siblings" (file names and sizes)
  HEAD /OWNER/NAME/resolve/REV/FILE              X-Repo-Commit, ETag and Content-Length, as huggingface_hub's metadata call reads
  GET  /OWNER/NAME/resolve/REV/FILE              the file, or with `Range: bytes=N-` its tail (206, Content-Range)

The model info lists each file's hashes as the hub does: "blobId" (git's blob sha1) and, for a model file (.gguf,
.safetensors: what the hub keeps in LFS), "lfs" with its sha256; the ETag is the sha256 of an LFS file, the blob sha1 of
another. A repository or file it lacks answers 404 with the X-Error-Code the hub sends (RepoNotFound, EntryNotFound). A file
named in `break_once` has its first whole transfer cut off halfway (the connection closes), as a network that drops. Every
request is recorded, with its Range header, and `served` counts the bytes of each file sent. With `rate_mbps`, file bytes
leave at that many Mbit/s in all (one internet link shared by every download), in 64 KiB pieces.
"""

import hashlib
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "c0ffee0000000000000000000000000000000001"
_INFO = re.compile(r"/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?")
_RESOLVE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")
PIECE = 64 << 10


class LocalHub:
  def __init__(self, repos: dict[str, dict[str, bytes]], rate_mbps: float | None = None):
    self.repos, self.rate_mbps = repos, rate_mbps
    self._free, self._lock = 0.0, threading.Lock()
    self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
    self.break_once: set[str] = set()
    self.served: dict[str, int] = {}  # file name: bytes of it sent
    self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self._server.server_address[1]}"

  def start(self) -> "LocalHub":
    self._thread.start()
    return self

  def stop(self) -> None:
    self._server.shutdown()
    self._server.server_close()

  def write(self, out, data: bytes, filename: str | None) -> None:
    """Send `data`, counted as bytes of `filename` (None: not a file) and paced to `rate_mbps` in all if it is one."""
    for at in range(0, len(data), PIECE):
      piece = data[at : at + PIECE]
      if filename is not None:
        with self._lock:  # the link is busy until self._free: a piece leaves after those before it, at rate_mbps
          self.served[filename] = self.served.get(filename, 0) + len(piece)
          if self.rate_mbps:
            self._free = max(self._free, time.monotonic()) + len(piece) * 8 / (self.rate_mbps * 1e6)
          due = self._free
        time.sleep(max(0.0, due - time.monotonic()))
      out.write(piece)
    out.flush()

  def file_requests(self, filename: str, method: str = "GET") -> list[str | None]:
    """The Range headers of the requests for `filename` (None: a whole-file request)."""
    return [r for m, path, r in self.requests if m == method and (found := _RESOLVE.fullmatch(path)) and found[3] == filename]


def _handler(hub: LocalHub):
  class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
      pass

    def do_HEAD(self):
      self._answer(body=False)

    def do_GET(self):
      self._answer(body=True)

    def _answer(self, body: bool):
      path = self.path.split("?", 1)[0]
      hub.requests.append((self.command, path, self.headers.get("Range")))
      if match := _INFO.fullmatch(path):
        files = hub.repos.get(match[1])
        if files is None:
          return self._error(404, "RepoNotFound")
        siblings = [_sibling(name, data) for name, data in sorted(files.items())]
        return self._send(200, json.dumps({"id": match[1], "modelId": match[1], "sha": COMMIT, "siblings": siblings}).encode(), body)
      match = _RESOLVE.fullmatch(path)
      if match is None or match[1] not in hub.repos:
        return self._error(404, "RepoNotFound")
      data = hub.repos[match[1]].get(match[3])
      if data is None:
        return self._error(404, "EntryNotFound")
      sha = hashlib.sha256(data).hexdigest() if _in_lfs(match[3]) else _blob_id(data)
      headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{sha}"', "Accept-Ranges": "bytes"}
      ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
      if ranged and body:
        start, end = int(ranged[1]), int(ranged[2] or len(data) - 1)
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return self._send(206, data[start : end + 1], body, headers, counted=match[3])
      if body and match[3] in hub.break_once:
        hub.break_once.discard(match[3])
        return self._send(200, data, body, headers, cut=len(data) // 2, counted=match[3])
      return self._send(200, data, body, headers, counted=match[3])

    def _error(self, status: int, code: str):
      self._send(status, json.dumps({"error": code}).encode(), self.command != "HEAD", {"X-Error-Code": code, "X-Repo-Commit": COMMIT})

    def _send(self, status: int, data: bytes, body: bool, headers: dict | None = None, cut: int | None = None, counted: str | None = None):
      self.send_response(status)
      for name, value in {"Content-Type": "application/octet-stream", **(headers or {}), "Content-Length": str(len(data))}.items():
        self.send_header(name, value)
      self.end_headers()
      if body:
        hub.write(self.wfile, data if cut is None else data[:cut], counted)
      if cut is not None:
        self.connection.shutdown(socket.SHUT_RDWR)  # the rest never comes: a transfer that broke off
        self.close_connection = True

  return Handler


def _in_lfs(filename: str) -> bool:
  return filename.endswith((".gguf", ".safetensors"))


def _blob_id(data: bytes) -> str:
  return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _sibling(name: str, data: bytes) -> dict:
  sibling = {"rfilename": name, "size": len(data), "blobId": _blob_id(data)}
  if _in_lfs(name):
    sibling["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
  return sibling
