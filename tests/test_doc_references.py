"""References into docs/ resolve: every "PROTOCOL.md 5.5" the code cites names a section of
docs/PROTOCOL.md, and every link from README.md into docs/ names a file (and heading) there.

Whether a section is *about* what the citing line does is for a reader to judge; this only
catches the citation that points nowhere (a renumbered or deleted section, a mistyped number).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = ROOT / "docs" / "PROTOCOL.md"
CITING_TREES = ("src", "tests", "bench", "docs")
CITING_SUFFIXES = {".py", ".js", ".json", ".md"}
SKIPPED_PARTS = {"node_modules", "__pycache__"}

# "PROTOCOL.md 4.4, 4.6", "PROTOCOL.md section 6", "PROTOCOL.md 5.2-5.4, 6.2",
# "PROTOCOL.md 2, E7 and 8.2", "PROTOCOL.md section 9 item 5", and the same after a line break.
_CITATION = re.compile(
    r"PROTOCOL\.md`?\s+(?:sections?\s+)?"
    r"(?P<refs>\d+(?:\.\d+)?(?:\s*(?:,|-|and)\s*(?:\d+(?:\.\d+)?|E\d))*)"
    r"(?:\s+item\s+(?P<item>\d+))?"
)
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.]\d)")


def protocol_sections() -> set[str]:
    sections: set[str] = set()
    for line in PROTOCOL.read_text(encoding="utf-8").splitlines():
        if match := re.match(r"#{2,3} (\d+(?:\.\d+)?)\.? ", line):
            sections.add(match.group(1))
    return sections


def chapter_items(chapter: str) -> set[str]:
    text = PROTOCOL.read_text(encoding="utf-8")
    start = re.search(rf"^## {re.escape(chapter)}\. ", text, re.MULTILINE)
    assert start is not None, f"no chapter {chapter}"
    end = re.search(r"^## ", text[start.end() :], re.MULTILINE)
    body = text[start.end() : start.end() + end.start() if end else len(text)]
    return set(re.findall(r"^(\d+)\. ", body, re.MULTILINE))


def citations() -> list[tuple[str, str, str | None]]:
    """(where, section, item) for every citation of PROTOCOL.md in the repository."""
    found: list[tuple[str, str, str | None]] = []
    for tree in CITING_TREES:
        for path in sorted((ROOT / tree).rglob("*")):
            if path.suffix not in CITING_SUFFIXES or SKIPPED_PARTS & set(path.parts):
                continue
            if path == PROTOCOL or not path.is_file():
                continue
            # Joined lines: a citation may wrap ("PROTOCOL.md\n3.6").
            text = re.sub(r"\s*\n\s*(?:#:?|//|\*)?\s*", " ", path.read_text(encoding="utf-8"))
            where = str(path.relative_to(ROOT))
            for match in _CITATION.finditer(text):
                for number in _NUMBER.findall(match.group("refs")):
                    found.append((where, number, match.group("item")))
    return found


CITATIONS = citations()


def test_citations_are_found() -> None:
    # The code cites the document dozens of times; finding none means the pattern broke.
    assert len(CITATIONS) > 50


@pytest.mark.parametrize(
    ("where", "section", "item"), CITATIONS, ids=[f"{w}:{s}" for w, s, _ in CITATIONS]
)
def test_protocol_citation_resolves(where: str, section: str, item: str | None) -> None:
    assert section in protocol_sections(), f"{where} cites PROTOCOL.md {section}, which is absent"
    if item is not None:
        assert item in chapter_items(section), f"{where} cites {section} item {item}"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


README_LINKS = re.findall(r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)", (ROOT / "README.md").read_text())


@pytest.mark.parametrize(("target", "anchor"), README_LINKS)
def test_readme_links_into_docs_resolve(target: str, anchor: str) -> None:
    path = ROOT / target
    assert path.is_file(), f"README.md links to {target}, which does not exist"
    if anchor:
        headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.MULTILINE)
        assert anchor in {_anchor(h) for h in headings}, f"no heading #{anchor} in {target}"
