"""Cluster membership: the secret the nodes of one cluster share, and the proofs of it that travel on the wire.

A node takes its cluster's secret from `--cluster-secret`, else the file `--cluster-secret-file` names, else the environment
variable EXO_CLUSTER_SECRET, else the file `cluster-secret` in its config folder ($XDG_CONFIG_HOME/exo, by default
~/.config/exo), which its first start writes (mode 0600) with a fresh random secret. Two proofs are derived from it, each with
its own key, so that one cannot be turned into the other:

- Discovery announcements carry a timestamp and an HMAC-SHA256 of the whole announcement (`seal` / `open`): a node ignores
  an announcement that is not signed with its cluster's secret, one older than ANNOUNCEMENT_MAX_AGE_S (or as far in the future),
  and one not newer than the last it took from the same node (a copy replayed later).
- Every gRPC call carries a token in its metadata, HMAC-SHA256(secret, a fixed label): the server refuses a call without it
  (UNAUTHENTICATED) before it reads the message. The token is the same for every call and travels in clear (the channels are
  not encrypted): it keeps out whoever can reach a node's port without having seen the cluster's traffic, not someone who can
  read that traffic, who may copy it (but learns neither the secret nor how to sign an announcement).

A call also names the node that sends it (SENDER_METADATA). Every member can claim any id: the name lets a node accept a
request's results and cancellation only from the nodes of that request's ring, which keeps members from changing one another's
requests by mistake, not a member that means harm.
"""

import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import stat
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from exo.base.errors import BadInput, ExoError

SECRET_ENV = "EXO_CLUSTER_SECRET"
SECRET_FILE_NAME = "cluster-secret"
TOKEN_METADATA = "x-exo-cluster-token"
SENDER_METADATA = "x-exo-node-id-bin"  # binary metadata (-bin): node ids are any UTF-8
MIN_SECRET_CHARS = 16
MAX_SECRET_BYTES = 4096
ANNOUNCEMENT_MAX_AGE_S = 60.0  # and as far ahead: nodes whose clocks differ by more do not hear each other


class NotAMember(ExoError):
  """A call or an announcement without valid proof of membership of this node's cluster."""

  http_status = 401
  grpc_code = "UNAUTHENTICATED"


class NotAllowed(ExoError):
  """A member's call that this node does not take from it (a request that did not come from its origin, a stranger to a request)."""

  http_status = 403
  grpc_code = "PERMISSION_DENIED"


def config_dir(environ=os.environ) -> Path:
  """exo's config folder: $XDG_CONFIG_HOME/exo, else ~/.config/exo (HOME as the environment gives it)."""
  base = environ.get("XDG_CONFIG_HOME") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".config")
  return Path(base) / "exo"


def stored_secret_path(environ=os.environ) -> Path:
  return config_dir(environ) / SECRET_FILE_NAME


def _derive(secret: str, label: bytes) -> bytes:
  return hmac.new(secret.encode("utf-8"), label, hashlib.sha256).digest()


def _canonical(message: dict) -> bytes:
  return json.dumps(message, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Membership:
  """A cluster's secret (never shown in a repr) and `source`: where the node took it from, for the line saying how to join."""

  secret: str = field(repr=False)
  source: str

  def __post_init__(self):
    if len(self.secret.strip()) < MIN_SECRET_CHARS:
      raise BadInput(f"the cluster secret ({self.source}) has {len(self.secret.strip())} characters; expected at least {MIN_SECRET_CHARS}")

  def token(self) -> str:
    """What every gRPC call carries in TOKEN_METADATA."""
    return _derive(self.secret, b"exo cluster grpc token v1").hex()

  def accepts_token(self, token: str | None) -> bool:
    return isinstance(token, str) and hmac.compare_digest(token.encode(), self.token().encode())

  def _mac(self, body: dict) -> str:
    return hmac.new(_derive(self.secret, b"exo cluster announcement key v1"), _canonical(body), hashlib.sha256).hexdigest()

  def seal(self, message: dict, now: float | None = None) -> bytes:
    """The datagram of an announcement: `message` with a "timestamp" (Unix seconds) and an "hmac" over the rest."""
    body = {**message, "timestamp": time.time() if now is None else now}
    return json.dumps({**body, "hmac": self._mac(body)}).encode()

  def open(self, data: bytes) -> dict:
    """The announcement in a datagram `seal` made with this cluster's secret, without its "hmac" (its "timestamp" kept). ValueError
    if it is not a JSON object; NotAMember if its HMAC is missing or wrong."""
    try:
      message = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: a packet of 5000 '['
      raise ValueError(f"not JSON: {e}") from None
    if not isinstance(message, dict):
      raise ValueError(f"expected a JSON object, got {str(message)[:80]!r}")
    mac = message.pop("hmac", None)
    if not isinstance(mac, str):
      raise NotAMember("it is not signed (no hmac)")
    if not hmac.compare_digest(mac.encode(), self._mac(message).encode()):
      raise NotAMember("its hmac does not match this cluster's secret")
    timestamp = message.get("timestamp")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float) or not math.isfinite(timestamp):
      raise NotAMember(f"its timestamp is not a number: {timestamp!r}")
    return message

  def join_hint(self) -> str:
    """How to start another node of this cluster, without the secret itself."""
    if self.source == SECRET_ENV:
      return f"cluster secret from {SECRET_ENV}: start other nodes of this cluster with the same {SECRET_ENV}"
    if self.source == "--cluster-secret":
      return "cluster secret from --cluster-secret: start other nodes of this cluster with the same one (other users of this machine see command lines: prefer --cluster-secret-file)"
    path = self.source.removeprefix("--cluster-secret-file ")
    return (
      f"cluster secret in {path}: to join another node to this cluster, copy this file to it and start it with "
      f"`exo --cluster-secret-file FILE` (or `{SECRET_ENV}=$(cat FILE) exo`, or put the file at ~/.config/exo/{SECRET_FILE_NAME} there)"
    )


