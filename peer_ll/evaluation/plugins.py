"""Avalanche plugin metrics for PEER routing and plasticity health.

They only collect; the numbers come from the pure functions in
:mod:`peer_ll.evaluation.metrics`. Each emits, after every evaluation experience j,
one ``MetricValue`` per quantity, so the values reach every Avalanche logger (text,
TensorBoard, CSV, ...). Names follow Avalanche's scheme, task segment included, e.g.
``PEER_Usage/blocks.0.peer/eval_phase/test_stream/Task000/Exp002``.

:class:`PEERRoutingMetrics`, per PEER layer (module name) and experience j:

- ``PEER_Usage``, ``PEER_Unevenness``: usage and unevenness (He 2024, Table 2;
  :func:`peer_ll.experts.expert_usage`, :func:`peer_ll.experts.unevenness`) of the
  router mass that the inputs of experience j put on the pool;
- ``PEER_RoutingShare/<layer>/Owner<o>``: the fraction of that mass on owner o's experts;
- ``PEER_Margin``, ``PEER_GateEntropy``: mean retrieval confidence over tokens and heads
  (k-th minus (k+1)-th score; entropy of the gates).

:class:`PlasticityHealth` (Dohare et al. 2024), on one module's outputs for experience j:
``Plasticity_DeadUnits/<module>`` and ``Plasticity_EffectiveRank/<module>``.
"""

from __future__ import annotations

import math

import torch
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from avalanche.evaluation.metric_utils import get_metric_name
from torch import nn

from peer_ll.evaluation.metrics import dead_unit_fraction, effective_rank, routing_share
from peer_ll.evaluation.report import METRIC_NAME, parse_metric_name
from peer_ll.experts import PEER, expert_usage, peer_layers, unevenness
from peer_ll.experts.checks import check_bool, check_int

__all__ = [
    "ACTIVATIONS",
    "METRIC_NAME",
    "PEERRoutingMetrics",
    "PlasticityHealth",
    "parse_metric_name",
    "peer_metrics",
]

#: Module types whose output counts as post-activation features by default.
ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Softplus)


