"""Where the JAX program is cached: eager JAX calls run as one compiled ``jax.jit``
program per call signature.
"""

from __future__ import annotations

from typing import Any

from .namespaces import is_jax

_JITTED: dict[Any, Any] = {}


def call_core(fn: Any, arrays: tuple[Any, ...], statics: tuple[Any, ...]) -> Any:
    """``fn(*arrays, *statics)``; for JAX arrays, as one ``jax.jit`` program.

    Op-by-op JAX dispatch compiles every primitive for every new shape; one compiled
    program per call signature is several times faster to compile and to run. Under
    an eager ``jax.grad`` or ``vmap`` the call is still one compiled program; inside
    the caller's own ``jit`` the nested jit is simply inlined.
    """
    present = [a for a in arrays if a is not None]
    if present and is_jax(present[0]):
        jitted = _JITTED.get(fn)
        if jitted is None:
            import jax

            first = len(arrays)
            jitted = jax.jit(fn, static_argnums=tuple(range(first, first + len(statics))))
            _JITTED[fn] = jitted
        return jitted(*arrays, *statics)
    return fn(*arrays, *statics)
