"""The Ollama API on a node's API port, a translation onto the API's one request path (exo.api.serving), so that a tool pointed
at an Ollama address works when pointed at a node:

  POST /api/chat       {model, messages, stream (default true), options}: a message, or newline-delimited JSON pieces
  POST /api/generate   {model, prompt, system, raw, stream, options}: the prompt as the user's turn of the model's chat template
                       (raw: as it is); an empty prompt only answers that the model is ready, as Ollama's loads it
  GET  /api/tags       the models whose files are on this node;  POST /api/show {model}: one model's figures
  GET  /api/version

`options`: temperature, top_p, top_k, seed, num_predict (the answer's most tokens; -1 or -2: what the context leaves) and stop.
Without a temperature the answer is greedy, as with the node's other APIs. A model may be named with Ollama's ":latest" tag.
Errors are Ollama's shape, {"error": message}, with the status of their kind.
"""

import contextlib
import json
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

from aiohttp import web

from exo.api.api_errors import BadRequest, shown
from exo.api.chat_request import parse_messages, parse_sampling, parse_stop
from exo.api.completion import Completion
from exo.api.serving import Refusal, TextRequest, read_json, refusal
from exo.base.model_spec import ModelSpec
from exo.base.models import MODELS
from exo.orchestration.requests import Generation

__all__ = ["OllamaAPI"]


def ollama_error(e: Refusal) -> web.Response:
  return web.json_response({"error": e.message}, status=e.status, headers=e.headers or None)


def now() -> str:
  return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def model_name(data: dict) -> str:
  name = data.get("model")
  if not isinstance(name, str) or not name:
    raise BadRequest(f"'model' must name a model, got {shown(name)}", "model")
  return name.removesuffix(":latest")


def options_request(data: dict, model_id: str, messages: list[dict] | None, prompt: str | None) -> TextRequest:
  """The request with its `options`, each checked; BadRequest naming the first bad one."""
  options = data.get("options") or {}
  if not isinstance(options, dict):
    raise BadRequest(f"'options' must be an object, got {shown(options)}", "options")
  most = options.get("num_predict")
  if most is not None and (isinstance(most, bool) or not isinstance(most, int) or not (most >= 1 or most in (-1, -2))):
    raise BadRequest(f"options.num_predict must be a whole number >= 1, or -1 (no limit), got {shown(most)}", "options.num_predict")
  sampling = parse_sampling({k: options.get(k) for k in ("temperature", "top_p", "top_k", "seed")})
  return TextRequest(model_id, messages, prompt, most if most and most > 0 else None, sampling, parse_stop({"stop": options.get("stop") or None}))


def streamed(data: dict) -> bool:
  stream = data.get("stream", True)
  if not isinstance(stream, bool):
    raise BadRequest(f"'stream' must be true or false, got {shown(stream)}", "stream")
  return stream


