"""Who may use a node's HTTP API, decided from the request's headers before any work is done.

- Host: a web page that rebinds its own name to this machine's address (DNS rebinding) sends its own name as Host, so only
  the names this node answers to are taken: the bound address; loopback names and addresses; bound beyond loopback, the
  machine's host names and addresses (bound to every interface, any address: a rebinding page sends a name, never an
  address); and the hosts of the origins the operator allowed (--allowed-origins).
- Origin: a browser names the page behind every cross-origin request (and same-origin POSTs). Only the node's own page
  (Origin equal to Host) and the origins the operator listed are served; those listed get CORS headers naming them, every
  other origin a 403, preflights included.
- Key: bound beyond loopback (or given a key), every API call needs `Authorization: Bearer KEY` or the cookie the chat page's
  key URL (`/?token=KEY`) sets: HttpOnly and SameSite=Strict, so no other site's page can send it. The page's files and
  /healthcheck carry no data and are served without it.
"""

import hmac
import ipaddress
import re
import secrets
import socket
from urllib.parse import quote, urlsplit

import psutil

from exo.base.errors import BadInput

__all__ = ["Access", "allowed_origin", "api_key", "is_loopback", "request_host"]

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARDS = frozenset({"", "0.0.0.0", "::"})
KEY_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]{16,256}")  # RFC 6750's token68: safe in a header, a cookie and (quoted) a URL


def is_loopback(host: str) -> bool:
  if host.lower() == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def is_ip(host: str) -> bool:
  try:
    ipaddress.ip_address(host)
    return True
  except ValueError:
    return False


def request_host(header: str) -> str:
  """The host of a Host header (`name`, `name:port`, `[v6]` or `[v6]:port`), lower-case, without a trailing dot; '' if malformed."""
  try:
    host = urlsplit(f"//{header.strip()}").hostname
  except ValueError:
    return ""
  return (host or "").rstrip(".")


def allowed_origin(value: str) -> str:
  """An --allowed-origins entry as a browser writes it in its Origin header: scheme://host[:port], lower-case; BadInput if not one."""
  origin = value.strip().rstrip("/").lower()
  try:
    parts = urlsplit(origin)
    parts.port  # noqa: B018 (a port out of range raises here)
  except ValueError:
    parts = None
  if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query or parts.fragment or "@" in origin:
    raise BadInput(f"--allowed-origins takes origins such as http://localhost:3000 (scheme://host[:port], no path), got {value!r}")
  return origin


def api_key(given: str | None, host: str) -> tuple[str | None, bool]:
  """(the key the API requires, whether it was generated here): `given` (--api-key or EXO_API_KEY) if any, else a fresh one
  when `host` is beyond loopback, else None (no key on loopback). BadInput for a key that headers and cookies cannot carry."""
  if given is not None:
    if not KEY_CHARS.fullmatch(given):
      raise BadInput("--api-key (or EXO_API_KEY) must be 16 to 256 characters of letters, digits and . _ ~ + / = -")
    return given, False
  if is_loopback(host):
    return None, False
  return secrets.token_urlsafe(32), True


def machine_names() -> set[str]:
  """This machine's host names and interface addresses, lower-case."""
  name = socket.gethostname().lower()
  names = {name, f"{name}.local", socket.getfqdn().lower()}
  for addresses in psutil.net_if_addrs().values():
    names.update(a.address.split("%")[0].lower() for a in addresses if a.family in (socket.AF_INET, socket.AF_INET6))
  return names


def lan_address() -> str:
  """A non-loopback IPv4 address of this machine for other devices to reach it by (its host name if it has none)."""
  for addresses in psutil.net_if_addrs().values():
    for a in addresses:
      if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
        return a.address
  return socket.gethostname()


class Access:
  """The API's rules for one bound address: `key` None serves without one; `origins` are the listed cross origins."""

  def __init__(self, host: str, key: str | None = None, origins: tuple[str, ...] = ()):
    self.key, self.origins = key, frozenset(origins)
    self.cookie = "exo_api_key"
    bound = host.strip("[]").lower()
    self.hosts = set(LOOPBACK_NAMES) | {request_host(urlsplit(o).netloc) for o in self.origins}
    self.any_ip = bound in WILDCARDS  # bound to every interface: any address of the machine, which psutil may not list yet
    if bound not in WILDCARDS:
      self.hosts.add(bound)
    if not is_loopback(bound):
      self.hosts |= machine_names()

  def set_port(self, port: int) -> None:
    """Nodes on one machine share its cookies (cookies ignore ports): each names its own."""
    self.cookie = f"exo_api_key_{port}"

  def host_allowed(self, header: str | None) -> bool:
    """Whether a request with this Host header may be served (none: not a browser, which always sends one)."""
    if header is None:
      return True
    host = request_host(header)
    return host in self.hosts or (self.any_ip and is_ip(host))

  def origin_refused(self, origin: str | None, host_header: str | None) -> bool:
    """Whether a request from `origin` is refused: not this node's own page (the Origin's host and port are the Host's) nor listed."""
    if origin is None:
      return False
    origin = origin.strip().lower()
    if origin in self.origins:
      return False
    return host_header is None or urlsplit(origin).netloc != host_header.strip().lower()

  def cross_origin(self, origin: str | None) -> bool:
    return origin is not None and origin.strip().lower() in self.origins

  def matches(self, candidate: str | None) -> bool:
    return self.key is not None and candidate is not None and hmac.compare_digest(candidate.encode(), self.key.encode())

  def authorized(self, authorization: str | None, cookie: str | None) -> bool:
    """Whether the request carries the key (`Authorization: Bearer KEY` or the cookie); always, when no key is required."""
    if self.key is None:
      return True
    scheme, _, token = (authorization or "").strip().partition(" ")
    return (scheme.lower() == "bearer" and self.matches(token.strip())) or self.matches(cookie)

  def login_url(self, page_url: str, host: str, port: int) -> str:
    """The chat page's URL to open once (it sets the cookie): on every interface, at an address other devices reach."""
    if self.key is None:
      return page_url
    if host.strip("[]") in WILDCARDS:
      address = lan_address()
      page_url = f"http://{f'[{address}]' if ':' in address else address}:{port}/"
    return f"{page_url}?token={quote(self.key, safe='')}"
