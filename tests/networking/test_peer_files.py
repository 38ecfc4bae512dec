"""Model files from peers (exo.networking.peer_files) over real gRPC on loopback: each node has a models folder of its own; the
hub is a counter of what it was asked for (or the local stand-in hub, for a resumed download). Bytes are checked against the
content the test made, never against what the code wrote."""

import asyncio
import hashlib
import logging
import threading

import grpc
import pytest

from exo.base.errors import ClusterCannotServe
from exo.inference.downloads import ensure_model
from exo.inference.hub_files import HubFile, blob_path, held, install, partial_path, snapshot_path
from exo.networking import peer_files
from exo.networking.grpc import node_service_pb2 as pb
from exo.networking.grpc import node_service_pb2_grpc as pb_grpc
from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
from exo.networking.grpc.grpc_server import GRPCServer
from exo.networking.membership import TOKEN_METADATA, Membership
from exo.networking.peer_files import PeerFiles
from exo.tools.local_hub import COMMIT, LocalHub
from tests.support.grpc_node import MEMBER
from tests.support.patience import STALL_S

REPO = "org/weights"
DATA = bytes(range(256)) * 5000 + b"tail"  # 1.28 MB: several pieces and chunks at the sizes below
FILE = HubFile(REPO, COMMIT, "model.gguf", len(DATA), hashlib.sha256(DATA).hexdigest())


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
  monkeypatch.setattr(peer_files, "PIECE", 32 << 10)
  monkeypatch.setattr(peer_files, "CHUNK", 256 << 10)


class FileNode:
  """A node that only shares files: its PeerFiles behind a gRPC server, its models folder, the bytes it has sent."""

  def __init__(self, node_id: str, root):
    self.id, self.cache, self.peers, self.sent = node_id, root / node_id, [], 0
    self.files = PeerFiles(node_id, lambda: list(self.peers), lambda: self.cache)
    self.server = GRPCServer(self, "127.0.0.1", 0)
    self.hang_after: int | None = None  # bytes after which its streams stop sending (a peer that froze mid-file)
    self.hung = threading.Event()

  async def start(self) -> None:
    await self.server.start()
    self.files.loop = asyncio.get_running_loop()

  def file_status(self, file, claim):
    return self.files.status(file, claim)

  async def file_chunks(self, file, offset, length):
    async for at, data in self.files.chunks(file, offset, length):
      if self.hang_after is not None and self.sent >= self.hang_after:
        self.hung.set()
        await asyncio.Event().wait()
      self.sent += len(data)
      yield at, data

  def is_healthy(self):
    return True

  def handle(self, caller: str) -> GRPCPeerHandle:
    return GRPCPeerHandle(self.id, f"127.0.0.1:{self.server.port}", None, sender_id=caller)

  def hold(self, data: bytes = DATA) -> None:
    partial = partial_path(self.cache, FILE)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(data)
    if data == DATA:
      install(self.cache, FILE)
    else:  # a corrupted copy, as if it had been installed
      partial.rename(blob_path(self.cache, FILE))

  def got(self) -> bytes:
    return snapshot_path(self.cache, FILE).read_bytes()


class FakeHub:
  """The hub's side of `obtain`: appends the rest of DATA to a node's partial file, counting calls and bytes."""

  def __init__(self):
    self.calls, self.served = 0, 0
    self.lock = threading.Lock()

  def filler(self, node: FileNode):
    def fill() -> None:
      with self.lock:
        self.calls += 1
      partial = partial_path(node.cache, FILE)
      partial.parent.mkdir(parents=True, exist_ok=True)
      with open(partial, "ab") as out:
        for at in range(out.tell(), len(DATA), 64 << 10):
          out.write(DATA[at : at + (64 << 10)])
          out.flush()
          with self.lock:
            self.served += min(64 << 10, len(DATA) - at)

    return fill


def no_hub() -> None:
  raise ClusterCannotServe("no hub here")


