"""A TCP proxy on 127.0.0.1 that adds a fixed one-way delay in each direction without cutting throughput, so tests can put
network latency between nodes running on one machine.

Each direction of a connection has a reader that stamps every chunk with its release time (arrival + delay, read when the chunk
arrives) and a writer that sends chunks in order at their release time; the reader never waits for a chunk's delay. EOF travels
the same way (half-close). Buffering is unbounded: fine for tests, not for a hostile peer.

As a process: python -m exo.tools.latency_proxy --listen 127.0.0.1:PORT --target 127.0.0.1:PORT --delay-ms 10
"""

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 16


class LatencyProxy:
  def __init__(
    self, target_host: str, target_port: int, up_s: float = 0.0, down_s: float | None = None, listen_host: str = "127.0.0.1", port: int = 0
  ):
    """Forward listen_host:port (0 = a free port) to target_host:target_port, delaying client->server data by `up_s` and
    server->client data by `down_s` (default: `up_s`)."""
    self.target_host, self.target_port = target_host, target_port
    self.listen_host, self._port = listen_host, port
    self.set_delay(up_s, up_s if down_s is None else down_s)
    self._server: asyncio.Server | None = None
    self._connections: set[asyncio.Task] = set()

  @property
  def port(self) -> int:
    return self._port

  def set_delay(self, up_s: float, down_s: float) -> None:
    """Change the one-way delays; chunks already in flight keep the delay they arrived with."""
    if up_s < 0 or down_s < 0:
      raise ValueError(f"delays must be >= 0 seconds, got up {up_s!r} and down {down_s!r}")
    self.up_s, self.down_s = up_s, down_s

  async def start(self) -> None:
    self._server = await asyncio.start_server(self._accept, self.listen_host, self._port)
    self._port = self._server.sockets[0].getsockname()[1]
    log.info(
      "latency proxy %s:%d -> %s:%d (+%.1f ms up, +%.1f ms down)",
      self.listen_host,
      self._port,
      self.target_host,
      self.target_port,
      self.up_s * 1000,
      self.down_s * 1000,
    )

  async def stop(self) -> None:
    """Stop listening and drop every open connection."""
    if self._server is not None:
      self._server.close()
    for task in list(self._connections):
      task.cancel()
    await asyncio.gather(*self._connections, return_exceptions=True)
    if self._server is not None:
      await self._server.wait_closed()
      self._server = None

  async def __aenter__(self) -> "LatencyProxy":
    await self.start()
    return self

  async def __aexit__(self, *exc) -> None:
    await self.stop()

  async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
    # the work runs in a task of its own that stop() cancels: cancelling asyncio's handler task itself makes Python 3.11 log an error
    task = asyncio.create_task(self._connect(client_reader, client_writer))
    self._connections.add(task)
    try:
      await asyncio.wait({task})
    finally:
      self._connections.discard(task)
    if not task.cancelled() and task.exception() is not None:
      log.info("latency proxy connection failed: %r", task.exception())

  async def _connect(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
    try:
      server_reader, server_writer = await asyncio.open_connection(self.target_host, self.target_port)
    except OSError as e:
      log.info("latency proxy cannot reach %s:%d: %s", self.target_host, self.target_port, e)
      client_writer.close()
      return
    try:
      await asyncio.gather(self._pump(client_reader, server_writer, lambda: self.up_s), self._pump(server_reader, client_writer, lambda: self.down_s))
    finally:
      for writer in (client_writer, server_writer):
        writer.close()
      for writer in (client_writer, server_writer):
        with contextlib.suppress(Exception):
          await writer.wait_closed()

  async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
      try:
        while chunk := await reader.read(CHUNK_BYTES):
          queue.put_nowait((loop.time() + delay(), chunk))
      except (ConnectionError, OSError):
        pass
      queue.put_nowait((loop.time() + delay(), b""))  # EOF or a broken peer: pass the end on after the delay

    async def write() -> None:
      while True:
        release, chunk = await queue.get()
        while (wait := release - loop.time()) > 0:  # asyncio may wake a timer up to a clock tick early
          await asyncio.sleep(wait)
        if not chunk:
          if writer.can_write_eof():
            with contextlib.suppress(ConnectionError, OSError):
              writer.write_eof()
          return
        writer.write(chunk)
        await writer.drain()

    reading = asyncio.create_task(read())
    try:
      await write()
    except (ConnectionError, OSError):
      pass
    finally:
      reading.cancel()
      with contextlib.suppress(asyncio.CancelledError):
        await reading


def _address(text: str) -> tuple[str, int]:
  host, sep, port = text.rpartition(":")
  if not sep or not port.isdigit():
    raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
  return host or "127.0.0.1", int(port)


async def _serve(args: argparse.Namespace) -> None:
  up = args.delay_ms if args.up_ms is None else args.up_ms
  down = args.delay_ms if args.down_ms is None else args.down_ms
  proxy = LatencyProxy(*args.target, up / 1000, down / 1000, listen_host=args.listen[0], port=args.listen[1])
  await proxy.start()
  print(f"listening on {proxy.listen_host}:{proxy.port}", flush=True)  # a parent that asked for port 0 reads the port here
  stopped = asyncio.Event()
  loop = asyncio.get_running_loop()
  for sig in (signal.SIGINT, signal.SIGTERM):
    loop.add_signal_handler(sig, stopped.set)
  await stopped.wait()
  await proxy.stop()


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m exo.tools.latency_proxy", description="TCP proxy adding a one-way delay each way")
  parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT to listen on (port 0 picks a free one)")
  parser.add_argument("--target", type=_address, required=True, help="HOST:PORT to forward to")
  parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay in each direction")
  parser.add_argument("--up-ms", type=float, help="client->server delay (default --delay-ms)")
  parser.add_argument("--down-ms", type=float, help="server->client delay (default --delay-ms)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
  asyncio.run(_serve(args))
  return 0


if __name__ == "__main__":
  sys.exit(main())
