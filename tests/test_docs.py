"""The documentation stays navigable: README.md is short, every relative link in README.md and
docs/*.md resolves (the file and, for ``#anchor`` links, a heading with that GitHub anchor),
every docs page anchor the code cites exists, and the code cites no document outside the
repository."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]
CODE_DIRS = ["repa_e_fast", "kernels", "benchmarks", "csrc", "tests"]
CODE_SUFFIXES = (".py", ".sh", ".cpp", ".h")

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`[^`]*`")
# docs/<page>.md or docs/<page>.md#<anchor>, as the code cites them
CITATION = re.compile(r"docs/[\w-]+\.md(?:#[\w-]+)?")
# Citations of documents that are not in the repository: the plan's sections ("spec §9.4", any
# "§"), its numbered items ("R39", "Q11"), the reference fixtures' README, a design document.
OUTSIDE_CITATION = re.compile(r"§|\b[RQ][0-9]+\b|reference README|DESIGN\.md|README[:§]")


def lines_by_kind(text: str, in_fence: bool):
    """The lines outside fenced code blocks (``in_fence=False``) or inside them."""
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced == in_fence:
            yield line


def prose_lines(text: str):
    return lines_by_kind(text, in_fence=False)


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, inline markup and punctuation dropped
    (letters, digits, '_', '-' and spaces kept), spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set:
    found, seen = set(), {}
    for line in prose_lines(page.read_text(encoding="utf-8")):
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            anchor = github_anchor(heading.group(1))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def unresolved(target: Path, anchor: str) -> str:
    """Why ``target#anchor`` does not resolve, or '' when it does."""
    if not target.exists():
        return f"{target.relative_to(REPO)} does not exist"
    if anchor and anchor not in anchors(target):
        return f"{target.relative_to(REPO)} has no heading with anchor #{anchor}"
    return ""


def test_github_anchor_rules():
    assert github_anchor("Order, sharding, resumption") == "order-sharding-resumption"
    assert github_anchor("`pos_embed` is trained") == "pos_embed-is-trained"
    assert github_anchor("`repa_e_fast.cache_latents` and LDM-only training") == \
        "repa_e_fastcache_latents-and-ldm-only-training"
    assert github_anchor("ZeRO-3 / FSDP2: not needed on 80 GB") == "zero-3--fsdp2-not-needed-on-80-gb"


def test_readme_is_at_most_300_lines():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_keeps_the_ci_test_command_in_a_fenced_block():
    # .ci/run runs exactly this command; the README is where a newcomer reads it.
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert 'pip install -e ".[test]" && pytest -q' in lines_by_kind(text, in_fence=True)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    problems = []
    for line in prose_lines(page.read_text(encoding="utf-8")):
        for link in LINK.findall(CODE_SPAN.sub("", line)):
            if re.match(r"[a-z]+:", link):
                continue  # http(s), mailto: not checked here
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            problem = unresolved(target, anchor)
            if problem:
                problems.append(f"[{link}]: {problem}")
    assert not problems, f"{page.relative_to(REPO)}:\n" + "\n".join(problems)


def code_lines():
    """(file, line number, line) of every source file under CODE_DIRS, and setup.py."""
    sources = [REPO / "setup.py"]
    for directory in CODE_DIRS:
        sources += sorted(p for p in (REPO / directory).rglob("*")
                          if p.suffix in CODE_SUFFIXES and "__pycache__" not in p.parts)
    for source in sources:
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            yield source, number, line


def test_docs_anchors_cited_in_the_code_resolve():
    problems = []
    for source, number, line in code_lines():
        for citation in CITATION.findall(line):
            path, _, anchor = citation.partition("#")
            problem = unresolved(REPO / path, anchor)
            if problem:
                problems.append(f"{source.relative_to(REPO)}:{number}: {citation}: {problem}")
    assert not problems, "\n".join(problems)


def test_the_code_cites_no_document_outside_the_repository():
    this_file = Path(__file__).resolve()  # it spells the patterns out
    problems = [f"{source.relative_to(REPO)}:{number}: {line.strip()}"
                for source, number, line in code_lines()
                if source.resolve() != this_file and OUTSIDE_CITATION.search(line)]
    assert not problems, "cite docs/<page>.md#<anchor> instead:\n" + "\n".join(problems)
