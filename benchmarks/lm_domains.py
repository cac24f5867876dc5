"""Benchmark: add experts for new text domains to a PEER language model.

Runs ``peer-ll lm`` (``peer_ll.cli.lm``) on three built-in domains in sequence,
python-stdlib → pydoc-topics → unicode-names, with the settings below (the job's
defaults, written out so that the record names them), prints its table and appends
the figures to ``benchmarks/RESULTS.md`` under its own heading (``--no-append`` to
skip). Every method starts from the same model trained on the first domain; figures
are perplexities and ratios measured in the same run.

    python benchmarks/lm_domains.py                  # about 10 minutes on 2 CPU cores
    python benchmarks/lm_domains.py --steps-first 60 --steps 20 --no-append   # smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
from pathlib import Path

from peer_ll.cli import lm
from peer_ll.cli.results import environment_line, write_section

HEADING = "## Language model: adding experts for new text domains (benchmarks/lm_domains.py)"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SETTINGS = [
    "--steps-first",
    "1000",
    "--steps",
    "250",
    "--max-bytes",
    "1000000",
    "--eval-blocks",
    "96",
    "--lr-first",
    "3e-3",
    "--lr",
    "6e-3",
    "--grow-keys",
    "32",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    lm.add_arguments(parser)
    parser.add_argument("--no-append", action="store_true", help="do not write RESULTS.md")
    argv = SETTINGS + sys.argv[1:]
    args = parser.parse_args(argv)
    if not args.threads:
        args.threads = os.cpu_count() or 1
    args.out = args.out or f"benchmarks/runs/lm-domains-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    load_before = os.getloadavg()[0]
    code = lm.main(args)
    results = json.loads((Path(args.out) / "results.json").read_text())
    if not args.no_append:
        append(results, args, load_before)
    return code


def append(results: dict, args: argparse.Namespace, load_before: float) -> None:
    """Add this run's section to RESULTS.md (one section per run, under HEADING)."""
    import datasets

    table = (Path(args.out) / "table.txt").read_text().rstrip()
    command = "python benchmarks/lm_domains.py " + shlex.join(sys.argv[1:])
    text = [
        f"### Run of {datetime.date.today()}\n",
        f"Command: `{command.strip()}` (settings: `{' '.join(SETTINGS)}`).",
        environment_line(results["environment"]) + f" Load average {load_before:.1f} at the "
        f"start, {os.getloadavg()[0]:.1f} at the end (shared machine: seconds are only "
        "comparable within the run); datasets " + datasets.__version__ + ".",
        f"Model: {json.dumps(results['config']['model'])}.",
        "",
        "```",
        table,
        "```",
    ]
    write_section(RESULTS, HEADING, "\n".join(text))


if __name__ == "__main__":
    sys.exit(main())
