"""Load saved PEERLM checkpoints in a fresh process and recompute their perplexities.

``python -m peer_ll.cli.lm_reload SPEC.json`` reads a list of checkpoints, each with
the evaluations to redo, and writes the perplexities it gets to ``SPEC.out.json``.
:func:`reload_check` runs it and compares with the perplexities of the live models:
they must be identical, bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import peer_ll
from peer_ll.cli.lm_methods import EVALUATIONS, eval_domain
from peer_ll.cli.lm_train import perplexity
from peer_ll.models.lm import PEERLM

BASE_LABEL = "base"


def recompute(spec: dict) -> list[dict[str, list[float]]]:
    """Perplexities of each checkpoint of ``spec``: [{row label: [ppl per domain]}]."""
    torch.set_num_threads(spec["threads"])
    folder = Path(spec["folder"])
    tests = list(torch.load(folder / "eval_blocks.pt", weights_only=True).values())
    out = []
    for item in spec["checkpoints"]:
        model = PEERLM.load(folder / item["path"])
        rows = {}
        for label in item["expected"]:
            mode = None if label == BASE_LABEL else EVALUATIONS[label][1]
            rows[label] = [
                perplexity(model, t, domain=eval_domain(mode, j, model))
                for j, t in enumerate(tests)
            ]
        out.append(rows)
    return out


def reload_check(folder: Path, records: dict, first_row: list[float]) -> dict:
    """Reload every checkpoint of a run in a new process and compare perplexities.

    Args:
        folder: the run folder (holds ``eval_blocks.pt`` and the checkpoints).
        records: {method: record} of :func:`peer_ll.cli.lm.run_method`.
        first_row: perplexities of the base model (its checkpoint is ``base-0-*``).

    Returns:
        {"identical": bool, "checked": number of perplexities, "max_abs_diff": float}.
    """
    base = next((folder / "checkpoints").glob("base-0-*.pt"))
    items = [{"path": str(base.relative_to(folder)), "expected": {BASE_LABEL: first_row}}]
    for rec in records.values():
        for t, path in enumerate(rec["checkpoints"]):
            expected = {label: rows[t] for label, rows in rec["rows"].items()}
            items.append({"path": path, "expected": expected})
    spec_path = folder / "reload_spec.json"
    spec = {
        "folder": os.fspath(folder.resolve()),
        "threads": torch.get_num_threads(),
        "checkpoints": items,
    }
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(peer_ll.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    subprocess.run(
        [sys.executable, "-m", "peer_ll.cli.lm_reload", os.fspath(spec_path)], env=env, check=True
    )
    got = json.loads(spec_path.with_suffix(".out.json").read_text())
    diffs = [
        abs(a - b)
        for item, rows in zip(items, got, strict=True)
        for label, want in item["expected"].items()
        for a, b in zip(want, rows[label], strict=True)
    ]
    return {"identical": max(diffs) == 0.0, "checked": len(diffs), "max_abs_diff": max(diffs)}


if __name__ == "__main__":
    spec_file = Path(sys.argv[1])
    result = recompute(json.loads(spec_file.read_text()))
    spec_file.with_suffix(".out.json").write_text(json.dumps(result))
