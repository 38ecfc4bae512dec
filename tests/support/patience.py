"""How long a test waits before it calls something hung. No verdict may depend on how busy the machine is: a test waits for an
event (a token, a line, a port), and these bounds only catch a hang, far beyond what the slowest loaded machine takes."""

HANG_S = 900.0  # real engines (model loading, kernel capture, generation) and node processes (start, discovery, `exo run`)
STALL_S = 60.0  # in-process work of milliseconds (the dummy engine, loopback messages, fakes): normally done in under a second
