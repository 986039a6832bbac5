"""A Griffe extension: the library's docstrings, written for Sphinx's eye, rendered by mkdocstrings.

The docstrings follow Google style (``Args:``, ``Returns:``, ``Raises:``) with three habits
of reStructuredText that Markdown does not know. Before mkdocstrings parses a docstring of
the package, this extension rewrites its text:

- a cross-reference role, ``:class:`~secondorder.curvature.DenseMFAC```, ``:meth:`step```,
  ``:mod:`.obs``` (also ``:func:``, ``:data:``, ``:attr:``, ``:exc:``, ``:obj:``), becomes an
  optional mkdocs-autorefs link: a link where the name is rendered on the site, plain code
  otherwise (``torch.*``, private modules). Names resolve as Sphinx would: in the scope of
  the documented object, ``.name`` from its module, ``~`` showing the last part. A name
  inside the package that exists nowhere (a typo, a rename) is a warning, so strict
  ``mkdocs build`` fails on it;
- ``.. math::`` and its indented body (or its one line) becomes a ``$$`` block for
  pymdownx.arithmatex, wrapped in ``aligned`` when it aligns on ``&`` (Sphinx's ``split``);
- in an ``Args:`` section, an entry shared by several arguments, ``lr, betas, eps: as for
  AdamW.`` (also when the names wrap onto a second line), becomes one entry per argument,
  so that each appears in the table and is checked against the signature; a line there
  that names no argument (``Other arguments as for ...``) moves below the section, and
  the keywords a ``**kwargs`` takes move to an ``Other Parameters:`` section (a name in
  neither the signature nor ``**kwargs``'s reach, such as a renamed ``**options``, is
  still a warning).

Sources are never changed; ``mkdocs.yml`` loads this file as ``docs/griffe_roles.py``.
"""

from __future__ import annotations

