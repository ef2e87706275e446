"""Text for calibration and evaluation: the default Wikipedia excerpt (shipped inside gensim) and user files.

The default corpus is the English Wikipedia dump excerpt in the gensim test data, parsed with the standard
library and cleaned from wiki markup into plain prose. gensim itself is never imported.
"""

from __future__ import annotations

import bz2
import dataclasses
import hashlib
import html
import importlib.util
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
"""Location of the dump inside the gensim package."""

INSTALL_HINT = "pip install --no-deps gensim==4.4.0"

DROPPED_SECTIONS = frozenset(
    {
        "see also",
        "references",
        "notes",
        "footnotes",
        "citations",
        "sources",
        "bibliography",
        "further reading",
        "external links",
        "notes and references",
    }
)
"""Headings (lower case) whose sections hold link lists and citations rather than prose."""

_DROPPED_TAGS = ("math", "gallery", "timeline", "imagemap", "score", "hiero")
"""HTML-like tags whose content is markup, not prose: removed with their content."""

_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.DOTALL)
_REF_EMPTY = re.compile(r"<ref\b[^>]*/>", re.IGNORECASE)
_REF = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.IGNORECASE | re.DOTALL)
_TAG_BLOCK = re.compile(rf"<({'|'.join(_DROPPED_TAGS)})\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_LINK = re.compile(r"\[\[((?:[^\[\]]|\[(?!\[)|\](?!\]))*)\]\]")  # innermost: no [[ or ]] inside
_DROPPED_LINK = re.compile(r"\s*(?:file|image|media|category)\s*:", re.IGNORECASE)
_INTERLANGUAGE = re.compile(r"[a-z][a-z-]*:[^|]*")
_EXTERNAL = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_BARE_URL = re.compile(r"(?:https?|ftp)://\S+")
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_MAGIC = re.compile(r"__[A-Z]+__")
_LIST_MARK = re.compile(r"^[*#:;]+\s*")
_SPACE_BEFORE_PUNCT = re.compile(r"[ \t]+([,.;:!?])")
_EMPTY_PARENS = re.compile(r"\(\s*[,;]?\s*\)")


class CorpusError(ValueError):
    """A corpus file or the default corpus cannot be read; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class Article:
    """One cleaned article: plain prose, paragraphs separated by blank lines."""

    title: str
    text: str


@dataclasses.dataclass(frozen=True)
class Split:
    """Disjoint article sets: calibration (Hessians) and evaluation (perplexity)."""

    calibration: list[Article]
    evaluation: list[Article]


def default_dump_path() -> Path:
    """The bz2 Wikipedia dump shipped in the gensim package, found without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    for root in (spec and spec.submodule_search_locations) or []:
        path = Path(root) / WIKI_DUMP
        if path.is_file():
            return path
    raise CorpusError(f"default corpus not found (it ships in gensim's test data): {INSTALL_HINT}")


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove every balanced ``open_ ... close`` span, nested ones included; an unclosed span runs to the end."""
    out, depth, start = [], 0, 0
    for token in re.finditer(f"{re.escape(open_)}|{re.escape(close)}", text):
        if depth == 0:
            out.append(text[start : token.start()])
        depth = depth + 1 if token.group() == open_ else max(depth - 1, 0)  # a stray close is dropped alone
        if depth == 0:
            start = token.end()
    if depth == 0:
        out.append(text[start:])
    return "".join(out)


def _link_text(match: re.Match[str]) -> str:
    """Visible text of an internal link ``[[target|label]]``; "" for files, categories and language links."""
    target, _, label = match.group(1).partition("|")
    if _DROPPED_LINK.match(target) or (not label and _INTERLANGUAGE.fullmatch(target)):
        return ""
    return label or target.lstrip(":")


def _resolve_links(text: str) -> str:
    """Replace internal links innermost first, so captions with links inside file links go with them."""
    while True:
        text, n = _LINK.subn(_link_text, text)
        if n == 0:
            return text


def _prose_lines(text: str) -> list[str]:
    """Lines of plain text: headings unwrapped, list markers dropped, reference sections removed."""
    lines, skipping = [], False
    for raw in text.splitlines():
        heading = _HEADING.match(raw.strip())
        if heading:
            skipping = heading.group(2).lower() in DROPPED_SECTIONS
            if not skipping:
                lines += ["", heading.group(2), ""]  # a heading is a paragraph of its own
            continue
        line = _LIST_MARK.sub("", raw.strip())
        if not skipping and not line.startswith("----"):
            lines.append(" ".join(line.split()))
    return lines


def clean_wikitext(text: str) -> str:
    """Plain prose from MediaWiki markup: templates, tables, refs, tags, files and categories removed.

    Paragraphs (and heading lines) are separated by one blank line; whitespace inside lines is collapsed.
    """
    text = _COMMENT.sub("", text)
    text = _REF_EMPTY.sub("", text)
    text = _REF.sub("", text)
    text = _TAG_BLOCK.sub("", text)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    text = _resolve_links(text)
    text = _EXTERNAL.sub(lambda m: m.group(1) or "", text)
    text = _BARE_URL.sub("", text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = _MAGIC.sub("", text)
    text = html.unescape(text).replace("\xa0", " ")
    text = _EMPTY_PARENS.sub("", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    paragraphs = re.split(r"\n(?:\s*\n)+", "\n".join(_prose_lines(text)))
    return "\n\n".join(p.strip() for p in paragraphs if p.strip())


def wiki_articles(path: Path | None = None, *, min_chars: int = 2000) -> list[Article]:
    """Main-namespace articles of a MediaWiki XML dump (.xml or .xml.bz2), cleaned, in dump order.

    Redirects and articles with fewer than ``min_chars`` characters after cleaning are skipped.
    Defaults to the excerpt shipped in gensim.
    """
    path = Path(path) if path is not None else default_dump_path()
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    articles = []
    with bz2.open(path, "rb") if path.suffix == ".bz2" else path.open("rb") as f:
        pages = ET.iterparse(f, events=("start", "end"))
        _, root = next(pages)
        ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""  # the MediaWiki export namespace
        for event, page in pages:
            if event != "end" or page.tag != f"{ns}page":
                continue
            wikitext = page.findtext(f"{ns}revision/{ns}text", "")
            is_article = page.findtext(f"{ns}ns", "0") == "0" and page.find(f"{ns}redirect") is None
            if is_article and not wikitext.lstrip().upper().startswith("#REDIRECT"):
                text = clean_wikitext(wikitext)
                if len(text) >= min_chars:
                    articles.append(Article(page.findtext(f"{ns}title", ""), text))
            root.clear()  # drop parsed pages: memory stays flat on full dumps
    return articles


def _title_key(article: Article) -> str:
    return hashlib.sha256(article.title.encode()).hexdigest()


def default_split(articles: list[Article] | None = None, *, eval_chars: int = 150_000) -> Split:
    """Deterministic disjoint split: articles in SHA-256-of-title order go to evaluation until it holds
    ``eval_chars`` characters; all others (in their original order) are calibration.

    Defaults to ``wiki_articles()``. The rule depends on titles only, not on the order or the other articles.
    """
    articles = wiki_articles() if articles is None else articles
    evaluation, total = set(), 0
    for article in sorted(articles, key=_title_key):
        if total >= eval_chars:
            break
        evaluation.add(article.title)
        total += len(article.text)
    if len(evaluation) == len(articles):
        raise CorpusError(f"{len(articles)} articles hold under {eval_chars} characters: nothing left to calibrate")
    return Split(
        calibration=[a for a in articles if a.title not in evaluation],
        evaluation=[a for a in articles if a.title in evaluation],
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CorpusError(f'{path}:{lineno}: expected an object with a string "text" field')
        if record["text"].strip():
            texts.append(record["text"])
    return texts


def load_text_files(paths: Iterable[Path | str]) -> list[str]:
    """Documents from user files: a ``.txt`` file is one document, a ``.jsonl`` file one per line's ``text``."""
    texts = []
    for path in map(Path, paths):
        if not path.is_file():
            raise CorpusError(f"{path}: no such file")
        if path.suffix == ".jsonl":
            found = _read_jsonl(path)
        elif path.suffix == ".txt":
            found = [t] if (t := _read_text(path)).strip() else []
        else:
            raise CorpusError(f"{path}: unsupported file type {path.suffix!r} (expected .txt or .jsonl)")
        if not found:
            raise CorpusError(f"{path}: empty (no text)")
        texts.extend(found)
    return texts


HUB_DATASETS: dict[str, tuple[str, dict[str, str], str]] = {
    "wikitext2": ("wikitext", {"name": "wikitext-2-raw-v1", "split": "test"}, "one document"),
    "wikitext2-train": ("wikitext", {"name": "wikitext-2-raw-v1", "split": "train"}, "one document"),
    "c4": (
        "allenai/c4",
        {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}, "split": "validation"},
        "one per record",
    ),
}
"""Names accepted where a text file is: (hub dataset, load_dataset keywords, how records become documents).
WikiText-2 is joined into one document (its rows are lines of articles); C4 gives one per record (first shard)."""


