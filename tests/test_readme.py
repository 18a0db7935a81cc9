"""The README's code runs and the files it names exist, so the docs match the code."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
TEXT = open(README).read()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.DOTALL)


# Examples that build a detector compile it several times (~30 s): `make test-all` runs them.
EXAMPLES = [
    pytest.param(index, marks=pytest.mark.slow) if "create_model" in block else index
    for index, block in enumerate(PYTHON_BLOCKS)
]


@pytest.mark.parametrize("index", EXAMPLES)
def test_python_examples_run(index, capsys):
    exec(compile(PYTHON_BLOCKS[index], f"README.md python block {index}", "exec"), {})
    assert capsys.readouterr().out.strip(), "each example prints what it shows"


def test_named_files_exist():
    root = os.path.dirname(README)
    named = set(
        re.findall(r"\b((?:configs|benchmarks|notebooks|jaxcomp)/[\w/]+\.(?:py|ipynb))", TEXT)
    )
    assert named, "the README names no files"
    missing = sorted(path for path in named if not os.path.exists(os.path.join(root, path)))
    assert not missing, f"the README names files that do not exist: {missing}"
