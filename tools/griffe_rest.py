"""A griffe extension for the API reference: signalprop's docstrings are
written in reStructuredText's inline style (read by ``help()`` and Sphinx
alike), which mkdocstrings renders as Markdown.  Two constructs differ:

- roles, ``:func:`gain``` or ``:class:`~signalprop.records.Report```, become
  code spans (``gain``, ``Report``: a leading ``~`` keeps the last name, as
  Sphinx shows it);
- a literal block introduced by ``::`` (alone on its line or ending a
  sentence) becomes a fenced Python block, its indentation removed.

Everything else (double-backtick code, emphasis, lists) already reads the
same in both.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|obj|exc|const):`([^`]+)`")


def _role(m: re.Match[str]) -> str:
    target = m.group(1).strip()
    if target.startswith("~"):
        target = target[1:].rsplit(".", 1)[-1]
    return f"`{target.lstrip('.')}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _literal_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.rstrip().endswith("::"):
            out.append(line)
            i += 1
            continue
        lead = line.rstrip()[:-2].rstrip()
        if lead:  # "as follows::" reads "as follows:" before the block
            out.append(lead + ":")
        base = _indent(line)
        j = i + 1
        block: list[str] = []
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
            block.append(lines[j])
            j += 1
        while block and not block[-1].strip():
            block.pop()
        body = textwrap.dedent("\n".join(block)).strip("\n")
        out += ["", "```python", *body.split("\n"), "```", ""]
        i = j
    return "\n".join(out)


def convert(text: str) -> str:
    """The Markdown mkdocstrings should render for a reST-inline docstring."""
    return _literal_blocks(_ROLE.sub(_role, text))


class RestInline(griffe.Extension):
    """Rewrites every docstring through :func:`convert` once it is loaded."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
