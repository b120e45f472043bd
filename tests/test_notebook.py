"""The Colab quickstart runs top to bottom: executed on CPU with SMOKE_TEST=True, as papermill would inject it."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
KERNEL = "howto-venv"


def read_notebook() -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def parameters_index(nb: nbformat.NotebookNode) -> int:
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    return tagged[0]


def test_parameters_cell_defaults_to_the_t4_run():
    nb = read_notebook()
    namespace: dict = {}
    exec(nb.cells[parameters_index(nb)].source, namespace)
    assert namespace["SMOKE_TEST"] is False
    assert namespace["MODEL"] == "mistral"
    assert namespace["CONFIG"] == "configs/t4.yaml" and (ROOT / namespace["CONFIG"]).is_file()
    assert namespace["DATA"] == "data/howto_steps.jsonl" and (ROOT / namespace["DATA"]).is_file()


def test_notebook_is_stored_without_outputs():
    for cell in read_notebook().cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "clear the outputs before committing"


def test_install_cell_installs_the_wheels_setup_sh_installs():
    """The GPU install is skipped in the smoke run, so this keeps its --no-deps wheels in step with setup.sh."""
    setup = (ROOT / "setup.sh").read_text(encoding="utf-8")
    wanted = set(re.search(r"--no-deps ([^\n]+)", setup).group(1).split())
    source = "\n".join(c.source for c in read_notebook().cells if c.cell_type == "code")
    assert "requirements.txt" in source
    assert set(re.search(r"WHEELS = (\[[^\]]*\])", source).group(1).strip("[]").replace('"', "").split(", ")) == wanted


def test_install_cell_keeps_the_runtimes_torch(tmp_path):
    """Colab's torch (a CUDA build matched to its driver) is pinned by a constraint, so requirements.txt cannot
    replace it; where pip cannot keep it, the cell stops and says what to do. Run with a recorder for `run`."""
    from importlib.metadata import PackageNotFoundError, version

    cell = next(c for c in read_notebook().cells if c.cell_type == "code" and "WHEELS = " in c.source)
    commands = []
    namespace = {"SMOKE_TEST": False, "OUT": str(tmp_path / "out"), "Path": Path, "sys": sys,
                 "run": lambda *cmd: commands.append([str(c) for c in cmd])}
    exec(cell.source, namespace)
    constraints = tmp_path / "out" / "runtime-torch.txt"
    assert commands[0] == [sys.executable, "-m", "pip", "install", "-q", "-r", "requirements.txt", "-c",
                           str(constraints)]
    assert commands[1][:5] == [sys.executable, "-m", "pip", "install", "-q"] and "--no-deps" in commands[1]
    pins = []
    for name in ("torch", "torchvision", "torchaudio"):
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pass
    assert pins[0].startswith("torch==") and constraints.read_text().splitlines() == pins

    def refused(*cmd):
        raise RuntimeError("exit code 1")

    with pytest.raises(RuntimeError, match="pick an older Colab runtime version"):
        exec(cell.source, {**namespace, "run": refused})


@pytest.fixture
def venv_kernel(tmp_path, monkeypatch) -> str:
    """A kernel spec that runs this interpreter (the venv's), in a private Jupyter path: nothing is installed."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "howto-steps venv", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return KERNEL


def outputs(cell: nbformat.NotebookNode, mime: str) -> str:
    """Everything a cell showed in one MIME type (stream text counts as text/plain)."""
    found = []
    for out in cell.outputs:
        if out.output_type == "stream" and mime == "text/plain":
            found.append(out.text)
        elif out.output_type in ("display_data", "execute_result") and mime in out.data:
            found.append(out.data[mime])
    return "\n".join(found)


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_on_cpu(tmp_path, venv_kernel, tiny_model):
    nb = read_notebook()
    out = tmp_path / "out"
    injected = nbformat.v4.new_code_cell(f"SMOKE_TEST = True\nOUT = {str(out)!r}",
                                         metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(parameters_index(nb) + 1, injected)

    # Any cell that raises (a script that exits non-zero included) fails the run with CellExecutionError.
    NotebookClient(nb, kernel_name=venv_kernel, timeout=900, resources={"metadata": {"path": str(ROOT)}}).execute()

    text = {i: outputs(cell, "text/plain") for i, cell in enumerate(nb.cells) if cell.cell_type == "code"}
    everything = "\n".join(text.values())
    assert f"working in {ROOT}" in everything  # already inside the clone: no git clone
    assert "SMOKE_TEST: skipping the GPU install" in everything
    run_dir = out / "tiny"
    assert (out / "data" / "test.jsonl").stat().st_size > 0
    assert (run_dir / "adapter_model.safetensors").is_file()
    assert (run_dir / "gguf" / "model-q8_0.gguf").is_file() and (run_dir / "gguf" / "Modelfile").is_file()
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["n_examples"] == 4

    report_cell = next(c for c in nb.cells if "report.md" in c.source and c.cell_type == "code")
    shown = outputs(report_cell, "text/markdown")
    assert "BERTScore" in shown and "![" not in shown  # the table inline; image links replaced by the images
    pngs = [o for o in report_cell.outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(pngs) >= 2  # the loss curve and the evaluation plots
    download_cell = nb.cells[-1]
    assert "model-q8_0.gguf" in outputs(download_cell, "text/plain")