def _read_secret_file(path: Path, what: str) -> str:
  try:
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
      raise BadInput(f"{what} {path} is not a regular file")
    if info.st_size > MAX_SECRET_BYTES:
      raise BadInput(f"{what} {path} has {info.st_size} bytes; a cluster secret has at most {MAX_SECRET_BYTES}")
    with open(path, "rb") as f:
      data = f.read(MAX_SECRET_BYTES + 1)
  except OSError as e:
    raise BadInput(f"cannot read {what} {path}: {e.strerror or e}") from None
  try:
    return data.decode("utf-8").strip()
  except UnicodeDecodeError as e:
    raise BadInput(f"{what} {path} is not UTF-8 text: {e.reason} at byte {e.start}") from None


def stored_secret(path: Path) -> str:
  """The secret stored at `path`, written first (mode 0600, a new random one) if there is none. Nodes starting at once on one
  machine agree: each writes a file of its own and links it into place, and the first link wins."""
  if not path.exists():
    try:
      path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
      draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
      fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
      try:
        with os.fdopen(fd, "w") as f:
          f.write(secrets.token_urlsafe(32) + "\n")
        try:
          os.link(draft, path)
        except FileExistsError:
          pass  # another node stored one first: use that
      finally:
        draft.unlink()
    except OSError as e:
      raise BadInput(f"cannot store a new cluster secret in {path}: {e.strerror or e}; give one with --cluster-secret-file or {SECRET_ENV}") from None
  return _read_secret_file(path, "the stored cluster secret")


def cluster_membership(secret: str | None = None, secret_file: str | None = None, environ=os.environ) -> Membership:
  """This node's cluster: `secret` (--cluster-secret), else the file `secret_file` (--cluster-secret-file), else EXO_CLUSTER_SECRET,
  else the stored one (written on first use). BadInput, one line, for a file that cannot be read or a secret too short."""
  if secret is not None:
    return Membership(secret.strip(), "--cluster-secret")
  if secret_file is not None:
    return Membership(_read_secret_file(Path(secret_file), "cluster secret file"), f"--cluster-secret-file {secret_file}")
  if environ.get(SECRET_ENV):
    return Membership(environ[SECRET_ENV].strip(), SECRET_ENV)
  path = stored_secret_path(environ)
  return Membership(stored_secret(path), str(path))


class RateLimitedLog:
  """Warnings about one key (a sender's address) at most once every `interval_s`, each saying how many were left out since;
  it remembers at most `keys` senders (the oldest forgotten first), so spoofed addresses cannot grow it without bound."""

  def __init__(self, logger: logging.Logger, interval_s: float = 60.0, keys: int = 1024):
    self.logger, self.interval_s, self.keys = logger, interval_s, keys
    self._seen: OrderedDict[str, list] = OrderedDict()  # key -> [when last logged, how many left out since]

  def warning(self, key: str, message: str, *args) -> None:
    now = time.monotonic()
    seen = self._seen.get(key)
    if seen is not None and now - seen[0] < self.interval_s:
      seen[1] += 1
      return
    left_out = seen[1] if seen is not None else 0
    self._seen[key] = [now, 0]
    self._seen.move_to_end(key)
    while len(self._seen) > self.keys:
      self._seen.popitem(last=False)
    suffix = f" ({left_out} more like it since the last warning)" if left_out else ""
    self.logger.warning(message + suffix, *args)
