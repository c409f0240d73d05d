"""Banks on the Hub: the commit (per-layer files, manifest, card) built offline, the card's
metadata, and loading one layer alone from a Hub cache laid out the way a push leaves it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from latentlens import ContextualIndex
from latentlens import constants as C
from latentlens.cli import main
from latentlens.extract import build_index
from latentlens.hub import hub_operations, model_card
from tests.test_index import fake_hub_repo
from tests.tiny import SENTENCES, tiny_causal_lm, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("push")
    corpus = root / "captions.txt"
    corpus.write_text("\n".join(SENTENCES))
    build_index("org/tiny-llama", str(corpus), layers=[1, 2, 3], model=tiny_causal_lm("llama"),
                tokenizer=tiny_tokenizer(), show_progress=False, output_dir=root / "bank",
                max_contexts_per_token=3)  # fmt: skip
    return root / "bank"


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_metadata_and_the_build_command(bank):
    manifest = json.loads((bank / C.CONFIG_FILE).read_text())
    card = model_card(manifest, "me/bank", license="cc-by-4.0")
    meta = front_matter(card)
    assert meta["library_name"] == "latentlens" and meta["license"] == "cc-by-4.0"
    assert meta["base_model"] == "org/tiny-llama"
    ll = meta["latentlens"]
    assert ll["layers"] == [1, 2, 3] and ll["corpus"] == "captions.txt"
    assert ll["rows_per_layer"] == {str(k): v for k, v in manifest["rows_per_layer"].items()}
    assert ll["dtype"] == "float16" and ll["hidden_dim"] == 32 and ll["normalized"] is True
    assert "latentlens build org/tiny-llama captions.txt OUT_DIR --layers 1,2,3 --cap 3" in card
    assert '"cap": 3' in card and 'from_pretrained("me/bank", layers=[3])' in card
    assert f"({len(SENTENCES):,} sentences)" in card
    local = model_card({**manifest, "model_name": str(bank)}, "me/bank")  # a local path
    assert "base_model" not in front_matter(local) and front_matter(local)["license"] == "other"


def test_commit_operations_hold_every_file_once(bank):
    ops = hub_operations(bank, "card")
    names = [op.path_in_repo for op in ops]
    assert len(names) == len(set(names))
    assert set(names) == {
        C.CONFIG_FILE, C.ENTRIES_FILE, C.CAPTIONS_FILE, C.TOKENS_FILE, C.STATS_FILE,
        "layer_01.safetensors", "layer_02.safetensors", "layer_03.safetensors", "README.md",
    }  # fmt: skip
    for op in ops:
        if op.path_in_repo != "README.md":
            assert Path(op.path_or_fileobj).read_bytes() == (bank / op.path_in_repo).read_bytes()


def test_push_to_hub_sends_one_commit_and_the_cache_loads_one_layer_alone(
    bank, tmp_path, monkeypatch
):
    from huggingface_hub import HfApi

    index = ContextualIndex.from_directory(bank)
    sent: dict = {}

    def create_repo(self, repo_id, **kw):
        sent["repo"] = (repo_id, kw)

    def create_commit(self, repo_id, operations, **kw):
        sent["files"] = {
            op.path_in_repo: (
                op.path_or_fileobj
                if isinstance(op.path_or_fileobj, bytes)
                else Path(op.path_or_fileobj).read_bytes()
            )
            for op in operations
        }
        sent["commit"] = kw

        class Info:
            commit_url = f"https://huggingface.co/{repo_id}/commit/abc"

        return Info()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    url = index.push_to_hub("me/bank", layers=[2, 3], private=True, license="mit")
    assert url.endswith("/commit/abc")
    assert sent["repo"] == ("me/bank", {"private": True, "exist_ok": True, "repo_type": "model"})
    files = sent["files"]
    assert "layer_01.safetensors" not in files and "layer_02.safetensors" in files
    manifest = json.loads(files[C.CONFIG_FILE])
    assert manifest["layers"] == [2, 3]
    assert front_matter(files["README.md"].decode())["latentlens"]["layers"] == [2, 3]
    # the Hub cache as a download of layer 3 alone leaves it: loads, equals the local bank
    cache = tmp_path / "hub"
    fake_hub_repo(cache, "me/bank", {k: v for k, v in files.items() if k != "layer_02.safetensors"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    got = ContextualIndex.from_pretrained("me/bank", layers=[3], cache_dir=cache)
    assert got.available_layers == [3]
    q = torch.randn(4, 32)
    assert got.search(q) == index.search(q, layers=[3])
    assert got._stats.keys() == {3}  # the statistics came along
    with pytest.raises(Exception, match="layer 2|layer_02|offline"):
        ContextualIndex.from_pretrained("me/bank", layers=[2], cache_dir=cache)


def test_push_command_dry_run_prints_files_and_card(bank):
    r = CliRunner().invoke(main, ["push", str(bank), "me/bank", "--layers", "1", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "layer_01.safetensors" in r.output and "layer_02" not in r.output
    assert "library_name: latentlens" in r.output and "README.md" in r.output