def hub_texts(name: str) -> list[str]:
    """Documents of a named hub dataset through ``datasets`` (needs network or a filled local HF cache)."""
    path, kwargs, how = HUB_DATASETS[name]
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"{name}: the datasets package is not installed (pip install datasets)") from None
    try:
        rows = datasets.load_dataset(path, **kwargs)["text"]
    except Exception as e:  # noqa: BLE001 (network, cache and format errors all end here)
        raise CorpusError(f"{name}: cannot load {path} ({type(e).__name__}: {e}); it needs network access") from None
    texts = ["".join(rows)] if how == "one document" else [t for t in rows if t.strip()]
    if not texts or not any(t.strip() for t in texts):
        raise CorpusError(f"{name}: {path} holds no text")
    return texts


def load_texts(specs: Iterable[Path | str]) -> list[str]:
    """Documents from each spec in turn: a hub dataset name (``HUB_DATASETS``) or a .txt / .jsonl file."""
    texts = []
    for spec in specs:
        texts += hub_texts(str(spec)) if str(spec) in HUB_DATASETS else load_text_files([spec])
    return texts


def describe_texts(specs: Iterable[Path | str]) -> str:
    """What ``load_texts(specs)`` reads, for run.json and reports: dataset names as given, files as full paths."""
    return ", ".join(str(s) if str(s) in HUB_DATASETS else str(Path(s).resolve()) for s in specs)
