from dataclasses import replace

from rich.console import Console

from exo.base.device_capabilities import DeviceCapabilities, DeviceFlops, FileTransfer, LayerTimes
from exo.base.models import model_spec
from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.networking.discovery import NoDiscovery
from exo.orchestration.node import Node
from exo.orchestration.planner_driver import PlannerConfig
from exo.topology.plan_request import PlanRequest
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


def test_the_view_shows_each_nodes_measured_ms_per_layer_for_the_served_model():
  model = model_spec("smollm2-135m")
  caps = DeviceCapabilities("Test", "chip", 4096, DeviceFlops(1, 2, 4), 10)
  node = Node("solo", DummyInferenceEngine(), NoDiscovery(), caps.with_layer_times(model.id, LayerTimes(2.08, 0.9)), model)
  node.topology.update_node("peer", caps.with_layer_times("another-model", LayerTimes(5.0, 1.0)))  # measured for another model only
  rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in rendered(node).splitlines() if line.startswith("│")]
  column = [cell.strip() for cell in next(line for line in rendered(node).splitlines() if line.startswith("┃")).split("┃")[1:-1]].index("ms/layer")
  assert {row[0]: row[column] for row in rows} == {"peer": "-", "solo (this node)": "2.08"}


def test_the_view_shows_the_chat_pages_address_first():
  node = Node(
    "solo", DummyInferenceEngine(), NoDiscovery(), DeviceCapabilities("Test", "chip", 4096, DeviceFlops(1, 2, 4), 10), model_spec("smollm2-135m")
  )
  console = Console(record=True, width=200)
  console.print(RingView(node, page_url="http://localhost:52415/").render())
  assert console.export_text().splitlines()[0] == "Chat page: http://localhost:52415/"
  assert "Chat page" not in rendered(node)  # a view without the API's address (none given) shows none


def test_the_view_shows_the_planned_context_and_the_models_when_it_is_less():
  caps = DeviceCapabilities("Test", "chip", 4096, DeviceFlops(1, 2, 4), 10)
  node = Node("solo", DummyInferenceEngine(), NoDiscovery(), caps, model_spec("smollm2-135m"), PlannerConfig(PlanRequest.of(max_context=2000)))
  assert "context:" not in rendered(node)  # no plan yet
  node.plan(node.model)
  assert "context: 2000 tokens per request, prompt and answer (of the model's 8192)" in rendered(node)
  node.planner.config, node.planner.current_plan = PlannerConfig(), None
  node.plan(node.model)
  assert "context: 8192 tokens per request, prompt and answer\n" in rendered(node)


def test_the_view_shows_files_arriving_at_nodes_with_progress_bars():
  caps = DeviceCapabilities("Test", "chip", 4096, DeviceFlops(1, 2, 4), 10)
  node = Node("solo", DummyInferenceEngine(), NoDiscovery(), caps, model_spec("smollm2-135m"))
  assert "arriving" not in rendered(node)
  node.topology.update_node("peer", replace(caps, transfers=(FileTransfer("org/m/model.gguf", 25_000_000, 100_000_000, "solo"),)))
  text = rendered(node)
  row = next(line for line in text.splitlines() if "org/m/model.gguf" in line)
  assert "model files arriving" in text and "peer" in row and "25.0 of 100.0 MB" in row and row.rstrip("│ ").endswith("solo")
  assert row.count("━") >= 7  # a quarter of the 30-character bar drawn
