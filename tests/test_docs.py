"""The docs stay true to the tree and to their sources.

Every relative link (and its #anchor) resolves; every repository path, `python -m` module and
`docs/*.md` named in the docs or the code exists; the index lists every doc and the file map
(docs/files.md) every module of the packages; each figure in the README's results table appears
in the report its row links to; the bad-input count quoted is the number of cases in the generated
table; no test count is written down (it goes stale with every new test)."""

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", ROOT / "recipe" / "ta_opd" / "README.md", *sorted(DOCS.glob("*.md"))]
CODE_DIRS = ("ta_opd", "recipe", "tests", "launch", "benchmarks")

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"(?<![\w/.-])((?:ta_opd|recipe|configs|tests|benchmarks|launch|docs)/[\w./-]*"
                       r"\.(?:py|ya?ml|md|csv|sh|sbatch|png|txt))(?![\w/])")
MODULE = re.compile(r"python -m ((?:ta_opd|recipe|launch|benchmarks)(?:\.\w+)+)")
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
COMMENT = re.compile(r"<!--.*?-->", re.S)


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation and symbols dropped, spaces -> '-'."""
    keep = (c for c in heading.strip().lower()
            if c in " -" or unicodedata.category(c)[0] in "LMN" or unicodedata.category(c) == "Pc")
    return "".join(keep).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            s = _slug(m.group(1))
            seen[s] = seen.get(s, -1) + 1  # a repeated heading gets -1, -2, ... as on GitHub
    return {s if i == 0 else f"{s}-{i}" for s, n in seen.items() for i in range(n + 1)}


def _links(page: Path) -> list[str]:
    return [t for t in LINK.findall(FENCE.sub("", page.read_text())) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {_rel(dest)}")
    assert not broken, f"{_rel(page)}:\n" + "\n".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_repository_path_and_module_named_exists(page):
    text = page.read_text()
    missing = [p for p in REPO_PATH.findall(text) if not (ROOT / p).exists()]
    for mod in MODULE.findall(text):
        base = ROOT.joinpath(*mod.split("."))
        if not (base.with_suffix(".py").exists() or (base / "__main__.py").exists()):
            missing.append(f"python -m {mod}")
    assert not missing, f"{_rel(page)} names what does not exist: {missing}"


def test_every_doc_the_code_cites_exists():
    missing = []
    for d in CODE_DIRS:
        for f in (ROOT / d).rglob("*"):
            if f.suffix in (".py", ".yaml", ".sh", ".sbatch") and ".venv" not in f.parts:
                missing += [f"{_rel(f)}: {m}" for m in re.findall(r"docs/\w+\.md", f.read_text())
                            if not (ROOT / m).exists()]
    assert not missing, missing


def test_the_index_lists_every_doc_and_the_readme_links_the_index():
    listed = {(DOCS / t.partition("#")[0]).resolve() for t in _links(DOCS / "README.md")}
    unlisted = [p.name for p in DOCS.glob("*.md") if p.name != "README.md" and p.resolve() not in listed]
    assert not unlisted, f"docs/README.md does not list {unlisted}"
    assert "docs/README.md" in _links(ROOT / "README.md")


def test_the_file_map_names_every_module_of_the_packages():
    files_md = (DOCS / "files.md").read_text()
    modules = [_rel(f) for d in ("ta_opd", "recipe") for f in (ROOT / d).rglob("*.py")
               if f.name != "__init__.py" and "assets" not in f.parts]
    unnamed = [m for m in modules if m not in files_md]
    assert not unnamed, f"docs/files.md does not name {unnamed}"


def test_every_file_in_docs_is_linked_from_some_page():
    linked = {(p.parent / t.partition("#")[0]).resolve() for p in PAGES for t in _links(p)}
    orphans = [p.name for p in DOCS.iterdir() if p.is_file() and p.resolve() not in linked]
    assert not orphans, orphans


def _results_rows():
    section = ROOT.joinpath("README.md").read_text().split("\n## Results", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for ln in lines[2:]:
        cells = dict(zip(header, (c.strip() for c in ln.strip().strip("|").split(" | "))))
        yield cells


def test_readme_results_figures_appear_in_the_report_each_row_links_to():
    rows = list(_results_rows())
    assert len(rows) >= 5
    wrong = []
    for row in rows:
        targets = [t for t in LINK.findall(row["source"]) if not t.startswith("#")]
        if not targets:
            wrong.append(f"{row['what']}: no linked source")
            continue
        source = " ".join((ROOT / t.partition("#")[0]).read_text() for t in targets)
        have = set(NUMBER.findall(source))
        absent = [n for n in NUMBER.findall(COMMENT.sub("", row["result"])) if n not in have]
        if absent:
            wrong.append(f"{row['what']}: {absent} not in {targets}")
    assert not wrong, "\n".join(wrong)


def test_the_bad_input_count_quoted_is_the_generated_tables():
    table = (DOCS / "bad_inputs.md").read_text()
    n = len(re.findall(r"^\| \d+ \|", table, re.M))
    quoted = {p.name: [int(x) for x in re.findall(r"(\d+) bad inputs", p.read_text())]
              for p in (ROOT / "README.md", DOCS / "reliability.md")}
    assert quoted["README.md"], "the README no longer quotes the bad-input count"
    assert all(q == n for qs in quoted.values() for q in qs), (n, quoted)


def test_no_test_count_is_written_down():
    stale = [f"{_rel(p)}: {m}" for p in PAGES for m in re.findall(r"\b\d+ (?:tests|passed)\b", p.read_text())]
    assert not stale, f"test counts go stale with every new test: {stale}"
