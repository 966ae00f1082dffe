"""Backend helpers shared by the core modules, one idea per module:

* ``types``: the ``Array`` and ``Namespace`` aliases;
* ``namespaces``: array kinds, namespaces and devices;
* ``dtypes``: accepted dtypes and the compute dtype;
* ``shapes``: broadcasting of batch dimensions;
* ``tracing``: traced arrays, accelerators, autodiff tracking (what the host may read);
* ``inplace``: the in-place fast path;
* ``scan``: the chunk-state scan, running maximum and splitting;
* ``jit``: the JAX program cache;
* ``blocking``: CPU block lengths;
* ``recompute``: autograd recomputation of blocks.

Everything is array API only, except the optional backend fast paths chosen at call
time (no backend is imported when favorplus is imported). The names are re-exported
here for the core modules.
"""

from __future__ import annotations

from .blocking import BLOCK_NUMBERS, cpu_block
from .dtypes import check_float, compute_dtype, is_half
from .inplace import (
    _NUMPY_UFUNCS,
    _binary,
    _fits,
    _mutable,
    add,
    exp,
    lower_triangle,
    multiply,
    subtract,
)
from .jit import _JITTED, call_core
from .namespaces import (
    _check_devices,
    _instance,
    _refuse_numpy_subclass,
    _torch_namespace,
    common_namespace,
    device,
    is_cupy,
    is_dask,
    is_jax,
    is_numpy,
    is_torch,
    require,
)
from .recompute import _keep, _never, recompute
from .scan import chunk_loop, chunk_scan, cumulative_max, split, unstack
from .shapes import broadcast_shapes
from .tracing import (
    _functorch_active,
    _torch_traced,
    host_readable,
    is_traced,
    needs_grad,
    on_accelerator,
    scanned_form,
    stop_gradient,
)
from .types import Array, Namespace
