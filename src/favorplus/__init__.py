"""favorplus: FAVOR+ attention (Performers) for every array API backend.

One implementation, written against the Python array API standard, runs on NumPy,
PyTorch, JAX, CuPy and array-api-strict arrays and returns results of the caller's
own kind, on the caller's device.
"""

from .attention import favor_attention, favor_attention_matrix, softmax_attention
from .causal import CausalState, favor_attention_step, init_causal_state
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
    "KERNELS",
    "CausalState",
    "KeySummary",
    "MaskParts",
    "causal_summary",
    "draw_projection",
    "exclusive_prefix",
    "favor_attention",
    "favor_attention_matrix",
    "favor_attention_step",
    "feature_map",
    "init_causal_state",
    "key_summary",
    "merge_causal_states",
    "merge_summaries",
    "read_summary",
    "softmax_attention",
    "split_mask",
]

__version__ = "0.1.0"
