"""The reproduce pipeline end to end: `run_all.sh --tiny`, skipping done work, kill and resume.

Each test runs the real shell scripts as subprocesses on tiny random models (two of the
nine connector VLMs and Qwen2-VL), offline, with a fake judge speaking the
chat-completions protocol on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reproduce.judge import FakeJudge, FakeJudgeServer, aggregate, read_cache
from tests.reproduce.conftest import run_all

ROOT = Path(__file__).resolve().parents[2]
RUN_ALL = ROOT / "reproduce" / "run_all.sh"
MODELS = ("olmo-vit", "qwen-siglip", "qwen2vl")
LENSES = ("latentlens", "logitlens", "embeddinglens")
LAYERS = (0, 1, 2)  # the paper's rule for a 3-layer LLM: 0, 1, 2 below n, n-2, n-1
GRIDS = {"olmo-vit": 3, "qwen-siglip": 3, "qwen2vl": 6}


def _png_ok(path: Path) -> None:
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] > 200 and img.shape[1] > 300, img.shape
    assert img.std() > 5  # drawn, not blank


@pytest.mark.slow
def test_run_all_tiny_runs_every_step(tiny_run):
    out, proc, seconds = tiny_run
    log = proc.stdout + proc.stderr
    for n in range(1, 7):
        assert f"=== step {n} finished" in log
    # step 2: a paper-mode bank per LLM
    for bank in ("olmo", "qwen", "qwen2vl"):
        config = json.loads((out / "banks" / bank / "config.json").read_text())
        build = config["build"]
        assert (build["sampling"], build["cap"], build["skip_first"], build["seed"]) == (
            "reservoir",
            20,
            0,
            42,
        )
        assert build["storage_dtype"] == "float8_e4m3fn" and config["layers"] == [1, 2]
    # step 3: the SPEC §8 files of every lens, layer and model, for the same images
    manifest = json.loads((out / "images" / "manifest.json").read_text())
    indices = [r["index"] for r in manifest["images"]]
    assert len(indices) == 6
    files = {
        "latentlens": ("contextual_nearest_neighbors", "contextual_neighbors_visual{L}_allLayers"),
        "logitlens": ("logit_lens", "logit_lens_layer{L}_topk5_multi-gpu"),
        "embeddinglens": (
            "nearest_neighbors",
            "nearest_neighbors_analysis_pixmo_cap_multi-gpu_layer{L}",
        ),
    }
    for model in MODELS:
        run = model if model == "qwen2vl" else f"checkpoints_{model}"
        for lens, (folder, name) in files.items():
            for layer in LAYERS:
                path = out / "lenses" / folder / run / (name.format(L=layer) + ".json")
                doc = json.loads(path.read_text())
                images = (
                    doc["splits"]["validation"]["images"]
                    if lens == "embeddinglens"
                    else doc["results"]
                )
                assert [im["image_idx"] for im in images] == indices
                patches = images[0]["chunks"][0]["patches"]
                assert len(patches) == GRIDS[model] ** 2
                if lens == "latentlens":
                    nb = patches[0]["nearest_contextual_neighbors"]
                    assert len(nb) == 5 and {n["contextual_layer"] for n in nb} <= {1, 2}
    # step 4: every (lens, model) judged, no failure, patches inside the grid
    for model in MODELS:
        for lens in LENSES:
            items = json.loads(
                (out / "eval" / lens / model / "evaluation_results.json").read_text()
            )
            assert [it["layer"] for it in items] == list(LAYERS)
            for it in items:
                assert it["failed_count"] == 0 and it["pending_count"] == 0
                assert it["total_count"] >= 5  # one patch per image (CLIP skips the wide one)
                g = GRIDS[model]
                for p in it["patches"]:
                    assert 1 <= p["patch_row"] < g - 1 and 1 <= p["patch_col"] < g - 1
    # step 5: scores equal a count by hand, figures drawn, table beside the paper
    scores = json.loads((out / "report" / "interpretability.json").read_text())
    assert set(scores) == set(LENSES) and set(scores["latentlens"]) == set(MODELS)
    for lens in LENSES:
        for model in MODELS:
            items = json.loads(
                (out / "eval" / lens / model / "evaluation_results.json").read_text()
            )
            for it in items:
                n_int = sum(1 for p in it["patches"] if p["interpretable"])
                expected = round(100 * n_int / len(it["patches"]), 2)
                assert scores[lens][model][str(it["layer"])] == expected
    assert scores == aggregate(out / "eval")
    for lens in LENSES:
        _png_ok(out / "report" / f"interpretability_{lens}.png")
    _png_ok(out / "report" / "interpretability_by_lens.png")
    summary = (out / "report" / "summary.md").read_text()
    for number in ("74.36", "21.73", "29.70", "72.30", "62.12"):
        assert number in summary
    assert seconds < 600, f"run_all.sh --tiny took {seconds:.0f} s"


@pytest.mark.slow
def test_run_all_again_skips_every_step(tiny_run):
    out, _, _ = tiny_run
    watched = [
        out / "banks" / "olmo" / "layer_01.safetensors",
        out / "lenses" / "logit_lens" / "qwen2vl" / "logit_lens_layer2_topk5_multi-gpu.json",
        out / "eval" / "latentlens" / "olmo-vit" / "evaluation_results.json",
        out / "report" / "interpretability.json",
        out / "site" / ".latentlens-site.json",
    ]
    before = [p.stat().st_mtime_ns for p in watched]
    proc = run_all(out)
    log = proc.stdout + proc.stderr
    assert "step 1 already done" in log
    assert log.count(": skipped") >= 3 + 3  # three banks, three models
    assert len(re.findall(r"step 4: .* skipped ", log)) == 9  # every (lens, model) judged
    assert "step 5 already done" in log
    assert "step 6 already done" in log
    assert [p.stat().st_mtime_ns for p in watched] == before


def test_judge_dry_run_counts_calls_and_sends_nothing(tiny_run):
    out, _, _ = tiny_run
    results = out / "eval" / "latentlens" / "olmo-vit" / "evaluation_results.json"
    caches = sorted((out / "eval").rglob("judge_cache.jsonl"))
    before = [results.stat().st_mtime_ns] + [c.read_bytes() for c in caches]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "reproduce",
            "judge",
            "--tiny",
            "--out",
            str(out),
            "--force",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(re.findall(r"step 4: .* dry run: ", proc.stdout)) == 9
    # every patch is already judged: nothing would be sent, and nothing was written
    assert "dry run: 0 judge call(s) in all" in proc.stdout
    assert [results.stat().st_mtime_ns] + [c.read_bytes() for c in caches] == before


def _ok_lines(eval_dir: Path) -> int:
    return sum(
        1
        for cache in eval_dir.rglob("judge_cache.jsonl")
        for line in cache.read_bytes().splitlines()
        if b'"status": "ok"' in line
    )


@pytest.mark.slow
def test_killed_run_all_resumes_and_judges_each_patch_once(tiny_run, tmp_path: Path):
    src, _, _ = tiny_run
    out = tmp_path / "tiny"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("eval", "report"))
    judge_flags = [
        "--judge-model",
        "fake-judge",
        "--api-key-env",
        "NO_SUCH_KEY_VAR",
        "--concurrency",
        "2",
        "--timeout",
        "1",
        "--backoff",
        "0.01",
        "--max-retries",
        "4",
    ]
    faults = ["429", "500", "slow", "malformed", "badjson", "disconnect", "503", "invalid"]
    with FakeJudgeServer(FakeJudge(), faults=faults, reply_delay=0.05, slow_seconds=2.5) as server:
        flags = ["--base-url", server.url, *judge_flags]
        log = tmp_path / "run1.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                ["bash", str(RUN_ALL), "--tiny", "--out", str(out), *flags],
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 240
            while _ok_lines(out / "eval") < 12:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the judge step made no progress"
                time.sleep(0.05)
            server.hold()  # let the answered requests reach the cache, then kill -9
            while server.inflight or _ok_lines(out / "eval") != server.total_successes():
                assert time.monotonic() < deadline
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        server.release(drop=True)
        assert not server.faults  # every scheduled fault was served to the killed run
        assert set(server.served) >= {"429", "500", "slow", "malformed", "badjson"}
        results = list((out / "eval").rglob("evaluation_results.json"))
        assert len(results) < 9  # killed in the middle of step 4

        # Run 2: one (lens, model) keeps failing; the run finishes and reports it.
        server.fault_for = lambda key, attempt: (
            "500" if key.startswith("embeddinglens/qwen2vl/") else None
        )
        proc2 = run_all(out, *flags)
        log2 = proc2.stdout + proc2.stderr
        assert "step 3: olmo-vit: skipped" in log2 and "step 3: qwen2vl: skipped" in log2
        assert "FAILED" in log2 and "not counted as verdicts" in log2
        failed_items = json.loads(
            (out / "eval/embeddinglens/qwen2vl/evaluation_results.json").read_text()
        )
        n_failed = sum(it["failed_count"] for it in failed_items)
        assert n_failed == sum(it["total_count"] for it in failed_items) > 0
        assert all(
            p["failed"] and p["judgment"] is None for it in failed_items for p in it["patches"]
        )
        assert not any(k.startswith("embeddinglens/qwen2vl/") for k in server.successes)
        assert "failed" in (out / "report" / "summary.md").read_text()

        # Run 3: the judge recovers; only the failed patches are sent again.
        server.fault_for = None
        sent_before = sum(server.attempts.values())
        proc3 = run_all(out, *flags)
        log3 = proc3.stdout + proc3.stderr
        assert "FAILED" not in log3
        assert f"sent {n_failed}, reused 0" in log3
        assert sum(server.attempts.values()) - sent_before == n_failed

    ok_keys = {
        key
        for cache in (out / "eval").rglob("judge_cache.jsonl")
        for key, rec in read_cache(cache).items()
        if rec["status"] == "ok"
    }
    total = 0
    for lens in LENSES:
        for model in MODELS:
            items = json.loads(
                (out / "eval" / lens / model / "evaluation_results.json").read_text()
            )
            assert all(it["failed_count"] == 0 for it in items)
            total += sum(it["total_count"] for it in items)
    assert len(ok_keys) == total
    assert dict(server.successes) == dict.fromkeys(ok_keys, 1)  # each patch judged once


@pytest.mark.slow
def test_qwen2vl_files_match_explain_image_and_shards_match_the_full_run(tiny_run, tmp_path):
    import torch

    from latentlens.explain import explain_image
    from latentlens.index import ContextualIndex
    from latentlens.models.loading import load_model, load_processor
    from latentlens.vlm import load_image
    from reproduce.data.pixmo import read_manifest
    from reproduce.layout import Layout
    from reproduce.steps.lenses import VLMSubject, run_model

    out, _, _ = tiny_run
    torch.set_num_threads(1)
    # Qwen2-VL's LatentLens file holds what the quickstart's engine finds for the same image.
    vlm, _ = load_model(out / "models" / "qwen2vl", dtype="float32")
    processor = load_processor(out / "models" / "qwen2vl")
    index = ContextualIndex.from_directory(out / "banks" / "qwen2vl")
    records = read_manifest(out / "images")
    assert records is not None
    ex = explain_image(vlm, processor, load_image(records[1].path), index, [1], size=48, top_k=5)
    doc = json.loads(
        (
            out
            / "lenses/contextual_nearest_neighbors/qwen2vl"
            / "contextual_neighbors_visual1_allLayers.json"
        ).read_text()
    )
    patch = doc["results"][1]["chunks"][0]["patches"][14]
    assert (patch["patch_row"], patch["patch_col"]) == divmod(14, 6)
    got = [(n["token_str"], n["caption"]) for n in patch["nearest_contextual_neighbors"]]
    assert got == [(n.token_str, n.caption) for n in ex.neighbors[1][14]]
    assert VLMSubject(vlm, processor, image_size=48).grid == 6

    # Step 3's per-image function on a shard of the images gives the full run's records.
    shard = Layout.at(tmp_path / "shard")
    shutil.copytree(out / "models", shard.models)
    run_model(
        shard,
        "qwen-siglip",
        records,
        [records[0].index, records[2].index],
        lenses=["logitlens"],
        tiny=True,
        progress=False,
    )
    name = "logit_lens/checkpoints_qwen-siglip/logit_lens_layer2_topk5_multi-gpu.json"
    part = json.loads((shard.lenses / name).read_text())["results"]
    full = json.loads((out / "lenses" / name).read_text())["results"]
    assert [r["image_idx"] for r in part] == [records[0].index, records[2].index]
    for mine, ref in zip(part, [full[0], full[2]]):
        a = [p["top_predictions"][0]["token"] for p in mine["chunks"][0]["patches"]]
        b = [p["top_predictions"][0]["token"] for p in ref["chunks"][0]["patches"]]
        assert a == b


def test_scripts_have_help_and_reject_unknown_flags():
    for script in ("run_all.sh", "step1_download.sh", "step4_judge.sh", "step6_explore.sh"):
        proc = subprocess.run(
            ["bash", str(ROOT / "reproduce" / script), "--help"], capture_output=True, text=True
        )
        assert proc.returncode == 0 and "--tiny" in proc.stdout, proc.stderr
    proc = subprocess.run(["bash", str(RUN_ALL), "--no-such-flag"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown option --no-such-flag" in proc.stderr
    proc = subprocess.run(["bash", str(RUN_ALL), "--out"], capture_output=True, text=True)
    assert proc.returncode == 2 and "needs a value" in proc.stderr


def test_run_all_lists_and_forwards_every_step_option_it_names():
    """run_all.sh's usage names, per step, flags that the step's command really takes."""
    from reproduce.__main__ import main as cli

    usage = subprocess.run(
        ["bash", str(RUN_ALL), "--help"], capture_output=True, text=True, check=True
    ).stdout
    blocks = re.findall(r"^  step (\d)(.*?)(?=^  step \d|^\S|\Z)", usage, re.M | re.S)
    assert [n for n, _ in blocks] == ["1", "2", "3", "4", "5", "6"]
    commands = {
        "1": "download",
        "2": "extract",
        "3": "lenses",
        "4": "judge",
        "5": "aggregate",
        "6": "explore",
    }
    script = RUN_ALL.read_text()
    for n, text in blocks:
        command = cli.commands[commands[n]]
        taken = {o for p in command.params for o in p.opts}
        for flag in re.findall(r"--[a-z][a-z0-9-]*", text):
            assert flag in taken, f"step {n} ({commands[n]}) takes no {flag}"
            assert re.search(rf"[|( ]{flag}[|)]", script), f"run_all.sh does not forward {flag}"
