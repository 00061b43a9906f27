"""Every notebook in notebooks/ runs top to bottom in a fresh kernel without an error.

The notebooks check their formulas with ``assert`` statements, so a wrong formula or a broken
public API fails here. The kernel is this interpreter (``sys.executable``), whatever kernel specs
are installed elsewhere, and runs in notebooks/ like ``jupyter lab notebooks/`` would. Deselect
these slow tests with ``-m "not notebooks"``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "psi-geoopt-tests"
CELL_TIMEOUT_S = 300


@pytest.fixture(scope="session")
def kernel_spec_manager(tmp_path_factory: pytest.TempPathFactory) -> KernelSpecManager:
    """A kernel spec that launches ``sys.executable -m ipykernel_launcher``, in a private dir."""
    kernels = tmp_path_factory.mktemp("kernels")
    kernelspec.write_kernel_spec(path=kernels / KERNEL_NAME)
    return KernelSpecManager(kernel_dirs=[str(kernels)])


def test_notebooks_are_found():
    assert NOTEBOOKS, f"no notebook found in {NOTEBOOK_DIR}"


def test_notebooks_are_committed_without_outputs():
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type == "code":
                assert not cell.outputs, f"{path.name}: cell {index} has outputs; strip them"
                assert cell.execution_count is None, f"{path.name}: cell {index} was executed"


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path: Path, kernel_spec_manager: KernelSpecManager):
    notebook = nbformat.read(path, as_version=4)
    manager = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernel_spec_manager)
    client = nbclient.NotebookClient(
        notebook,
        km=manager,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{path.name} failed:\n{error}", pytrace=False)
