"""The documentation holds together: every "design §N" and "ComfyUI facts §CN" cited in the repository's code and
docs names a heading of docs/design.md / docs/comfyui.md, nothing cites the out-of-repo spec, and the links of
README.md and docs/*.md point at files (and headings) that exist. Citations are collected from the files at test
time."""
from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DESIGN = REPO / "docs" / "design.md"
COMFYUI_DOC = REPO / "docs" / "comfyui.md"
README = REPO / "README.md"
SCANNED_SUFFIXES = (".py", ".md", ".js")
SKIPPED_DIRS = {"node_modules", "__pycache__", "venv"}
SKIPPED_PATHS = {REPO / "tests" / "data"}  # test data: made by other programs, cites nothing

SECTION = r"\d+(?:\.\d+)*"
# "design §7.5", "design §1, §6", "design §7.2–7.4", "design §10.1 folder/file, §10.2 prefix": everything up to
# the end of the parenthesis, line or docstring belongs to the citation.
DESIGN_CITATION = re.compile(r"design §([^)\n\"]{0,100})")
DESIGN_NUMBER = re.compile(rf"§?({SECTION})(?:\s*[–-]\s*({SECTION}))?")
FACTS_CITATION = re.compile(r"ComfyUI facts §([^)\n\"]{0,60})")
FACTS_NUMBER = re.compile(r"§?C(\d+)\b")
SPEC_CITATION = "spec" + " §"  # split so this file does not cite it
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _scanned_files() -> list[Path]:
    files = []
    for root, dirs, names in os.walk(REPO):
        dirs[:] = sorted(
            d for d in dirs if d not in SKIPPED_DIRS and not d.startswith(".") and Path(root, d) not in SKIPPED_PATHS
        )
        files += [Path(root, n) for n in sorted(names) if n.endswith(SCANNED_SUFFIXES)]
    return files


def _headings(path: Path) -> list[str]:
    """Heading texts of a markdown file, outside fenced code blocks."""
    out, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match:
            out.append(match.group(2))
    return out


def _numbered(headings: list[str], pattern: str) -> set[str]:
    numbers = set()
    for text in headings:
        match = re.match(pattern, text)
        if match:
            numbers.add(match.group(1))
    return numbers


def _design_sections() -> set[str]:
    return _numbered(_headings(DESIGN), rf"({SECTION})\.?(?:\s|$)")


def _facts_sections() -> set[str]:
    return _numbered(_headings(COMFYUI_DOC), r"C(\d+)\.?(?:\s|$)")


def _expand(first: str, last: str | None) -> list[str]:
    """A cited range "7.2–7.4" → 7.2, 7.3, 7.4 (same parent); a single section → itself."""
    if last is None:
        return [first]
    head_a, _, tail_a = first.rpartition(".")
    head_b, _, tail_b = last.rpartition(".")
    assert head_a == head_b and int(tail_a) <= int(tail_b), f"odd section range {first}–{last}"
    return [f"{head_a}.{n}" if head_a else str(n) for n in range(int(tail_a), int(tail_b) + 1)]


def _sections_in(body: str) -> list[str]:
    """Sections named by the text after "design §": the first number, then every further "§N" (a bare number later
    in the sentence is prose, not a section), ranges expanded."""
    found = []
    for number in DESIGN_NUMBER.finditer(body.split("ComfyUI facts")[0]):
        if number.start() > 0 and not number.group(0).startswith("§"):
            continue
        found += _expand(number.group(1), number.group(2))
    return found


def _design_citations() -> dict[str, list[str]]:
    """Cited section → files citing it."""
    cited: dict[str, list[str]] = {}
    for path in _scanned_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for citation in DESIGN_CITATION.finditer(text):
            for section in _sections_in(citation.group(1)):
                cited.setdefault(section, []).append(str(path.relative_to(REPO)))
    return cited


def _facts_citations() -> dict[str, list[str]]:
    cited: dict[str, list[str]] = {}
    for path in _scanned_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for citation in FACTS_CITATION.finditer(text):
            for number in FACTS_NUMBER.finditer(citation.group(1)):
                cited.setdefault(number.group(1), []).append(str(path.relative_to(REPO)))
    return cited


