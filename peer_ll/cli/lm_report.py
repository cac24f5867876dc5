"""Summaries, tables and text samples of a ``peer-ll lm`` run."""

from __future__ import annotations

import math

import torch

from peer_ll.cli.lm_methods import EVALUATIONS
from peer_ll.evaluation.metrics import relative_increase

GOAL_RISE, GOAL_GAIN = 0.02, 0.80  # the goal: first domain +2 % at most, 80 % of gain
METHOD_OF_SAMPLES = ("grow-and-freeze", "infer")


def summarize(names, first_row, first_seconds, records, *, base_params: int) -> dict:
    """The run's results: per row label its R matrix (T, T) and derived figures.

    R[i][j] is the perplexity on domain j after training on domain i; row 0 is the
    model trained on the first domain, shared by every method.
    """
    methods = {}
    for label, (method, _) in EVALUATIONS.items():
        if method not in records:
            continue
        rec = records[method]
        R = [list(first_row)] + rec["rows"][label]
        methods[label] = {
            "method": method,
            "R": R,
            "forgetting": relative_increase(R),  # mean over j < T-1, relative increase
            "first_domain_change": (R[-1][0] - R[0][0]) / R[0][0],
            # Gain on domain t: from the model trained on the first domain (a start
            # every method shares) to right after training on t.
            "gain": [R[0][t] - R[t][t] for t in range(1, len(names))],
            "seconds": rec["seconds"],
            "new_params": rec["new_params"],
            "changed_old_params": rec["changed_old_params"],
            "trainable_params": rec["trainable"],
            "diagnostics": rec["extra"],
        }
    full = methods.get("full finetuning")
    for row in methods.values():
        row["gain_vs_full"] = (
            [g / f if f > 0 else math.nan for g, f in zip(row["gain"], full["gain"], strict=True)]
            if full
            else None
        )
    results = {
        "domains": list(names),
        "first": {"perplexity": list(first_row), "seconds": first_seconds, "params": base_params},
        "methods": methods,
    }
    goal = methods.get("grow-and-freeze")
    if goal and goal["gain_vs_full"]:
        results["goal"] = {
            "first_domain_change": goal["first_domain_change"],
            "min_gain_vs_full": min(goal["gain_vs_full"]),
            "met": goal["first_domain_change"] <= GOAL_RISE
            and min(goal["gain_vs_full"]) >= GOAL_GAIN,
        }
    return results


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:+.1f}%"


def tables(results: dict) -> str:
    """The summary table and the R matrices, as text."""
    names = results["domains"]
    head = ["method", f"{names[0]} end (change)"]
    head += [f"{n} (gain/full)" for n in names[1:]]
    head += ["forgetting", "new params", "changed old", "train s"]
    lines = []
    for label, row in results["methods"].items():
        R = row["R"]  # R[i][j]: perplexity on domain j after training on domain i
        cells = [label, f"{R[-1][0]:.3f} ({_pct(row['first_domain_change'])})"]
        for t in range(1, len(names)):
            ratio = row["gain_vs_full"][t - 1] if row["gain_vs_full"] else None
            share = "-" if ratio is None else f"{100 * ratio:.0f}%"
            cells.append(f"{R[0][t]:.3f}→{R[t][t]:.3f} ({share})")
        cells += [
            _pct(row["forgetting"]),
            f"{sum(row['new_params']):,}",
            f"{sum(row['changed_old_params']):,}",
            f"{sum(row['seconds']):.1f}",
        ]
        lines.append(cells)
    out = [_grid(head, lines)]
    out.append(
        f"columns: perplexity on test blocks; '{names[0]} end': after the last domain "
        f"(change from right after {names[0]}); later domains: right after {names[0]} → "
        "right after training on that domain (gain as a share of full finetuning's); "
        "forgetting: mean relative increase R[T-1][j] vs R[j][j], j < T-1; params "
        "summed over the domains"
    )
    first = results["first"]
    out.append(
        f"\nfirst domain {names[0]}: {first['seconds']:.1f} s, "
        f"{first['params']:,} parameters; perplexities after it: "
        + ", ".join(f"{n} {p:.3f}" for n, p in zip(names, first["perplexity"], strict=True))
    )
    for label, row in results["methods"].items():
        out.append(f"\nR (perplexity), {label}: row i = after training on domain i")
        out.append(
            _grid(
                ["after \\ on", *names],
                [[n, *(f"{v:.3f}" for v in r)] for n, r in zip(names, row["R"], strict=True)],
            )
        )
    out += _diagnostic_lines(results)
    if "goal" in results:
        g = results["goal"]
        out.append(
            f"\ngoal (grow-and-freeze): {names[0]} change {_pct(g['first_domain_change'])}"
            f" (<= +2%), least gain vs full finetuning {100 * g['min_gain_vs_full']:.0f}%"
            f" (>= 80%): {'met' if g['met'] else 'NOT met'}"
        )
    if "reload" in results:
        r = results["reload"]
        out.append(
            f"reload in a new process: {r['checked']} perplexities, "
            f"{'identical' if r['identical'] else 'DIFFERENT'} "
            f"(max |diff| {r['max_abs_diff']:.3g})"
        )
    return "\n".join(out)


def _diagnostic_lines(results: dict) -> list[str]:
    """Routing drift of grow-only and domain-inference accuracy of grow-and-freeze."""
    names, lines = results["domains"], []
    pool = results["methods"].get("grow-only (all experts)")
    if pool:
        share = pool["diagnostics"][-1]["routing_share"][0]  # first domain, after the last
        drift = 1 - share.get("0", share.get(0, 0.0))
        lines.append(
            f"\ngrow-only, after the last domain: {100 * drift:.1f}% of {names[0]}'s "
            "router mass goes to grown experts (routing drift)"
        )
    branch = results["methods"].get("grow-and-freeze")
    if branch:
        acc = branch["diagnostics"][-1]["domain_accuracy"]
        lines.append(
            "grow-and-freeze, after the last domain: positions read as their own "
            "domain: " + ", ".join(f"{n} {100 * a:.1f}%" for n, a in zip(names, acc, strict=True))
        )
    return lines


def _grid(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*head), "-+-".join("-" * w for w in widths)] + [fmt.format(*r) for r in rows]
    )


@torch.no_grad()
def samples(
    records: dict, blocks: dict, names: list[str], *, prompt: int = 48, new: int = 96, seed: int = 0
) -> str:
    """Continuations of a test prompt of every domain by the final models, as text."""
    from peer_ll.data.text import decode

    out = []
    for method, rec in records.items():
        domain = "infer" if method == METHOD_OF_SAMPLES[0] else None
        for name in names:
            idx = blocks[name]["test"][:1, :prompt]
            gen = torch.Generator().manual_seed(seed)
            ids = rec["model"].generate(
                idx, new, temperature=0.8, top_k=20, owners=domain, generator=gen
            )
            out.append(
                f"--- {method} (domain={domain}) on {name}\n"
                f"[prompt] {decode(ids[0, :prompt])!r}\n"
                f"[model]  {decode(ids[0, prompt:])!r}"
            )
    return "\n".join(out) + "\n"
