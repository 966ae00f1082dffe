"""favorplus: FAVOR+ attention (Performers) for every array API backend.

One implementation, written against the Python array API standard, runs on NumPy,
PyTorch, JAX, CuPy and array-api-strict arrays and returns results of the caller's
own kind, on the caller's device.
"""

from .attention import favor_attention, favor_attention_matrix, softmax_attention
from .causal import CausalState, favor_attention_step, init_causal_state
from .estimators import (
    ESTIMATORS,
    OPRF,
    SADERF,
    FeatureStatistics,
    feature_statistics,
    oprf_second_moment,
    optimal_a,
    saderf_psi,
)
from .features import KERNELS, feature_map
from .projection import draw_projection

__all__ = [
    "ESTIMATORS",
    "KERNELS",
    "OPRF",
    "SADERF",
    "CausalState",
    "FeatureStatistics",
    "draw_projection",
    "favor_attention",
    "favor_attention_matrix",
    "favor_attention_step",
    "feature_map",
    "feature_statistics",
    "init_causal_state",
    "optimal_a",
    "oprf_second_moment",
    "saderf_psi",
    "softmax_attention",
]

__version__ = "0.1.0"
