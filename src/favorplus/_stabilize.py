"""Stabilized features: exponentials shifted by constants that cancel exactly.

* Queries: one constant per query row (it cancels between numerator and denominator).
* Keys, bidirectional: one constant per feature column, over the unmasked keys of a
  sequence, added back on the query side, so that ``q_r * k_r`` is unchanged for
  every feature r. Every key feature is then at most 1 and, for the row's largest
  query feature (equal to 1), some unmasked key has feature exactly 1: the
  normaliser of a positive kernel is at least 1 and can neither overflow nor
  underflow.
* Keys, causal: a running maximum over the past only (see ``causal.py``).
"""

from __future__ import annotations

from ._backend import Array, Namespace, add, exp, host_readable, stop_gradient, subtract
from .features import FeatureParts

NEG_INF = float("-inf")


def below(xp: Namespace, x: Array, top: Array, *, owned: bool) -> Array:
    """``x - top`` for a ``top`` that no element of ``x`` exceeds: never above 0, and
    exactly 0 where ``x`` reaches ``top``, whatever a compiler does.

    The stabilizers rely on the largest exponent being exactly 0 (a feature exactly 1).
    In a traced program that is not guaranteed: XLA copies the producer of ``x`` (the
    projection) into every consuming fusion, and the compiler may contract
    ``u * w - top`` into one fused multiply-add, which skips the rounding of ``u * w``
    that the maximum saw. At ``|u * w|`` near 1e19 the difference is about 1e11, and
    the feature that should be 1 becomes ``exp(1e11) = inf``. Where ``x >= top`` (the
    elements that reach the maximum), the result is pinned to 0 with ``arg - arg``
    (same value, the gradient of ``arg`` kept). Eager arrays, whose operations run one
    at a time, take the plain subtraction.
    """
    if host_readable(x):
        return subtract(xp, x, top, owned=owned)
    reach = x >= top  # before the subtraction, which may run in place on x
    arg = subtract(xp, x, top, owned=owned)
    return xp.where(reach, arg - stop_gradient(arg), arg)


def query_features(xp: Namespace, parts: FeatureParts, shift: Array | None = None) -> Array:
    """Query features stabilized by their row maximum; ``shift`` (per feature) is added first."""
    log = parts.log
    owned = log is not None and not parts.shared  # a fresh (..., L, M) array of ours
    if shift is not None:
        if log is None:
            log, owned = shift, False
        else:
            log = add(xp, log, shift, owned=owned)  # in place, or a new array: ours either way
            owned = True
    elif parts.shared:
        log = None
    if log is None:
        # A constant per row cancels in the ratio: nothing to exponentiate.
        assert parts.sign is not None
        return parts.sign
    top = xp.max(stop_gradient(log), axis=-1, keepdims=True)
    values = exp(xp, below(xp, log, top, owned=owned), owned=True)
    return values if parts.sign is None else parts.sign * values


def bidirectional_features(
    xp: Namespace, qparts: FeatureParts, kparts: FeatureParts, key_mask: Array | None
) -> tuple[Array, Array]:
    """Stabilized query and key features whose products equal the true ones."""
    mask = None if key_mask is None else key_mask[..., None]
    shift = None
    if kparts.log is None:
        assert kparts.sign is not None
        kf = kparts.sign if mask is None else xp.where(mask, kparts.sign, 0.0)
    else:
        lk = kparts.log
        masked = lk if mask is None else xp.where(mask, lk, NEG_INF)
        top = xp.max(stop_gradient(masked), axis=-2, keepdims=True)
        top = xp.where(xp.isfinite(top), top, 0.0)
        kf = exp(xp, below(xp, masked, top, owned=True), owned=True)
        if kparts.sign is not None:
            kf = kparts.sign * kf
        # A per-feature constant goes back on the query side; a shared one cancels.
        shift = None if kparts.shared else top
    return query_features(xp, qparts, shift), kf
