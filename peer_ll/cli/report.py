"""``peer-ll report RUN_DIR``: print the table and redraw the plots of a finished run."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from peer_ll.cli.args import check_out_dir
from peer_ll.evaluation.plots import draw_run_plots
from peer_ll.evaluation.report import SCALARS, results_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder of 'peer-ll run' (or its results.json)")
    parser.add_argument(
        "--plots", default=None, help="folder for the redrawn plots (default: the run folder)"
    )
    parser.add_argument("--no-plots", action="store_true", help="print the table only")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")


def _number(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def check_results(results: Any, where: str) -> dict[str, Any]:
    """``results`` if it has the shape of a ``results.json``; ValueError naming ``where``.

    Checks what the table and plots read: a ``strategies`` mapping of name -> summary,
    each summary's scalars numbers (or null) and its accuracy matrix a square list of
    rows of numbers (or null).
    """
    if not isinstance(results, dict):
        raise ValueError(f"{where} must hold a JSON object, got a {type(results).__name__}")
    strategies = results.get("strategies")
    if not isinstance(strategies, dict) or not strategies:
        raise ValueError(f"{where} must hold a non-empty 'strategies' object, got "
                         f"{type(strategies).__name__}")  # fmt: skip
    for name, summary in strategies.items():
        if not isinstance(summary, dict):
            raise ValueError(f"{where}: strategies[{name!r}] must be an object, got "
                             f"{type(summary).__name__}")  # fmt: skip
        for key in SCALARS:
            for k in (key, f"{key}_std"):
                if not _number(summary.get(k)):
                    raise ValueError(f"{where}: strategies[{name!r}][{k!r}] must be a number "
                                     f"or null, got {summary[k]!r}")  # fmt: skip
        matrix = summary.get("accuracy_matrix")
        rows = matrix if isinstance(matrix, list) else None
        if (
            rows is None
            or not rows
            or any(
                not isinstance(r, list) or len(r) != len(rows) or not all(map(_number, r))
                for r in rows
            )
        ):
            raise ValueError(
                f"{where}: strategies[{name!r}]['accuracy_matrix'] must be a "
                f"square list of rows of numbers, got {str(matrix)[:80]}"
            )
    if not isinstance(results.get("config", {}), dict):
        raise ValueError(f"{where}: 'config' must be an object")
    return results


def check_arguments(args: argparse.Namespace) -> None:
    """Reads and checks RUN_DIR's results.json and the plot folder; ValueError otherwise."""
    path = Path(args.run_dir)
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"RUN_DIR must be a run folder with a results.json, or the file; "
                         f"not found: {path}")  # fmt: skip
    try:
        results = json.loads(path.read_text(), parse_constant=lambda c: math.nan)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"RUN_DIR: {path} is not readable JSON: {err}") from None
    args.results = check_results(results, str(path))
    args.plot_dir = Path(args.plots) if args.plots else path.parent
    if not args.no_plots:
        check_out_dir(args.plot_dir, "--plots" if args.plots else "RUN_DIR (for its plots)")


def main(args: argparse.Namespace) -> int:
    if not hasattr(args, "results"):
        check_arguments(args)
    results = args.results
    cfg = results.get("config", {})
    if cfg:
        print(
            f"{cfg.get('stream')}: {cfg.get('n_experiences')} experiences, "
            f"seeds {cfg.get('seeds')}, {cfg.get('epochs')} epochs, "
            f"replay budget {cfg.get('replay_budget')}; accuracy in %, mean ± std over seeds"
        )
    if results.get("complete") is False:
        print("(an unfinished run: the strategies and seeds finished so far)")
    print(results_table(results, markdown=args.markdown))
    if not args.no_plots:
        paths = draw_run_plots(results, args.plot_dir)
        print(f"\n{len(paths)} plots in {args.plot_dir}")
    return 0
