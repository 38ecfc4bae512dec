"""An OpenAI-compatible HTTP API in front of a node: chat completions (plain and streamed), the model list, and the node's live
topology and plan; and at `/` the chat page (exo/api/static), which chats through that API and shows the ring as it runs.

Any node can serve it: a request is planned and run by the node that receives it, as one from `exo run`. A request whose
prompt plus `max_tokens` exceeds the planned context (the plan's `context_tokens`) is refused with 400 naming both; without
`max_tokens` the answer may fill the context; either way it is capped at the node's --max-generate-tokens. Sampling:
`temperature` 0 to 2, absent 0 (greedy: unlike OpenAI's default of 1, a request that does not ask for sampling gets the one
reproducible answer); `top_p`; `top_k` (not OpenAI's; 0: every token);
`seed` (0 to 2**63 - 1: the same seed gives the same answer); `stop`, a string or up to 4 (the answer ends before the first
that occurs, with finish_reason "stop"; a stream holds back text that may be the start of one).
"""

import asyncio
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Callable

from aiohttp import web

from exo.errors import BadInput, Busy, ExoError
from exo.inference.engine_wrapper import EngineWrapper
from exo.inference.model_figures import model_spec_for
from exo.inference.model_file_engine import ModelFileEngine
from exo.inference.model_files import present
from exo.inference.model_sources import is_repo_id, local_path, model_sources
from exo.inference.sampling import MAX_SEED, MAX_TOP_K, Sampling
from exo.inference.shard import Shard
from exo.orchestration.node import Admission, Generation, Node, RequestFailed
from exo.orchestration.stop_strings import MAX_STOP_STRINGS, visible_text
from exo.topology.model_spec import ModelSpec
from exo.topology.models import MODELS

log = logging.getLogger(__name__)
DEFAULT_PORT = 52415  # upstream's --chatgpt-api-port
CORS_HEADERS = {
  "Access-Control-Allow-Origin": "*",
  "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
  "Access-Control-Allow-Headers": "*",
  "Access-Control-Expose-Headers": "*",
}
STATIC_DIR = Path(__file__).parent / "static"  # the chat page: plain files shipped with the package, nothing fetched from elsewhere
STATIC_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript"}


class BadRequest(BadInput):
  """A request the API rejects with 400; `param` names the offending field, `code` is OpenAI's error code."""

  def __init__(self, message: str, param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.param, self.code = param, code


ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable"}


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> web.Response:
  return web.json_response(error_body(message, kind, param, code), status=status)


def failure(model: ModelSpec, e: Exception) -> tuple[dict, int]:
  """The error body and status for a request that failed after it was accepted: the status an ExoError carries (a missing model
  404, a cluster that cannot serve it 503), 503 for a failed ring, 500 for a bug."""
  if isinstance(e, ExoError):
    return error_body(f"the cluster could not serve {model.id}: {e}", ERROR_TYPES[e.http_status]), e.http_status
  if isinstance(e, RequestFailed):
    return error_body(f"the cluster could not serve {model.id}: {e}", "service_unavailable"), 503
  log.error("a chat completion for %s failed", model.id, exc_info=e)
  return error_body(f"the chat completion for {model.id} failed: {type(e).__name__}: {e}", "internal_error"), 500


def full_shard(model: ModelSpec) -> Shard:
  """Every layer of `model`: tokenizers and templates are per model, so any full-range shard serves to encode and decode."""
  return Shard(model.id, 0, model.n_layers - 1, model.n_layers)


def message_text(content, index: int) -> str:
  """A message's content as text: a string, or the text parts of a list of content parts."""
  if isinstance(content, str):
    return content
  if isinstance(content, list) and all(isinstance(p, dict) for p in content):
    if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
      raise BadRequest(f"messages[{index}].content may only hold text parts; this node serves text models", f"messages[{index}].content")
    return "".join(p["text"] for p in content)
  raise BadRequest(f"messages[{index}].content must be a string or a list of text parts, got {content!r}", f"messages[{index}].content")


def parse_messages(messages) -> list[dict]:
  if not isinstance(messages, list) or not messages:
    raise BadRequest(f"'messages' must be a non-empty list of {{role, content}} objects, got {messages!r}", "messages")
  parsed = []
  for index, message in enumerate(messages):
    if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
      raise BadRequest(f"messages[{index}] must be an object with a string 'role' and a 'content', got {message!r}", f"messages[{index}]")
    parsed.append({"role": message["role"], "content": message_text(message["content"], index)})
  return parsed


def positive_int(data: dict, key: str) -> int | None:
  value = data.get(key)
  if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
    raise BadRequest(f"'{key}' must be an integer >= 1, got {value!r}", key)
  return value


def parse_sampling(data: dict) -> Sampling:
  """The request's temperature, top_p, top_k and seed; 400 naming the first bad one."""

  def field(key: str, default, valid, expected: str):
    value = data.get(key)
    if value is None:
      return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):  # a NaN fails `valid` too
      raise BadRequest(f"'{key}' must be {expected}, got {value!r}", key)
    return value

  temperature = field("temperature", 0.0, lambda v: 0 <= v <= 2, "a number from 0 (greedy) to 2")
  top_p = field("top_p", 1.0, lambda v: 0 < v <= 1, "a number above 0 and at most 1")
  top_k = field("top_k", 0, lambda v: isinstance(v, int) and 0 <= v <= MAX_TOP_K, f"an integer from 0 (every token) to {MAX_TOP_K}")
  seed = field("seed", None, lambda v: isinstance(v, int) and 0 <= v <= MAX_SEED, "an integer from 0 to 2**63 - 1")
  return Sampling(temperature, top_p, top_k, seed)


