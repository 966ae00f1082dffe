"""nox sessions: one test session per backend (each with only that backend installed),
lint, the demo and the benchmarks.

    nox -t tests             # the whole backend test matrix (what CI runs), without `slow`
    nox -t tests -- -m slow  # the long statistical runs (CI runs them after the matrix)
    nox -s tests-torch       # one backend
    nox -s lint
    nox -s bench -- --quick  # every benchmark, quick mode (what CI runs)
    nox -s bench -- fig4     # one benchmark, full size
    nox -s docs              # the documentation site, warnings as errors
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).parent
CONSTRAINTS = ("-c", str(ROOT / "constraints" / "cpu.txt"))

# backend -> (extras, environment). FAVORPLUS_TEST_BACKENDS (tests/conftest.py): the xp
# fixture's backends in that session, so that each backend's parametrizations run in one
# session only (numpy is installed everywhere, but its parametrizations run in tests-numpy).
BACKENDS = {
    # favorplus.sklearn's tests run on numpy, strict, torch and cupy; SCIPY_ARRAY_API=1 lets
    # scikit-learn dispatch to the array API (sklearn.set_config(array_api_dispatch=True)).
    # tests/test_dask.py (favorplus on dask arrays) runs in the numpy session.
    "numpy": (
        "test,sklearn,dask",
        {"SCIPY_ARRAY_API": "1", "FAVORPLUS_TEST_BACKENDS": "numpy"},
    ),
    "strict": (
        "test,strict,sklearn",
        {"SCIPY_ARRAY_API": "1", "FAVORPLUS_TEST_BACKENDS": "array_api_strict"},
    ),
    # gpu (Triton): tests/test_triton.py and the fused kernels' doctests run here under
    # Triton's interpreter, in the same environment (one torch install less in the matrix).
    "torch": (
        "test,torch,transformers,sklearn,gpu",
        {"SCIPY_ARRAY_API": "1", "FAVORPLUS_TEST_BACKENDS": "torch,torch-cuda"},
    ),
    # JAX compiles per shape: fewer Hypothesis examples keep the session short, and the
    # compiled programs are kept on disk (JAX's persistent compilation cache, in the user's
    # cache directory: _jax_cache_dir), so that a second run skips most compilations. That
    # needs the same shapes on every run: Hypothesis's derandomized "ci" profile (random
    # examples, the "dev" profile, drew new shapes each run: a warm run missed the cache
    # ~10 times in 11); HYPOTHESIS_PROFILE set by the caller wins.
    "jax": (
        "test,jax,flax",
        {
            "HYPOTHESIS_PROFILE": os.environ.get("HYPOTHESIS_PROFILE", "ci"),
            "FAVORPLUS_HYPOTHESIS_EXAMPLES": "8",
            "FAVORPLUS_TEST_BACKENDS": "jax,jax-gpu",
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
        },
    ),
    "cupy": (
        "test,cupy,sklearn",
        {"SCIPY_ARRAY_API": "1", "FAVORPLUS_TEST_BACKENDS": "cupy"},
    ),
}


def _jax_cache_dir() -> str:
    """Where tests-jax keeps JAX's compiled programs: $JAX_COMPILATION_CACHE_DIR if set, else
    the user's cache directory ($XDG_CACHE_HOME or ~/.cache, then favorplus/jax), so that
    every clone and every fresh .nox of this machine reuses them (JAX keys each entry by
    the program, the jax / jaxlib versions and the flags: a stale entry is never used)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "favorplus" / "jax")


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def _marker_args(posargs: list[str]) -> list[str]:
    """``-m "not slow"`` unless the caller chose markers: the long statistical runs (marked
    ``slow``) are left to `nox -t tests -- -m slow`, which CI (.ci/run) runs too."""
    chosen = any(a == "-m" or (a.startswith("-m") and not a.startswith("--")) for a in posargs)
    return [] if chosen else ["-m", "not slow"]


def _make_test_session(backend: str, extras: str, env: dict[str, str]) -> None:
    @nox.session(name=f"tests-{backend}", tags=["tests"])
    def tests(session: nox.Session) -> None:
        if backend == "cupy" and not _has_gpu():
            session.skip("cupy needs an NVIDIA GPU; none on this machine")
        session.install(*CONSTRAINTS, "-e", f".[{extras}]")
        if backend == "numpy":
            # scikit-learn's set_output and feature-name checks of favorplus.sklearn
            session.install("pandas", "polars")
        # Two pytest workers (pytest-xdist): the 2-core CI machine is otherwise half idle
        # while JAX compiles or a test waits on a subprocess. `nox -s tests-numpy -- -n 0`
        # runs in one process.
        workers = [] if any(a.startswith("-n") for a in session.posargs) else ["-n", "2"]
        run_env = dict(env)
        if backend == "jax":
            run_env["JAX_COMPILATION_CACHE_DIR"] = _jax_cache_dir()
        # With markers chosen (`-- -m slow`), exit code 5 (no test selected) is a pass: some
        # sessions have no slow test.
        marked = not _marker_args(session.posargs)
        session.run(
            "python",
            "-m",
            "pytest",
            *workers,
            *_marker_args(session.posargs),
            *session.posargs,
            env=run_env,
            success_codes=[0, 5] if marked else [0],
        )

    tests.__doc__ = f"Run the test suite with only {backend} installed."