class OllamaAPI:
  """`api`: the node's ChatGPTAPI, whose request path, model list and model checks these routes share."""

  def __init__(self, api):
    self.api, self.path, self.requested_model = api, api.path, api.requested_model

  def model_spec(self, model_id: str) -> ModelSpec:
    node = self.api.node
    return node.model if model_id == node.model.id else MODELS[model_id]

  def routes(self) -> list[web.RouteDef]:
    return [
      web.post("/api/chat", self.handle_chat),
      web.post("/api/generate", self.handle_generate),
      web.get("/api/tags", self.handle_tags),
      web.post("/api/show", self.handle_show),
      web.get("/api/version", self.handle_version),
    ]

  async def handle_chat(self, request: web.Request) -> web.StreamResponse:
    try:
      data = await read_json(request)
      asked = options_request(data, self.requested_model(model_name(data)), parse_messages(data.get("messages")), None)
      return await self.answer(request, asked, streamed(data), "message")
    except (BadRequest, Refusal) as e:
      return ollama_error(refusal(e))

  async def handle_generate(self, request: web.Request) -> web.StreamResponse:
    try:
      data = await read_json(request)
      model_id, prompt, system = self.requested_model(model_name(data)), data.get("prompt", ""), data.get("system")
      if not isinstance(prompt, str) or (system is not None and not isinstance(system, str)):
        raise BadRequest(f"'prompt' and 'system' must be strings, got {shown(prompt)} and {shown(system)}", "prompt")
      if not prompt:  # Ollama's way to load a model: nothing to answer
        return web.json_response({"model": data["model"], "created_at": now(), "response": "", "done": True, "done_reason": "load"})
      if data.get("raw"):
        asked = options_request(data, model_id, None, prompt)
      else:
        asked = options_request(
          data, model_id, [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": prompt}], None
        )
      return await self.answer(request, asked, streamed(data), "response")
    except (BadRequest, Refusal) as e:
      return ollama_error(refusal(e))

  async def answer(self, request: web.Request, asked: TextRequest, stream: bool, field: str) -> web.StreamResponse:
    """The answer as one object, or as newline-delimited pieces ending with the counts; `field`: "message" (chat) or "response"."""
    started = time.perf_counter()

    def piece(completion: Completion, text: str) -> dict:
      content = {"role": "assistant", "content": text} if field == "message" else text
      return {"model": completion.model.id, "created_at": now(), field: content, "done": False}

    async with self.path.opened(asked) as completion:
      if not stream:
        generation = await self.path.whole(completion)
        return web.json_response({**piece(completion, generation.text), **await self.counts(completion, generation, started)})
      response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
      await response.prepare(request)
      with contextlib.suppress(ConnectionResetError):  # a client gone: RequestPath.pieces cancels the request
        try:
          async for part in self.path.pieces(completion):
            if isinstance(part, str):
              await response.write((json.dumps(piece(completion, part)) + "\n").encode())
            else:
              await response.write((json.dumps({**piece(completion, ""), **await self.counts(completion, part, started)}) + "\n").encode())
        except Refusal as e:
          await response.write((json.dumps({"error": e.message}) + "\n").encode())
        await response.write_eof()
      return response

  async def counts(self, completion: Completion, generation: Generation, started: float) -> dict:
    """The last piece's fields: done, why, and Ollama's counts and durations (nanoseconds)."""
    total_ns = int((time.perf_counter() - started) * 1e9)
    return {
      "done": True, "done_reason": "length" if generation.finish_reason == "length" else "stop", "total_duration": total_ns, "load_duration": 0,
      "prompt_eval_count": await completion.prompt_tokens(), "eval_count": len(generation.tokens), "eval_duration": int(generation.elapsed_s * 1e9),
    }  # fmt: skip

  def details(self, model_id: str) -> dict:
    spec = self.model_spec(model_id)
    return {
      "format": "gguf" if spec.file_bytes else "safetensors",
      "family": "llama",
      "families": ["llama"],
      "parameter_size": "",
      "quantization_level": "",
    }

  async def handle_tags(self, request: web.Request) -> web.Response:
    served = [m for m in self.api.model_ids() if self.api.has_files(m)]
    models = [{"name": m, "model": m, "modified_at": now(), "size": 0, "digest": "", "details": self.details(m)} for m in served]
    return web.json_response({"models": models})

  async def handle_show(self, request: web.Request) -> web.Response:
    try:
      data = await read_json(request)
      model_id = model_name(data)
      if model_id not in self.api.model_ids():
        raise Refusal(404, f"model {model_id!r} not found: GET /api/tags lists the models on this node")
    except (BadRequest, Refusal) as e:
      return ollama_error(refusal(e))
    spec = self.model_spec(model_id)
    info = {"general.architecture": "llama", "llama.block_count": spec.n_layers, "llama.context_length": spec.context_tokens}
    return web.json_response(
      {"modelfile": "", "parameters": "", "template": "", "details": self.details(model_id), "model_info": info, "capabilities": ["completion"]}
    )

  async def handle_version(self, request: web.Request) -> web.Response:
    try:
      return web.json_response({"version": version("exo")})
    except PackageNotFoundError:
      return web.json_response({"version": "0.0.0"})
