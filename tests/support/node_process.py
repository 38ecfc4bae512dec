"""An `exo` node process on loopback, as a user starts one, and the chat page address it prints when its API is up."""

import select
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from exo.tools.local_cluster import ROOT, stop_process
from tests.support.patience import HANG_S

LOOPBACK_NODE = ["--node-host", "127.0.0.1", "--chatgpt-api-host", "127.0.0.1", "--chatgpt-api-port", "0"]  # the OS picks the API port


def printed_page_url(proc: subprocess.Popen, timeout: float) -> str:
  """The address in the node's "Chat page: URL" line, read from its unbuffered stdout as soon as it is printed."""
  deadline, seen = time.monotonic() + timeout, b""
  while (left := deadline - time.monotonic()) > 0:
    ready, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
    if ready:
      line = proc.stdout.readline()
      if not line:
        break  # the node closed its stdout: it exited
      seen += line
      if line.startswith(b"Chat page: "):
        return line.decode().removeprefix("Chat page: ").strip()
    elif proc.poll() is not None:
      break
  raise AssertionError(f"the node printed no chat page address within {timeout:g} s (exit status {proc.poll()}); its stdout: {seen!r}")


@contextmanager
def exo_node(args: list[str], log_path: Path, timeout: float = HANG_S):
  """`exo ARGS` (plus loopback addresses) running until the block ends; yields (process, chat page URL)."""
  with open(log_path, "ab") as log:
    proc = subprocess.Popen([sys.executable, "-m", "exo.main", *LOOPBACK_NODE, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=log, bufsize=0)
  try:
    yield proc, printed_page_url(proc, timeout)
  finally:
    stop_process(proc, grace_s=10.0)
