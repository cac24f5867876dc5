"""PNG plots of a comparison run, drawn with matplotlib's Agg backend (no display).

- :func:`plot_accuracy_matrix`: heatmap of R[i][j] (row: after training on i, column:
  tested on j);
- :func:`plot_accuracy_curves`: after each experience i, the mean accuracy on the
  experiences seen so far (mean of R[i][:i+1]), one line per strategy with a ±std band
  over seeds;
- :func:`plot_routing_share`: per PEER layer, the share of router mass that the inputs
  of experience j put on the experts of owner o. A strong diagonal means old inputs
  still use their own experts; mass right of the diagonal is drift to newer experts.

:func:`draw_run_plots` draws them all from a ``results.json`` mapping.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "draw_run_plots",
    "plot_accuracy_curves",
    "plot_accuracy_matrix",
    "plot_routing_share",
    "slug",
]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def slug(name: str) -> str:
    """A file-name-safe form of a strategy name: ``"PEER growth + RD"`` -> ``"peer-growth-rd"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "strategy"


def _heatmap(ax, values: np.ndarray):
    """Annotated percent heatmap of a 2-D array of fractions on ``ax``; returns the image.

    NaN cells stay blank.
    """
    pct = 100 * values
    image = ax.imshow(pct, vmin=0.0, vmax=100.0, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(pct):
        if np.isfinite(v):
            color = "black" if v > 60 else "white"
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color=color)
    return image


def plot_accuracy_matrix(R: Any, path: str | Path, *, title: str = "") -> Path:
    """Saves a heatmap of the (T, T) accuracy matrix ``R`` (percent in each cell).

    Returns:
        The path written.
    """
    m = np.asarray(R, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.size == 0:
        raise ValueError(f"R must be a non-empty (T, T) matrix, got shape {m.shape}")
    plt = _pyplot()
    t = m.shape[0]
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * t, 1.0 + 0.5 * t))
    image = _heatmap(ax, m)
    ax.set_xlabel("tested on experience j")
    ax.set_ylabel("after training on experience i")
    ax.set_xticks(range(t))
    ax.set_yticks(range(t))
    ax.set_title(title or "accuracy R[i][j] (%)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def _seen_so_far(R: np.ndarray) -> np.ndarray:
    """(T,) mean of R[i][:i+1] for each i."""
    return np.array([R[i, : i + 1].mean() for i in range(R.shape[0])])


def plot_accuracy_curves(strategies: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Saves the accuracy-over-experiences curves of every strategy.

    Args:
        strategies: ``{name: summary}`` as in ``results.json``; each summary has
            ``per_seed`` records with an ``accuracy_matrix`` (or just an
            ``accuracy_matrix``).
        path: the PNG to write.
    """
    if not strategies:
        raise ValueError("strategies must hold at least one strategy, got none")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    t = 1
    for name, summary in strategies.items():
        seeds = summary.get("per_seed") or [summary]
        curves = np.array([_seen_so_far(np.asarray(r["accuracy_matrix"], float)) for r in seeds])
        mean = 100 * curves.mean(axis=0)
        std = 100 * (curves.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros_like(mean))
        t = len(mean)
        x = np.arange(1, t + 1)
        (line,) = ax.plot(x, mean, marker="o", markersize=3, label=name)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.set_xticks(range(1, t + 1))
    ax.set_xlabel("experiences trained")
    ax.set_ylabel("mean accuracy on experiences seen (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def plot_routing_share(
    shares: Mapping[str, Sequence[Sequence[float]]], path: str | Path, *, title: str = ""
) -> Path:
    """Saves one heatmap per PEER layer: rows experience j, columns owner o.

    Args:
        shares: ``{layer: (T, O) share}``; row j sums to 1.
        path: the PNG to write.
        title: figure title (e.g. the strategy).
    """
    if not shares:
        raise ValueError("shares must hold at least one layer, got none")
    plt = _pyplot()
    arrays = {layer: np.asarray(s, dtype=np.float64) for layer, s in shares.items()}
    for layer, a in arrays.items():
        if a.ndim != 2 or a.size == 0:
            raise ValueError(f"shares[{layer!r}] must be a (T, O) array, got shape {a.shape}")
    t, o = next(iter(arrays.values())).shape
    fig, axes = plt.subplots(
        1, len(arrays), figsize=(1.6 + 0.55 * o * len(arrays), 1.2 + 0.5 * t), squeeze=False
    )
    for ax, (layer, a) in zip(axes[0], arrays.items(), strict=True):
        image = _heatmap(ax, a)
        ax.set_xlabel("expert owner o")
        ax.set_ylabel("inputs of experience j")
        ax.set_xticks(range(a.shape[1]))
        ax.set_yticks(range(a.shape[0]))
        ax.set_title(layer, fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.046)
    fig.suptitle(title or "routing share by owner (%)", fontsize=9)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def draw_run_plots(results: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Draws every plot of a run into ``out_dir``.

    Files: ``accuracy_matrix_<slug>.png`` per strategy, ``accuracy_curves.png``, and
    ``routing_share_<slug>.png`` per strategy whose pools have more than one owner
    (a fixed pool has nothing to share).

    Returns:
        The paths written.
    """
    strategies = results.get("strategies", results)
    out = Path(out_dir)
    paths = []
    for name, summary in strategies.items():
        paths.append(
            plot_accuracy_matrix(
                summary["accuracy_matrix"],
                out / f"accuracy_matrix_{slug(name)}.png",
                title=f"{name}: accuracy R[i][j] (%), mean over seeds",
            )
        )
    paths.append(plot_accuracy_curves(strategies, out / "accuracy_curves.png"))
    for name, summary in strategies.items():
        routing = summary.get("routing") or {}
        shares = {layer: s["share"] for layer, s in routing.items() if "share" in s}
        if shares and max(np.shape(s)[1] for s in shares.values()) > 1:
            paths.append(
                plot_routing_share(
                    shares,
                    out / f"routing_share_{slug(name)}.png",
                    title=f"{name}: routing share by owner (%), after the last experience",
                )
            )
    return paths
