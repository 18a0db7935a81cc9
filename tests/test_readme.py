"""The code of README.md and docs/*.md runs and the files they name exist: docs match code."""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
PAGES = {os.path.relpath(path, ROOT): open(path).read() for path in [README, *DOCS]}
PYTHON_BLOCKS = [
    (page, index, block)
    for page, text in PAGES.items()
    for index, block in enumerate(re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL))
]
NAMED_FILE = re.compile(r"\b((?:configs|benchmarks|notebooks|jaxcomp)/[\w/]+\.(?:py|ipynb))")
LINK = re.compile(r"\]\(([^)\s]+)\)")


# Examples that build a detector compile it several times (~30 s): `make test-all` runs them.
EXAMPLES = [
    pytest.param(
        page,
        index,
        block,
        id=f"{page}-{index}",
        marks=[pytest.mark.slow] if "create_model" in block else [],
    )
    for page, index, block in PYTHON_BLOCKS
]


def test_docs_pages_exist():
    assert DOCS, "docs/ holds no pages"


@pytest.mark.parametrize("page,index,block", EXAMPLES)
def test_python_examples_run(page, index, block, capsys):
    exec(compile(block, f"{page} python block {index}", "exec"), {})
    assert capsys.readouterr().out.strip(), "each example prints what it shows"


@pytest.mark.parametrize("page", sorted(PAGES))
def test_named_files_exist(page):
    named = set(NAMED_FILE.findall(PAGES[page]))
    if page == "README.md":
        assert named, "the README names no files"
    missing = sorted(path for path in named if not os.path.exists(os.path.join(ROOT, path)))
    assert not missing, f"{page} names files that do not exist: {missing}"


@pytest.mark.parametrize("page", sorted(PAGES))
def test_relative_links_resolve(page):
    base = os.path.dirname(os.path.join(ROOT, page))
    targets = {
        link.split("#")[0]
        for link in LINK.findall(PAGES[page])
        if not re.match(r"[a-z]+:", link) and not link.startswith("#")
    }
    missing = sorted(t for t in targets if not os.path.exists(os.path.join(base, t)))
    assert not missing, f"{page} links to files that do not exist: {missing}"


def test_readme_links_every_docs_page():
    linked = {os.path.normpath(link.split("#")[0]) for link in LINK.findall(PAGES["README.md"])}
    unlinked = sorted(
        page for page in PAGES if page != "README.md" and os.path.normpath(page) not in linked
    )
    assert not unlinked, f"the README does not link these docs pages: {unlinked}"
