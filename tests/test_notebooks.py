"""Every notebook under notebooks/ runs top to bottom in a fresh kernel on the real model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture
def venv_kernel(tmp_path, monkeypatch) -> str:
    """A kernelspec that runs this interpreter, first on JUPYTER_PATH: the notebook must see the
    package under test, not whatever a user-level `python3` kernel points at."""
    spec = tmp_path / "jupyter" / "kernels" / "esr-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "esr test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "esr-test"


def _run(path: Path, kernel: str, cwd: Path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        f"{path.name} is committed with outputs; clear them"
    NotebookClient(nb, kernel_name=kernel, timeout=600, startup_timeout=300,
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        assert out.output_type != "error", out
        parts.append(out.get("text", ""))
        for mime, data in out.get("data", {}).items():
            parts.append(json.dumps(data) if mime.endswith("json") else data)
    return "\n".join(parts)


def test_inspect_latents_notebook_runs_top_to_bottom(venv_kernel, tmp_path, lm):
    nb = _run(NOTEBOOKS / "inspect_latents.ipynb", venv_kernel, tmp_path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    out = [_text(c) for c in code]
    assert f"SAE {lm.spec.default_sae} reads blocks.15.hook_resid_post" in out[0]
    found = [line.split()[0] for line in out[1].strip().splitlines()]
    assert 1 <= len(found) <= 5 and all(x.isdigit() for x in found)  # latents found by label
    assert "token in context" in out[2] and "«" in out[2]  # latents firing on the snippet
    card = out[3]
    assert f"latent {found[0]} · {lm.spec.default_sae}" in card and "value 0 (unsteered)" in card
    assert f'id="latent-{found[0]}"' in card  # the HTML card was displayed
    assert "application/vnd.jupyter.widget-view+json" in json.dumps(code[4].outputs)  # the widgets
    unsteered, steered = out[5].split("--- steered: latent ")
    assert unsteered.startswith("--- unsteered ---\n") and len(unsteered.strip()) > 40
    assert steered.startswith(f"{found[0]} x ") and unsteered.split("---\n", 1)[1].strip() != \
        steered.split("---\n", 1)[1].strip()
