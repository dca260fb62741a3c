"""Plain-text corpora for ``sae-adaptive compare --lm``: files in, a list of documents out.

Formats (by file name): ``.txt``/``.cor`` — one document per non-empty line (the Lee corpus);
``.jsonl`` — a ``"text"`` field per line; ``.bz2`` — any of these compressed, or a MediaWiki XML
dump (gensim's shortened enwiki), whose articles' wikitext is reduced to prose paragraphs:
templates, tables, references, links' targets, markup and list/heading lines are dropped.
"""

from __future__ import annotations

import bz2
import html
import json
import re
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".cor", ".jsonl")

_PAGE_TEXT = re.compile(r"<text[^>]*>(.*?)</text>", re.S)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|.*?\|\}", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_TAG = re.compile(r"<[^>]+>")
_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*\]\]", re.I)
_PIPED_LINK = re.compile(r"\[\[[^\[\]|]*\|([^\[\]]*)\]\]")
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXTERNAL = re.compile(r"\[https?://[^\s\]]*\s?([^\]]*)\]")
_EMPHASIS = re.compile(r"'{2,}")
_SPACES = re.compile(r"[ \t]+")


def wikitext_to_paragraphs(wikitext: str, min_chars: int = 200) -> list[str]:
    """Prose paragraphs (at least ``min_chars`` long) of one article's wikitext."""
    text = html.unescape(wikitext)
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    for _ in range(6):  # templates nest: strip the innermost ones until none are left
        text, n = _TEMPLATE.subn("", text)
        if n == 0:
            break
    text = _TABLE.sub("", text)
    for _ in range(3):  # file captions can hold links
        text = _FILE_LINK.sub("", text)
    text = _PIPED_LINK.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _EXTERNAL.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = html.unescape(text)  # dumps escape twice: "&amp;nbsp;" -> "&nbsp;" -> a space
    paragraphs = []
    for line in text.split("\n"):
        line = _SPACES.sub(" ", line).strip()
        if not line or line[0] in "*#:;|!{}=" or "{{" in line or "}}" in line:
            continue
        if len(line) >= min_chars:
            paragraphs.append(line)
    return paragraphs


def read_documents(path: str | Path, min_chars: int = 200) -> list[str]:
    """The documents of a corpus file (see the module docstring for the formats); a MediaWiki
    dump's paragraphs shorter than ``min_chars`` are dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text corpus {path} does not exist")
    name = path.name.lower()
    if name.endswith(".bz2"):
        raw = bz2.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        inner = name.removesuffix(".bz2")
    else:
        raw = path.read_text(encoding="utf-8", errors="replace")
        inner = name
    if "<mediawiki" in raw[:2000]:
        docs = [
            p for page in _PAGE_TEXT.findall(raw) for p in wikitext_to_paragraphs(page, min_chars)
        ]
    elif inner.endswith(".jsonl"):
        docs = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}: line {number} has no string field 'text'")
                docs.append(record["text"])
    elif inner.endswith((".txt", ".cor")) or "." not in inner:
        docs = [line.strip() for line in raw.splitlines() if line.strip()]
    else:
        raise ValueError(
            f"text corpus {path}: unknown format; use .txt/.cor (one document per line), "
            ".jsonl (a 'text' field), their .bz2, or a MediaWiki XML .bz2 dump"
        )
    if not docs:
        raise ValueError(f"text corpus {path}: no documents found")
    return docs
