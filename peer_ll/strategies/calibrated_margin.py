"""Key-match owner inference with per-owner calibration ("margin-z").

Raw key-match confidence compares scores of different owners' keys, and those scales
differ: the first owner's keys trained with the query network, later owners' keys
behind a frozen one, and a softmax gate is blind to a shift of all scores. Plain
"margin" inference then tends to pick one owner for every input.
:class:`CalibratedMarginInference` z-scores each owner's confidence by the mean and
standard deviation it has on pseudo-queries drawn from that owner's own query
statistics, per head, then averages over heads: an owner wins where its keys match a
query as well as they match their own inputs. It needs no replay and no extra pass
over data; the calibration is redone whenever the owner's statistics change.
"""

from __future__ import annotations

import torch

from peer_ll.experts import PEER, OwnerInference
from peer_ll.experts.checks import check_int
from peer_ll.kernels.product_topk import product_topk


class CalibratedMarginInference(OwnerInference):
    """Owner scores ``mean_h (conf_o,h(q) − μ_o,h) / σ_o,h``; use as ``layer.owner_inference``.

    Args:
        key_score: "best" (top-1 score) or "gap" (top-1 minus k-th), as for "margin".
        num_samples: pseudo-queries per owner for the calibration.
        seed: seed of the pseudo-queries.
        soft, top, temperature, candidates: as for :class:`~peer_ll.experts.OwnerInference`.
    """

    def __init__(
        self,
        *,
        key_score: str = "best",
        num_samples: int = 512,
        seed: int = 0,
        soft: bool = False,
        top: int = 2,
        temperature: float = 1.0,
        candidates: list[int] | None = None,
    ) -> None:
        super().__init__(
            "margin",
            key_score=key_score,
            soft=soft,
            top=top,
            temperature=temperature,
            candidates=candidates,
        )
        self.method = "margin-z"
        self.num_samples = check_int("num_samples", num_samples, minimum=2)
        self.seed = int(seed)
        self._calibration: dict[tuple[int, int], tuple[int, torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"CalibratedMarginInference(key_score={self.key_score!r}, soft={self.soft}, "
            f"num_samples={self.num_samples})"
        )

    def candidate_owners(self, layer: PEER) -> list[int]:
        """Owners with enough experts and query statistics to calibrate on."""
        owners = super().candidate_owners(layer)
        if layer.query_stats is None:
            raise ValueError(
                "calibrated margin inference needs query statistics, got a layer "
                "built with query_stats=None"
            )
        usable = set(layer.query_stats.usable_owners())
        owners = [o for o in owners if o in usable]
        if not owners:
            raise ValueError("no owner can be inferred: no candidate owner has query statistics")
        return owners

    def confidence(self, layer: PEER, q: torch.Tensor, owner: int) -> torch.Tensor:
        """Raw key-match confidence (T, H) of ``owner``'s keys for queries q (T, H, d)."""
        k = layer.topk
        keep = layer.segment_owner == owner
        s, _ = product_topk(
            layer.owner_query(q, owner),
            layer.sub_keys.detach(),
            layer.segments[keep],
            k,
            backend=layer.backend,
        )  # (T, H, k)
        return s[..., 0] if self.key_score == "best" else s[..., 0] - s[..., k - 1]

    @torch.no_grad()
    def calibration(self, layer: PEER, owner: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, σ), each (H,): the owner's confidence on its own pseudo-queries."""
        count = layer.query_stats.count_of(owner)
        key = (id(layer), owner)
        cached = self._calibration.get(key)
        if cached is None or cached[0] != count:
            gen = torch.Generator(device=layer.query_stats.mean.device).manual_seed(self.seed)
            q = layer.query_stats.sample(
                owner, self.num_samples, generator=gen, dtype=layer.sub_keys.dtype
            ).to(layer.sub_keys.device)
            conf = self.confidence(layer, q, owner)  # (P, H)
            cached = (count, conf.mean(0), conf.std(0).clamp_min(1e-6))
            self._calibration[key] = cached
        return cached[1], cached[2]

    @torch.no_grad()
    def scores(self, layer: PEER, q: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """(owners O, calibrated scores (T, O)) for queries q (T, H, d)."""
        owners = self.candidate_owners(layer)
        out = []
        for owner in owners:  # one restricted search per owner, not per input
            mu, sd = self.calibration(layer, owner)
            out.append(((self.confidence(layer, q, owner) - mu) / sd).mean(dim=-1))
        return owners, torch.stack(out, dim=1)
