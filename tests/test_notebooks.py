"""The notebooks run top to bottom on a fresh kernel (small setting), and are committed clean.

Each notebook runs in its own kernel with `JAXCOMP_NOTEBOOK_SMALL=1`, its own workdir, the
session's tiny dataset and the session's compilation cache: the notebooks train the same
tiny configs, so the later ones mostly load compiled programs instead of compiling them.
"""

import pathlib
import signal

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
# Per cell; a whole small notebook takes one to a few minutes on 2 loaded CPU cores.
CELL_TIMEOUT_SECONDS = 600


def test_the_three_notebooks_are_there():
    assert [path.name for path in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_new_transform.ipynb",
        "03_sweep.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_committed_notebook_has_no_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells, f"{path.name} has no code cell"
    for index, cell in enumerate(code_cells):
        assert cell.outputs == [], f"{path.name} code cell {index} has outputs; strip them"
        assert cell.execution_count is None, f"{path.name} code cell {index} has a count"
    assert notebook.metadata.kernelspec.name == "python3"


# The quick start runs by default; the other two (1-2 minutes of compiling each on 2
# cores) run with `make test-all`.
EXECUTED = [
    pytest.param(path, id=path.stem, marks=() if path.stem == "01_quickstart" else pytest.mark.slow)
    for path in NOTEBOOKS
]


@pytest.mark.parametrize("path", EXECUTED)
def test_notebook_runs_top_to_bottom(path, tiny_data_dir, compilation_cache, tmp_path, monkeypatch):
    # The kernel inherits this process's environment.
    monkeypatch.setenv("JAXCOMP_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("JAXCOMP_NOTEBOOK_DATA_DIR", tiny_data_dir)
    monkeypatch.setenv("JAXCOMP_NOTEBOOK_WORKDIR", str(tmp_path / "runs"))
    monkeypatch.setenv("JAXCOMP_NOTEBOOK_CACHE_DIR", compilation_cache)
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_SECONDS,
        resources={"metadata": {"path": str(REPO)}},
    )
    # nbclient resets SIGINT and SIGTERM to Python's defaults afterwards, not to the
    # handlers it found (SIGINT is SIG_IGN in a test run launched in the background).
    inherited = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    finally:
        for sig, handler in inherited.items():
            signal.signal(sig, handler)
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.output_type == "error"]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert images, f"{path.name} displayed no figure"
    assert (tmp_path / "runs").is_dir(), f"{path.name} wrote no run to JAXCOMP_NOTEBOOK_WORKDIR"
