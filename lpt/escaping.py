"""Escaping of names that come from the data (class names, task names, file paths) in text outputs.

A class name is whatever a folder, list file or JSON said: it may hold a newline (a forged extra line or
table row), terminal escape sequences (``\\x1b[2J``), Markdown (``|``, ``[link](...)``, ``<img>``) or start
with ``=``, ``+``, ``-``, ``@`` (a spreadsheet formula when a CSV is opened: CSV injection). One helper per
output kind; JSON outputs (manifest, packs, export metadata, plots data, ``--json``) keep names exactly.

* :func:`text_line`: every non-printable character (``str.isprintable``: controls, line and paragraph
  separators, format characters such as bidi overrides) written as its Python escape (``\\n``, ``\\x1b``,
  ``\\u202e``), so a name is always one line of plain characters.
* :func:`markdown_cell`: :func:`text_line`, then Markdown's active characters backslash-escaped.
* :func:`csv_cell`: :func:`text_line`, then a leading ``=``, ``+``, ``-``, ``@`` (or their full-width
  forms) prefixed with ``'``, the OWASP rule that makes spreadsheets show the cell as text. ``csv.writer``
  quotes the cell as usual.

Only standard library imports: ``lpt.runtime`` (torch-free) uses it.
"""

from __future__ import annotations

__all__ = ["text_line", "markdown_cell", "csv_cell", "FORMULA_STARTS", "MARKDOWN_ACTIVE"]

FORMULA_STARTS = frozenset("=+-@\uff1d\uff0b\uff0d\uff20")
"""First characters that make a spreadsheet evaluate a cell (and their full-width forms)."""

MARKDOWN_ACTIVE = frozenset("\\`*_[]<>|")
"""Characters backslash-escaped in a Markdown cell: table pipes, HTML tags, links and images, code spans,
emphasis, and the backslash itself."""


def text_line(value: object) -> str:
    """``str(value)`` with every non-printable character written as its Python escape (one plain line).

    Example:
        >>> text_line("a\\nb\\x1b[31m")
        'a\\\\nb\\\\x1b[31m'
    """
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def markdown_cell(value: object) -> str:
    """A value for a Markdown table cell or inline text: :func:`text_line`, Markdown syntax escaped.

    Example:
        >>> markdown_cell("a|b <i>x</i>")
        'a\\\\|b \\\\<i\\\\>x\\\\</i\\\\>'
    """
    return "".join("\\" + ch if ch in MARKDOWN_ACTIVE else ch for ch in text_line(value))


def csv_cell(value: object) -> str:
    """A text value for a CSV cell: :func:`text_line`, and a leading formula character made inert with ``'``.

    Example:
        >>> csv_cell('=HYPERLINK("http://x")')
        '\\'=HYPERLINK("http://x")'
    """
    text = text_line(value)
    return "'" + text if text[:1] in FORMULA_STARTS else text
