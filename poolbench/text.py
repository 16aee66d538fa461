"""Text from records and file names is data: one escaping function per output kind.

A results folder may come from someone else, so an operator name, an error message or a path read
from it can hold anything: terminal escape sequences (``ESC[2J`` clears the screen, OSC 0 sets the
window title), rich markup, Markdown table syntax, LaTeX commands (``\\input``, ``\\write18``) or HTML.
Everything printed or exported from such text goes through the function of its output kind:

- :func:`plain`: control characters (C0, C1, DEL, Unicode line separators and bidirectional overrides)
  shown as ``\\xNN`` / ``\\uNNNN`` escapes, undecodable bytes as ``\\xNN``: one visible line;
- :func:`terminal`: :func:`plain`, then rich markup escaped (text embedded in a rich markup string);
- :func:`markdown`: :func:`plain`, then Markdown's special characters backslash-escaped;
- :func:`latex`: :func:`plain`, then every LaTeX special character replaced by its literal form;
- :func:`html`: :func:`plain`, then ``html.escape`` (quotes included).

Light on purpose (no pandas, no torch): every command's console uses it.
"""

from __future__ import annotations

import html as _html
import re
from typing import Any

# C0 and C1 controls, DEL, line/paragraph separators and the bidirectional embeddings, overrides and
# isolates ("Trojan source"): none belongs in one line of output.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")
# An underscore inside a word is never emphasis (CommonMark's flanking rules): escaped only at a word's edge.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*\[\]<>|~&$]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z]))")
_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "$": r"\$",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
    "Δ": r"$\Delta$",
    "±": r"$\pm$",
}
# The only math a table cell may carry unescaped: what poolbench's own number formatting writes
# (``$0.712 \pm 0.013$``); a cell that merely starts with ``$`` is text like any other.
_OWN_MATH = re.compile(r"\$((?:[-+0-9.eE ]|inf|nan|\\pm|\\Delta)*)\$")


def _control(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def plain(value: Any) -> str:
    """``value`` as one printable line: control characters and undecodable bytes shown as escapes."""
    text = value if isinstance(value, str) else str(value)
    try:  # a file name's undecodable bytes (os.fsdecode's surrogates) shown as the bytes they were
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # other lone surrogates (e.g. "\ud800" in a JSON record)
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(_control, text)


def terminal(value: Any) -> str:
    """For a rich console (markup on): :func:`plain`, with ``[`` escaped so it is never read as markup."""
    from rich.markup import escape

    return escape(plain(value))


def markdown(value: Any) -> str:
    """For a Markdown document or table cell: no pipe, backtick, emphasis, link, HTML or heading survives."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", plain(value))


def latex(value: Any) -> str:
    """For LaTeX text mode: every special character literal, so no command (``\\input``, ``\\write18``)
    and no math mode can be injected."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in plain(value))


def latex_cell(value: Any) -> str:
    """A table cell for LaTeX: poolbench's own ``$number \\pm number$`` kept in math mode, anything else
    (any other text starting with ``$``) escaped by :func:`latex`."""
    text = plain(value)
    match = _OWN_MATH.match(text)
    if match:
        return match.group() + latex(text[match.end():])
    return latex(text)


def html(value: Any) -> str:
    """For HTML text or attribute values."""
    return _html.escape(plain(value), quote=True)
