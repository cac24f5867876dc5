"""Summaries of comparison runs over seeds, their table, and ``results.json``.

A *seed record* describes one strategy trained once (one seed)::

    {"seed": 0, "accuracy_matrix": (T, T) list, "params_total": int,
     "params_active": int, "seconds": float,
     "routing": {layer: {"share": (T, O), "usage": (T,), ...}},   # optional
     "health": {"dead_units": (T, T), "effective_rank": (T, T)}}    # optional

:func:`summarize` turns a strategy's seed records into its entry of ``results.json``:
every scalar of :data:`SCALARS` and the accuracy matrix as the mean over seeds, with
``<name>_std`` (sample standard deviation, 0 for one seed) beside it, the averaged
routing and health, and the records themselves under ``per_seed``. NaN is written as
``null``. Nothing here imports Avalanche.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peer_ll.evaluation.metrics import (
    average_accuracy,
    bwt,
    forgetting,
    intransigence,
    learning_accuracy,
)

__all__ = [
    "COLUMNS",
    "METRIC_NAME",
    "SCALARS",
    "evaluation_values",
    "json_ready",
    "load_results",
    "parse_metric_name",
    "results_table",
    "seed_scalars",
    "summarize",
    "write_results",
]

#: Scalars of a strategy, each averaged over seeds with a ``_std`` beside it.
SCALARS = (
    "avg_accuracy",
    "bwt",
    "forgetting",
    "learning_accuracy",
    "intransigence",
    "params_total",
    "params_active",
    "seconds",
)

#: Table columns: (header, scalar, kind); kind "pct" prints 100·value ± 100·std.
COLUMNS = (
    ("Avg acc %", "avg_accuracy", "pct"),
    ("BWT", "bwt", "pct"),
    ("Forgetting", "forgetting", "pct"),
    ("Learning acc", "learning_accuracy", "pct"),
    ("Intransigence", "intransigence", "pct"),
    ("Params", "params_total", "count"),
    ("Active", "params_active", "count"),
    ("Time s", "seconds", "time"),
)


#: Parses the per-experience names of Avalanche's and peer_ll's plugin metrics, e.g.
#: ``PEER_RoutingShare/blocks.0.peer/Owner003/eval_phase/test_stream/Task000/Exp002``.
METRIC_NAME = re.compile(
    r"^(?P<metric>[^/]+)(?:/(?P<module>[^/]+?))?(?:/Owner(?P<owner>\d+))?"
    r"/(?P<phase>train|eval)_phase/(?P<stream>[^/]+)_stream"
    r"(?:/Task(?P<task>\d+))?(?:/Exp(?P<exp>\d+))?$"
)
_ROUTING = {"PEER_Usage": "usage", "PEER_Unevenness": "unevenness", "PEER_Margin": "margin",
            "PEER_GateEntropy": "gate_entropy"}  # fmt: skip
_HEALTH = {"Plasticity_DeadUnits": "dead_units", "Plasticity_EffectiveRank": "effective_rank"}


def parse_metric_name(name: str) -> dict[str, str | int | None] | None:
    """Splits an emitted metric name into its parts, or None if it has another form.

    Returns:
        ``{"metric", "module", "owner", "phase", "stream", "task", "exp"}``; owner, task
        and exp are ints or None, module is a str or None.
    """
    match = METRIC_NAME.match(name)
    if match is None:
        return None
    parts: dict[str, str | int | None] = match.groupdict()
    for key in ("owner", "task", "exp"):
        parts[key] = None if parts[key] is None else int(parts[key])
    return parts


def evaluation_values(values: Mapping[str, Any], t: int) -> dict[str, Any]:
    """One evaluation over a T-experience test stream, from its metric values by name.

    Args:
        values: ``strategy.eval(test_stream)``'s result (Avalanche's
            ``Top1_Acc_Exp`` and the peer_ll plugin metrics).
        t: number of experiences.

    Returns:
        ``{"accuracy": (T,), "health": {"dead_units": (T,), "effective_rank": (T,)},
        "routing": {layer: {"owners": (O,), "share": (T, O), "usage": (T,), ...}}}``,
        NaN where a value is missing.
    """
    acc, health, peer = [math.nan] * t, {}, {}
    for name, value in values.items():
        parts = parse_metric_name(name)
        if parts is None or parts["phase"] != "eval" or parts["exp"] is None:
            continue
        metric, j = parts["metric"], parts["exp"]
        if metric == "Top1_Acc_Exp":
            acc[j] = float(value)
        elif metric in _HEALTH:
            health.setdefault(_HEALTH[metric], [math.nan] * t)[j] = float(value)
        elif metric == "PEER_RoutingShare":
            shares = peer.setdefault(parts["module"], {}).setdefault("shares", {})
            shares.setdefault(parts["owner"], [math.nan] * t)[j] = float(value)
        elif metric in _ROUTING:
            stats = peer.setdefault(parts["module"], {})
            stats.setdefault(_ROUTING[metric], [math.nan] * t)[j] = float(value)
    routing = {}
    for layer, stats in peer.items():
        shares = stats.pop("shares", {})
        owners = sorted(shares)
        share = [[shares[o][j] for o in owners] for j in range(t)]
        routing[layer] = {"owners": owners, "share": share, **stats}
    return {"accuracy": acc, "health": health, "routing": routing}


def seed_scalars(R: Any, joint_row: Sequence[float] | None = None) -> dict[str, float]:
    """The accuracy-matrix scalars of one run.

    Args:
        R: (T, T) accuracy matrix.
        joint_row: (T,) accuracies of joint training on the same seed, for
            intransigence (NaN without it).

    Returns:
        ``{"avg_accuracy", "bwt", "forgetting" (Chaudhry's max kind),
        "learning_accuracy", "intransigence"}``.
    """
    return {
        "avg_accuracy": average_accuracy(R),
        "bwt": bwt(R),
        "forgetting": forgetting(R, kind="max"),
        "learning_accuracy": learning_accuracy(R),
        "intransigence": math.nan if joint_row is None else intransigence(R, joint_row),
    }


def _mean_std(values: Sequence[Any]) -> tuple[Any, Any]:
    """Elementwise mean and sample std (ddof=1; 0 for one value), NaN-aware."""
    a = np.asarray(values, dtype=np.float64)
    if a.shape[0] == 1:
        return a[0], np.zeros_like(a[0])
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices stay NaN
        return np.nanmean(a, axis=0), np.nanstd(a, axis=0, ddof=1)


def summarize(
    records: Sequence[Mapping[str, Any]],
    *,
    joint_rows: Mapping[int, Sequence[float]] | None = None,
) -> dict[str, Any]:
    """A strategy's ``results.json`` entry from its seed records (see the module doc).

    Args:
        records: one seed record per seed, with the same T.
        joint_rows: ``{seed: (T,) accuracies of joint training}``, for intransigence.

    Returns:
        The summary; ``per_seed`` holds the records with their scalars added.
    """
    if not records:
        raise ValueError("records must hold at least one seed record, got none")
    shapes = {np.shape(r["accuracy_matrix"]) for r in records}
    if len(shapes) != 1:
        raise ValueError(f"records must share one accuracy-matrix shape, got {sorted(shapes)}")
    joint_rows = joint_rows or {}
    per_seed = []
    for record in records:
        row = joint_rows.get(record["seed"])
        per_seed.append({**record, **seed_scalars(record["accuracy_matrix"], row)})
    out: dict[str, Any] = {}
    matrix, matrix_std = _mean_std([r["accuracy_matrix"] for r in per_seed])
    out["accuracy_matrix"], out["accuracy_matrix_std"] = matrix.tolist(), matrix_std.tolist()
    for name in SCALARS:
        mean, std = _mean_std([r.get(name, math.nan) for r in per_seed])
        out[name], out[f"{name}_std"] = float(mean), float(std)
    if all("health" in r for r in per_seed):
        out["health"] = {
            key: _mean_std([r["health"][key] for r in per_seed])[0].tolist()
            for key in per_seed[0]["health"]
        }
    # Seeds whose pools grew to different owner counts (task-free growth) have routing
    # tables of different shapes: their mean is left out (per_seed keeps them).
    shapes = {json.dumps({layer: {k: np.shape(v) for k, v in stats.items()}
                          for layer, stats in r.get("routing", {}).items()})
              for r in per_seed}  # fmt: skip
    if all(r.get("routing") for r in per_seed) and len(shapes) == 1:
        out["routing"] = {
            layer: {
                key: _mean_std([r["routing"][layer][key] for r in per_seed])[0].tolist()
                for key in stats
            }
            for layer, stats in per_seed[0]["routing"].items()
        }
    out["per_seed"] = per_seed
    return out


def _cell(value: Any, std: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if kind == "pct":
        text = f"{100 * value:.1f}"
        return text if not std else f"{text} ± {100 * std:.1f}"
    if kind == "count":
        return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}k"
    return f"{value:.1f}"


def results_table(results: Mapping[str, Any], *, markdown: bool = False) -> str:
    """The comparison table: one row per strategy, the columns of :data:`COLUMNS`.

    Args:
        results: the ``results.json`` content (``{"strategies": {name: summary}}``) or
            its ``strategies`` mapping alone.
        markdown: a Markdown table instead of aligned plain text.
    """
    strategies = results.get("strategies", results)
    if not isinstance(strategies, Mapping) or not strategies:
        raise ValueError("results must hold a non-empty 'strategies' mapping")
    header = ["Strategy", *(title for title, _, _ in COLUMNS)]
    rows = [
        [name, *(_cell(s.get(key), s.get(f"{key}_std"), kind) for _, key, kind in COLUMNS)]
        for name, s in strategies.items()
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = [str.ljust] + [str.rjust] * (len(header) - 1)
    lines = ["  ".join(f(c, w) for f, c, w in zip(fmt, r, widths, strict=True)) for r in rows]
    head = "  ".join(f(c, w) for f, c, w in zip(fmt, header, widths, strict=True))
    return "\n".join([head, "-" * len(head), *lines])


def json_ready(value: Any) -> Any:
    """``value`` for JSON: numpy and torch values as Python ones, NaN and inf as None."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return json_ready(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(run_dir: str | Path, results: Mapping[str, Any]) -> Path:
    """Writes ``results`` to ``run_dir/results.json`` (folders made as needed)."""
    path = Path(run_dir) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_ready(results), indent=1) + "\n")
    return path


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """Reads ``results.json`` from a run folder (or the file itself).

    Raises:
        FileNotFoundError: if there is no results.json there.
        ValueError: if it holds no ``strategies`` mapping.
    """
    path = Path(run_dir)
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"run_dir must hold a results.json; not found: {path}")
    results = json.loads(path.read_text())
    if not isinstance(results.get("strategies"), dict):
        raise ValueError(f"{path} must hold a 'strategies' mapping, got keys {sorted(results)}")
    return results
