"""Every Python example in README.md and docs/**/*.md runs as a test.

One test per Markdown file. The file's fenced code blocks whose info string starts
with ``python`` (```` ```python ````, ```` ```python title="x.py" ````) run in the
order they appear, in one namespace, so a later block can use the names an earlier
one defined. Line numbers in tracebacks are the Markdown file's own.

Markers, written as HTML comments (invisible in the rendered site):

* ``<!-- docs-test: skip -->`` on the line right before an opening fence: that block
  is shown but not run (e.g. a GPU-only or illustrative snippet). Blocks with
  another language (```` ```bash ````, ```` ```text ````, ```` ```pycon ````) never run.
* ``<!-- docs-test: skip-file REASON -->`` anywhere: the whole file is skipped.

A file is skipped (``pytest.skip`` with the reason) when a module that one of its
running blocks imports is not available: a backend that this test session did not
install (each nox session installs one backend: numpy only, array-api-strict, torch,
jax), an optional favorplus module that does not exist yet or whose backend is
missing (``favorplus.torch``, ``favorplus.flax``), or CuPy without a GPU. Any other
import error fails the test. Examples assert what they show, so a broken example
fails.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_BLOCK = "<!-- docs-test: skip -->"
SKIP_FILE = re.compile(r"<!--\s*docs-test:\s*skip-file\s*(.*?)\s*-->")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


@dataclass
class Block:
    """One fenced block: its first code line (1-based) in the file, and its code."""

    line: int
    code: str


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [f for f in files if f.is_file()]


def python_blocks(text: str) -> list[Block]:
    """The runnable ```python blocks of a Markdown text (see the module docstring)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, info = match["indent"], match["fence"], match["info"].strip()
        words = info.split()
        runs = bool(words) and words[0] == "python"
        skipped = i > 0 and lines[i - 1].strip() == SKIP_BLOCK
        start = i + 1
        j = start
        close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        if runs and not skipped:
            body = [
                line[len(indent) :] if line.startswith(indent) else line for line in lines[start:j]
            ]
            blocks.append(Block(line=start + 1, code="\n".join(body) + "\n"))
        i = j + 1
    return blocks


def imported_modules(code: str) -> list[str]:
    """Absolute module names imported anywhere in ``code``."""
    names: list[str] = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def unavailable(module: str) -> str | None:
    """Why ``module`` cannot be used here, or None when it can."""
    root = module.split(".")[0]
    if root != "favorplus" and importlib.util.find_spec(root) is None:
        return f"{root} is not installed"
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        # Skip when the module itself (or a backend it needs) is missing; an import
        # error inside favorplus proper is a failure.
        if missing == module or missing.split(".")[0] != "favorplus":
            return f"{module} is not available ({missing} not found)"
        raise
    if root == "cupy":
        import cupy

        try:
            if cupy.cuda.runtime.getDeviceCount() < 1:
                return "cupy: no GPU"
        except Exception as exc:  # no driver, no device
            return f"cupy: no GPU ({type(exc).__name__})"
    return None


def numpy_only(path: Path) -> bool:
    """Whether the file's examples import nothing but NumPy, favorplus's own array-API
    modules and the standard library: they compute on NumPy arrays alone, the same in
    every session, so they run once in the matrix (the ``numpy_only`` marker)."""
    adapters = {"torch", "flax", "transformers", "sklearn"}  # favorplus.<framework>
    for block in python_blocks(path.read_text(encoding="utf-8")):
        for module in imported_modules(block.code):
            parts = module.split(".")
            if parts[0] == "favorplus":
                if len(parts) > 1 and parts[1] in adapters:
                    return False
            elif parts[0] != "numpy" and parts[0] not in sys.stdlib_module_names:
                return False
    return True


FILES = markdown_files()


@pytest.mark.parametrize(
    "path",
    [pytest.param(f, marks=[pytest.mark.numpy_only] if numpy_only(f) else []) for f in FILES],
    ids=[str(f.relative_to(ROOT)) for f in FILES],
)
def test_markdown_examples(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    marker = SKIP_FILE.search(text)
    if marker:
        pytest.skip(marker.group(1) or "marked docs-test: skip-file")
    blocks = python_blocks(text)
    if not blocks:
        pytest.skip("no python examples")
    for block in blocks:
        for module in imported_modules(block.code):
            reason = unavailable(module)
            if reason:
                pytest.skip(reason)
    namespace: dict[str, object] = {"__name__": f"docs_example_{path.stem}"}
    for block in blocks:
        # Pad with blank lines so that tracebacks give the Markdown file's line numbers.
        source = "\n" * (block.line - 1) + block.code
        exec(compile(source, str(path), "exec"), namespace)


def test_fence_parser() -> None:
    text = "\n".join(
        [
            "```python",
            "a = 1",
            "```",
            SKIP_BLOCK,
            "```python",
            "raise SystemExit",
            "```",
            "```bash",
            "echo no",
            "```",
            '    ```python title="x.py"',
            "    b = a + 1",
            "    ```",
            "````python",
            "s = '```'",
            "````",
        ]
    )
    blocks = python_blocks(text)
    assert [b.code for b in blocks] == ["a = 1\n", "b = a + 1\n", "s = '```'\n"]
    assert [b.line for b in blocks] == [2, 12, 15]
    assert imported_modules("import numpy as np\nfrom favorplus import torch") == [
        "numpy",
        "favorplus",
    ]
