"""Griffe extension for the docs build: curvops' reStructuredText-flavoured docstrings, rendered for Markdown.

curvops' docstrings head their doctest with ``Example:`` (singular).  Griffe knows only
``Examples:`` as the section whose ``>>>`` lines are code; any other heading becomes an
admonition whose lines are read as Markdown (where ``x["a"]["b"]`` looks like a reference link
and fails the strict build).  This renames the heading in the text griffe parses; the source
files are untouched.

Two reStructuredText habits of the docstrings are rendered for Markdown: a ``.. math::``
directive (with its indented continuation lines) becomes a ``$$ … $$`` display, and Sphinx
roles (``:class:`~curvops.Objective```, ``:func:``, ``:meth:``, …) become inline code.

It also reads an unindented wrapped line inside an ``Args:``/``Attributes:``/``Returns:`` block
(a line at the entries' indentation that is not ``name: description``) as the continuation of
the entry above, as a reader would, instead of failing the strict build on it.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.M)
_BLOCK = re.compile(r"^(Args|Arguments|Attributes|Returns|Raises|Yields):\s*$")
_ENTRY = re.compile(r"^[\w*., /()\[\]|`'\"-]+:(\s|$)")


_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`~?([^`]+)`")


def _markdown(text: str) -> str:
    text = _ROLE.sub(lambda m: "`" + (m.group(1).rsplit(".", 1)[-1] if "~" in m.group(0) else m.group(1)) + "`", text)
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if stripped.startswith(".. math::"):
            pad = line[: len(line) - len(stripped)]
            body = [stripped[len(".. math::"):].strip()]
            i += 1
            while i < len(lines) and lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) > len(pad):
                body.append(lines[i].strip())
                i += 1
            out += [pad + "$$", *(pad + b for b in body if b), pad + "$$"]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def _indent_continuations(text: str) -> str:
    lines, out, block = text.split("\n"), [], None
    for line in lines:
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if _BLOCK.match(line):
            block = None
            out.append(line)
            block = -1
            continue
        if block == -1 and stripped:
            block = indent  # the entries' indentation
        elif block is not None and block > 0 and stripped:
            if indent < block:
                block = None
            elif indent == block and not _ENTRY.match(stripped) and out and out[-1].strip():
                line = " " * (block + 4) + stripped
        out.append(line)
    return "\n".join(out)


class MarkdownDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _markdown(_indent_continuations(_HEADING.sub(r"\1Examples:", obj.docstring.value)))
