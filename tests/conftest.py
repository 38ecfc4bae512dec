import os

import pytest
from hypothesis import HealthCheck, settings

from exo.networking import udp_discovery

# Tests never reach the internet: nothing is downloaded (HF_HUB_OFFLINE), and a test that turns downloads on without pointing
# HF_ENDPOINT at its own local hub reaches a closed port. Set before anything imports huggingface_hub, which reads them once;
# node processes the tests start inherit them.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# Every node a test starts, in this process or another, belongs to one cluster (exo.networking.membership), and none writes a
# secret into the real home: the config folder is a fresh one (cluster_config_home).
os.environ["EXO_CLUSTER_SECRET"] = "the-test-suite-cluster-secret"

# Hypothesis: CI draws the same examples on every run (derandomize: a seed fixed by each test's own code), so a CI verdict
# never depends on a dice roll; a local run draws new examples each time (and replays the failures it found, from
# .hypothesis/). No verdict depends on the machine's speed: no deadline, no "too slow" health check. A test's own @settings
# (max_examples and the like) keeps the profile's other values, since conftest loads the profile before any test module is
# imported. HYPOTHESIS_PROFILE=ci or =explore picks a profile by name.
DEFAULT = settings.get_profile("default")  # Hypothesis's own; under a CI variable it loads its "ci" profile at import
settings.register_profile(
  "ci", DEFAULT, derandomize=True, database=None, print_blob=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("explore", DEFAULT, derandomize=False, print_blob=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if IN_CI else "explore"))


@pytest.fixture(autouse=True, scope="session")
def cluster_config_home(tmp_path_factory):
  """exo's config folder (XDG_CONFIG_HOME) is a temporary one for the whole run, for this process and the nodes it starts."""
  os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("config-home"))


@pytest.fixture(autouse=True)
def environment_restored():
  """Each test leaves the environment as it found it: `exo` run in-process sets variables from its flags (--models-max-gb sets
  EXO_MODELS_MAX_GB, --allow-downloads EXO_ALLOW_DOWNLOADS), which node processes of a later test would otherwise inherit."""
  saved = dict(os.environ)
  yield
  if os.environ != saved:
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def no_lan_broadcast(monkeypatch):
  """Tests talk to loopback only: any UDP discovery started in-process must name its (loopback) broadcast addresses."""

  def refuse():
    raise AssertionError("a test would broadcast on the LAN: pass broadcast_addresses=['127.255.255.255']")

  monkeypatch.setattr(udp_discovery, "default_broadcast_addresses", refuse)
