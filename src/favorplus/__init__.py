"""favorplus: FAVOR+ attention (Performers) for every array API backend.

One implementation, written against the Python array API standard, runs on NumPy,
PyTorch, JAX, CuPy and array-api-strict arrays and returns results of the caller's
own kind, on the caller's device.
"""

from ._fastpath import fast_path, get_fast_path, set_fast_path
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
from .masks import MaskParts, split_mask
from .projection import draw_projection
from .summaries import (
    KeySummary,
    causal_summary,
    exclusive_prefix,
    key_summary,
    merge_causal_states,
    merge_summaries,
    read_summary,
)

__all__ = [
    "ESTIMATORS",
    "KERNELS",
    "OPRF",
    "SADERF",
    "causal_summary",
    "CausalState",
    "draw_projection",
    "exclusive_prefix",
    "fast_path",
    "favor_attention",
    "favor_attention_matrix",
    "favor_attention_step",
    "feature_map",
    "feature_statistics",
    "FeatureStatistics",
    "get_fast_path",
    "init_causal_state",
    "key_summary",
    "KeySummary",
    "MaskParts",
    "merge_causal_states",
    "merge_summaries",
    "oprf_second_moment",
    "optimal_a",
    "read_summary",
    "saderf_psi",
    "set_fast_path",
    "softmax_attention",
    "split_mask",
]

__version__ = "0.1.0"
