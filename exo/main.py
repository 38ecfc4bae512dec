"""The `exo` console script: wiring and argument handling only. `exo plan` runs the planner; the node runtime is not in this build yet."""

import sys

from exo import plan_cli

USAGE = (
  "usage: exo plan --topology FILE (--model ID | --model-spec FILE) [options]; the node runtime is not in this build yet (try `exo plan --help`)"
)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["plan"]:
    return plan_cli.main(argv[1:])
  print(USAGE, file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
