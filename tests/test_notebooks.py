"""The Colab notebooks run top to bottom (with few training and sampling steps): a failing
cell fails the suite."""

import os
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


def _setup_cell(path: pathlib.Path) -> str:
    cell = nbformat.read(path, as_version=4).cells[1]
    assert cell.cell_type == "code" and cell.source.startswith("# Set-up"), path.name
    return cell.source


def test_colab_setup_cell_clones_and_pip_installs_the_repository(tmp_path):
    """The set-up cell's Colab branch (not inside a checkout): git clone of the repository and
    `pip install -e` into a fresh Python environment with nothing installed, as on a new
    Colab machine; afterwards `lumiere_jax` loads from the clone and its `lumiere` command
    runs. The repository is this checkout's git history (its HEAD), in place of the GitHub
    URL. Colab itself (its preinstalled packages, its Python) cannot be reached from here."""
    import subprocess
    import sys

    sources = {_setup_cell(p) for p in NOTEBOOKS}
    assert len(sources) == 1  # one set-up cell, the same in every notebook
    venv, clone, cwd = tmp_path / "venv", tmp_path / "content" / "lumiere_jax", tmp_path / "nb"
    cwd.mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path),
           "LUMIERE_REPO_URL": str(REPO), "LUMIERE_CLONE_DIR": str(clone)}
    for key in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CERT",
                "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_DEFAULT_TIMEOUT"):
        if key in os.environ:  # the machine's package-index settings, as pip sees them here
            env[key] = os.environ[key]
    setup = subprocess.run([str(python), "-c", sources.pop()], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=1200)
    assert setup.returncode == 0, setup.stderr[-3000:]
    assert setup.stdout.strip().endswith(f"lumiere_jax at {clone}")
    check = subprocess.run(
        [str(python), "-c", "import lumiere_jax, flax, orbax.checkpoint, grain; "
         "print(lumiere_jax.__file__)"], cwd=cwd, env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr[-3000:]
    assert check.stdout.strip() == str(clone / "lumiere_jax" / "__init__.py")
    # The installed console script works: it writes a shard of the built-in world.
    cli = subprocess.run([str(venv / "bin" / "lumiere"), "data", "synth", "--out",
                          str(tmp_path / "shards"), "--num", "2"], cwd=cwd, env=env,
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert (tmp_path / "shards" / "shard-00000.array_record").stat().st_size > 0