def run(test, tmp_path, *ids: str):
  """`await test(*nodes)`: a node for each id, started, each with every other as its peer."""

  async def main():
    nodes = [FileNode(i, tmp_path) for i in ids]
    for node in nodes:
      await node.start()
    for node in nodes:
      node.peers = [other.handle(node.id) for other in nodes if other is not node]
    try:
      await asyncio.wait_for(test(*nodes), STALL_S)
    finally:
      for node in nodes:
        await node.server.stop()
        for peer in node.peers:
          await peer.disconnect()

  asyncio.run(main())


async def obtain(node: FileNode, from_hub=no_hub) -> None:
  """What exo.inference.downloads does with one file: obtain it, then install it."""
  await asyncio.to_thread(node.files.obtain, FILE, node.cache, from_hub)
  install(node.cache, FILE)


def test_a_file_a_peer_holds_comes_from_it_not_the_hub(tmp_path):
  async def test(a, b):
    a.hold()
    await obtain(b)
    assert b.got() == DATA and a.sent == len(DATA)

  run(test, tmp_path, "a", "b")


def test_a_file_two_peers_hold_is_spread_over_both(tmp_path):
  async def test(a, b, c):
    a.hold()
    c.hold()
    await obtain(b)
    assert b.got() == DATA
    assert a.sent + c.sent == len(DATA) and a.sent > 0 and c.sent > 0

  run(test, tmp_path, "a", "b", "c")


def test_nodes_that_need_a_file_at_once_ask_the_hub_once(tmp_path):
  """Three nodes obtain the same file at the same moment: one fetches it from the hub, the two others stream it from peers."""
  hub = FakeHub()

  async def test(*nodes):
    await asyncio.gather(*(obtain(node, hub.filler(node)) for node in nodes))
    assert all(node.got() == DATA for node in nodes)
    assert (hub.calls, hub.served) == (1, len(DATA))
    assert sum(node.sent for node in nodes) == 2 * len(DATA)

  run(test, tmp_path, "a", "b", "c")


def test_a_peer_killed_mid_file_is_replaced_by_another_from_where_it_stopped(tmp_path):
  async def test(a, b, c):
    a.hold()
    c.hold()
    b.peers = [a.handle("b")]  # b knows a only, until a is gone
    a.hang_after = len(DATA) // 2
    task = asyncio.create_task(obtain(b))
    await asyncio.to_thread(a.hung.wait)
    b.peers = [a.handle("b"), c.handle("b")]
    await a.server.stop()  # a dies mid-file: b's stream breaks, and a answers no more
    await task
    assert b.got() == DATA
    assert a.sent >= len(DATA) // 2 and 0 < c.sent < len(DATA) and a.sent + c.sent >= len(DATA)  # c was asked for the rest

  run(test, tmp_path, "a", "b", "c")


def test_a_peer_killed_mid_file_is_replaced_by_the_hub_from_where_it_stopped(tmp_path, monkeypatch):
  """The real download: b asks its peer a first; a dies mid-file; b asks the hub for the rest only (a Range request)."""
  import huggingface_hub.constants

  hub = LocalHub({REPO: {"model.gguf": DATA}}).start()
  monkeypatch.setenv("HF_ENDPOINT", hub.url)
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

  async def test(a, b):
    monkeypatch.setenv("EXO_MODELS_DIR", str(b.cache))
    a.hold()
    a.hang_after = len(DATA) // 3
    task = asyncio.create_task(asyncio.to_thread(ensure_model, f"{REPO}/model.gguf", allow="any", progress=False, mirror=b.files))
    await asyncio.to_thread(a.hung.wait)
    await a.server.stop()
    path = await task
    assert path.read_bytes() == DATA
    [ranged] = hub.file_requests("model.gguf")
    assert int(ranged.removeprefix("bytes=").rstrip("-")) == a.sent >= len(DATA) // 3
    assert hub.served["model.gguf"] == len(DATA) - a.sent

  try:
    run(test, tmp_path, "a", "b")
  finally:
    hub.stop()


