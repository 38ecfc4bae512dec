"""Opening a file whose path or content comes from outside (a flag, a model folder, a download): regular files only, and no more
than a stated size, so a bad path costs one line of error instead of a read that blocks (a FIFO), never ends (/dev/zero) or
fills the node's memory."""

import os
import stat
from pathlib import Path

from exo.base.errors import BadInput

__all__ = ["open_regular", "read_bytes"]


def _mb(n: int) -> str:
  return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


def open_regular(path: str | Path, what: str, limit: int | None = None):
  """`path` opened for binary reading if it is a regular file of at most `limit` bytes (None: any size), else a BadInput naming
  it. Opened without blocking, so a FIFO is refused by its type instead of waiting for a writer."""
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
  except OSError as e:
    raise BadInput(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from None
  info = os.fstat(fd)
  if not stat.S_ISREG(info.st_mode) or (limit is not None and info.st_size > limit):
    os.close(fd)
    if not stat.S_ISREG(info.st_mode):
      raise BadInput(f"{what} {str(path)!r} is not a regular file")
    raise BadInput(f"{what} {str(path)!r} is {_mb(info.st_size)}; at most {_mb(limit)} is read")
  return os.fdopen(fd, "rb")


def read_bytes(path: str | Path, what: str, limit: int) -> bytes:
  """The content of the regular file `path`, of at most `limit` bytes, else a BadInput naming it."""
  with open_regular(path, what, limit) as file:
    try:
      data = file.read(limit + 1)  # a file that grew since it was measured is still cut at the limit
    except OSError as e:
      raise BadInput(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from None
  if len(data) > limit:
    raise BadInput(f"{what} {str(path)!r} is over {_mb(limit)}; at most {_mb(limit)} is read")
  return data
