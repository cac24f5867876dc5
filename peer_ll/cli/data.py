"""``peer-ll data fetch NAME``: find or install a data set's files (never downloads itself)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FETCHABLE = ("fashion-mnist", "mnist")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    fetch = sub.add_parser("fetch", help="make a data set's IDX files available locally")
    fetch.add_argument("name", choices=FETCHABLE)
    fetch.add_argument("--root", default=None, help="folder that holds (or will hold) the files")


def check_arguments(args: argparse.Namespace) -> None:
    """``--root`` must be a folder (or not exist yet)."""
    if args.root is not None and Path(args.root).exists() and not Path(args.root).is_dir():
        raise ValueError(f"--root must be a folder, got the file {args.root}")


def main(args: argparse.Namespace) -> int:
    from peer_ll.data.fetch import fetch

    try:
        path = fetch(args.name, root=args.root)
    except (FileNotFoundError, RuntimeError) as err:
        print(f"peer-ll data fetch {args.name}: {err}", file=sys.stderr)
        return 1
    if path is not None:
        print(f"{args.name}: files are in {path}")
    return 0
