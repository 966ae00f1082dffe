"""Messages for the optional framework modules when their framework is missing."""

from __future__ import annotations


def missing(module: str, extra: str, needs: str) -> str:
    """The ImportError message of ``module`` (e.g. favorplus.torch) without ``needs``."""
    return (
        f"{module} needs {needs}, which is not installed: install the '{extra}' extra, "
        f"python -m pip install 'favorplus[{extra}]' (from a clone: "
        f"python -m pip install '.[{extra}]')"
    )