import html
import re
from typing import Any, NamedTuple

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`(?P<target>[^`]+)`")
MATH = re.compile(r"^(?P<indent>\s*)\.\. math::[ \t]*(?P<inline>.*)$")
ARGS = re.compile(
    r"^(?P<indent>\s*)(?P<name>Args|Arguments|Parameters|Keyword Args|Other Parameters):\s*$"
)
ARGUMENTS = ("Args", "Arguments", "Parameters")
NAME = r"\*{0,2}[A-Za-z_]\w*"
ENTRY = re.compile(rf"^{NAME}(?:\s*\([^)]*\))?\s*:")
GROUP = re.compile(rf"^(?P<names>{NAME}(?:\s*,\s*{NAME})+)\s*:\s*(?P<text>.*)$")
OPEN_GROUP = re.compile(rf"^{NAME}(?:\s*,\s*{NAME})*\s*,$")


class Signature(NamedTuple):
    names: set[str]
    var_keyword: bool  # takes **kwargs

    @classmethod
    def of(cls, obj: griffe.Object) -> Signature | None:
        """The parameters of a function, or of a class's ``__init__``; ``None`` otherwise."""
        if not (obj.is_function or obj.is_class):
            return None
        parameters = list(obj.parameters)  # type: ignore[attr-defined]
        var_keyword = griffe.ParameterKind.var_keyword
        return cls({p.name for p in parameters}, any(p.kind is var_keyword for p in parameters))


class SphinxHabits(griffe.Extension):
    """Rewrites the docstrings of every loaded package as the module docstring says."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        objects = list(_objects(pkg))
        paths = [obj.path for obj in objects]
        for obj in objects:
            if obj.docstring is not None:
                text = expand_grouped_arguments(obj.docstring.value, Signature.of(obj))
                text = math_blocks(text)
                obj.docstring.value = roles_to_autorefs(text, obj, pkg, paths)


def _objects(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)  # type: ignore[arg-type]


def roles_to_autorefs(text: str, obj: griffe.Object, pkg: griffe.Module, paths: list[str]) -> str:
    """Each role an optional link; a warning (so a failed strict build) for a role that
    names, in the package ``pkg``, something that does not exist."""

    def link(match: re.Match[str]) -> str:
        target = match["target"].strip().lstrip("!")
        short = target.startswith("~")
        target = target.lstrip("~")
        title = target.rsplit(".", 1)[-1] if short else target
        identifier = _resolve(target, obj, paths)
        if not _exists(identifier, pkg):
            where = f"{obj.relative_filepath}:{obj.docstring.lineno}"  # type: ignore[union-attr]
            griffe.logger.warning(f"{where}: {match[0]} names nothing in {pkg.name}")
        identifier, title = html.escape(identifier), html.escape(title)
        return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'

    return ROLE.sub(link, text)


def _resolve(target: str, obj: griffe.Object, paths: list[str]) -> str:
    """The full path ``target`` names in the scope of ``obj``, as Sphinx would find it:
    ``.name`` in the module of ``obj``, else the shortest path of the package ending so."""
    if target.startswith("."):
        module = obj if obj.is_module else obj.module
        if f"{module.path}{target}" in paths:
            return f"{module.path}{target}"
        return min((path for path in paths if path.endswith(target)), key=len, default=target[1:])
    head, _, rest = target.partition(".")
    try:
        resolved = obj.resolve(head)
    except griffe.NameResolutionError:
        return target
    return f"{resolved}.{rest}" if rest else resolved


def _exists(identifier: str, pkg: griffe.Module) -> bool:
    """False only for a path inside ``pkg`` that names nothing there (aliases followed)."""
    root, _, inner = identifier.partition(".")
    if root != pkg.name or not inner:
        return True
    try:
        pkg[inner]
    except (KeyError, griffe.AliasResolutionError):
        return False
    return True


def math_blocks(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = MATH.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match["indent"]
        body = [match["inline"]] if match["inline"].strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(indent)):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        tex = "\n".join(f"{indent}{line}" for line in body if line)
        if "&" in tex or "\\\\" in tex:
            tex = f"{indent}\\begin{{aligned}}\n{tex}\n{indent}\\end{{aligned}}"
        out += [f"{indent}$$", tex, f"{indent}$$", ""]
    return "\n".join(out)


def expand_grouped_arguments(text: str, signature: Signature | None = None) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = ARGS.match(lines[i])
        out.append(lines[i])
        i += 1
        if match:
            section_end = i
            while section_end < len(lines) and (
                not lines[section_end].strip() or _indent(lines[section_end]) > len(match["indent"])
            ):
                section_end += 1
            forwarding = signature if match["name"] in ARGUMENTS else None
            out += _expand_section(lines[i:section_end], match["indent"], forwarding)
            i = section_end
    return "\n".join(out)


def _expand_section(
    lines: list[str], section_indent: str, signature: Signature | None
) -> list[str]:
    """One entry per argument in the body of an ``Args:`` section; prose moved to its end,
    and, where ``signature`` takes ``**kwargs``, the keywords it forwards to an ``Other
    Parameters:`` section after it."""
    if not any(line.strip() for line in lines):
        return lines
    item_indent = min(_indent(line) for line in lines if line.strip())
    items: list[list[str]] = []
    for line in lines:
        if line.strip() and _indent(line) == item_indent:
            if items and OPEN_GROUP.match(items[-1][0].strip()):
                items[-1][0] += " " + line.strip()
                continue
            items.append([line])
        elif items:
            items[-1].append(line)
    entries: list[list[str]] = []
    prose: list[str] = []
    for head, *rest in items:
        stripped = head.strip()
        group = GROUP.match(stripped)
        if group:
            for name in re.split(r"\s*,\s*", group["names"]):
                entries.append([f"{' ' * item_indent}{name}: {group['text']}", *rest])
        elif ENTRY.match(stripped):
            entries.append([head, *rest])
        else:
            prose += [stripped, *(line.strip() for line in rest)]
    forwarded = [entry for entry in entries if _forwarded(entry[0], signature)]
    out = [line for entry in entries if entry not in forwarded for line in entry]
    if forwarded:
        out += ["", f"{section_indent}Other Parameters:", *(line for e in forwarded for line in e)]
    if prose:  # after a blank line, at the section's indentation: a paragraph of its own
        out += ["", section_indent + " ".join(line for line in prose if line)]
    return out


def _forwarded(head: str, signature: Signature | None) -> bool:
    """Whether the entry ``head`` documents a keyword that ``**kwargs`` of ``signature`` takes."""
    if signature is None or not signature.var_keyword:
        return False
    name = head.strip().split(":", 1)[0].split("(", 1)[0].strip()
    return not name.startswith("*") and name not in signature.names


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())
