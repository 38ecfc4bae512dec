from dataclasses import replace

from rich.console import Console

from exo.base.device_capabilities import DeviceCapabilities, DeviceFlops, FileTransfer, LayerTimes
from exo.base.models import model_spec
from exo.base.wording import count, figure, short_id
from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.networking.discovery import NoDiscovery
from exo.orchestration.node import Node
from exo.orchestration.planner_driver import PlannerConfig
from exo.topology.plan_request import PlanRequest
from exo.viz.ring_view import RingView

PEER = "9ab1f7a6-da03-4d42-8376-94366751280b"
SELF = "32de3b14-6c3e-4b54-915e-8ef8ba8ebf86"


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


def rows(text: str) -> list[list[str]]:
  return [[cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]


def test_the_view_says_what_it_serves_from_the_start_in_words_and_figures_a_person_reads():
  caps = DeviceCapabilities("Linux Box", "AMD EPYC", 24105.26, DeviceFlops(0.0810593, 0.0810593, 0.0810593), 21.67061983897465)
  node = Node(SELF, DummyInferenceEngine(), NoDiscovery(), caps, model_spec("smollm2-135m"))
  text = rendered(node)
  assert text.splitlines()[0].strip() == f"exo node {SELF}: serving smollm2-135m; 1 node, strategy flops-latency (latency)"
  assert rows(text) == [["32de3b14 (this node)", "Linux Box (AMD EPYC)", "24105", "0.0811", "21.7", "-", "-", "-"]]
  node.topology.update_node(PEER, replace(caps, flops=DeviceFlops(27.2, 54.4), memory_bandwidth=1008.0))
  node.plan(node.model)
  text = rendered(node)
  assert text.splitlines()[0].strip() == f"exo node {SELF}: serving smollm2-135m; 2 nodes, strategy flops-latency (latency)"
  assert [row[:5] for row in rows(text)] == [
    ["32de3b14 (this node)", "Linux Box (AMD EPYC)", "24105", "0.0811", "21.7"],
    ["9ab1f7a6", "Linux Box (AMD EPYC)", "24105", "54.4", "1010"],
  ]
  assert "ring: 32de3b14 (smollm2-135m)\n" in text


def test_counts_figures_and_ids_for_a_person():
  assert [count(n, "node") for n in (0, 1, 3)] == ["0 nodes", "1 node", "3 nodes"]
  figures = [0.0810593, 54.4, 1008, 10.0, 999.6, 2.084, 0.0005, -3.14159, 0, 123456789]
  assert [figure(x) for x in figures] == ["0.0811", "54.4", "1010", "10", "1000", "2.08", "0.0005", "-3.14", "0", "123000000"]
  assert short_id(SELF) == "32de3b14" and short_id("studio") == "studio" and short_id("x" * 36) == "x" * 36
