"""Non-finite values never enter owner statistics: they are skipped, counted, warned once.

A NaN or infinite input (or query) would poison an owner's running mean and
covariance for good, and every later owner score with it. The statistics modules of
this package drop every sample that holds a non-finite value before it is merged,
add the number dropped to their ``nonfinite_skipped`` counter, and warn (with
:mod:`warnings`, once per statistics module) the first time it happens.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

logger = logging.getLogger(__name__)


def finite_rows(stats: nn.Module, rows: torch.Tensor, owner: int) -> torch.Tensor:
    """(N,) bool: the samples of ``rows`` (N, ...) whose values are all finite.

    Counts the others on ``stats.nonfinite_skipped`` and warns the first time.
    """
    keep = torch.isfinite(rows.reshape(len(rows), -1)).all(dim=1)
    skipped = int((~keep).sum())
    if skipped:
        stats.nonfinite_skipped = getattr(stats, "nonfinite_skipped", 0) + skipped
        logger.info(
            "%s skipped %d non-finite samples of owner %d", type(stats).__name__, skipped, owner
        )
        if not getattr(stats, "_warned_nonfinite", False):
            stats._warned_nonfinite = True
            warnings.warn(
                f"{type(stats).__name__}: skipped {skipped} of {len(rows)} samples of "
                f"owner {owner} holding NaN or infinite values; they do not enter the "
                "statistics (counted in .nonfinite_skipped; warned once)",
                stacklevel=3,
            )
    return keep