class _PerExperienceMetric(PluginMetric[dict]):
    """Collects during one evaluation experience and emits after it."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, float] = {}
        self._handles: list = []

    def result(self) -> dict[str, float]:
        """The values emitted after the latest evaluation experience, by metric name."""
        return dict(self._last)

    def reset(self) -> None:
        self._last = {}

    def _emit(self, strategy, values: dict[str, float]) -> list[MetricValue]:
        x = strategy.clock.train_iterations
        out = []
        for base, value in values.items():
            name = get_metric_name(base, strategy, add_experience=True, add_task=True)
            out.append(MetricValue(self, name, value, x))
        self._last = {v.name: v.value for v in out}
        return out

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class PEERRoutingMetrics(_PerExperienceMetric):
    """Usage, unevenness, routing share by owner and retrieval confidence, per layer.

    During each evaluation experience every PEER layer tracks routing (even if its
    ``track_routing`` is off); afterwards its router mass and ``track_routing`` are put
    back as they were, so evaluation leaves the layer's statistics untouched.

    Args:
        confidence: also emit the retrieval confidence (one extra top-(k+1) search per
            batch and layer).

    Raises:
        ValueError: at evaluation, if the model has no PEER layer
            (:func:`peer_ll.experts.peer_layers`).
    """

    def __init__(self, *, confidence: bool = True) -> None:
        super().__init__()
        self.confidence = check_bool("confidence", confidence)
        self._state: dict[str, dict] = {}

    def before_eval_exp(self, strategy) -> None:
        self._remove_hooks()
        self._state = {}
        for name, layer in peer_layers(strategy.model).items():
            name = name or "model"  # the model itself is a PEER layer
            self._state[name] = {
                "layer": layer,
                "mass": layer.router_mass.detach().clone(),
                "track": layer.track_routing,
                "margin": [0.0, 0],  # sum over finite values, count
                "entropy": [0.0, 0],
            }
            layer.track_routing = True
            if self.confidence:
                hook = self._confidence_hook(self._state[name])
                self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))

    @staticmethod
    def _confidence_hook(state: dict):
        def hook(layer: PEER, args, kwargs) -> None:
            x = args[0] if args else kwargs["x"]
            owners = args[1] if len(args) > 1 else kwargs.get("owners")
            conf = layer.retrieval_confidence(x.detach(), owners)
            for key, values in (("margin", conf["margin"]), ("entropy", conf["gate_entropy"])):
                finite = values[torch.isfinite(values)]
                state[key][0] += float(finite.double().sum())
                state[key][1] += finite.numel()

        return hook

    def after_eval_exp(self, strategy) -> list[MetricValue]:
        self._remove_hooks()
        values: dict[str, float] = {}
        for name, state in self._state.items():
            layer: PEER = state["layer"]
            n = layer.num_experts
            mass = (layer.router_mass[:n] - state["mass"][:n]).clamp_min(0).detach().cpu()
            with torch.no_grad():
                layer.router_mass.copy_(state["mass"])
            layer.track_routing = state["track"]
            values[f"PEER_Usage/{name}"] = expert_usage(mass)
            if float(mass.sum()) > 0:
                values[f"PEER_Unevenness/{name}"] = unevenness(mass)
                for owner, share in routing_share(mass, layer.owners.cpu()).items():
                    values[f"PEER_RoutingShare/{name}/Owner{owner:03d}"] = share
            if self.confidence:
                for key, label in (("margin", "PEER_Margin"), ("entropy", "PEER_GateEntropy")):
                    total, count = state[key]
                    values[f"{label}/{name}"] = total / count if count else math.nan
        self._state = {}
        return self._emit(strategy, values)

    def __str__(self) -> str:
        return "PEER_Routing"


class PlasticityHealth(_PerExperienceMetric):
    """Dead-unit fraction and effective rank of one module's outputs (Dohare et al. 2024).

    Args:
        module: name of the module (as in ``model.named_modules()``) whose outputs are
            the features; default: the last activation module (:data:`ACTIVATIONS`).
        max_samples: feature rows kept per evaluation experience (the first ones).
        threshold, atol: a unit is dead if its output is ``<= threshold + atol`` on
            every kept row (see :func:`~peer_ll.evaluation.metrics.dead_unit_fraction`).
    """

    def __init__(
        self,
        module: str | None = None,
        *,
        max_samples: int = 1024,
        threshold: float = 0.0,
        atol: float = 0.0,
    ) -> None:
        super().__init__()
        if module is not None and not isinstance(module, str):
            raise TypeError(f"module must be a module name (str) or None, got {module!r}")
        self.module, self.max_samples = module, check_int("max_samples", max_samples, minimum=1)
        self.threshold, self.atol = float(threshold), float(atol)
        self._rows: list[torch.Tensor] = []
        self._count = 0
        self._name = ""

    def features_module(self, model: nn.Module) -> tuple[str, nn.Module]:
        """``(name, module)`` whose outputs are the features in ``model``."""
        modules = dict(model.named_modules())
        if self.module is not None:
            if self.module not in modules:
                raise ValueError(
                    f"module must name a submodule of the model, got {self.module!r}; "
                    f"some names: {sorted(modules)[:8]}"
                )
            return self.module, modules[self.module]
        found = [(n, m) for n, m in modules.items() if isinstance(m, ACTIVATIONS)]
        if not found:
            raise ValueError(
                "module must be given: the model has no activation module "
                f"({', '.join(t.__name__ for t in ACTIVATIONS)})"
            )
        return found[-1]

    def before_eval_exp(self, strategy) -> None:
        self._remove_hooks()
        self._rows, self._count = [], 0
        self._name, module = self.features_module(strategy.model)
        self._handles.append(module.register_forward_hook(self._collect))

    def _collect(self, module: nn.Module, args, output) -> None:
        if not isinstance(output, torch.Tensor) or self._count >= self.max_samples:
            return
        rows = output.detach().reshape(-1, output.shape[-1])[: self.max_samples - self._count]
        self._rows.append(rows.float().cpu())
        self._count += len(rows)

    def after_eval_exp(self, strategy) -> list[MetricValue]:
        self._remove_hooks()
        if not self._rows:
            return []
        features = torch.cat(self._rows)  # (n, units)
        self._rows, self._count = [], 0
        dead = dead_unit_fraction(features, threshold=self.threshold, atol=self.atol)
        if features.shape[0] > features.shape[1]:
            # R of a QR factorisation has the singular values of the features: a small SVD.
            features = torch.linalg.qr(features.double(), mode="r").R  # (units, units)
        values = {
            f"Plasticity_DeadUnits/{self._name}": dead,
            f"Plasticity_EffectiveRank/{self._name}": effective_rank(features),
        }
        return self._emit(strategy, values)

    def __str__(self) -> str:
        return "Plasticity"


def peer_metrics(
    *, routing: bool = True, confidence: bool = True, plasticity: bool = True, module=None
) -> list[PluginMetric]:
    """The peer_ll plugin metrics, for ``EvaluationPlugin(*peer_metrics(), ...)``.

    Args:
        routing: include :class:`PEERRoutingMetrics` (the model must have PEER layers).
        confidence: with ``routing``, emit the retrieval confidence too.
        plasticity: include :class:`PlasticityHealth`.
        module: the features module of :class:`PlasticityHealth`.
    """
    metrics: list[PluginMetric] = []
    if routing:
        metrics.append(PEERRoutingMetrics(confidence=confidence))
    if plasticity:
        metrics.append(PlasticityHealth(module))
    return metrics
