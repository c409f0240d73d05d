"""The latentlens command through click's runner (and once as a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from latentlens import ContextualIndex
from latentlens.cli import main


def small_index() -> ContextualIndex:
    meta = [
        {"token_str": f"t{i}", "token_id": i, "caption": f"c{i}", "position": 2} for i in range(30)
    ]
    return ContextualIndex.from_tensors(
        {3: torch.randn(30, 8), 5: torch.randn(30, 8)}, meta, model_name="m"
    )


def test_info_lists_layers_and_memory(tmp_path):
    small_index().save(tmp_path / "b")
    r = CliRunner().invoke(main, ["info", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert "hidden dim:  8" in r.output and "3:" in r.output and "MiB" in r.output


def test_convert_legacy(tmp_path):
    meta = [{"token_str": "a", "token_id": 1, "caption": "x a", "position": 2}] * 4
    (tmp_path / "old" / "layer_2").mkdir(parents=True)
    torch.save(
        {"embeddings": torch.randn(4, 8), "metadata": meta},
        tmp_path / "old/layer_2/embeddings_cache.pt",
    )
    r = CliRunner().invoke(
        main, ["convert", str(tmp_path / "old"), str(tmp_path / "new"), "--dtype", "bf16"]
    )
    assert r.exit_code == 0, r.output
    idx = ContextualIndex.from_directory(tmp_path / "new")
    assert idx.available_layers == [2] and idx.dtype == torch.bfloat16


def test_user_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["info", str(tmp_path / "empty")])
    assert r.exit_code == 1
    assert "Error:" in r.output and "Traceback" not in r.output


def test_help_as_subprocess():
    out = subprocess.run(
        [sys.executable, "-m", "latentlens.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "info" in out.stdout and "convert" in out.stdout


def test_build_from_a_saved_tiny_model(tmp_path):
    from tests.tiny import SENTENCES, tiny_causal_lm, tiny_tokenizer

    tiny_causal_lm("llama").save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "corpus.txt").write_text("\n".join(SENTENCES) + "\n")
    args = [
        "build",
        str(tmp_path / "model"),
        str(tmp_path / "corpus.txt"),
        str(tmp_path / "bank"),
        "--layers",
        "1,3",
        "--cap",
        "2",
        "--batch-size",
        "3",
        "--device",
        "cpu",
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    idx = ContextualIndex.from_directory(tmp_path / "bank")
    assert idx.available_layers == [1, 3] and idx.manifest["build"]["cap"] == 2
    r = CliRunner().invoke(
        main,
        [
            "build",
            str(tmp_path / "model"),
            str(tmp_path / "corpus.txt"),
            str(tmp_path / "b2"),
            "--layers",
            "1,9",
        ],
    )
    assert r.exit_code == 1 and "out of range" in r.output


def test_build_rejects_empty_corpus(tmp_path):
    (tmp_path / "c.txt").write_text("\n\n")
    r = CliRunner().invoke(
        main, ["build", "whatever", str(tmp_path / "c.txt"), str(tmp_path / "o")]
    )
    assert r.exit_code == 1 and "no non-blank" in r.output


# --- search and interpret ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_and_bank(tmp_path_factory) -> tuple[str, str]:
    """A tiny Llama saved to disk and a bank built from it (the manifest names its path)."""
    from latentlens.extract import build_index
    from tests.tiny import SENTENCES, tiny_causal_lm, tiny_tokenizer

    root = tmp_path_factory.mktemp("cli")
    tiny_causal_lm("llama").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    build_index(
        str(root / "model"),
        SENTENCES,
        layers=[1, 3],
        max_contexts_per_token=3,
        output_dir=root / "bank",
        device="cpu",
        show_progress=False,
    )
    return str(root / "model"), str(root / "bank")


def test_search_shows_each_tokens_neighbours(tiny_model_and_bank, tmp_path) -> None:
    from tests.tiny import SENTENCES

    _, bank = tiny_model_and_bank
    args = [
        "search",
        bank,
        "--text",
        "the cat sleeps",
        "--layers",
        "3",
        "--top-k",
        "2",
        "--json",
        str(tmp_path / "s.json"),
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "== latent lens (score: cosine)" in r.output and "layer 3" in r.output
    assert "'sleeps'" in r.output and any(s in r.output for s in SENTENCES)
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["layers"] == [3] and data["tokens"] == ["<s>", "the", "cat", "sleeps"]
    cell = data["lenses"]["latent"]["predictions"][0][2]
    assert len(cell) == 2 and cell[0]["contextual_layer"] in (1, 3)
    assert cell[0]["caption"] in SENTENCES
    r = CliRunner().invoke(
        main,
        [
            "search",
            bank,
            "--text",
            "the cat",
            "--bank-layers",
            "1",
            "-q",
            "--json",
            str(tmp_path / "s1.json"),
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "s1.json").read_text())
    assert data["layers"] == [1, 3]  # default query layers: the bank's
    assert {
        p["contextual_layer"]
        for row in data["lenses"]["latent"]["predictions"]
        for cell in row
        for p in cell
    } == {1}


def test_interpret_all_three_lenses_with_json_and_plot(tiny_model_and_bank, tmp_path) -> None:
    model, bank = tiny_model_and_bank
    args = [
        "interpret",
        model,
        "--text",
        "a red car",
        "--bank",
        bank,
        "--lens",
        "latent",
        "--lens",
        "logit",
        "--lens",
        "embedding",
        "--layers",
        "0,3",
        "--top-k",
        "3",
        "--json",
        str(tmp_path / "i.json"),
        "--plot",
        str(tmp_path / "i.png"),
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    for name in ("latent", "logit", "embedding"):
        assert f"== {name} lens" in r.output
    data = json.loads((tmp_path / "i.json").read_text())
    assert list(data["lenses"]) == ["latent", "logit", "embedding"] and data["layers"] == [0, 3]
    assert (tmp_path / "i.png").stat().st_size > 10_000
    # Default lenses without a bank; the original embedding lens may return special ids.
    r = CliRunner().invoke(
        main,
        [
            "interpret",
            model,
            "-t",
            "a red car",
            "--layers",
            "0",
            "--all-embedding-rows",
            "--json",
            str(tmp_path / "o.json"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert list(json.loads((tmp_path / "o.json").read_text())["lenses"]) == ["logit", "embedding"]


def test_search_and_interpret_user_errors(tiny_model_and_bank, tmp_path) -> None:
    model, bank = tiny_model_and_bank
    cases = [
        (["interpret", model, "-t", "a red car", "--lens", "latent"], 2, "needs --bank"),
        (["interpret", model, "-t", "a red car", "--layers", "7"], 1, "invalid layer"),
        (["interpret", model, "-t", "a red car", "--positions", "9"], 1, "out of range"),
        (["interpret", str(tmp_path / "nope"), "-t", "a"], 1, "Error:"),
        (["search", bank, "-t", "a red car", "--bank-layers", "2"], 1, "not in this index"),
        (["search", bank, "-t", "a red car", "--layers", "x"], 2, "comma-separated integers"),
        (["interpret", model, "-t", "a", "--lens", "tuned"], 2, "Invalid value"),
    ]
    for args, code, message in cases:
        r = CliRunner().invoke(main, args)
        assert r.exit_code == code, (args, r.output)
        assert message in r.output and "Traceback" not in r.output, (args, r.output)
    small_index().save(tmp_path / "anon")
    manifest = tmp_path / "anon" / "config.json"
    manifest.write_text(manifest.read_text().replace('"model_name": "m"', '"model_name": ""'))
    r = CliRunner().invoke(main, ["search", str(tmp_path / "anon"), "-t", "a"])
    assert r.exit_code == 1 and "pass --model" in r.output


def test_interpret_as_subprocess(tiny_model_and_bank, tmp_path) -> None:
    model, _ = tiny_model_and_bank
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "latentlens.cli",
            "interpret",
            model,
            "--text",
            "the cat sleeps",
            "--layers",
            "1,3",
            "--lens",
            "logit",
            "--json",
            str(tmp_path / "p.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "== logit lens" in out.stdout and "layer 3" in out.stdout
    assert json.loads((tmp_path / "p.json").read_text())["tokens"][-1] == "sleeps"


def test_help_imports_neither_torch_nor_transformers():
    code = (
        "import sys, latentlens, latentlens.cli; "
        "from click.testing import CliRunner; "
        "r = CliRunner().invoke(latentlens.cli.main, ['--help']); "
        "assert r.exit_code == 0, r.output; "
        "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lazy_package_exports_every_public_name():
    import latentlens

    for name in latentlens.__all__:
        assert getattr(latentlens, name) is not None, name
    assert latentlens.SUPPORTED_MODELS is latentlens.models.MODEL_DEFAULTS
    import pkgutil

    submodules = {m.name for m in pkgutil.iter_modules(latentlens.__path__)}
    assert not submodules & set(latentlens._LAZY), "a submodule import would shadow the name"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        latentlens.nope  # noqa: B018


def test_lazy_names_survive_their_modules_being_imported_first():
    code = (
        "import latentlens.interpretation, latentlens.extract, latentlens.index, latentlens; "
        "assert callable(latentlens.interpret) and callable(latentlens.build_index); "
        "assert latentlens.ContextualIndex.__name__ == 'ContextualIndex'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
