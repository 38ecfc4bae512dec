from rich.console import Console

from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.models import model_spec
from exo.networking.discovery import NoDiscovery
from exo.orchestration.node import Node
from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops
from exo.viz.ring_view import RingView


def rendered(node: Node) -> str:
  console = Console(record=True, width=200)
  console.print(RingView(node).render())
  return console.export_text()


def test_the_view_says_when_new_work_waits_for_memory():
  node = Node(
    "solo", DummyInferenceEngine(), NoDiscovery(), DeviceCapabilities("Test", "chip", 4096, DeviceFlops(1, 2, 4), 10), model_spec("smollm2-135m")
  )
  assert "engine:" not in rendered(node)
  node.engine.waiting = "layers 0-14 wait for the requests on layers 0-29 to finish: both do not fit in memory"
  assert "engine: layers 0-14 wait for the requests on layers 0-29 to finish" in rendered(node)
