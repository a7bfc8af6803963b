"""The notebooks run top to bottom (small settings) against the installed package."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch, tmp_path):
    monkeypatch.setenv("SDEDIFF_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    resources = {"metadata": {"path": str(tmp_path)}}
    # execute() raises CellExecutionError on the first failing cell
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources=resources).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code)


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_stores_its_figures(path):
    """Every stored notebook holds its plots as inline image outputs (a reader on the repository page
    sees them), not only as files in notebooks/figures/."""
    import json

    nb = json.loads(path.read_text())
    images = [
        out
        for c in nb["cells"]
        if c["cell_type"] == "code"
        for out in c.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert images, f"{path.name} stores no image output: re-run notebooks/_build.py"


def test_the_image_notebook_is_built():
    assert "05_image_models.ipynb" in {p.name for p in NOTEBOOKS}
