"""The Colab notebooks run top to bottom (with few training and sampling steps): a failing
cell fails the suite."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_every_notebook_is_tested():
    assert {p.stem for p in NOTEBOOKS} == {"quickstart", "train_stunet", "applications"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("NOTEBOOK_STEPS", "4")
    monkeypatch.setenv("NOTEBOOK_SAMPLE_STEPS", "3")
    monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device, as in Colab
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # Every notebook shows videos or images inline.
    assert any("image/gif;base64" in str(o.get("data", {}).get("text/html", ""))
               for o in outputs), path.name
