"""`python -m trainlib <command> ...`: tools that look at run directories (training itself is
`python -m recipes.<name>`, or a Trainer in your own code)."""
from __future__ import annotations

import sys

USAGE = """usage: python -m trainlib <command> [args]

Look at run directories (read-only, except the PNGs that plot writes):

  runs [DIR]                      a table of the runs under DIR (default: runs), newest first:
                                  name, recipe, status, best monitored metric, epochs, wall time
  compare RUN RUN [RUN ...]       the config keys that differ between runs (section.key) and
                                  their best metrics side by side
  plot RUN_DIR [...] [--out DIR]  PNGs of training loss, every validation metric and lr against
                                  the step (runs overlaid); needs matplotlib (pip install -e ".[plot]")

`python -m trainlib <command> --help` describes one command. Training: python -m recipes.<name> --help"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "runs":
        from .runs import main_runs

        return main_runs(rest)
    if command == "compare":
        from .runs import main_compare

        return main_compare(rest)
    if command == "plot":
        from .plot import main as plot_main

        return plot_main(rest)
    print(f"error: unknown command {command!r}; expected one of: runs, compare, plot "
          "(python -m trainlib --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
