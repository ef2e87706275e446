"""Wiki markup cleaning, the default Wikipedia split, and user text files."""

import json
from pathlib import Path

import pytest

from caldera.io.corpus import Article, CorpusError, clean_wikitext, default_split, load_text_files, wiki_articles


@pytest.fixture(scope="session")
def articles() -> list[Article]:
    return wiki_articles()


@pytest.mark.parametrize(
    ("wikitext", "expected"),
    [
        ("A {{cite|x={{nested|y}}}}b.", "A b."),
        ("Before\n{| class=wikitable\n|-\n| {{flag|x}} || 1\n|}\nAfter", "Before\n\nAfter"),
        ('Fact.<ref name="a">{{cite web|url=http://x}}</ref> More<ref name="a" /> text.', "Fact. More text."),
        ("Keep <!-- hidden\nnote --> <small>small</small> <math>x^2</math>this.", "Keep small this."),
        ("[[File:A.jpg|thumb|A [[cat]] [sic] sat]]Cats[[Category:Felines]][[de:Katze]].", "Cats."),
        (
            "[[Paris|the capital]] and [[London]]s and [[:Category:Cities|cities]].",
            "the capital and Londons and cities.",
        ),
        (
            "See [http://example.org the site], [http://example.org] or http://example.org/x now.",
            "See the site, or now.",
        ),
        ("'''Bold''' and ''italic'' and '''''both'''''.", "Bold and italic and both."),
        (
            "Intro.\n\n\n== History ==\n* one\n# two\n\n\nEnd  of   text.",
            "Intro.\n\nHistory\n\none\ntwo\n\nEnd of text.",
        ),
        ("Body.\n== References ==\n{{reflist}}\n* a book\n== Later ==\nMore.", "Body.\n\nLater\n\nMore."),
        ("Born ({{birth date|1900}}) in 1900&nbsp;AD &ndash; here .", "Born in 1900 AD – here."),
    ],
)
def test_clean_wikitext(wikitext: str, expected: str) -> None:
    assert clean_wikitext(wikitext) == expected


def test_articles_are_clean_prose(articles: list[Article]) -> None:
    assert len(articles) > 50
    assert len({a.title for a in articles}) == len(articles)
    for a in articles:
        assert len(a.text) >= 2000
        for markup in ("{{", "}}", "[[", "]]", "<ref", "{|", "'''", "<!--", "http://"):
            assert markup not in a.text, (a.title, markup)
        assert "\n\n\n" not in a.text and a.text == a.text.strip()


def test_redirects_and_other_namespaces_skipped(articles: list[Article]) -> None:
    titles = {a.title for a in articles}
    assert "AccessibleComputing" not in titles  # the dump's first page, a redirect
    assert "Anarchism" in titles
    assert not any(":" in t and t.split(":")[0] in {"Wikipedia", "Template", "Category"} for t in titles)


def test_default_split_is_disjoint_deterministic_and_large_enough(articles: list[Article]) -> None:
    split = default_split(articles)
    cal, ev = {a.title for a in split.calibration}, {a.title for a in split.evaluation}
    assert not cal & ev and len(cal | ev) == len(articles)
    assert sum(len(a.text) for a in split.evaluation) >= 150_000
    assert sum(len(a.text) for a in split.calibration) >= 10 * 150_000
    assert default_split(articles) == split
    assert {a.title for a in default_split(articles[::-1]).evaluation} == ev  # the order of articles does not matter


def test_default_split_needs_something_to_calibrate() -> None:
    with pytest.raises(CorpusError, match="nothing left to calibrate"):
        default_split([Article("a", "x" * 10)], eval_chars=100)


def test_wiki_articles_reads_plain_xml(tmp_path: Path) -> None:
    ns = "http://www.mediawiki.org/xml/export-0.11/"
    page = "<page><title>{}</title><ns>{}</ns>{}<revision><text>{}</text></revision></page>"
    pages = [
        page.format("Kept", 0, "", "'''Kept''' is [[prose]]."),
        page.format("Moved", 0, '<redirect title="Kept" />', "#REDIRECT [[Kept]]"),
        page.format("Talk:Kept", 1, "", "Talk text."),
    ]
    dump = tmp_path / "dump.xml"
    dump.write_text(f'<mediawiki xmlns="{ns}">{"".join(pages)}</mediawiki>')
    assert wiki_articles(dump, min_chars=0) == [Article("Kept", "Kept is prose.")]


def test_load_text_files(tmp_path: Path) -> None:
    txt, jsonl = tmp_path / "a.txt", tmp_path / "b.jsonl"
    txt.write_text("plain text\n")
    jsonl.write_text(json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_text_files([txt, str(jsonl)]) == ["plain text\n", "one", "two"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "no such file"),
        ("empty.txt", " \n", "empty"),
        ("empty.jsonl", "\n", "empty"),
        ("bad.jsonl", '{"text": "ok"}\n{"body": "x"}\n', r"bad.jsonl:2: expected an object with a string \"text\""),
        ("broken.jsonl", '{"text": \n', "broken.jsonl:1: not valid JSON"),
        ("data.csv", "text\n", "unsupported file type"),
        ("latin1.txt", "caf\xe9".encode("latin-1"), "not UTF-8 text"),
    ],
)
def test_load_text_files_errors(tmp_path: Path, name: str, content: str | bytes | None, message: str) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(CorpusError, match=message) as err:
        load_text_files([path])
    assert "\n" not in str(err.value)
