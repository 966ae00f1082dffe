"""Griffe extension for the documentation build: favorplus's docstrings as mkdocstrings reads them.

* Sphinx roles. The docstrings use Sphinx cross-reference roles
  (``:func:`favor_attention```, ``:class:`torch.nn.MultiheadAttention```). mkdocstrings
  renders docstrings as Markdown, where a role would show literally. Each role becomes a
  mkdocstrings cross-reference when its target is an object that the site documents (the
  public API of ``favorplus``, ``favorplus.torch`` and ``favorplus.flax``), and inline
  code otherwise (numpy, torch or flax objects: the site has no inventory of theirs).
* Grouped parameters. A NumPy-style entry that names several parameters without a type
  (``kernel, key_mask, scale, chunk_size`` followed by one description) is split into one
  entry per name with that description, so that each shows its own annotation and
  default from the signature (griffe's parser gives them all the first one's).

Loaded by mkdocs.yml (``plugins: mkdocstrings: ... extensions``); excluded from the site.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|obj|exc|const):`(~?)([^`]+)`")
LAYER_MODULES = ("torch", "flax")  # submodules whose public API the Layers page renders
NAME_LIST = re.compile(r"^\w+(?:,\s*\w+)*,?$")  # a parameter entry's names, no type
PARAMETER_SECTIONS = ("Parameters", "Other Parameters")


def _is_header(lines: list[str], i: int) -> bool:
    """Line i is a NumPy section title (underlined with dashes)."""
    nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
    return bool(lines[i].strip()) and not lines[i].startswith(" ") and set(nxt) == {"-"}


def split_grouped_parameters(text: str) -> str:
    """One entry per name for untyped, comma-grouped parameter entries (see above)."""
    lines = text.split("\n")
    out: list[str] = []
    in_parameters = False
    i = 0
    while i < len(lines):
        if _is_header(lines, i):
            in_parameters = lines[i].strip() in PARAMETER_SECTIONS
            out += lines[i : i + 2]
            i += 2
            continue
        line = lines[i]
        if in_parameters and NAME_LIST.match(line) and "," in line:
            names = line
            i += 1
            while names.endswith(",") and i < len(lines) and NAME_LIST.match(lines[i]):
                names += " " + lines[i]
                i += 1
            body = []
            while i < len(lines) and lines[i].startswith(" "):
                body.append(lines[i])
                i += 1
            for name in (n.strip() for n in names.split(",")):
                if name:
                    out += [name, *body]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def _public(obj: griffe.Object | griffe.Alias) -> Iterator[tuple[str, Any]]:
    names = obj.exports if obj.exports is not None else obj.members
    for name in names:
        if name in obj.members and not name.startswith("_"):
            yield name, obj.members[name]


def _documented(pkg: griffe.Module) -> dict[str, str]:
    """Rendered identifier of every documented object, by its rendered and canonical paths."""
    targets: dict[str, str] = {}

    def add(ident: str, member: Any) -> None:
        targets[ident] = ident
        targets[member.target_path if member.is_alias else member.path] = ident

    for name, member in _public(pkg):
        if name not in LAYER_MODULES:
            add(f"{pkg.path}.{name}", member)
    for module_name in LAYER_MODULES:
        module = pkg.members.get(module_name)
        if module is None or module.is_alias:
            continue
        for name, member in _public(module):
            ident = f"{module.path}.{name}"
            add(ident, member)
            if member.is_class:
                for method_name, method in member.members.items():
                    if not method_name.startswith("_") and method.docstring:
                        add(f"{ident}.{method_name}", method)
    return targets


def _objects(obj: Any) -> Iterator[Any]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles into cross-references or inline code (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.path != "favorplus":
            return
        targets = _documented(pkg)
        for obj in _objects(pkg):
            if obj.docstring is None:
                continue
            scopes = [obj.module.path, "favorplus"]
            if obj.is_class:
                scopes.insert(0, obj.path)
            elif obj.parent is not None and obj.parent.is_class:
                scopes.insert(0, obj.parent.path)

            def replace(match: re.Match[str], scopes: list[str] = scopes) -> str:
                short, target = match.group(1), match.group(2)
                text = target.rsplit(".", 1)[-1] if short else target
                for candidate in (target, *(f"{scope}.{target}" for scope in scopes)):
                    if candidate in targets:
                        return f"[`{text}`][{targets[candidate]}]"
                return f"`{text}`"

            text = split_grouped_parameters(obj.docstring.value)
            obj.docstring.value = ROLE.sub(replace, text)
