"""A free TCP port, for a server that was given none."""

import socket


def free_port(host: str = "127.0.0.1") -> int:
  """A port the OS says is free on `host` now (another process may take it before it is bound: bind soon)."""
  with socket.socket() as s:
    s.bind((host, 0))
    return s.getsockname()[1]
