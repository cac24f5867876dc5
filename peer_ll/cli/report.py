"""``peer-ll report RUN_DIR``: print the table and redraw the plots of a finished run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peer_ll.evaluation.plots import draw_run_plots
from peer_ll.evaluation.report import load_results, results_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder of 'peer-ll run' (or its results.json)")
    parser.add_argument("--plots", default=None,
                        help="folder for the redrawn plots (default: the run folder)")
    parser.add_argument("--no-plots", action="store_true", help="print the table only")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")


def main(args: argparse.Namespace) -> int:
    try:
        results = load_results(args.run_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"peer-ll report: error: {err}", file=sys.stderr)
        return 2
    cfg = results.get("config", {})
    if cfg:
        print(f"{cfg.get('stream')}: {cfg.get('n_experiences')} experiences, "
              f"seeds {cfg.get('seeds')}, {cfg.get('epochs')} epochs, "
              f"replay budget {cfg.get('replay_budget')}; accuracy in %, mean ± std over seeds")
    print(results_table(results, markdown=args.markdown))
    if not args.no_plots:
        run_dir = Path(args.run_dir)
        out = Path(args.plots) if args.plots else (run_dir if run_dir.is_dir() else run_dir.parent)
        paths = draw_run_plots(results, out)
        print(f"\n{len(paths)} plots in {out}")
    return 0