def test_corrupted_bytes_from_a_peer_are_never_installed_and_the_hub_gives_the_file(tmp_path, caplog):
  hub = FakeHub()
  corrupted = bytearray(DATA)
  corrupted[len(DATA) // 2] ^= 0xFF

  async def test(a, b):
    a.hold(bytes(corrupted))
    with caplog.at_level(logging.WARNING, logger="exo.networking.peer_files"):
      await obtain(b, hub.filler(b))
    assert b.got() == DATA and (hub.calls, hub.served) == (1, len(DATA))
    assert "not asking them for it again" in caplog.text and "from peer(s) a" in caplog.text

  run(test, tmp_path, "a", "b")


def test_corrupted_bytes_and_no_hub_leave_nothing(tmp_path):
  corrupted = bytearray(DATA)
  corrupted[7] ^= 0x01

  async def test(a, b):
    a.hold(bytes(corrupted))
    with pytest.raises(ClusterCannotServe):
      await obtain(b)
    assert held(b.cache, REPO, FILE.sha) is None and not snapshot_path(b.cache, FILE).exists()

  run(test, tmp_path, "a", "b")


def raw_fetch(node: FileNode, file: pb.HubFile, metadata=MEMBER) -> tuple[grpc.StatusCode, bytes]:
  """A FetchFile call as any caller may send it; (its status, the bytes it got)."""

  async def call():
    async with grpc.aio.insecure_channel(f"127.0.0.1:{node.server.port}") as channel:
      received = b""
      try:
        async for chunk in pb_grpc.NodeServiceStub(channel).FetchFile(pb.FetchFileRequest(file=file), metadata=metadata, timeout=STALL_S):
          received += chunk.data
      except grpc.aio.AioRpcError as e:
        return e.code(), received
      return grpc.StatusCode.OK, received

  return call()


@pytest.mark.parametrize(
  "field, value",
  [
    ("repo", "../../etc"),
    ("repo", "org/../../x"),
    ("filename", "../../../../etc/passwd"),
    ("filename", "/etc/passwd"),
    ("sha", "../../../../../etc/passwd"),
    ("sha", "0" * 63 + "/"),
    ("commit", "../snapshots"),
  ],
)
def test_a_request_naming_a_path_outside_the_models_folder_gets_nothing(tmp_path, field, value):
  (tmp_path / "secret").write_bytes(b"not a model")

  async def test(a):
    a.hold()
    good = pb.HubFile(repo=REPO, commit=COMMIT, filename="model.gguf", size=len(DATA), sha=FILE.sha)
    assert await raw_fetch(a, good) == (grpc.StatusCode.OK, DATA)  # the same request, well formed, gets the file
    bad = pb.HubFile(repo=REPO, commit=COMMIT, filename="model.gguf", size=len(DATA), sha=FILE.sha)
    setattr(bad, field, value)
    assert await raw_fetch(a, bad) == (grpc.StatusCode.INVALID_ARGUMENT, b"")

  run(test, tmp_path, "a")


def test_a_blob_that_leads_outside_the_models_folder_is_not_served(tmp_path):
  (tmp_path / "secret").write_bytes(DATA)

  async def test(a):
    blob = blob_path(a.cache, FILE)
    blob.parent.mkdir(parents=True)
    blob.symlink_to(tmp_path / "secret")
    message = pb.HubFile(repo=REPO, commit=COMMIT, filename="model.gguf", size=len(DATA), sha=FILE.sha)
    assert await raw_fetch(a, message) == (grpc.StatusCode.NOT_FOUND, b"")
    assert a.files.status(FILE, 0).held_bytes == 0

  run(test, tmp_path, "a")


def test_a_caller_outside_the_cluster_gets_nothing(tmp_path):
  async def test(a):
    a.hold()
    message = pb.HubFile(repo=REPO, commit=COMMIT, filename="model.gguf", size=len(DATA), sha=FILE.sha)
    stranger = ((TOKEN_METADATA, Membership("another cluster's secret, long enough", "test").token()),)
    assert await raw_fetch(a, message, stranger) == (grpc.StatusCode.UNAUTHENTICATED, b"")
    assert await raw_fetch(a, message, ()) == (grpc.StatusCode.UNAUTHENTICATED, b"")

  run(test, tmp_path, "a")
