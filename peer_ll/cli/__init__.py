"""The ``peer-ll`` command and the experiment harness behind it.

Each subcommand lives in a module with ``add_arguments(parser)``, an optional
``check_arguments(args)`` (raises ValueError naming the flag; run before anything is
read, made or removed: ``peer-ll CMD: error: ...`` on stderr, status 2) and
``main(args) -> int``;
only the module of the chosen subcommand is imported, so ``peer-ll --help`` is instant.

Modules:
    compare: ``peer-ll run``: stream, strategy zoo, seeds, summary and run folder.
    harness: the run loop and evaluator that ``peer-ll run`` and ``benchmarks/`` share.
    strategies_zoo: the named strategies that ``peer-ll run`` compares.
    results: the one writer of ``benchmarks/RESULTS.md``, and the machine record.
    report: ``peer-ll report``.
    lm, lm_methods, lm_train, lm_report, lm_reload: ``peer-ll lm``. ``lm_train`` holds the
        plain torch loops for a :class:`~peer_ll.models.PEERLM` (``train_lm``,
        ``perplexity``, ``routing_shares``), public API used by the examples.
    data: ``peer-ll data``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import peer_ll

COMMANDS = {
    "run": ("peer_ll.cli.compare", "compare continual-learning strategies on a task stream"),
    "report": ("peer_ll.cli.report", "print the table and redraw the plots of a finished run"),
    "data": ("peer_ll.cli.data", "find or install data sets (peer-ll data fetch NAME)"),
    "lm": ("peer_ll.cli.lm", "add experts for new text domains to a PEER language model"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peer-ll",
        description="Lifelong learning with growable PEER expert pools.",
        epilog="Run 'peer-ll COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {peer_ll.__version__}")
    parser.add_argument(
        "command",
        choices=sorted(COMMANDS),
        help="; ".join(f"{name}: {text}" for name, (_, text) in COMMANDS.items()),
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``peer-ll`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
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
    try:
        args = parser.parse_args(rest)
    except SystemExit as stop:  # argparse's errors (status 2) and --help (status 0)
        return int(stop.code or 0)
    try:  # every argument is checked before anything is read, made or removed
        getattr(module, "check_arguments", lambda args: None)(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    return int(module.main(args) or 0)
