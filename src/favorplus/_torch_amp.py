"""Autocast switched off around favorplus's attention in the torch layers (it computes in
the inputs' dtype, at least float32, and casts back itself)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def autocast_off(device: torch.device) -> Any:
    """``torch.autocast(device.type, enabled=False)``; nothing on the ``meta`` device,
    which has no autocast (shape inference runs there)."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)
