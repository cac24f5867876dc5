"""Forgetting, plasticity and PEER routing metrics; plugin metrics, reports and plots.

The pure metrics load with the package. The Avalanche plugin metrics
(``peer_ll.evaluation.plugins``, ``.matrix_plugin``), run summaries (``.report``) and
plots (``.plots``) load on first use of one of their names, so importing the metrics
stays light.
"""

from importlib import import_module

from peer_ll.evaluation import metrics as _metrics
from peer_ll.evaluation.metrics import *  # noqa: F403 (the pure metrics, as listed there)

_LAZY = {
    "AccuracyMatrix": "matrix_plugin",
    "PEERRoutingMetrics": "plugins",
    "PlasticityHealth": "plugins",
    "peer_metrics": "plugins",
    "evaluation_values": "report",
    "load_results": "report",
    "parse_metric_name": "report",
    "results_table": "report",
    "seed_scalars": "report",
    "summarize": "report",
    "write_results": "report",
    "draw_run_plots": "plots",
    "plot_accuracy_curves": "plots",
    "plot_accuracy_matrix": "plots",
    "plot_routing_share": "plots",
}

__all__ = [*_metrics.__all__, *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"peer_ll.evaluation.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
