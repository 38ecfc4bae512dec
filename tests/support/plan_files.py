"""`exo plan` as the tests run it: a hand-checkable topology and model, files written for its flags, and its exit status and
output captured."""

import json
from pathlib import Path

import pytest

from exo.main import main

# Hand-checkable: 4 layers of 1 GB and 1 GFLOP. `fast` streams a layer in 1e9 / 100e9 = 10 ms, `slow` in 100 ms (compute, 1 ms, is
# dominated). Each holds floor(8192 MB * 0.9 / 1 GB) = 7 layers. One hop is 10 ms / 2 = 5 ms.
HAND_MODEL = {"id": "hand", "n_layers": 4, "layer_bytes": 1e9, "layer_flops": 1e9, "activation_bytes": 0}
HAND_TOPOLOGY = {
  "nodes": {
    "fast": {"model": "Fast Box", "chip": "F1", "memory": 8192, "flops": {"fp16": 1.0}, "memory_bandwidth": 100},
    "slow": {"model": "Slow Box", "chip": "S1", "memory": 8192, "flops": {"fp16": 1.0}, "memory_bandwidth": 10},
  },
  "edges": [{"from": "fast", "to": "slow", "rtt_ms": 10.0}],
}


@pytest.fixture(autouse=True)
def plain_terminal(monkeypatch):
  """No colour codes in captured output, whatever the CI environment forces."""
  for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("NO_COLOR", "1")


def write(tmp_path: Path, name: str, data) -> str:
  path = tmp_path / name
  if isinstance(data, bytes):
    path.write_bytes(data)
  else:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
  return str(path)


def run(capsys, *args) -> tuple[int, str, str]:
  status = main(["plan", *map(str, args)])
  out, err = capsys.readouterr()
  return status, out, err
