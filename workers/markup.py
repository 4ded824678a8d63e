"""Markup out of the text a voice reads: what an LLM writes is Markdown, and some clients
send HTML or SSML, whose marks espeak reads aloud ("**Bold**": "asterisk asterisk bold",
``<break time="3s"/>``: "break time equals three s slash", ``&amp;``: "and amp").

Conservative on purpose: HTML entities are unescaped; what looks like an XML/HTML/SSML tag
(``<``, a name, attributes with values, ``>``) is dropped, a comment or processing instruction too
("a < b and c > d" stays: a space after ``<`` is no tag); Markdown's emphasis marks around
words (``**``, ``__``, ``*``, ``_``, ``~~``, backticks), heading ``#``s, list bullets and
quote marks at line starts, rules and code fences go, a link is its text. Nothing is
interpreted: SSML's ``<break>`` makes no pause, ``<say-as>`` changes no reading; its tags
are dropped and the words between them read as text.
"""
from __future__ import annotations

import html
import re

#: a tag: ``<name attr="v">``, ``</name>``, ``<name/>`` (every attribute with a value, so
#: "x<y and y>z" is no tag); a comment; ``<?xml ...?>``, ``<!DOCTYPE ...>``
_TAG = re.compile(r"<!--.*?-->|<\?.*?\?>|<![A-Za-z][^<>]*>"
                  r"|</?[A-Za-z][\w:.-]*(?:\s+[\w:.-]+\s*=\s*(?:\"[^\"]*\"|'[^']*'|[^\s\"'<>=`]+))*"
                  r"\s*/?>", re.DOTALL)
#: an autolink ``<https://...>``: its address
_AUTOLINK = re.compile(r"<((?:https?|mailto):[^\s<>]+)>")
#: a Markdown link or image ``[text](url "title")``: its text
_LINK = re.compile(r"!?\[([^\]\n]*)\]\([^)\s]*(?:\s+\"[^\"\n]*\")?\)")
#: line starts: a heading's ``#``s, a rule, a code fence, a quote's ``>``, a bullet, a
#: numbered item (kept: its number is read)
_HEADING = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.MULTILINE)
_RULE = re.compile(r"^[ \t]*(?:([-*_])[ \t]*)(?:\1[ \t]*){2,}$|^[ \t]*(?:```|~~~).*$", re.MULTILINE)
_QUOTE = re.compile(r"^[ \t]*(?:>[ \t]?)+", re.MULTILINE)
_ITEM = re.compile(r"^[ \t]*(?:[-*+•][ \t]+|(?=\d{1,3}[.)][ \t]+))", re.MULTILINE)
#: emphasis around words (not inside one: ``2*3*4``, ``snake_case_name`` stay)
_EMPHASIS = [re.compile(p) for p in (
    r"(?<![\w*])\*\*(?=\S)(.+?)(?<=\S)\*\*(?![\w*])",
    r"(?<![\w_])__(?=\S)(.+?)(?<=\S)__(?![\w_])",
    r"(?<![\w*])\*(?=[^\s*])([^*\n]+?)(?<=[^\s*])\*(?![\w*])",
    r"(?<![\w_])_(?=[^\s_])([^_\n]+?)(?<=[^\s_])_(?![\w_])",
    r"~~(?=\S)(.+?)(?<=\S)~~",
    r"`+([^`\n]+?)`+",
)]


def strip_markup(text: str) -> str:
    """``text`` as a reader sees it rendered, line breaks kept: entities unescaped, tags
    and Markdown marks gone. A heading and each list item end their paragraph (a blank
    line after them), so they are read as sentences of their own, not run together."""
    text = html.unescape(text.replace("\r\n", "\n"))
    text = _TAG.sub(" ", _AUTOLINK.sub(r"\1", text))
    text = _RULE.sub("", text)
    text = _HEADING.sub(r"\1\n", text)
    text = _QUOTE.sub("", text)
    text = _ITEM.sub("\n", text)
    text = _LINK.sub(r"\1", text)
    for pattern in _EMPHASIS:
        text = pattern.sub(r"\1", text)
    return text
