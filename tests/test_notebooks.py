"""The notebooks run top to bottom on the demo data and the tiny pipeline's store.

Each one is executed in a real python3 kernel (nbclient) on a temporary copy; a cell that
raises fails the test. The committed files carry no outputs, so diffs show code only.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# notebook -> figures it draws on the test data (a figure that fails to render has no image)
FIGURES = {
    "01_explore_dataset.ipynb": 3,
    "02_augmentations.ipynb": 7,
    "03_compare_runs.ipynb": 7,
}
CELL_TIMEOUT_S = 300  # generous: the machine running the suite is shared and slow
# the notebooks' inputs: a value from the caller's shell must not leak into a test
PARAMETERS = ("FAT_MLFLOW_DATA", "FAT_MLFLOW_SEED", "FAT_MLFLOW_PIPELINE_RUN_ID",
              "FAT_MLFLOW_STAGE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def execute(name: str, tmp_path: Path, env: dict[str, str]) -> nbformat.NotebookNode:
    """Run a copy of the notebook in `tmp_path`; the kernel gets this process's environment
    without the notebook parameters, plus `env` and the Agg backend (no display needed)."""
    copy = tmp_path / name
    shutil.copy(NOTEBOOKS / name, copy)
    notebook = nbformat.read(copy, as_version=4)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    inherited = {key: value for key, value in os.environ.items() if key not in PARAMETERS}
    client.execute(env={**inherited, "MPLBACKEND": "Agg", **env})
    return notebook


def images(notebook: nbformat.NotebookNode) -> int:
    return sum("image/png" in output.get("data", {})
               for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)


def test_every_notebook_is_executed_here():
    assert sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")) == sorted(FIGURES)


@pytest.mark.parametrize("name", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda path: path.name)
def test_committed_notebook_has_no_outputs(name: Path):
    notebook = nbformat.read(name, as_version=4)
    nbformat.validate(notebook)
    dirty = [index for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"
             and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{name.name}: cells {dirty} carry outputs or execution counts; clear them"


@pytest.mark.parametrize("name", ["01_explore_dataset.ipynb", "02_augmentations.ipynb"])
def test_data_notebook_runs_on_the_demo_data(name: str, demo_data: Path, tmp_path: Path):
    notebook = execute(name, tmp_path, {"FAT_MLFLOW_DATA": str(demo_data)})
    assert images(notebook) == FIGURES[name]


def test_compare_runs_notebook_reads_the_pipeline_run(tiny_chain, tmp_path: Path):
    with tiny_chain.store() as uri:
        notebook = execute("03_compare_runs.ipynb", tmp_path,
                           {"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri})
    assert images(notebook) == FIGURES["03_compare_runs.ipynb"]
    printed = "".join(output.get("text", "") for cell in notebook.cells
                      if cell.cell_type == "code" for output in cell.outputs)
    assert f"pipeline run: {tiny_chain.pipeline_run_id}" in printed