def test_design_doc_has_the_cited_numbering():
    sections = _design_sections()
    # the top-level sections 1..14 every "design §N" can point at
    assert {str(n) for n in range(1, 15)} <= sections, sorted(sections, key=lambda s: [int(p) for p in s.split(".")])


def test_every_design_citation_resolves():
    cited = _design_citations()
    assert len(cited) >= 20, f"found only {len(cited)} cited sections; the citation scan is broken"
    sections = _design_sections()
    missing = {s: sorted(set(files))[:3] for s, files in cited.items() if s not in sections}
    assert not missing, f"'design §' citations without a heading in docs/design.md: {missing}"


def test_design_doc_cross_references_resolve():
    text = DESIGN.read_text(encoding="utf-8")
    sections = _design_sections()
    referenced = {n for m in re.finditer(rf"§({SECTION})(?:\s*[–-]\s*({SECTION}))?", text)
                  for n in _expand(m.group(1), m.group(2))}
    assert referenced, "docs/design.md refers to none of its sections; the scan is broken"
    assert referenced <= sections, f"docs/design.md refers to missing sections {sorted(referenced - sections)}"


def test_every_comfyui_facts_citation_resolves():
    sections = _facts_sections()
    assert {str(n) for n in range(1, 15)} <= sections, f"docs/comfyui.md ComfyUI facts headings: {sorted(sections)}"
    cited = _facts_citations()
    assert cited, "no 'ComfyUI facts §CN' citation found; the citation scan is broken"
    missing = {s: sorted(set(files))[:3] for s, files in cited.items() if s not in sections}
    assert not missing, f"'ComfyUI facts §C' citations without a heading in docs/comfyui.md: {missing}"


def test_citation_scan_reads_lists_and_ranges():
    text = ('x (design §1, §6.2.) y (design §7.2–7.4) z (design §10.1 folder/file, §10.2 prefix) "design §11." '
            "(design §5.2 step 7, §4)")
    found = [section for citation in DESIGN_CITATION.finditer(text) for section in _sections_in(citation.group(1))]
    assert found == ["1", "6.2", "7.2", "7.3", "7.4", "10.1", "10.2", "11", "5.2", "4"]


def test_no_file_cites_the_spec():
    offenders = [
        str(path.relative_to(REPO)) for path in _scanned_files()
        if SPEC_CITATION in path.read_text(encoding="utf-8", errors="replace")
    ]
    assert not offenders, f"cite docs/design.md ('design §N') instead of the spec in: {offenders}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _link_problems(doc: Path) -> tuple[int, list[str]]:
    """(number of links, broken ones) of a markdown file; web links are not followed."""
    targets = LINK.findall(doc.read_text(encoding="utf-8"))
    problems = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        file = (doc.parent / path_part).resolve() if path_part else doc
        if not file.exists():
            problems.append(f"{target}: no such file")
            continue
        if anchor and file.suffix == ".md" and anchor not in {_slug(h) for h in _headings(file)}:
            problems.append(f"{target}: no heading with anchor #{anchor}")
    return len(targets), problems


def test_readme_and_docs_links_resolve():
    readme_links, problems = _link_problems(README)
    assert readme_links >= 5, f"README has {readme_links} links; the link scan is broken"
    broken = {"README.md": problems} if problems else {}
    for doc in sorted((REPO / "docs").glob("*.md")):
        _, problems = _link_problems(doc)
        if problems:
            broken[f"docs/{doc.name}"] = problems
    assert not broken, f"broken links: {broken}"


def test_link_check_finds_a_broken_link(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\n[ok](#title) [gone](missing.md) [bad anchor](#nowhere) [web](https://example.org)\n")
    count, problems = _link_problems(doc)
    assert count == 4
    assert problems == ["missing.md: no such file", "#nowhere: no heading with anchor #nowhere"]


def test_readme_links_the_design_doc():
    assert "](docs/design.md)" in README.read_text(encoding="utf-8")
