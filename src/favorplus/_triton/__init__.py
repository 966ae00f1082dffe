"""Fused Triton kernels for torch CUDA tensors (imported only when the fast path runs).

Nothing here is imported by ``import favorplus``: :mod:`favorplus._fastpath` imports
these modules, and with them ``triton``, the first time a call takes the fast path.
"""
