"""The notebooks in notebooks/ run from top to bottom (with small settings) and say what they should.

Each notebook is executed with nbclient in a fresh ``python3`` kernel that runs this
interpreter (so it imports this featx), in a temporary working folder, with matplotlib's
Agg backend and its outputs (stores, generated stimuli) under ``tmp_path``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import h5py
import nbclient
import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT = 300  # seconds per cell


def _runs_this_interpreter(argv: list[str]) -> bool:
    # jupyter_client replaces a bare "python"/"python3"/"pythonX.Y" with sys.executable.
    bare = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
    if not argv:
        return False
    return argv[0] in bare or Path(argv[0]).resolve() == Path(sys.executable).resolve()


@pytest.fixture
def kernel_name(tmp_path, monkeypatch) -> str:
    """``python3``, made to run this interpreter when the installed spec would not (or is missing).

    ``.venv/bin/python -m ipykernel install --sys-prefix`` installs the usual spec; without
    it (or when another ``python3`` spec comes first) a spec for ``sys.executable`` is
    written into a temporary folder that ``JUPYTER_PATH`` puts first.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
        if _runs_this_interpreter(spec.argv):
            return "python3"
    except NoSuchKernel:
        pass
    folder = tmp_path / "jupyter" / "kernels" / "python3"
    folder.mkdir(parents=True)
    (folder / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (featx tests)",
        "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    assert _runs_this_interpreter(KernelSpecManager().get_kernel_spec("python3").argv)
    return "python3"


def execute(name: str, workdir: Path, kernel: str, monkeypatch, **settings: str) -> tuple[nbformat.NotebookNode, str]:
    """Run notebook ``name`` in ``workdir``; returns the executed notebook and its stdout."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("FEATX_REPO", str(REPO))
    monkeypatch.setenv("FEATX_NB_OUT", str(workdir / "out"))
    monkeypatch.setenv("FEATX_NB_DEVICE", "cpu")
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(notebook, kernel_name=kernel, timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError, showing the cell, if any cell fails
    stdout = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                     for out in cell.get("outputs", []) if out.get("name") == "stdout")
    for cell in notebook.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", out
    return notebook, stdout


def test_notebooks_are_committed_without_outputs():
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == ["01_quickstart.ipynb", "02_brain_comparison.ipynb"]
    for name in names:
        path = NOTEBOOKS / name
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        assert notebook.metadata["kernelspec"]["name"] == "python3"
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name}: clear the outputs"
        assert path.stat().st_size < 40_000


def test_quickstart_runs(tmp_path, kernel_name, monkeypatch):
    stages = ["relu0", "relu2", "fc1_relu"]
    _, stdout = execute("01_quickstart.ipynb", tmp_path, kernel_name, monkeypatch,
                        FEATX_NB_STAGES=",".join(stages), FEATX_NB_WEIGHTS="random")
    assert "weights: RANDOM initialisation" in stdout
    store = tmp_path / "out" / "01_quickstart_alexnet.h5"
    assert str(store) in stdout
    with h5py.File(store, "r") as f:
        assert set(stages) <= set(f)
        assert f["relu0"].shape == (8, 64, 55, 55) and f["fc1_relu"].shape == (8, 4096)
        assert f.attrs["store_state"] == "complete"
    for stage in stages:
        assert re.search(rf"^{stage}\s+\('stimulus', '{stage}_", stdout, re.M), stdout
    assert "done:" in stdout


def test_brain_comparison_recovers_the_planted_stage(tmp_path, kernel_name, monkeypatch):
    _, stdout = execute("02_brain_comparison.ipynb", tmp_path, kernel_name, monkeypatch,
                        FEATX_NB_N="40", FEATX_NB_SEED="0", FEATX_NB_PLANTED="relu3")
    assert re.search(r"^planted stage: relu3$", stdout, re.M), stdout
    best = re.search(r"^best stage: (\S+)$", stdout, re.M)
    assert best, stdout
    assert best.group(1) == "relu3", stdout
    # It used what it was asked to: 40 generated pictures, reductions only, srp:32:0.
    out = tmp_path / "out"
    assert len(list((out / "02_synthetic_stimuli").glob("stim*.png"))) == 40
    with h5py.File(out / "02_brain_comparison_alexnet.h5", "r") as f:
        assert f["relu3.srp32"].shape == (40, 32)
        assert "relu3" not in f  # keep_full=False
        assert json.loads(f.attrs["featx_config"])["reduce"]["reductions"][0]["seed"] == 0
