"""One ``xp`` fixture over every backend and device that this machine has.

Backends: numpy, array-api-strict, torch (CPU, and CUDA where a GPU is present),
jax (CPU, and GPU where present), cupy (GPU only). A backend that is not installed, or a
GPU backend on a machine without an NVIDIA GPU, gets no parametrization at all: the test
header names it once (``backends under test: ...``) instead of one skip per test.
``FAVORPLUS_TEST_BACKENDS`` (comma-separated names, e.g. ``jax,jax-gpu``) narrows the
list further: each nox session sets its own backend, so that the numpy parametrizations
run once in the matrix (in ``tests-numpy``), not again in every session.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Hypothesis: no deadlines (shared, noisy machines); a deterministic profile for CI.
# Hypothesis loads its own "ci" profile when CI is set; ours replaces it.
_common = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_examples = int(os.environ.get("FAVORPLUS_HYPOTHESIS_EXAMPLES", "20"))
settings.register_profile("ci", derandomize=True, database=None, max_examples=_examples, **_common)
settings.register_profile("dev", max_examples=_examples, **_common)
settings.register_profile("thorough", max_examples=200, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


if _has("jax"):
    import jax

    jax.config.update("jax_enable_x64", True)
    # JAX multiplies float32 matrices in TF32 on recent GPUs by default; test full float32.
    jax.config.update("jax_default_matmul_precision", "highest")


@dataclass
class Backend:
    """A backend under test: its namespace, device and conversions from/to NumPy."""

    name: str
    xp: Any
    device: Any
    module: Any
    dtypes: dict[str, Any] = field(default_factory=dict)

    def dtype(self, name: str) -> Any:
        if name not in self.dtypes:
            pytest.skip(f"{self.name} has no {name}")
        return self.dtypes[name]

    def asarray(self, a: Any, dtype: str | None = None) -> Any:
        a = np.asarray(a)
        if dtype is None:
            dtype = "bool" if a.dtype == np.bool_ else "float64"
        dt = self.xp.bool if dtype == "bool" else self.dtype(dtype)
        if self.name.startswith("torch") and dtype in ("bfloat16",):
            return self.module.asarray(a.astype(np.float32), device=self.device).to(dt)
        if self.name.startswith("jax"):
            # Converted on the host, then placed: jnp.asarray(a, dtype=, device=) compiles
            # two small programs per new shape and dtype (thousands in the jax session).
            return self.module.device_put(a.astype(np.dtype(dt)), self.device)
        return self.xp.asarray(a, dtype=dt, device=self.device)

    def numpy(self, x: Any) -> np.ndarray:
        """To a float64 (or bool) NumPy array on the host."""
        if self.name.startswith("torch"):
            x = x.detach().cpu()
            if x.dtype != self.module.bool:
                x = x.double()
            return x.numpy()
        if self.name == "cupy":
            return x.get().astype(np.float64) if x.dtype != bool else x.get()
        out = np.from_dlpack(x) if self.name == "array_api_strict" else np.asarray(x)
        return out if out.dtype == np.bool_ else out.astype(np.float64)

    @property
    def supports_half(self) -> bool:
        return "float16" in self.dtypes


def _make(name: str) -> Backend:
    from array_api_compat import array_namespace

    if name == "numpy":
        xp = array_namespace(np.empty(0))
        return Backend(name, xp, "cpu", np, _dtypes(xp, ("float16", "float32", "float64")))
    if name == "array_api_strict":
        if not _has("array_api_strict"):
            pytest.skip("array-api-strict is not installed")
        import array_api_strict as xps

        return Backend(
            name, xps, xps.Device("CPU_DEVICE"), xps, _dtypes(xps, ("float32", "float64"))
        )
    if name.startswith("torch"):
        if not _has("torch"):
            pytest.skip("torch is not installed")
        import torch

        device = "cuda" if name == "torch-cuda" else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("no CUDA GPU for torch")
        xp = array_namespace(torch.empty(0))
        names = ("float16", "bfloat16", "float32", "float64")
        return Backend(name, xp, torch.device(device), torch, _dtypes(torch, names))
    if name.startswith("jax"):
        if not _has("jax"):
            pytest.skip("jax is not installed")
        import jax
        import jax.numpy as jnp

        if name == "jax-gpu":
            try:
                device = jax.devices("gpu")[0]
            except RuntimeError:
                pytest.skip("no GPU for jax")
        else:
            device = jax.devices("cpu")[0]
        names = ("float16", "bfloat16", "float32", "float64")
        return Backend(name, jnp, device, jax, _dtypes(jnp, names))
    if name == "cupy":
        if not _has("cupy"):
            pytest.skip("cupy is not installed")
        import cupy

        try:
            if cupy.cuda.runtime.getDeviceCount() < 1:
                pytest.skip("no GPU for cupy")
        except Exception:
            pytest.skip("no GPU for cupy")
        xp = array_namespace(cupy.empty(0))
        return Backend(
            name, xp, cupy.cuda.Device(0), cupy, _dtypes(cupy, ("float16", "float32", "float64"))
        )
    raise ValueError(name)


def _dtypes(ns: Any, names: tuple[str, ...]) -> dict[str, Any]:
    return {n: getattr(ns, n) for n in names if hasattr(ns, n)}


BACKENDS = ["numpy", "array_api_strict", "torch", "torch-cuda", "jax", "jax-gpu", "cupy"]
_MODULE = {"torch-cuda": "torch", "jax-gpu": "jax"}  # the package of each backend
_GPU = ("torch-cuda", "jax-gpu", "cupy")
_cache: dict[str, Backend] = {}


def _why_not(name: str, chosen: list[str] | None) -> str | None:
    """Why ``name`` is not under test here (None: it is)."""
    module = _MODULE.get(name, name)
    if not _has(module):
        return f"{module} not installed"
    if name in _GPU and shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU"
    if chosen is not None and name not in chosen:
        return "not in FAVORPLUS_TEST_BACKENDS"
    return None


def _chosen() -> list[str] | None:
    value = os.environ.get("FAVORPLUS_TEST_BACKENDS", "").strip()
    if not value:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise pytest.UsageError(
            f"FAVORPLUS_TEST_BACKENDS: unknown backend(s) {', '.join(unknown)}; "
            f"expected names from {', '.join(BACKENDS)}"
        )
    return names


# Decided once at import (the same in every pytest-xdist worker): the xp fixture's params.
_CHOSEN = _chosen()
_NOT_UNDER_TEST = {n: why for n in BACKENDS if (why := _why_not(n, _CHOSEN)) is not None}
UNDER_TEST = [n for n in BACKENDS if n not in _NOT_UNDER_TEST]


def pytest_report_header(config: pytest.Config) -> list[str]:
    """The backends under test, and why each other one is not (once, not per test)."""
    absent = "; ".join(f"{n} ({why})" for n, why in _NOT_UNDER_TEST.items())
    return [
        f"backends under test: {', '.join(UNDER_TEST) or 'none'}",
        f"backends not under test: {absent or 'none'}",
    ]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``numpy_only`` compute on NumPy arrays alone, whatever the session's
    backend: they run where numpy is under test (``tests-numpy``, or a run without
    ``FAVORPLUS_TEST_BACKENDS``), once in the matrix instead of once per session."""
    if "numpy" in UNDER_TEST:
        return
    dropped = [item for item in items if item.get_closest_marker("numpy_only")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not item.get_closest_marker("numpy_only")]


@pytest.fixture(params=UNDER_TEST, scope="session")
def xp(request: pytest.FixtureRequest) -> Backend:
    """The backend under test (named ``xp`` as in the array API convention)."""
    name = request.param
    if name not in _cache:
        _cache[name] = _make(name)
    return _cache[name]


@pytest.fixture(scope="session")
def numpy_backend() -> Backend:
    return _make("numpy")


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config) -> Any:
    """A test skipped because its framework is not installed (``pytest.importorskip``)
    prints no ``s`` in the progress line: the header names the missing backends once, and
    the closing line still counts every skip."""
    if report.skipped and "could not import" in str(report.longrepr):
        return "skipped", "", "SKIPPED"
    return None
