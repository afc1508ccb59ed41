"""Edit values in a YAML file's text the way a person would: only the values that change, nothing else.

A value that sits on its key's line (a scalar or a flow list such as ``[0.5, 0.5, 0.5]``) is replaced in
place: the key, the spelling of every other value (``null``, ``1.0e-6``), blank lines and comments stay
byte for byte. An inline comment keeps its column when the new value fits before it; one pushed right by a
long value (two spaces after it) goes back to the column of its siblings' comments when a shorter value
returns, so a preset
round trip (``lpt params preset X``, then back) gives back the original bytes. A key the file lacks, or a
value written as a block, goes through ruamel.yaml's round trip (what DVC uses to edit params files),
with ``null`` kept as ``null``.

    >>> text = "a:\\n  b: 1        # one\\n  c: [1, 2]   # two\\n"
    >>> print(edit_yaml_text(text, {"a.b": 20000000000, "a.c": [3]}), end="")
    a:
      b: 20000000000  # one
      c: [3]      # two
    >>> edit_yaml_text(edit_yaml_text(text, {"a.b": 20000000000}), {"a.b": 1}) == text
    True
"""

from __future__ import annotations

import io
import re
from collections import Counter
from typing import Any

import yaml

__all__ = ["edit_yaml_text", "flow_text"]

_COMMENT = re.compile(r"\s#")


def flow_text(value: Any) -> str | None:
    """``value`` as one-line YAML that PyYAML (DVC's reader) reads back equal; ``None`` for a mapping.

    >>> flow_text([0.5, None, True, 1e-06, "a b"])
    '[0.5, null, true, 1.0e-06, a b]'
    """
    if isinstance(value, dict):
        return None
    if isinstance(value, (list, tuple)):
        items = [flow_text(item) for item in value]
        return None if any(item is None for item in items) else "[" + ", ".join(items) + "]"  # type: ignore[arg-type]
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:  # PyYAML (YAML 1.1) needs the dot: 1.0e-06
            text = text.replace("e", ".0e", 1)
        return text if text not in ("inf", "-inf", "nan") else None
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


def _value_end(line: str, start: int) -> int | None:
    """End column of the one-line value that starts at ``start`` (``None``: not a one-line value)."""
    if start >= len(line):
        return None
    opener = line[start]
    if opener in "'\"":
        end = line.find(opener, start + 1)
        while opener == "'" and end != -1 and line[end + 1: end + 2] == "'":  # '' is an escaped quote
            end = line.find("'", end + 2)
        return None if end == -1 else end + 1
    if opener == "[":
        depth = 0
        for i in range(start, len(line)):
            depth += {"[": 1, "]": -1}.get(line[i], 0)
            if line[i] in "'\"{":
                return None  # quoted or nested items: leave it to the round trip
            if depth == 0:
                return i + 1
        return None
    if opener in "{|>&*!":
        return None
    match = _COMMENT.search(line, start)
    value = line[start: match.start() if match else len(line)].rstrip()
    return start + len(value) if value else None


def _comment_column(line: str, end: int) -> int | None:
    """Column of the inline comment after a value ending at ``end`` (``None``: no comment)."""
    match = _COMMENT.search(line, end)
    return None if match is None else match.end() - 1


def _sibling_column(lines: list[str], node: Any, leaf: str) -> int | None:
    """The most common inline-comment column among ``leaf``'s one-line siblings (``None``: none have one)."""
    columns = []
    for key in node:
        if key == leaf:
            continue
        row, col = node.lc.value(key)
        line = lines[row] if row < len(lines) else ""
        if row != node.lc.key(key)[0]:
            continue
        end = _value_end(line, col)
        column = None if end is None else _comment_column(line, end)
        if column is not None:
            columns.append(column)
    return Counter(columns).most_common(1)[0][0] if columns else None


def _edit_line(lines: list[str], node: Any, leaf: str, value: Any) -> bool:
    """Replace ``node[leaf]``'s one-line value in ``lines`` with ``value``; False when it is not one line."""
    from ruamel.yaml.comments import CommentedMap

    new = flow_text(value)
    if new is None or isinstance(node.get(leaf), CommentedMap) or leaf not in node:
        return False
    row, col = node.lc.value(leaf)
    if row != node.lc.key(leaf)[0]:
        return False  # a block value on the lines below its key
    line = lines[row]
    end = _value_end(line, col)
    if end is None:
        return False
    head, tail = line[:col] + new, line[end:]
    comment = _comment_column(line, end)
    if comment is not None:
        siblings = _sibling_column(lines, node, leaf)
        pushed = line[end:comment] == "  "  # what a value too long for the comment's column leaves
        if pushed and siblings is not None and len(head) < siblings < comment:
            target = siblings  # back in line with its siblings
        elif len(head) < comment:
            target = comment  # stays where it is
        else:
            target = len(head) + 2  # pushed right
        lines[row] = head + " " * (target - len(head)) + tail.lstrip()
    else:
        lines[row] = head + tail
    return True


def _same(old: Any, new: Any) -> bool:
    """Equal values of the same kind (``True`` is not ``1``, ``1`` is ``1.0`` as YAML reads them)."""
    if isinstance(old, bool) or isinstance(new, bool):
        return type(old) is type(new) and old == new
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return len(old) == len(new) and all(_same(a, b) for a, b in zip(old, new))
    return old == new and (old is None) == (new is None)


def _round_trip(text: str, overrides: dict[str, Any]) -> str:
    """``text`` with ``overrides`` set through ruamel.yaml's round trip (``null`` written as ``null``)."""
    from ruamel.yaml import YAML

    def _null(representer: Any, _: None) -> Any:
        return representer.represent_scalar("tag:yaml.org,2002:null", "null")

    def _float(representer: Any, value: float) -> Any:
        return representer.represent_scalar("tag:yaml.org,2002:float", flow_text(value) or repr(value))

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 10**6
    rt.representer.add_representer(type(None), _null)
    rt.representer.add_representer(float, _float)
    doc = rt.load(text)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = doc
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[leaf] = value
    buf = io.StringIO()
    rt.dump(doc, buf)
    return buf.getvalue()


def edit_yaml_text(text: str, overrides: dict[str, Any]) -> str:
    """``text`` with the dotted-key ``overrides`` set, touching only the values that change.

    Args:
        text: a YAML mapping document (a params file).
        overrides: ``{"train.phase1.epochs": 3}``; a mapping value replaces the whole sub-section.

    Returns:
        The edited text: byte-identical to ``text`` where no value changes.
    """
    from ruamel.yaml import YAML

    doc = YAML().load(text)
    lines = text.splitlines(keepends=False)
    ends_with_newline = text.endswith("\n")
    rest: dict[str, Any] = {}
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = doc
        for part in parents:
            node = node.get(part) if hasattr(node, "get") else None
            if node is None:
                break
        if node is not None and hasattr(node, "get") and leaf in node and _same(node[leaf], value):
            continue  # unchanged: its text stays as it is
        if node is None or not hasattr(node, "lc") or not _edit_line(lines, node, leaf, value):
            rest[dotted] = value
    edited = "\n".join(lines) + ("\n" if ends_with_newline else "")
    return _round_trip(edited, rest) if rest else edited
