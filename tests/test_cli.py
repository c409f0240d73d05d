"""The latentlens command through click's runner (and once as a real subprocess)."""

from __future__ import annotations

import subprocess
import sys

import torch
from click.testing import CliRunner

from latentlens import ContextualIndex
from latentlens.cli import main


def small_index() -> ContextualIndex:
    meta = [{"token_str": f"t{i}", "token_id": i, "caption": f"c{i}", "position": 2} for i in range(30)]
    return ContextualIndex.from_tensors({3: torch.randn(30, 8), 5: torch.randn(30, 8)}, meta, model_name="m")


def test_info_lists_layers_and_memory(tmp_path):
    small_index().save(tmp_path / "b")
    r = CliRunner().invoke(main, ["info", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert "hidden dim:  8" in r.output and "3:" in r.output and "MiB" in r.output


def test_convert_legacy(tmp_path):
    meta = [{"token_str": "a", "token_id": 1, "caption": "x a", "position": 2}] * 4
    (tmp_path / "old" / "layer_2").mkdir(parents=True)
    torch.save({"embeddings": torch.randn(4, 8), "metadata": meta}, tmp_path / "old/layer_2/embeddings_cache.pt")
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "old"), str(tmp_path / "new"), "--dtype", "bf16"])
    assert r.exit_code == 0, r.output
    idx = ContextualIndex.from_directory(tmp_path / "new")
    assert idx.available_layers == [2] and idx.dtype == torch.bfloat16


def test_user_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["info", str(tmp_path / "empty")])
    assert r.exit_code == 1
    assert "Error:" in r.output and "Traceback" not in r.output


def test_help_as_subprocess():
    out = subprocess.run([sys.executable, "-m", "latentlens.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "info" in out.stdout and "convert" in out.stdout
