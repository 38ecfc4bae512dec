"""Who may use the HTTP API, decided before any work: a web page of another origin (the issue's `text/plain` POST that needs no
preflight), a Host the node does not answer to (DNS rebinding), the key and its cookie; and request bodies, roles and model
ids that are refused with 400 before anything is resolved."""

import http.client
import json
import re
import socket
from http.cookies import SimpleCookie

import pytest

from exo.api.access import Access, allowed_origin, api_key
from exo.base.errors import BadInput
from exo.main import main
from tests.support.local_hub import LocalHub, tiny_checkpoint
from tests.support.node_process import exo_node
from tests.support.patience import STALL_S
from tests.support.served_api import MESSAGES, SERVED, Served

KEY = "k3y-for-tests-only_0123456789"
LISTED = "http://localhost:3000"
CHAT = json.dumps({"model": SERVED, "messages": MESSAGES, "max_tokens": 3})


def call(served: Served, method: str, path: str, body: str | bytes | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
  """(status, headers with lower-case names, raw body) of one request sent exactly as given (Host too; no redirect followed)."""
  connection = http.client.HTTPConnection("127.0.0.1", served.api.port, timeout=STALL_S)
  try:
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
  finally:
    connection.close()


def error(raw: bytes) -> dict:
  assert raw.count(b"\n") == 0  # one line
  return json.loads(raw)["error"]


@pytest.fixture
def served():
  served = Served(api_options={"origins": (LISTED,)})
  yield served
  served.close()


@pytest.fixture
def keyed():
  served = Served(api_options={"key": KEY})
  yield served
  served.close()


@pytest.fixture
def hub(tmp_path, monkeypatch):
  import huggingface_hub.constants

  server = LocalHub({"fill/a1": tiny_checkpoint(tmp_path / "source")}).start()
  monkeypatch.setenv("HF_ENDPOINT", server.url)
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
  monkeypatch.setenv("EXO_MODELS_DIR", str(tmp_path / "models"))
  yield server
  server.stop()


def test_the_issues_web_page_request_is_refused_and_downloads_nothing(hub, tmp_path):
  served = Served()
  try:
    body = json.dumps({"model": "fill/a1", "messages": [{"role": "user", "content": "hi"}]})
    status, headers, raw = call(served, "POST", "/v1/chat/completions", body, {"Origin": "http://evil", "Content-Type": "text/plain"})
    assert status == 403 and "'http://evil'" in error(raw)["message"] and "access-control-allow-origin" not in headers
    status, _, raw = call(served, "POST", "/v1/chat/completions", body, {"Content-Type": "text/plain"})  # no Origin: still not JSON
    assert status == 415 and "application/json" in error(raw)["message"]
    own = {"Origin": f"http://127.0.0.1:{served.api.port}", "Content-Type": "text/plain"}  # the node's own page must send JSON too
    assert call(served, "POST", "/v1/chat/completions", body, own)[0] == 415
    assert served.node.last_generation is None and served.node.load()["active_requests"] == 0
  finally:
    served.close()
  assert hub.requests == [] and not (tmp_path / "models").exists()


def test_a_listed_origin_gets_cors_headers_and_its_preflight_and_others_get_403(served):
  preflight = {"Origin": LISTED, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
  status, headers, _ = call(served, "OPTIONS", "/v1/chat/completions", headers=preflight)
  assert status == 204 and headers["access-control-allow-origin"] == LISTED and "POST" in headers["access-control-allow-methods"]
  assert {"authorization", "content-type"} <= {h.strip().lower() for h in headers["access-control-allow-headers"].split(",")}
  status, headers, raw = call(served, "POST", "/v1/chat/completions", CHAT, {"Origin": LISTED, "Content-Type": "application/json"})
  assert status == 200 and headers["access-control-allow-origin"] == LISTED and json.loads(raw)["object"] == "chat.completion"
  assert "access-control-allow-credentials" not in headers  # a cross-origin page sends the key, never the cookie
  for other in ("http://localhost:3001", "https://localhost:3000", "null"):
    status, headers, raw = call(served, "OPTIONS", "/v1/chat/completions", headers={**preflight, "Origin": other})
    assert status == 403 and error(raw)["code"] == "origin_not_allowed" and "access-control-allow-origin" not in headers
    assert call(served, "GET", "/v1/models", headers={"Origin": other})[0] == 403
  status, headers, _ = call(served, "GET", "/v1/models", headers={"Origin": f"http://127.0.0.1:{served.api.port}"})  # its own page
  assert status == 200 and "access-control-allow-origin" not in headers


@pytest.mark.parametrize(
  "host, status",
  [
    ("127.0.0.1:{port}", 200),
    ("localhost:{port}", 200),
    ("LocalHost.:{port}", 200),
    ("[::1]:{port}", 200),
    ("localhost:3000", 200),  # the host of a listed origin
    ("evil.example:{port}", 403),
    ("127.0.0.1.nip.io:{port}", 403),  # a name that resolves to loopback: what a rebinding page sends
    ("192.168.1.20:{port}", 403),  # an address, but not one a loopback-bound node answers to
    ("", 403),
  ],
)
def test_a_host_the_node_does_not_answer_to_is_refused(served, host, status):
  got, _, raw = call(served, "GET", "/v1/models", headers={"Host": host.format(port=served.api.port)})
  assert got == status
  if status == 403:
    assert error(raw)["code"] == "host_not_allowed"


def test_on_loopback_no_key_is_needed(served):
  assert served.api.access.key is None
  assert call(served, "POST", "/v1/chat/completions", CHAT, {"Content-Type": "application/json"})[0] == 200
  assert served.api.login_url == served.api.page_url  # nothing to carry


def test_with_a_key_every_api_call_needs_it_before_any_work(keyed):
  for path, method, body in [("/v1/chat/completions", "POST", CHAT), ("/v1/models", "GET", None), ("/v1/plan", "GET", None)]:
    for authorization in (None, "Bearer wrong-key-of-some-length", f"Basic {KEY}", KEY):
      headers = {"Content-Type": "application/json", **({"Authorization": authorization} if authorization else {})}
      status, response_headers, raw = call(keyed, method, path, body, headers)
      assert (status, response_headers["www-authenticate"], error(raw)["code"]) == (401, "Bearer", "invalid_api_key")
  assert keyed.node.current_plan is None and keyed.node.last_generation is None  # nothing was planned nor run
  status, _, raw = call(keyed, "POST", "/v1/chat/completions", CHAT, {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
  assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"]
  assert keyed.client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=3).choices[0].message.content  # OpenAI's client
  assert [call(keyed, "GET", path)[0] for path in ("/", "/static/chat.js", "/healthcheck")] == [200, 200, 200]  # no data in them


def test_the_key_url_sets_a_strict_http_only_cookie_that_the_page_then_uses(keyed):
  url = keyed.api.login_url
  assert url == f"http://127.0.0.1:{keyed.api.port}/?token={KEY}"
  assert call(keyed, "GET", "/?token=not-the-key-at-all")[0] == 401
  status, headers, _ = call(keyed, "GET", f"/?token={KEY}")
  assert status == 303 and headers["location"] == "/"  # the key leaves the address bar
  [(name, morsel)] = SimpleCookie(headers["set-cookie"]).items()
  assert (name, morsel.value, morsel["path"], morsel["samesite"], morsel["httponly"]) == (f"exo_api_key_{keyed.api.port}", KEY, "/", "Strict", True)
  cookie = {"Cookie": f"{name}={morsel.value}"}
  assert call(keyed, "GET", "/v1/models", headers=cookie)[0] == 200
  own_page = {**cookie, "Origin": f"http://127.0.0.1:{keyed.api.port}", "Content-Type": "application/json"}
  assert call(keyed, "POST", "/v1/chat/completions", CHAT, own_page)[0] == 200
  assert call(keyed, "GET", "/v1/models", headers={"Cookie": f"{name}=guess-{KEY}"})[0] == 401
  assert call(keyed, "GET", "/v1/models", headers={**cookie, "Origin": "http://evil"})[0] == 403  # a page elsewhere: refused first


def test_bound_beyond_loopback_a_key_is_generated_and_the_machines_names_are_hosts():
  key, generated = api_key(None, "0.0.0.0")
  assert generated and len(key) >= 40 and api_key(None, "0.0.0.0")[0] != key  # a fresh one each start
  assert api_key(None, "192.0.2.7")[1] and api_key(None, "::")[1]
  assert [api_key(None, h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost")] == [(None, False)] * 4
  assert api_key(KEY, "127.0.0.1") == (KEY, False) and api_key(KEY, "0.0.0.0") == (KEY, False)
  for bad in ("", "short", "with space in the middle", "x" * 257, "semi;colon-and-more-chars"):
    with pytest.raises(BadInput, match="--api-key"):
      api_key(bad, "0.0.0.0")
  everywhere, name = Access("0.0.0.0", key), socket.gethostname().lower()
  assert everywhere.host_allowed(f"{name}:52415") and everywhere.host_allowed("10.1.2.3:52415") and everywhere.host_allowed("[fe80::1]:52415")
  assert not everywhere.host_allowed("evil.example:52415") and not everywhere.host_allowed("10.1.2.3.nip.io")
  one = Access("192.0.2.7", key)  # a documentation address: nothing is bound to it
  assert one.host_allowed("192.0.2.7:52415") and one.host_allowed(name) and not one.host_allowed("198.51.100.1:52415")
  url = everywhere.login_url("http://localhost:52415/", "0.0.0.0", 52415)
  assert url.endswith(f":52415/?token={key}") and not url.startswith("http://localhost")  # an address other devices reach


def test_a_node_given_a_key_prints_the_page_url_carrying_it(tmp_path):
  args = ["--node-id", "keyed", "--discovery-module", "none", "--inference-engine", "dummy", "--disable-tui", "--api-key", KEY]
  with exo_node(args, tmp_path / "node.log") as (_, url):
    assert re.fullmatch(rf"http://127\.0\.0\.1:\d+/\?token={KEY}", url)


@pytest.mark.parametrize(
  "flags, names",
  [(["--api-key", "short"], "--api-key (or EXO_API_KEY) must be"), (["--allowed-origins", "http://ok:1,evil.example"], "'evil.example'")],
)
def test_bad_api_flags_are_one_line_before_the_node_starts(capsys, flags, names):
  assert main(["--inference-engine", "dummy", "--discovery-module", "none", "--disable-tui", *flags]) == 2
  out, err = capsys.readouterr()
  assert out == "" and err.count("\n") == 1 and err.startswith("exo: error: ") and names in err


def test_allowed_origins_are_origins():
  assert allowed_origin("HTTP://LocalHost:3000/") == "http://localhost:3000"
  for bad in ("localhost:3000", "ftp://host", "http://host/path", "http://", "http://user@host", "http://host:99999"):
    with pytest.raises(BadInput, match="--allowed-origins"):
      allowed_origin(bad)


# Bodies, roles and model ids refused before anything is resolved.


def post(served: Served, body: str | bytes) -> tuple[int, dict]:
  status, _, raw = call(served, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
  return status, error(raw)


@pytest.mark.parametrize("role", ["tool", "function", "<script>", "", "developer", "USER"])
def test_a_role_other_than_system_user_assistant_is_a_400_naming_it(served, role):
  status, e = post(served, json.dumps({"model": SERVED, "messages": [{"role": role, "content": "hi"}]}))
  assert status == 400 and e["param"] == "messages[0].role" and f"got {role!r}" in e["message"] and "system, user, assistant" in e["message"]


def test_a_huge_model_id_is_a_400_that_does_not_echo_it(served):
  status, e = post(served, json.dumps({"model": "a" * 100_000, "messages": MESSAGES}))
  assert status == 400 and e["param"] == "model" and "at most 1024" in e["message"] and len(e["message"]) < 300
  status, e = post(served, json.dumps({"model": "/tmp/\x00x", "messages": MESSAGES}))
  assert status == 400 and e["param"] == "model"


def test_a_path_that_is_not_a_model_gets_the_400_of_a_path_that_is_not_there(served, tmp_path):
  (tmp_path / "secret").mkdir()
  (tmp_path / "secret" / "config.json").write_text(json.dumps({"model_type": "very_private_kind"}))
  (tmp_path / "empty").mkdir()
  messages = {}
  for name in ("secret", "empty", "absent"):
    path = str(tmp_path / name)
    status, e = post(served, json.dumps({"model": path, "messages": MESSAGES}))
    assert status == 400 and e["code"] == "model_not_found"
    messages[name] = e["message"].replace(path, "PATH")
  assert messages["secret"] == messages["empty"] == messages["absent"] and "very_private_kind" not in messages["secret"]


def nested(depth: int) -> list:
  """Lists nested `depth` deep."""
  value: list = []
  for _ in range(depth - 1):
    value = [value]
  return value


@pytest.mark.parametrize(
  "body",
  [
    "[" * 100_000 + "]" * 100_000,  # beyond the JSON parser's recursion
    json.dumps({"model": SERVED, "messages": MESSAGES, "extra": nested(32)}),  # 33 levels with the body's object
    json.dumps({"model": SERVED, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "x": nested(28)}]}]}),  # 5 + 28
  ],
  ids=["100000-deep", "33-deep-extra", "33-deep-in-content"],
)
def test_deeply_nested_json_is_a_400(served, body):
  status, e = post(served, body)
  assert status == 400 and "nests deeper than 32 levels" in e["message"]


def test_json_nested_32_deep_is_parsed(served):
  status, _, raw = call(
    served, "POST", "/v1/chat/completions", json.dumps({**json.loads(CHAT), "extra": nested(31)}), {"Content-Type": "application/json"}
  )
  assert status == 200 and json.loads(raw)["object"] == "chat.completion"


def test_a_body_beyond_a_mebibyte_is_a_413(served):
  status, e = post(served, json.dumps({"model": SERVED, "messages": [{"role": "user", "content": "x" * 2**20}]}))
  assert status == 413 and "larger than 1048576 bytes" in e["message"]


def test_every_api_needs_the_key_and_anthropics_clients_send_it_as_x_api_key(keyed):
  messages = json.dumps({"model": SERVED, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
  for path in ("/v1/messages", "/v1/responses", "/v1/completions", "/api/chat", "/api/generate"):
    assert call(keyed, "POST", path, messages, {"Content-Type": "application/json"})[0] == 401
  assert call(keyed, "GET", "/api/tags")[0] == 401
  wrong = {"Content-Type": "application/json", "x-api-key": "wrong-key-of-some-length"}
  assert call(keyed, "POST", "/v1/messages", messages, wrong)[0] == 401
  status, _, raw = call(keyed, "POST", "/v1/messages", messages, {"Content-Type": "application/json", "x-api-key": KEY})
  assert status == 200 and json.loads(raw)["type"] == "message" and json.loads(raw)["usage"]["output_tokens"] == 3
