"""An OpenAI-compatible HTTP API in front of a node: chat completions (plain and streamed), the model list, and the node's live
topology and plan; and at `/` the chat page (exo/api/static), which chats through that API and shows the ring as it runs. The
same app serves OpenAI's completions and responses (openai_text.py), Anthropic's messages (anthropic_api.py) and Ollama's API
(ollama_api.py), each a translation onto the one request path (serving.py).

Any node can serve it: a request is planned and run by the node that receives it, as one from `exo run`. A request whose
prompt plus `max_tokens` exceeds the planned context (the plan's `context_tokens`) is refused with 400 naming both; without
`max_tokens` the answer may fill the context; either way it is capped at the node's --max-generate-tokens. Sampling:
`temperature` 0 to 2, absent 0 (greedy: unlike OpenAI's default of 1, a request that does not ask for sampling gets the one
reproducible answer); `top_p`; `top_k` (not OpenAI's; 0: every token);
`seed` (0 to 2**63 - 1: the same seed gives the same answer); `stop`, a string or up to 4 (the answer ends before the first
that occurs, with finish_reason "stop"; a stream holds back text that may be the start of one).

Before any work, every request passes exo.api.access (its Host, its Origin, the key), and a POST must carry a JSON body
(`Content-Type: application/json`, at most MAX_BODY_BYTES, nested at most MAX_JSON_DEPTH deep): a web page the user visits
cannot drive the node. A request the node could not finish in time next to those it runs gets 429 with `Retry-After`
(ServingNode.admit).
"""

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path

from aiohttp import web

from exo.api.access import Access
from exo.api.anthropic_api import AnthropicMessages
from exo.api.api_errors import ERROR_TYPES, BadRequest, error_body, error_response, shown
from exo.api.chat_request import MAX_BODY_BYTES, parse_messages, parse_sampling, parse_stop, positive_int
from exo.api.completion import Completion
from exo.api.ollama_api import OllamaAPI
from exo.api.openai_text import OpenAIText
from exo.api.serving import Refusal, RequestPath, TextRequest, openai_error, read_json, refusal, sse_response
from exo.base.errors import ExoError
from exo.base.model_spec import ModelSpec
from exo.base.models import MODELS
from exo.inference.downloads import may_download
from exo.inference.model_figures import model_spec_for
from exo.inference.model_files import present
from exo.inference.model_sources import is_repo_id, local_path
from exo.orchestration.service import ServingNode
from exo.topology.flops_latency_partitioning_strategy import DEFAULT_PROMPT_TOKENS
from exo.topology.holdings import downloads

log = logging.getLogger(__name__)
DEFAULT_PORT = 52415  # upstream's --chatgpt-api-port
PREFLIGHT_HEADERS = {  # for an origin listed with --allowed-origins
  "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
  "Access-Control-Allow-Headers": "Authorization, Content-Type",
  "Access-Control-Max-Age": "600",
}
MAX_MODEL_ID = 1024  # characters of a model id or path
COOKIE_MAX_AGE_S = 30 * 24 * 3600
STATIC_DIR = Path(__file__).parent / "static"  # the chat page: plain files shipped with the package, nothing fetched from elsewhere
STATIC_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript"}


