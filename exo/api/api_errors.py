"""The API's errors as OpenAI's API gives them: a JSON body {error: {message, type, param, code}} with the HTTP status of the
problem (exo.base.errors carries each error's status)."""

import logging

from aiohttp import web

from exo.base.errors import BadInput, ExoError
from exo.base.model_spec import ModelSpec
from exo.orchestration.requests import RequestFailed

log = logging.getLogger(__name__)

__all__ = ["ERROR_TYPES", "BadRequest", "error_body", "error_response", "failure", "shown"]


class BadRequest(BadInput):
  """A request the API rejects with 400; `param` names the offending field, `code` is OpenAI's error code."""

  def __init__(self, message: str, param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.param, self.code = param, code


ERROR_TYPES = {
  400: "invalid_request_error",
  401: "authentication_error",
  403: "permission_error",
  404: "not_found_error",
  413: "invalid_request_error",
  415: "invalid_request_error",
  429: "rate_limit_error",
  500: "internal_error",
  503: "service_unavailable",
}


def shown(value, most: int = 80) -> str:
  """`value`'s repr for an error message, cut to `most` characters: a message names a bad value, it does not echo a body."""
  text = repr(value)
  return text if len(text) <= most else f"{text[: most - 3]}..."


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
  status: int, message: str, kind: str | None = None, param: str | None = None, code: str | None = None, headers: dict | None = None
) -> web.Response:
  return web.json_response(error_body(message, kind or ERROR_TYPES[status], param, code), status=status, headers=headers)


def failure(model: ModelSpec, e: Exception) -> tuple[dict, int]:
  """The error body and status for a request that failed after it was accepted: the status an ExoError carries (a missing model
  404, a cluster that cannot serve it 503), 503 for a failed ring, 500 for a bug."""
  if isinstance(e, ExoError):
    return error_body(f"the cluster could not serve {model.id}: {e}", ERROR_TYPES[e.http_status]), e.http_status
  if isinstance(e, RequestFailed):
    return error_body(f"the cluster could not serve {model.id}: {e}", "service_unavailable"), 503
  log.error("a chat completion for %s failed", model.id, exc_info=e)
  return error_body(f"the chat completion for {model.id} failed: {type(e).__name__}: {e}", "internal_error"), 500
