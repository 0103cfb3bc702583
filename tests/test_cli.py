"""The CLI as a user meets it: help, a steered generation, and one-line errors with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import tied_sae
from esr.cli import main


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("esr: error: ")
    return err[0]


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "esr.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("fetch", "generate", "models"):
        assert cmd in out.stdout


def test_generate_prints_steered_and_unsteered(capsys, sae_dir, lm):
    rc = main(["generate", "--sae", str(sae_dir), "--latent", "3", "--value", "40",
               "--max-new-tokens", "12", "Explain how to bake bread."])
    out = capsys.readouterr().out
    assert rc == 0
    assert "--- unsteered (smollm2-135m-instruct) ---" in out
    assert "--- steered: latent 3 x 40 at blocks.15.hook_resid_post ---" in out
    plain, steered = out.split("--- steered")
    assert plain.split("---\n", 1)[1].strip() != steered.split("---\n", 1)[1].strip()


@pytest.mark.parametrize("argv, message", [
    (["--latent", "5000", "--value", "4"], "latent 5000 is out of range: the SAE has 512 latents"),
    (["--latent", "3", "--value", "nan"], "is not a finite number"),
    (["--latent", "3", "--value", "inf"], "is not a finite number"),
    (["--model", "no-such-model", "--latent", "3", "--value", "1"], "unknown model 'no-such-model'"),
    (["--value", "3"], "--value needs --latent"),
])
def test_bad_input_gives_one_line_error(capsys, sae_dir, lm, argv, message):
    rc = main(["generate", "--sae", str(sae_dir), *argv, "--max-new-tokens", "2", "Hi"])
    assert rc == 2
    assert message in _err_line(capsys)


def test_sae_width_mismatch(capsys, tmp_path, lm):
    tied_sae(d_in=64, d_sae=32).save_model(str(tmp_path))
    assert main(["generate", "--sae", str(tmp_path), "--latent", "1", "--value", "1", "Hi"]) == 2
    assert "SAE width d_in=64 does not match the model's d_model=576" in _err_line(capsys)


def test_sae_hook_outside_model(capsys, tmp_path, lm):
    tied_sae(d_sae=32, hook="blocks.40.hook_resid_post").save_model(str(tmp_path))
    assert main(["generate", "--sae", str(tmp_path), "--latent", "1", "--value", "1", "Hi"]) == 2
    assert "outside the model's 30 blocks" in _err_line(capsys)


def test_not_an_sae_directory(capsys, tmp_path):
    assert main(["generate", "--sae", str(tmp_path), "--latent", "1", "--value", "1", "Hi"]) == 2
    assert "is not a SAELens SAE directory" in _err_line(capsys)


def test_unreachable_hub_is_one_line_and_fast():
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens on the discard port
    env["HF_HOME"] = "/nonexistent-esr-test-cache"
    out = subprocess.run([sys.executable, "-m", "esr.cli", "generate", "--model",
                          "meta-llama/Llama-3.1-8B-Instruct", "Hi"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot get 'meta-llama/Llama-3.1-8B-Instruct' from the Hugging Face hub" in lines[0]
    assert "local directory" in lines[0]