class ChatGPTAPI:
  """`key` (exo.api.access.api_key) None: served without one; `origins`: the cross origins allowed (--allowed-origins)."""

  def __init__(self, node: ServingNode, host: str = "127.0.0.1", port: int = DEFAULT_PORT, key: str | None = None, origins: tuple[str, ...] = ()):
    self.node, self.host, self.port = node, host, port
    self.access = Access(host, key, origins)
    self.app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY_BYTES)
    self.app.on_response_prepare.append(self._add_cors)
    self.app.router.add_get("/", self.handle_static)
    self.app.router.add_get("/static/{name}", self.handle_static)
    self.app.router.add_get("/healthcheck", self.handle_healthcheck)
    self.app.router.add_get("/v1/models", self.handle_models)
    self.app.router.add_get("/v1/models/{model_id}", self.handle_model)
    self.app.router.add_post("/v1/chat/completions", self.handle_chat_completions)
    self.app.router.add_get("/v1/topology", self.handle_topology)
    self.app.router.add_get("/v1/plan", self.handle_plan)
    self.runner: web.AppRunner | None = None
    self.path = RequestPath(node, self.resolve_model)
    self.app.router.add_routes([*OpenAIText(self).routes(), *AnthropicMessages(self).routes(), *OllamaAPI(self).routes()])

  async def start(self) -> None:
    """Listen on host:port (port 0 picks a free one, stored in self.port); OSError if the address cannot be bound."""
    if self.runner is not None:
      return
    runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0, handler_cancellation=True)  # a client gone: its request stops
    await runner.setup()
    try:
      await web.TCPSite(runner, self.host, self.port).start()
    except OSError as e:
      await runner.cleanup()
      raise OSError(f"the ChatGPT API could not listen on {self.host}:{self.port}: {os.strerror(e.errno) if e.errno else e}") from e
    self.runner, self.port = runner, runner.addresses[0][1]
    self.access.set_port(self.port)

  @property
  def page_url(self) -> str:
    """The chat page's address; on a wildcard address, this machine's own name for itself."""
    host = "localhost" if self.host in ("", "0.0.0.0", "::") else self.host
    return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"

  @property
  def login_url(self) -> str:
    """The URL to open the chat page with: with a key, it carries it (opened once, it sets the key's cookie)."""
    return self.access.login_url(self.page_url, self.host, self.port)

  async def stop(self) -> None:
    if self.runner is not None:
      await self.runner.cleanup()
      self.runner = None

  # ---------- access: before any work (exo.api.access) ----------

  @web.middleware
  async def _guard(self, request: web.Request, handler):
    """Host, then Origin, then (for all but the page's files and /healthcheck) the key, then a JSON body for a POST."""
    access, host, origin = self.access, request.headers.get("Host"), request.headers.get("Origin")
    if not access.host_allowed(host):
      message = f"host {shown(host)} is not allowed: this node answers to its own names and addresses (others: --allowed-origins)"
      return error_response(403, message, code="host_not_allowed")
    if access.origin_refused(origin, host):
      return error_response(403, f"origin {shown(origin)} may not use this node's API (allow it with --allowed-origins)", code="origin_not_allowed")
    if request.method == "OPTIONS":
      return web.Response(status=204, headers=PREFLIGHT_HEADERS if access.cross_origin(origin) else None)
    if access.key is not None and request.path == "/" and "token" in request.query:
      return self.log_in(request.query["token"])
    public = request.path in ("/", "/healthcheck") or request.path.startswith("/static/")
    key = request.headers.get("Authorization") or (
      f"Bearer {request.headers['x-api-key']}" if "x-api-key" in request.headers else None
    )  # Anthropic's
    if not public and not access.authorized(key, request.cookies.get(access.cookie)):
      message = "this node's API needs its key: send 'Authorization: Bearer KEY', or open the chat page at the URL with ?token=KEY the node printed"
      return error_response(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if request.method == "POST" and request.content_type != "application/json":
      return error_response(415, f"a POST body must be JSON, sent with 'Content-Type: application/json', got {shown(request.content_type)}")
    return await handler(request)

  def log_in(self, token: str) -> web.Response:
    """`/?token=KEY`: set the key's cookie (HttpOnly: no script reads it; SameSite=Strict: no other site's page sends it) and
    send the browser to the page without the key in its address."""
    if not self.access.matches(token):
      return error_response(401, "the token in this URL is not this node's key", code="invalid_api_key")
    response = web.Response(status=303, headers={"Location": "/", "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})
    response.set_cookie(self.access.cookie, self.access.key, max_age=COOKIE_MAX_AGE_S, path="/", httponly=True, samesite="Strict")
    return response

  async def _add_cors(self, request: web.Request, response: web.StreamResponse) -> None:
    """An origin listed with --allowed-origins may read the answers (no credentials: a cross-origin client sends the key)."""
    origin = request.headers.get("Origin")
    if self.access.cross_origin(origin):
      response.headers.update({"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": "Retry-After", "Vary": "Origin"})

  # ---------- small endpoints ----------

  async def handle_static(self, request: web.Request) -> web.Response:
    name = request.match_info.get("name", "index.html")
    path = STATIC_DIR / name
    if path.parent != STATIC_DIR or path.suffix not in STATIC_TYPES or not path.is_file():  # a file of the folder itself, never above it
      return error_response(404, f"no file {name!r} in the chat page", "not_found_error")
    return web.Response(body=path.read_bytes(), content_type=STATIC_TYPES[path.suffix], charset="utf-8", headers={"Cache-Control": "no-cache"})

  async def handle_healthcheck(self, request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})

  def model_ids(self) -> list[str]:
    """The served model first, then every other built-in one."""
    return [self.node.model.id, *(m for m in MODELS if m != self.node.model.id)]

  def model_object(self, model_id: str, fits: bool | None = None) -> dict:
    """OpenAI's model object, with what this node can do with it now: `present`, whether it has what its engine needs to serve
    the model (a model file engine all its files; the request's tokenizer runs here); `downloadable`, whether it would fetch
    them from the hub now (not offline, allowed by --allow-downloads); `fits`, whether the cluster holds it (a plan exists; None:
    not asked); `max_tokens`, the longest answer it gives (--max-generate-tokens)."""
    present = self.has_files(model_id)
    downloadable = self.node.reads_model_files() and may_download(model_id)
    return {
      "id": model_id, "object": "model", "created": 0, "owned_by": "exo", "present": present, "downloadable": downloadable, "fits": fits,
      "max_tokens": self.node.max_generate_tokens,
    }  # fmt: skip

  def has_files(self, model_id: str) -> bool:
    return not self.node.reads_model_files() or present(model_id)

  def fits(self, model_id: str) -> bool:
    """Whether the cluster can hold `model_id` now: a plan exists for it on the live topology."""
    try:
      self.node.candidate_plan(self.node.model if model_id == self.node.model.id else MODELS[model_id])
    except ExoError:
      return False
    return True

  async def handle_models(self, request: web.Request) -> web.Response:
    ids = self.model_ids()
    fits = await asyncio.to_thread(lambda: [self.fits(m) for m in ids])
    return web.json_response({"object": "list", "data": [self.model_object(m, f) for m, f in zip(ids, fits)]})

  async def handle_model(self, request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    if model_id not in self.model_ids():
      return error_response(404, self.unknown_model_message(model_id), "invalid_request_error", "model", "model_not_found")
    return web.json_response(self.model_object(model_id))

  async def handle_topology(self, request: web.Request) -> web.Response:
    return web.json_response(self.node.topology.to_dict())

  async def handle_plan(self, request: web.Request) -> web.Response:
    try:
      plan = self.node.current_prediction() or await asyncio.to_thread(self.node.candidate_plan, self.node.model)  # a read adopts nothing
    except ExoError as e:
      return error_response(e.http_status, str(e), ERROR_TYPES[e.http_status])
    # what each ring node still fetches, from the holdings announced now (none for an engine that reads no model files)
    fetched = downloads(self.node.planning_topology(), plan.model, plan.stages) if self.node.reads_model_files() else []
    downloads_now = [d.to_dict() for d in fetched]
    assumes = {"prompt_tokens": DEFAULT_PROMPT_TOKENS, "batch": plan.params.batch}  # what the predicted TTFT and throughput are for
    load, last = self.node.load(), self.last_request()
    return web.json_response(
      {**plan.to_dict(), "assumes": assumes, "downloads": downloads_now, "load": load, "node_id": self.node.id, "last_request": last}
    )

  def last_request(self) -> dict | None:
    """The last request this node received, whatever its outcome, with what its plan predicts for its own prompt and answer:
    the chat page shows the two side by side."""
    last = self.node.last_request
    return None if last is None else last.to_dict()

  # ---------- chat completions ----------

  def unknown_model_message(self, model_id) -> str:
    """The models this node can serve now (its files are here, or it would fetch them), then the other ways to name one."""
    servable = [m for m in self.model_ids() if self.has_files(m) or (self.node.reads_model_files() and may_download(m))]
    return f"unknown model {model_id!r}; this node can serve {', '.join(servable)}, a Hugging Face repo id (owner/name) or a model path"

  def requested_model(self, model_id) -> str | None:
    """The request's "model" if it names one a node can serve (the served one, a built-in id, a Hugging Face repo id or a path
    on this node), else a 400."""
    if model_id is not None and not isinstance(model_id, str):
      raise BadRequest(f"'model' must be a string, got {shown(model_id)}", "model")
    if model_id is not None and (len(model_id) > MAX_MODEL_ID or not model_id.isprintable()):
      raise BadRequest(f"'model' must be a model id or path of at most {MAX_MODEL_ID} printable characters, got {shown(model_id)}", "model")
    if model_id is None or model_id in self.model_ids() or is_repo_id(model_id) or local_path(model_id):
      return model_id
    raise BadRequest(self.unknown_model_message(model_id), "model", "model_not_found")

  async def resolve_model(self, model_id: str | None) -> ModelSpec:
    """The spec of a requested model (model_figures.model_spec_for): a repo that is not on this node is downloaded first. A path
    that is not a model gets the 400 of a path that is not there, whatever is at it: the API tells a client nothing of the
    node's files (the operator's log says why)."""
    if model_id is None or model_id == self.node.model.id:
      return self.node.model
    try:
      return await asyncio.to_thread(model_spec_for, model_id, self.node.reads_model_files(), self.node.files)
    except Exception as e:
      if model_id in self.model_ids() or is_repo_id(model_id):
        raise
      log.info("model path %r requested through the API is not a model: %s: %s", model_id, type(e).__name__, e)
      raise BadRequest(self.unknown_model_message(model_id), "model", "model_not_found") from None

  async def handle_chat_completions(self, request: web.Request) -> web.StreamResponse:
    try:
      data = await read_json(request)
      max_tokens = positive_int(data, "max_completion_tokens") or positive_int(data, "max_tokens")
      asked = TextRequest(
        self.requested_model(data.get("model")), parse_messages(data.get("messages")), None, max_tokens, parse_sampling(data), parse_stop(data)
      )
      if data.get("n", 1) != 1:
        raise BadRequest(f"'n' must be 1 (one choice per request), got {data['n']!r}", "n")
      stream = data.get("stream", False)
      if not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be true or false, got {stream!r}", "stream")
      stream_options = data.get("stream_options") or {}
      if not isinstance(stream_options, dict):
        raise BadRequest(f"'stream_options' must be an object, got {stream_options!r}", "stream_options")
      async with self.path.opened(asked) as completion:
        if stream:
          return await self.stream(request, completion, bool(stream_options.get("include_usage")))
        generation = await self.path.whole(completion)
        body = completion.chunk("chat.completion", {"role": "assistant", "content": generation.text}, generation.finish_reason)
        body["usage"] = await completion.usage(generation.tokens)
        return web.json_response(body)
    except (BadRequest, Refusal) as e:
      return openai_error(refusal(e))

  async def stream(self, request: web.Request, completion: Completion, include_usage: bool) -> web.StreamResponse:
    """Server-sent events: one chunk per new piece of text, a chunk with the finish reason, optionally usage, then [DONE]; a
    failure after the first event is an error chunk."""
    response = await sse_response(request)

    async def send(payload) -> None:
      await response.write(f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode())

    with contextlib.suppress(ConnectionResetError):  # a client gone: RequestPath.pieces cancels the request
      await send(completion.chunk("chat.completion.chunk", {"role": "assistant", "content": ""}, None))
      try:
        async for piece in self.path.pieces(completion):
          if isinstance(piece, str):
            await send(completion.chunk("chat.completion.chunk", {"content": piece}, None))
            continue
          await send(completion.chunk("chat.completion.chunk", {}, piece.finish_reason))
          if include_usage:
            await send({**completion.chunk("chat.completion.chunk", {}, None), "choices": [], "usage": await completion.usage(piece.tokens)})
      except Refusal as e:
        await send(error_body(e.message, ERROR_TYPES.get(e.status, "internal_error")))
      await send("[DONE]")
      await response.write_eof()
    return response
