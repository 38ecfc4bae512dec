import os

import pytest

from exo.networking import udp_discovery

# Tests never reach the internet: nothing is downloaded (HF_HUB_OFFLINE), and a test that turns downloads on without pointing
# HF_ENDPOINT at its own local hub reaches a closed port. Set before anything imports huggingface_hub, which reads them once;
# node processes the tests start inherit them.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


@pytest.fixture(autouse=True)
def no_lan_broadcast(monkeypatch):
  """Tests talk to loopback only: any UDP discovery started in-process must name its (loopback) broadcast addresses."""

  def refuse():
    raise AssertionError("a test would broadcast on the LAN: pass broadcast_addresses=['127.255.255.255']")

  monkeypatch.setattr(udp_discovery, "default_broadcast_addresses", refuse)