for _name, (_extras, _env) in BACKENDS.items():
    _make_test_session(_name, _extras, _env)


@nox.session(name="tests-triton")
def tests_triton(session: nox.Session) -> None:
    """The fused Triton kernels alone under Triton's interpreter (CPU tensors; no GPU
    needed). In the matrix (`nox -t tests`) they run in tests-torch."""
    session.install(*CONSTRAINTS, "-e", ".[test,torch,gpu]")
    paths = ["tests/test_triton.py", "src/favorplus/_fastpath.py", "src/favorplus/_triton"]
    # Posargs that name tests replace the paths; options alone (e.g. `-m slow`) keep them.
    if any(a.startswith(("tests", "src")) for a in session.posargs):
        paths = []
    env = {"TRITON_INTERPRET": "1"}
    args = [*_marker_args(session.posargs), *session.posargs, *paths]
    marked = not _marker_args(session.posargs)
    session.run("python", "-m", "pytest", *args, env=env, success_codes=[0, 5] if marked else [0])


@nox.session(tags=["lint"])
def lint(session: nox.Session) -> None:
    """ruff check."""
    session.install("ruff>=0.6")
    paths = ["src", "tests", "benchmarks", "examples", "docs", "conftest.py", "noxfile.py"]
    session.run("ruff", "check", *paths)


@nox.session
def demo(session: nox.Session) -> None:
    """The demo on every CPU backend."""
    session.install(*CONSTRAINTS, "-e", ".[all]")
    session.run("python", "-m", "favorplus", *session.posargs)


# benchmarks/run.py: the speed and memory goals; benchmarks/paper.py: the paper's figures;
# benchmarks/sklearn_kernels.py: favorplus.sklearn against RBFSampler and Nystroem.
RUN_BENCHES = ("bidirectional", "causal")
PAPER_FIGURES = ("fig2", "fig3", "fig4", "peers")
# benchmarks/generate.py: transformers' generate() with DynamicCache vs FavorplusCache;
# benchmarks/sklearn_kernels.py: favorplus.sklearn against RBFSampler and Nystroem;
# benchmarks/estimators.py: simplex, OPRF and SADERF beside FAVOR+ (accuracy and cost).
SCRIPT_BENCHES = {
    "generate": "benchmarks/generate.py",
    "sklearn_kernels": "benchmarks/sklearn_kernels.py",
    "estimators": "benchmarks/estimators.py",
    "dask_million": "benchmarks/dask_million.py",
    "distributed": "benchmarks/distributed.py",
    "distributed_torch": "benchmarks/distributed_torch.py",
    "jax_speed": "benchmarks/jax_speed.py",
}


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks: `nox -s bench -- [NAME ...] [--quick]`.

    NAME: bidirectional, causal (benchmarks/run.py), fig2, fig3, fig4, peers
    (benchmarks/paper.py), generate (benchmarks/generate.py), sklearn_kernels
    (benchmarks/sklearn_kernels.py), estimators (benchmarks/estimators.py), dask_million,
    distributed (8 simulated JAX devices), distributed_torch (gloo processes), jax_speed
    (favorplus on JAX against a paper-style program); none: all of
    them. --quick: small sizes (each under a minute, written to benchmarks/results/quick/
    so that committed results stay).
    """
    session.install(
        *CONSTRAINTS,
        "-e",
        ".[torch,jax,strict,transformers,sklearn,dask]",
        "performer-pytorch",
        "psutil",
        "matplotlib",
    )
    known = RUN_BENCHES + PAPER_FIGURES + tuple(SCRIPT_BENCHES)
    names = [a for a in session.posargs if a in known] or list(known)
    options = [a for a in session.posargs if a not in known]  # e.g. --quick, --cap 2
    run = [n for n in names if n in RUN_BENCHES]
    if run:
        quick = "--quick" in options
        out = ["--out", str(ROOT / "benchmarks" / "results" / "quick")] if quick else []
        session.run("python", "benchmarks/run.py", *run, *options, *out)
    for figure in (n for n in names if n in PAPER_FIGURES):
        session.run("python", "benchmarks/paper.py", figure, *options)
    for name in (n for n in names if n in SCRIPT_BENCHES):
        quick = ["--quick", "--out", str(ROOT / "benchmarks" / "results" / "quick")]
        session.run("python", SCRIPT_BENCHES[name], *(quick if "--quick" in options else []))


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/, warnings as errors (mkdocs --strict)."""
    session.install(*CONSTRAINTS, "-e", ".[all]")
    session.install("-r", str(ROOT / "docs" / "requirements.txt"))
    # NO_MKDOCS_2_WARNING: mkdocs-material prints a banner about MkDocs 2.0 and its own
    # end of life (May 2027) on every build; the versions are pinned in docs/requirements.txt.
    session.run(
        "mkdocs",
        "build",
        "--strict",
        "--config-file",
        str(ROOT / "mkdocs.yml"),
        "--site-dir",
        str(ROOT / "site"),
        *session.posargs,
        env={"NO_MKDOCS_2_WARNING": "1"},
    )
