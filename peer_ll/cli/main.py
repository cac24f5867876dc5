"""The ``peer-ll`` command.

Each subcommand lives in a module with ``add_arguments(parser)`` and ``main(args) -> int``;
only the module of the chosen subcommand is imported, so ``peer-ll --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "run": ("peer_ll.jobs.compare", "compare continual-learning strategies on a task stream"),
    "report": ("peer_ll.jobs.report", "print the table and redraw the plots of a finished run"),
    "data": ("peer_ll.jobs.data", "find or install data sets (peer-ll data fetch NAME)"),
    "lm": ("peer_ll.jobs.lm", "add experts for new text domains to a PEER language model"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peer-ll",
        description="Lifelong learning with growable PEER expert pools.",
        epilog="Run 'peer-ll COMMAND --help' for the options of a command.",
    )
    parser.add_argument("command", choices=sorted(COMMANDS), help="; ".join(
        f"{name}: {text}" for name, (_, text) in COMMANDS.items()
    ))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        top = _top_parser()
        top.parse_args(argv[:1] or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    module_name, text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"peer-ll {name}", description=text)
    module.add_arguments(parser)
    return int(module.main(parser.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