def parse_stop(data: dict) -> tuple[str, ...]:
  stop = data.get("stop")
  if stop is None:
    return ()
  stop = [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
    raise BadRequest(f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them, got {data['stop']!r}", "stop")
  return tuple(stop)


class ChatGPTAPI:
  def __init__(self, node: Node, host: str = "0.0.0.0", port: int = DEFAULT_PORT):
    self.node, self.host, self.port = node, host, port
    self.app = web.Application(middlewares=[self._preflight])
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

  @property
  def page_url(self) -> str:
    """The chat page's address; on a wildcard address, this machine's own name for itself."""
    host = "localhost" if self.host in ("", "0.0.0.0", "::") else self.host
    return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"

  async def stop(self) -> None:
    if self.runner is not None:
      await self.runner.cleanup()
      self.runner = None

  # ---------- CORS: allow every origin, as upstream ----------

  @web.middleware
  async def _preflight(self, request: web.Request, handler):
    if request.method == "OPTIONS":
      return web.Response(status=204)
    return await handler(request)

  async def _add_cors(self, request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(CORS_HEADERS)

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

  def model_object(self, model_id: str) -> dict:
    """OpenAI's model object, with `present`: whether this node has what its engine needs to serve the model (a model file
    engine all its files; the request's tokenizer runs here), and `downloadable`: whether a node without them fetches them
    from the Hugging Face Hub when asked to serve it (exo.inference.model_sources)."""
    present = self.has_files(model_id)
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "exo", "present": present, "downloadable": bool(model_sources(model_id))}

  def file_engine(self) -> ModelFileEngine | None:
    """The node's engine if it serves models from files (under any wrappers)."""
    engine = self.node.engine
    while isinstance(engine, EngineWrapper):
      engine = engine.inner
    return engine if isinstance(engine, ModelFileEngine) else None

  def has_files(self, model_id: str) -> bool:
    return self.file_engine() is None or present(model_id)

  async def handle_models(self, request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [self.model_object(m) for m in self.model_ids()]})

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
    return web.json_response({**plan.to_dict(), "load": self.node.load(), "node_id": self.node.id, "last_request": self.last_request()})

  def last_request(self) -> dict | None:
    """What the last request this node received measured, next to what its plan predicted: the chat page compares them."""
    last = self.node.last_generation
    if last is None:
      return None
    ring = [node_id for node_id, _ in last.plan.node_shards()]
    return {
      "model": last.plan.model.id,
      "ring": ring,
      "tokens": len(last.tokens),
      "elapsed_s": last.elapsed_s,
      "predicted": last.plan.prediction.to_dict(),
    }

  # ---------- chat completions ----------

  def unknown_model_message(self, model_id) -> str:
    return f"unknown model {model_id!r}; this node serves {', '.join(self.model_ids())}, a Hugging Face repo id (owner/name) or a model path"

  def requested_model(self, model_id) -> str | None:
    """The request's "model" if it names one a node can serve (the served one, a built-in id, a Hugging Face repo id or a path
    on this node), else a 400."""
    if model_id is None or (isinstance(model_id, str) and (model_id in self.model_ids() or is_repo_id(model_id) or local_path(model_id))):
      return model_id
    raise BadRequest(self.unknown_model_message(model_id), "model", "model_not_found")

  async def resolve_model(self, model_id: str | None) -> ModelSpec:
    """The spec of a requested model (model_figures.model_spec_for): a repo that is not on this node is downloaded first."""
    if model_id is None or model_id == self.node.model.id:
      return self.node.model
    return await asyncio.to_thread(model_spec_for, model_id, self.file_engine() is not None)

  async def handle_chat_completions(self, request: web.Request) -> web.StreamResponse:
    try:
      try:
        data = await request.json()
      except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("the request body must be a JSON object") from None
      if not isinstance(data, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(data).__name__}")
      model_id = self.requested_model(data.get("model"))
      messages = parse_messages(data.get("messages"))
      max_tokens = positive_int(data, "max_completion_tokens") or positive_int(data, "max_tokens")
      if data.get("n", 1) != 1:
        raise BadRequest(f"'n' must be 1 (one choice per request), got {data['n']!r}", "n")
      sampling, stop = parse_sampling(data), parse_stop(data)
      stream = data.get("stream", False)
      if not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be true or false, got {stream!r}", "stream")
      stream_options = data.get("stream_options") or {}
      if not isinstance(stream_options, dict):
        raise BadRequest(f"'stream_options' must be an object, got {stream_options!r}", "stream_options")
    except BadRequest as e:
      return error_response(e.http_status, str(e), "invalid_request_error", e.param, e.code)
    try:
      model = await self.resolve_model(model_id)
    except ExoError as e:  # not found here nor at the hub (404), or the hub cannot be reached (503)
      return error_response(e.http_status, str(e), ERROR_TYPES[e.http_status], "model", "model_not_found" if e.http_status == 404 else None)
    shard = full_shard(model)
    try:
      prompt = await self.node.engine.apply_chat_template(shard, messages)
    except Exception as e:
      body, status = failure(model, e)
      return web.json_response(body, status=status)
    try:  # before anything streams: a node full (429), a prompt and max_tokens beyond the planned context (400), no plan (503)
      admission = await self.node.admit(prompt, model, max_tokens)
    except BadInput as e:  # as OpenAI's API says it
      return error_response(e.http_status, str(e), "invalid_request_error", "messages", "context_length_exceeded")
    except Busy as e:
      return error_response(e.http_status, str(e), ERROR_TYPES[e.http_status])
    except ExoError as e:
      body, status = failure(model, e)
      return web.json_response(body, status=status)
    completion = Completion(self.node, model, shard, prompt, admission, sampling, stop)
    if stream:
      return await self.stream(request, completion, bool(stream_options.get("include_usage")))
    try:
      generation = await completion.generate()
    except Exception as e:
      body, status = failure(model, e)
      return web.json_response(body, status=status)
    body = completion.chunk("chat.completion", {"role": "assistant", "content": generation.text}, generation.finish_reason)
    body["usage"] = await completion.usage(generation.tokens)
    return web.json_response(body)

  async def stream(self, request: web.Request, completion: "Completion", include_usage: bool) -> web.StreamResponse:
    """Server-sent events: one chunk per new piece of text, a chunk with the finish reason, optionally usage, then [DONE]."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(payload) -> None:
      await response.write(f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode())

    updates: asyncio.Queue = asyncio.Queue()  # token lists so far; None once the generation is over
    task = asyncio.create_task(completion.generate(on_token=updates.put_nowait))
    task.add_done_callback(lambda _: updates.put_nowait(None))
    sent = ""
    try:
      await send(completion.chunk("chat.completion.chunk", {"role": "assistant", "content": ""}, None))
      while (tokens := await updates.get()) is not None:
        while not updates.empty():  # a slow client gets the latest state, not every step; the end is sent from the result
          tokens = updates.get_nowait()
        if tokens is None:
          break
        visible = (await completion.text(tokens)).rstrip("\ufffd")  # an unfinished multi-byte character may still change
        visible = visible_text(visible, completion.stop)[0]  # never text after a stop string, nor what may begin one
        if visible.startswith(sent) and len(visible) > len(sent):
          await send(completion.chunk("chat.completion.chunk", {"content": visible[len(sent) :]}, None))
          sent = visible
      try:
        generation = await task
      except Exception as e:
        await send(failure(completion.model, e)[0])
        await send("[DONE]")
        return response
      text = generation.text
      rest = text[len(sent) :]
      if not text.startswith(sent):  # a tokenizer revised text already sent: the client's copy cannot be corrected
        log.warning("streamed text of %s was revised after it was sent", completion.model.id)
        rest = text[len(os.path.commonprefix([sent, text])) :]
      if rest:
        await send(completion.chunk("chat.completion.chunk", {"content": rest}, None))
      await send(completion.chunk("chat.completion.chunk", {}, generation.finish_reason))
      if include_usage:
        await send({**completion.chunk("chat.completion.chunk", {}, None), "choices": [], "usage": await completion.usage(generation.tokens)})
      await send("[DONE]")
      await response.write_eof()
    except ConnectionResetError:
      log.info("client of a streamed %s completion went away", completion.model.id)
    finally:
      task.cancel()  # a client that went away leaves no generation running (a no-op once it is over)
    return response


class Completion:
  """One chat completion request: its prompt, and the OpenAI objects built from the tokens generated so far."""

  def __init__(self, node: Node, model: ModelSpec, shard: Shard, prompt: str, admission: Admission, sampling: Sampling, stop: tuple[str, ...]):
    self.node, self.model, self.shard, self.prompt, self.admission = node, model, shard, prompt, admission
    self.sampling, self.stop = sampling, stop
    self.id, self.created = f"chatcmpl-{uuid.uuid4()}", int(time.time())

  async def generate(self, on_token: Callable[[list[int]], None] | None = None) -> Generation:
    """On the plan the request was admitted with, for the tokens it was admitted for."""
    admission = self.admission
    return await self.node.generate(self.prompt, self.model, admission.max_tokens, on_token, self.sampling, self.stop, admission.plan)

  def ended(self, tokens: list[int]) -> bool:
    return bool(tokens) and tokens[-1] in self.node.engine.eos_token_ids(self.shard)

  async def text(self, tokens: list[int]) -> str:
    """The decoded reply, without the end-of-sequence token's text."""
    return await self.node.engine.decode(self.shard, tokens[:-1] if self.ended(tokens) else tokens)

  async def usage(self, tokens: list[int]) -> dict:
    prompt_tokens = len(await self.node.engine.encode(self.shard, self.prompt))
    return {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens), "total_tokens": prompt_tokens + len(tokens)}

  def chunk(self, kind: str, message: dict, finish_reason: str | None) -> dict:
    key = "delta" if kind == "chat.completion.chunk" else "message"
    choice = {"index": 0, key: message, "logprobs": None, "finish_reason": finish_reason}
    return {"id": self.id, "object": kind, "created": self.created, "model": self.model.id, "choices": [choice]}
