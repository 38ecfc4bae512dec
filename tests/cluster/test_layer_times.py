"""`exo topology` shows the layer times each node process measured of its own engine, for the model it serves: a node paced to
its declared device (--emulate) measures that, one also slowed by --engine-slowdown measures it too, and a bare dummy engine,
whose microseconds stand for no device, measures nothing (it plans with its declared device)."""

import pytest

from exo.base.models import DEFAULT_MODEL
from exo.inference.slowed_engine import SlowedEngine
from exo.node_flags import build_parser
from exo.node_setup import build_node
from tests.cluster.harness import Device

DEVICE = Device(2000, 1, 20)


def test_exo_topology_shows_the_layer_times_each_node_measured(cluster):
  for node_id in ("paced", "slowed", "bare"):
    cluster.declare(node_id, DEVICE)
  cluster.start("paced", "--emulate")
  cluster.start("slowed", "--emulate", "--engine-slowdown", "3")
  cluster.start("bare")
  cluster.wait_for_mesh()
  nodes = cluster.topology("bare")["nodes"]  # the `exo topology --address` CLI, from a node that measures nothing itself
  for node_id in ("paced", "slowed"):
    measured = nodes[node_id]["layer_times"]
    assert set(measured) == {DEFAULT_MODEL} and measured[DEFAULT_MODEL]["decode_ms"] > 0 and measured[DEFAULT_MODEL]["token_ms"] > 0
  assert "layer_times" not in nodes["bare"]
  assert (nodes["bare"]["memory"], nodes["bare"]["memory_bandwidth"]) == (DEVICE.memory_mb, DEVICE.memory_bandwidth)


@pytest.mark.parametrize("factor", ["0.5", "-1", "nan", "slow"])
def test_an_engine_slowdown_below_one_is_refused(factor, capsys):
  with pytest.raises(SystemExit):
    build_parser().parse_args(["--engine-slowdown", factor])
  assert "--engine-slowdown" in capsys.readouterr().err


def node_built_with(*flags: str):
  """A node as `exo` builds it (not started), with a declared device (nothing probed) and the dummy engine."""
  return build_node(build_parser().parse_args(["--inference-engine", "dummy", *DEVICE.args(), *flags]))


def test_the_engine_slowdown_wraps_the_engine_and_a_bare_dummy_node_does_not_measure():
  manual = ("--discovery-module", "manual", "--discovery-config-path", "peers.json")
  slowed = node_built_with(*manual, "--engine-slowdown", "2.5")
  assert isinstance(slowed.engine, SlowedEngine) and slowed.engine.factor == 2.5 and not slowed.measure_layer_times
  emulated = node_built_with(*manual, "--emulate")
  assert emulated.measure_layer_times and not isinstance(emulated.engine, SlowedEngine)
  assert not node_built_with("--discovery-module", "none", "--emulate").measure_layer_times  # alone: no peers to plan with
