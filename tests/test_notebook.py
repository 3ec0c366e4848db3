"""The docs' example notebook runs: docs/examples/notebook_quickstart.ipynb is executed cell by cell in a
Jupyter kernel (nbclient), from the repository root, and any cell error fails the test. Its cells
assert what they show (run folders, summary values, load_model's predictions), so a broken notebook
API fails here. nbclient, nbformat and ipykernel come with the `test` extra (setup.cfg).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "examples" / "notebook_quickstart.ipynb"
CELL_TIMEOUT_S = 300

nbformat = pytest.importorskip("nbformat", reason='pip install -e ".[test]" (nbclient, nbformat, ipykernel)')
nbclient = pytest.importorskip("nbclient", reason='pip install -e ".[test]" (nbclient, nbformat, ipykernel)')
pytest.importorskip("ipykernel", reason='pip install -e ".[test]" (nbclient, nbformat, ipykernel)')


def _kernel_name() -> str:
    """`python3` when this interpreter's kernelspec (ipykernel installs it under sys.prefix) is found;
    else one registered for this interpreter under sys.prefix, so the kernel runs the test's python."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
        # "python" in argv is replaced by sys.executable when the kernel starts (jupyter_client)
        if spec.argv and (spec.argv[0] in ("python", "python3") or Path(spec.argv[0]).resolve()
                          == Path(sys.executable).resolve()):
            return "python3"
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import install

    install(kernel_name="trainlib-tests", prefix=sys.prefix)
    return "trainlib-tests"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "no code cells"
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the notebook's outputs before committing"


def test_example_notebook_runs(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel inherits the environment: the repository importable without an install, one thread,
    # no GPU (the notebook is a CPU walk-through)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # no profile or history in the user's home
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's tempfile.mkdtemp(): here even when a cell fails
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=_kernel_name(),
                                     resources={"metadata": {"path": str(ROOT)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{NOTEBOOK.relative_to(ROOT)}: a cell failed:\n{e}", pytrace=False)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
