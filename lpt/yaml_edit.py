"""Edit values in a YAML file's text the way a person would: only the values that change, nothing else.

A value on its key's line (a scalar, a flow list such as ``[0.5, 0.5, 0.5]``, an empty null) or a block list
of scalars is replaced in place, written the way the file writes such values (``null`` or an empty value;
non-empty lists flow or block: a file with any block list gets block lists, as DVC's writer makes them).
The key, the spelling of every other value (``1.0e-6``), blank lines and comments stay byte for byte. An
inline comment keeps its column when the new value fits before it; one pushed right by a long value (two
spaces after it) goes back to the column of its siblings' comments when a shorter value returns, so a
preset round trip (``lpt params preset X``, then back) gives back the original bytes. A key the file lacks,
or any other value, goes through ruamel.yaml's round trip (what DVC uses to edit params files).

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
from dataclasses import dataclass
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
    """The most common inline-comment column on the lines of ``leaf``'s siblings (``None``: none have one)."""
    columns = []
    for key in node:
        if key == leaf or not isinstance(key, str):
            continue
        row, col = node.lc.key(key)
        column = _comment_column(lines[row], col + len(key) + 1) if row < len(lines) else None
        if column is not None:
            columns.append(column)
    return Counter(columns).most_common(1)[0][0] if columns else None


@dataclass(frozen=True)
class _Style:
    """How the file writes what DVC's writer may rewrite: ``null`` or an empty value; lists flow or block."""

    null: str
    block_lists: bool

    @classmethod
    def of(cls, text: str, doc: Any) -> _Style:
        has_null_word = re.search(r":[ \t]+null[ \t]*(#.*)?$", text, re.M) is not None
        return cls(null="null" if has_null_word or not _has_none(doc) else "",
                   block_lists=re.search(r"^[ \t]*- ", text, re.M) is not None)


def _has_none(node: Any) -> bool:
    if isinstance(node, dict):
        return any(v is None or _has_none(v) for v in node.values())
    if isinstance(node, list):
        return any(v is None or _has_none(v) for v in node)
    return False


def _block_rows(lines: list[str], node: Any, leaf: str, key_row: int, key_col: int) -> int | None:
    """How many ``- scalar`` lines below the key hold its block list (``None``: not such a list)."""
    old = node[leaf]
    if not isinstance(old, list) or any(isinstance(item, (dict, list)) for item in old):
        return None
    rows = lines[key_row + 1: key_row + 1 + len(old)]
    if len(rows) != len(old) or not all(r.startswith(" " * key_col + "- ") for r in rows):
        return None
    return len(old)


def _edit_line(lines: list[str], node: Any, leaf: str, value: Any, style: _Style) -> bool:
    """Replace ``node[leaf]``'s value in ``lines`` (a value on the key's line, an empty null, or a block list of
    scalars) with ``value`` written in the file's style; False when it is none of those (the round trip's)."""
    from ruamel.yaml.comments import CommentedMap

    if leaf not in node or not isinstance(leaf, str) or isinstance(node[leaf], CommentedMap) \
            or isinstance(value, dict):
        return False
    key_row, key_col = node.lc.key(leaf)
    line = lines[key_row]
    start = key_col + len(leaf) + 1
    if line[key_col:start] != f"{leaf}:":
        return False  # a quoted or otherwise spelt key
    block = 0
    if node.lc.value(leaf)[0] != key_row and node[leaf] is not None:
        block = _block_rows(lines, node, leaf, key_row, key_col)
        if block is None:
            return False
        end = start
    else:
        first = len(line) - len(line[start:].lstrip(" ")) if line[start:].strip() else len(line)
        if first >= len(line) or line[first] == "#":
            end = start  # an empty value: null
        else:
            end = _value_end(line, first)
            if end is None:
                return False
    items: list[str] = []
    old = node[leaf]
    if isinstance(old, list) and old:  # a list keeps its form: block stays block, flow stays flow
        as_block = bool(block)
    else:  # a list replacing a scalar, a null or [] takes the file's form
        as_block = style.block_lists
    if isinstance(value, (list, tuple)) and value and as_block:
        items = [flow_text(item) for item in value]  # type: ignore[misc]
        if any(text is None or isinstance(item, (list, tuple)) for text, item in zip(items, value)):
            return False
        new = ""
    elif value is None:
        new = style.null
    else:
        new = flow_text(value)  # type: ignore[assignment]
        if new is None:
            return False
    head, tail = line[:start] + (" " + new if new else ""), line[end:]
    comment = _comment_column(line, end) if tail.strip() else None
    if comment is not None:
        siblings = _sibling_column(lines, node, leaf)
        pushed = line[end:comment] == "  "  # what a value too long for the comment's column leaves
        if pushed and siblings is not None and len(head) < siblings < comment:
            target = siblings  # back in line with its siblings
        elif len(head) < comment:
            target = comment  # stays where it is
        else:
            target = len(head) + 2  # pushed right
        new_line = head + " " * (target - len(head)) + tail.lstrip()
    else:
        new_line = head
    lines[key_row: key_row + 1 + block] = [new_line] + [" " * key_col + "- " + text for text in items]
    return True


def _same(old: Any, new: Any) -> bool:
    """Equal values of the same kind (``True`` is not ``1``, ``1`` is ``1.0`` as YAML reads them)."""
    if isinstance(old, bool) or isinstance(new, bool):
        return type(old) is type(new) and old == new
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return len(old) == len(new) and all(_same(a, b) for a, b in zip(old, new))
    return old == new and (old is None) == (new is None)


def _round_trip(text: str, overrides: dict[str, Any], style: _Style) -> str:
    """``text`` with ``overrides`` set through ruamel.yaml's round trip (``null`` as the file writes it)."""
    from ruamel.yaml import YAML

    def _null(representer: Any, _: None) -> Any:
        return representer.represent_scalar("tag:yaml.org,2002:null", "null")

    def _float(representer: Any, value: float) -> Any:
        return representer.represent_scalar("tag:yaml.org,2002:float", flow_text(value) or repr(value))

    from ruamel.yaml.representer import RoundTripRepresenter

    class _Representer(RoundTripRepresenter):  # add_representer is per class: never touch ruamel's own
        pass

    if style.null:
        _Representer.add_representer(type(None), _null)
    _Representer.add_representer(float, _float)
    rt = YAML()
    rt.Representer = _Representer
    rt.preserve_quotes = True
    rt.width = 10**6
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
    style = _Style.of(text, doc)
    rest: dict[str, Any] = {}
    for dotted, value in overrides.items():  # one at a time: an edit may add or remove lines
        node = doc
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.get(part) if hasattr(node, "get") else None
            if node is None:
                break
        if node is not None and hasattr(node, "get") and leaf in node and _same(node[leaf], value):
            continue  # unchanged: its text stays as it is
        lines = text.splitlines(keepends=False)
        if node is None or not hasattr(node, "lc") or not _edit_line(lines, node, leaf, value, style):
            rest[dotted] = value
            continue
        text = "\n".join(lines) + ("\n" if text.endswith("\n") else "")
        doc = YAML().load(text)  # line positions after the edit
    return _round_trip(text, rest, style) if rest else text
