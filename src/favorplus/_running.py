"""Running estimator statistics for the framework layers (array API): which kernels keep
them, the kernel of one call, and their BatchNorm-like update.

A layer whose kernel is a *data-driven* OPRF / SADERF (``"softmax_oprf"``,
``"softmax_saderf"``, ``OPRF()``, ``SADERF()``: no fixed parameters, no statistics) keeps
running :class:`~favorplus.FeatureStatistics`, one set per head. Bidirectional calls take
the parameters from their own queries and keys (per sequence and head, constants for
autodiff), as the functional API does; causal calls and decoding take them from the
running statistics, so that no output depends on a later token of the call. Training
calls update the running statistics from the call's statistics *after* computing the
output. The layers (:mod:`favorplus.torch`, :mod:`favorplus.flax`) hold the arrays in
their frameworks' state; this module holds what they share.
"""

from __future__ import annotations

import numbers
from typing import Any

from ._backend import Array, common_namespace
from .estimators import OPRF, SADERF, FeatureStatistics
from .features import resolve_kernel

__all__ = [
    "STAT_NAMES",
    "check_momentum",
    "tracks_statistics",
    "with_statistics",
    "updated_statistics",
]

# The names of the four running arrays in a layer's state (after FeatureStatistics's fields).
STAT_NAMES = (
    "running_query_mean",
    "running_query_sq_mean",
    "running_key_mean",
    "running_key_sq_mean",
)


def tracks_statistics(kernel: Any) -> bool:
    """True for an OPRF / SADERF kernel whose parameters come from the data (neither fixed
    values nor statistics given): the kernels for which a layer keeps running statistics."""
    kern = resolve_kernel(kernel)
    spec = getattr(kern, "spec", None)
    return spec is not None and spec.statistics is None and spec.a is None


def with_statistics(kernel: Any, statistics: FeatureStatistics) -> OPRF | SADERF:
    """The estimator of ``kernel`` (data-driven OPRF or SADERF) with its parameters computed
    from ``statistics`` (causal-safe)."""
    kern = resolve_kernel(kernel)
    if getattr(kern, "saderf", False):
        return SADERF(statistics=statistics)
    return OPRF(statistics=statistics)


def check_momentum(momentum: Any) -> float | None:
    """``momentum`` as a float in (0, 1], or None (a cumulative average)."""
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(
            f"statistics_momentum must be a float in (0, 1] or None; got {type(momentum).__name__}"
        )
    if not 0.0 < float(momentum) <= 1.0:
        raise ValueError(f"statistics_momentum must be in (0, 1] or None; got {momentum!r}")
    return float(momentum)


def updated_statistics(
    running: tuple[Array, ...],
    count: Array,
    batch: tuple[Array, ...],
    momentum: float | None,
) -> tuple[tuple[Array, ...], Array]:
    """The running statistics after one batch, and the new batch count.

    ``running + f (batch - running)`` with ``f = 1`` for the first batch (``count == 0``:
    the first batch replaces the zeros the layer starts from), then ``f = momentum``
    (an exponential moving average, as BatchNorm's), or ``f = 1 / (count + 1)`` with
    ``momentum=None`` (the average of all batches). A batch statistic that is not finite
    (an inf or NaN in an unmasked query or key) leaves that running entry unchanged.
    """
    xp = common_namespace(running=running[0], count=count)
    dtype = running[0].dtype
    n = xp.astype(count, dtype)
    if momentum is None:
        factor = 1.0 / (n + 1.0)
    else:
        first = xp.astype(count == 0, dtype)
        factor = first + (1.0 - first) * momentum
    out = []
    for r, b in zip(running, batch):
        b = xp.astype(b, dtype)
        new = r + factor * (b - r)
        out.append(xp.where(xp.isfinite(b), new, r))
    return tuple(out), count + 1
