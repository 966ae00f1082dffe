"""The type aliases of the core: an array of any array API library, and its namespace."""

from __future__ import annotations

from typing import Any

Array = Any
Namespace = Any
