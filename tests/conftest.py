import pytest

from exo.networking import udp_discovery


@pytest.fixture(autouse=True)
def no_lan_broadcast(monkeypatch):
  """Tests talk to loopback only: any UDP discovery started in-process must name its (loopback) broadcast addresses."""

  def refuse():
    raise AssertionError("a test would broadcast on the LAN: pass broadcast_addresses=['127.255.255.255']")

  monkeypatch.setattr(udp_discovery, "default_broadcast_addresses", refuse)
