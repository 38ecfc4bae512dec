"""The errors exo reports to a person, each one sentence naming the problem, and what each means at every boundary.

  BadInput            a malformed or impossible request: a bad file, flag, JSON value or API field
  ModelNotFound       a model id or file that is not there
  ClusterCannotServe  a well-formed request the cluster cannot serve: the model does not fit, no ring joins the nodes
  Busy                a request beyond what a node takes at once: try again shortly
Anything else raised inside exo is a bug: it keeps its traceback, and answers HTTP 500 / gRPC INTERNAL.

Each class carries its HTTP status, gRPC status code name and CLI exit status, so every boundary maps an error the same way.
"""


class ExoError(Exception):
  http_status = 500
  grpc_code = "INTERNAL"
  exit_status = 1


class BadInput(ExoError, ValueError):
  http_status = 400
  grpc_code = "INVALID_ARGUMENT"
  exit_status = 2


class ModelNotFound(ExoError, LookupError):
  http_status = 404
  grpc_code = "NOT_FOUND"
  exit_status = 1


class ClusterCannotServe(ExoError):
  http_status = 503
  grpc_code = "FAILED_PRECONDITION"
  exit_status = 1


class Busy(ExoError):
  http_status = 429
  grpc_code = "RESOURCE_EXHAUSTED"
  exit_status = 1

  def __init__(self, message: str, retry_after_s: int = 1):
    super().__init__(message)
    self.retry_after_s = retry_after_s  # whole seconds after which asking again may succeed (HTTP's Retry-After)
