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


def test_build_from_a_saved_tiny_model(tmp_path):
    from tests.tiny import SENTENCES, tiny_causal_lm, tiny_tokenizer

    tiny_causal_lm("llama").save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "corpus.txt").write_text("\n".join(SENTENCES) + "\n")
    args = ["build", str(tmp_path / "model"), str(tmp_path / "corpus.txt"), str(tmp_path / "bank"),
            "--layers", "1,3", "--cap", "2", "--batch-size", "3", "--device", "cpu"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    idx = ContextualIndex.from_directory(tmp_path / "bank")
    assert idx.available_layers == [1, 3] and idx.manifest["build"]["cap"] == 2
    r = CliRunner().invoke(main, ["build", str(tmp_path / "model"), str(tmp_path / "corpus.txt"),
                                  str(tmp_path / "b2"), "--layers", "1,9"])
    assert r.exit_code == 1 and "out of range" in r.output


def test_build_rejects_empty_corpus(tmp_path):
    (tmp_path / "c.txt").write_text("\n\n")
    r = CliRunner().invoke(main, ["build", "whatever", str(tmp_path / "c.txt"), str(tmp_path / "o")])
    assert r.exit_code == 1 and "no non-blank" in r.output
