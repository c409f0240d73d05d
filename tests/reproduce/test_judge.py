"""The LLM-judge evaluation: sampling, drawing, words, prompt, verdicts, judge runs, aggregation."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from reproduce.judge import (
    FakeJudge,
    FakeJudgeServer,
    FatalJudgeError,
    JudgeCache,
    JudgeClient,
    JudgeConfig,
    JudgeFailed,
    MalformedReply,
    aggregate,
    build_messages,
    build_prompt,
    candidate_words,
    comparison_table,
    estimate_cost,
    evaluate,
    expand_to_word,
    load_lens_layer,
    load_paper_results,
    model_means,
    parse_verdict,
    plan_tasks,
    plot_lens,
    plot_lenses,
    read_cache,
    real_patch_mask,
    region_box,
    render_view,
    sample_centres,
    valid_windows,
    write_report,
)
from reproduce.judge.cli import main as cli
from reproduce.judge.render import judge_views
from reproduce.judge.sampling import ImageGrid, make_rng
from reproduce.lens_files import detect_method, find_layer_files

GRID = 6
VOCAB = ["dog", "cat", "tree", "sky", "car", "red", "blue", "house", "grass", "road", "wall", "xyz"]
RELATED = {"dog": "concrete", "sky": "concrete", "blue": "abstract", "road": "global"}


# ---------------------------------------------------------------- fixtures


def _words(r: int, c: int, layer: int) -> list[str]:
    return [VOCAB[(r * 7 + c * 3 + layer + k) % len(VOCAB)] for k in range(5)]


def _patch(method: str, r: int, c: int, layer: int) -> dict:
    p = {"patch_idx": r * GRID + c, "patch_row": r, "patch_col": c}
    ws = _words(r, c, layer)
    if method == "latentlens":
        p["nearest_contextual_neighbors"] = [
            {
                "token_str": " " + w[:2],
                "token_id": 1,
                "caption": f"the {w} here",
                "position": 2,
                "similarity": 0.5,
                "contextual_layer": 1,
            }
            for w in ws
        ]
    elif method == "logitlens":
        p["top_predictions"] = [{"token": w, "token_id": 1, "logit": 1.0} for w in ws]
    else:
        p["nearest_neighbors"] = [{"token": w, "similarity": 0.1} for w in ws]
    return p


def write_lens_dir(path: Path, method: str, layers: list[int], n_images: int) -> Path:
    """Lens result files in the original tools' formats (SPEC §8)."""
    path.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        images = [
            {
                "image_idx": i,
                "ground_truth_caption": "a caption",
                "chunks": [
                    {
                        "chunk_name": "Full Image",
                        "patches": [
                            _patch(method, r, c, layer) for r in range(GRID) for c in range(GRID)
                        ],
                    }
                ],
            }
            for i in range(n_images)
        ]
        if method == "latentlens":
            name = f"contextual_neighbors_visual{layer}_allLayers.json"
            data = {"visual_layer": layer, "top_k": 5, "results": images}
        elif method == "logitlens":
            name = f"logit_lens_layer{layer}_topk5_multi-gpu.json"
            data = {"layer_idx": layer, "top_k": 5, "results": images}
        else:
            name = f"nearest_neighbors_analysis_pixmo_cap_multi-gpu_layer{layer}.json"
            data = {"splits": {"validation": {"images": images}}}
        (path / name).write_text(json.dumps(data), encoding="utf-8")
    return path


def write_images(path: Path, n: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    sizes = [(80, 60), (60, 80), (64, 64), (120, 40)]
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 40 * i % 255)], -1)
        Image.fromarray(arr.astype(np.uint8)).save(path / f"{i:05d}.jpg")
    return path


@pytest.fixture
def project(tmp_path: Path) -> dict[str, Path]:
    images = write_images(tmp_path / "images", 8)
    lens = write_lens_dir(tmp_path / "lens" / "latentlens" / "olmo-vit", "latentlens", [0, 4], 8)
    return {
        "root": tmp_path,
        "images": images,
        "lens": lens,
        "out": tmp_path / "eval" / "latentlens" / "olmo-vit",
    }


def fast_config(server: FakeJudgeServer, **kw) -> JudgeConfig:
    base = dict(
        base_url=server.url,
        model="fake-judge",
        api_key=None,
        timeout=0.5,
        max_retries=6,
        backoff_base=0.01,
        backoff_max=0.05,
    )
    base.update(kw)
    return JudgeConfig(**base)


# ---------------------------------------------------------------- sampling and drawing


def test_real_patch_mask_clip_padding_and_other_encoders():
    m = real_patch_mask(640, 480, "clip", (24, 24))  # 480×640 → 251×336, top pad 42
    assert list(np.where(m.all(1))[0]) == list(range(3, 20))
    assert not m[:3].any() and not m[20:].any()
    m = real_patch_mask(480, 640, "clip", (24, 24))
    assert list(np.where(m.all(0))[0]) == list(range(3, 20))
    orig = real_patch_mask(640, 480, "clip", (24, 24), convention="original")
    assert list(np.where(orig.all(1))[0]) == list(range(4, 21))  # the released script's cells
    for enc in ("siglip", "dinov2", "qwen2vl"):
        assert real_patch_mask(640, 480, enc, (27, 27)).all()


def test_sampling_is_deterministic_and_stays_inside_the_real_grid():
    rs = np.random.default_rng(1)
    images = []
    for i in range(60):
        w, h = int(rs.integers(20, 2000)), int(rs.integers(20, 2000))
        images.append(ImageGrid(i, real_patch_mask(w, h, "clip", (24, 24))))
    a = list(sample_centres(images, make_rng(42)))
    b = list(sample_centres(images, make_rng(42)))
    assert a == b and len(a) > 30
    for idx, r, c in a:
        real = images[idx].real
        assert 1 <= r <= 22 and 1 <= c <= 22
        assert real[r - 1 : r + 2, c - 1 : c + 2].all()
    # one generator for all layers: the next layer gets different patches
    rng = make_rng(42)
    first, second = list(sample_centres(images, rng)), list(sample_centres(images, rng))
    assert first != second
    assert list(sample_centres(images, make_rng(7))) != a


def test_sampling_skips_images_without_a_window_and_matches_random_sample():
    full = np.ones((5, 5), dtype=bool)
    thin = np.zeros((5, 5), dtype=bool)
    thin[2] = True  # a single real row: no 3×3 window
    out = list(sample_centres([ImageGrid(0, thin), ImageGrid(1, full)], make_rng(42)))
    assert len(out) == 1 and out[0][0] == 1
    ref = random.Random(42)  # same stream as the original's random.seed(42) + random.sample
    ((r, c),) = ref.sample(valid_windows(full), 1)
    assert out[0][1:] == (r + 1, c + 1)
    assert valid_windows(full) == [(r, c) for r in range(3) for c in range(3)]


def test_region_box_is_clipped_at_the_borders():
    assert region_box(10, 10, (24, 24)) == (192, 192, 256, 256)
    assert region_box(0, 0, (24, 24)) == (0, 0, 42, 42)
    assert region_box(23, 23, (24, 24)) == (469, 469, 512, 512)
    assert region_box(0, 15, (16, 16)) == (448, 0, 512, 64)
    for r in range(24):
        for c in range(24):
            left, top, right, bottom = region_box(r, c, (24, 24))
            assert 0 <= left < right <= 512 and 0 <= top < bottom <= 512
    with pytest.raises(IndexError):
        region_box(24, 0, (24, 24))


def test_judge_views_draw_the_box_and_crop_without_upscaling():
    img = Image.new("RGB", (640, 480), (0, 200, 0))
    view = render_view(img, "clip")
    assert view.size == (512, 512)
    assert view.getpixel((256, 10)) == (0, 0, 0)  # black padding above (480×640 → 384 rows)
    assert view.getpixel((256, 256)) == (0, 200, 0)
    boxed, crop = judge_views(view, 10, 10, (24, 24))
    assert crop.size == (64, 64) and crop.getpixel((32, 32)) == (0, 200, 0)  # unboxed, 1:1
    assert boxed.getpixel((192, 220)) == (255, 0, 0)  # the outline
    inside = boxed.getpixel((224, 224))
    assert inside[0] > 0 and inside[1] < 200  # light red tint
    assert boxed.getpixel((100, 100)) == (0, 200, 0)  # untouched elsewhere
    boxed, crop = judge_views(view, 23, 0, (24, 24))
    assert boxed.getpixel((0, 511)) == (255, 0, 0) and crop.size == (42, 43)
    sq = render_view(Image.new("RGB", (300, 100), (9, 9, 9)), "siglip")
    assert sq.size == (512, 512) and sq.getpixel((0, 0)) == (9, 9, 9)  # squashed, no padding
    assert render_view(Image.new("RGB", (300, 100), (9, 9, 9)), "qwen2vl").size == (512, 512)


# ---------------------------------------------------------------- words and files


@pytest.mark.parametrize(
    ("caption", "token", "word"),
    [
        ("a detailed rendering of a car", "ing", "rendering"),  # found mid-word
        ("a detailed rendering of a car", "ren", "rendering"),
        ("The Dog is barking", " dog", "Dog"),  # case-insensitive, caption's casing
        ("a red ball", "zebra", "zebra"),  # not found: the stripped token
        ("a red ball", "  ", ""),  # whitespace token: dropped
        ("a red ball", "", ""),
        ("", " sky", "sky"),
        ("a well-lit room", "lit", "lit"),  # punctuation bounds the word
        ("a well-lit room", "-", "well-lit"),  # touches word characters: grown both ways
        ("price: $5, cheap!", "$", "$5"),
        ("a dog.", "dog", "dog"),
        ("hello, world", "o, w", "o, w"),  # a token with a space is never grown
        ("snake_case_name here", "case", "snake_case_name"),
        ("Über cool", "über", "Über"),
    ],
)
def test_expand_to_word(caption: str, token: str, word: str):
    assert expand_to_word(caption, token) == word


def test_candidate_words_for_the_three_lenses(tmp_path: Path):
    ll = {
        "nearest_contextual_neighbors": [
            {"token_str": " ing", "caption": "a rendering"},
            {"token_str": " ", "caption": "x"},
            {"token_str": "Dog", "caption": "the dog"},
            {"token_str": "dog", "caption": "the dog"},
            {"token_str": "a", "caption": "b"},
            {"token_str": "zz", "caption": "zz top"},
        ]
    }
    assert candidate_words(ll, "latentlens") == ["rendering", "dog", "dog", "a"]  # top-5, dups kept
    lo = {
        "top_predictions": [
            {"token": t, "token_id": 0, "logit": 0.0}
            for t in [" the", "ing", " the", "x", "y", "z"]
        ]
    }
    assert candidate_words(lo, "logitlens") == [" the", "ing", " the", "x", "y"]  # as they are
    for method in ("latentlens", "logitlens", "embeddinglens"):
        d = write_lens_dir(tmp_path / method, method, [2, 24], 2)
        files = find_layer_files(d)
        assert sorted(files) == [2, 24]  # layer2 never matches layer24
        layer = load_lens_layer(files[2])
        assert layer.method == method and layer.layer == 2 and layer.grid_size == GRID
        assert [im.image_idx for im in layer.images] == [0, 1]
        assert layer.images[0].grid == (GRID, GRID) and len(layer.images[0].patches) == GRID**2
        assert len(candidate_words(layer.images[0].patches[(1, 2)], method)) == 5
    with pytest.raises(ValueError):
        detect_method({"results": [{"chunks": [{"patches": [{"foo": 1}]}]}]})


# ---------------------------------------------------------------- prompt and verdicts


def test_prompt_covers_every_point_of_the_spec():
    words = ["dog", "blue sky", "ing"]
    text = build_prompt(words).lower()
    for needle in (
        "expert",
        "outlined in red",
        "close-up crop",
        "too small",
        "concrete",
        "abstract",
        "global",
        "colours",
        "textures",
        "materials",
        "shapes",
        "emotions",
        "activities",
        "functions",
        "cultural",
        "qualities",
        "semantically related",
        "somewhere else in the image",
        "text inside the region",
        "one by one",
        "exactly one json object",
        '"reasoning"',
        '"interpretable"',
        '"concrete_words"',
        '"abstract_words"',
        '"global_words"',
    ):
        assert needle in text, needle
    assert json.dumps(words) in build_prompt(words)
    msgs = build_messages(words, "data:image/png;base64,AA", "data:image/png;base64,BB")
    assert [p["type"] for p in msgs[0]["content"]] == ["image_url", "text", "image_url"]
    assert msgs[0]["content"][0]["image_url"]["url"].endswith("AA")  # boxed image first, crop last


def test_parse_verdict():
    v = parse_verdict(
        'Thinking... {"reasoning": "r", "interpretable": false, "concrete_words": '
        '["dog"], "abstract_words": [], "global_words": null} done.'
    )
    assert v.interpretable and v.judge_interpretable is False  # the judge's own field is ignored
    assert v.concrete_words == ("dog",) and v.global_words == ()
    v = parse_verdict(
        '```json\n{"interpretable": true, "concrete_words": [], '
        '"abstract_words": [], "global_words": []}\n```'
    )
    assert not v.interpretable
    for bad in (
        "no json here",
        '{"concrete_words": "dog", "abstract_words": [], "global_words": []}',
        '{"concrete_words": [], "abstract_words": []}',
        "{not json}",
        '{"concrete_words": [1], "abstract_words": [], "global_words": []}',
    ):
        with pytest.raises(MalformedReply):
            parse_verdict(bad)


# ---------------------------------------------------------------- judge runs against a real server


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_judge_survives_faults_and_judges_each_patch_once(project, api):
    faults = ["429", "500", "slow", "malformed", "badjson", "invalid", "disconnect", "503", "429"]
    with FakeJudgeServer(
        FakeJudge(RELATED), faults=faults, retry_after=0.05, slow_seconds=0.8
    ) as server:
        # more attempts than faults: even one patch drawing every fault still succeeds
        ev = evaluate(
            project["lens"],
            project["images"],
            project["out"],
            fast_config(server, max_retries=len(faults), api=api),
            patches_per_layer=4,
            concurrency=3,
        )
        keys = {t.key("fake-judge") for t in ev.tasks}
        assert len(keys) == 8 and ev.run is not None and not ev.run.failures
        assert dict(server.successes) == dict.fromkeys(keys, 1)
        assert all(server.served[f] >= 1 for f in set(faults))
        assert {e["api"] for e in server.log} == {api}
        # a second run sends nothing
        again = evaluate(
            project["lens"],
            project["images"],
            project["out"],
            fast_config(server),
            patches_per_layer=4,
        )
        assert again.run.sent == 0 and again.run.reused == 8
        assert sum(server.successes.values()) == 8
    results = json.loads((project["out"] / "evaluation_results.json").read_text())
    assert [item["layer"] for item in results] == [0, 4]
    judge = FakeJudge(RELATED)
    for item in results:
        assert item["method"] == "latentlens" and item["grid_size"] == GRID
        assert item["total_count"] == 4 and item["failed_count"] == 0
        for p in item["patches"]:
            assert p["interpretable"] == any(judge.classify(w) for w in p["candidate_words"])
        n = sum(p["interpretable"] for p in item["patches"])
        assert item["interpretable_count"] == n and item["interpretable_fraction"] == n / 4


def test_failures_are_reported_not_counted_and_retried_next_run(project):
    doomed: set[str] = set()

    def fault_for(key: str, attempt: int) -> str | None:
        return "500" if key in doomed else None

    tasks = plan_tasks(
        project["lens"],
        project["images"],
        lens="latentlens",
        model="olmo-vit",
        encoder="clip",
        patches_per_layer=3,
    )
    doomed.update(t.key("fake-judge") for t in tasks[:2])
    with FakeJudgeServer(FakeJudge(RELATED), fault_for=fault_for) as server:
        ev = evaluate(
            project["lens"],
            project["images"],
            project["out"],
            fast_config(server, max_retries=2),
            patches_per_layer=3,
        )
        assert {f["key"] for f in ev.run.failures} == doomed
        assert all(server.attempts[k] == 3 for k in doomed)
        layer0 = ev.results[0]
        assert layer0["failed_count"] == 2 and layer0["judged_count"] == 1
        assert layer0["total_count"] == 3  # the original's denominator keeps them
        failed = [p for p in layer0["patches"] if p.get("failed")]
        assert len(failed) == 2 and all(
            p["judgment"] is None and not p["interpretable"] for p in failed
        )
        assert sum(server.successes.values()) == 4
        doomed.clear()  # the judge recovers; the next run retries only the failures
        again = evaluate(
            project["lens"],
            project["images"],
            project["out"],
            fast_config(server),
            patches_per_layer=3,
        )
        assert again.run.sent == 2 and again.run.reused == 4 and not again.run.failures
        assert dict(server.successes) == {t.key("fake-judge"): 1 for t in tasks}
        assert again.results[0]["failed_count"] == 0


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_client_honours_retry_after_and_fails_fast_on_400(api):
    msgs = build_messages(["dog"], "data:image/png;base64,AA", "data:image/png;base64,BB")
    plan = {("k1", 1): "429", ("k2", 1): "400", ("k3", 1): "503", ("k3", 2): "badjson"}
    with FakeJudgeServer(
        FakeJudge(RELATED), fault_for=lambda k, n: plan.get((k, n)), retry_after=0.3
    ) as server:
        with JudgeClient(fast_config(server, api=api)) as client:
            t0 = time.monotonic()
            reply = client.judge(msgs, request_key="k1")
            assert time.monotonic() - t0 >= 0.3 and reply.attempts == 2
            assert reply.verdict.concrete_words == ("dog",) and reply.usage
            with pytest.raises(JudgeFailed) as err:
                client.judge(msgs, request_key="k2")
            assert err.value.attempts == 1 and server.attempts["k2"] == 1
            # the SDK retries the 503, we re-ask after the reply that is not JSON
            assert client.judge(msgs, request_key="k3").attempts == 3
        assert {e["api"] for e in server.log} == {api}


def test_the_api_is_chosen_by_base_url_and_the_config_reads_the_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:1/v1")
    monkeypatch.setenv("LATENTLENS_JUDGE_MODEL", "judge-x")
    monkeypatch.setenv("MY_KEY", "sk-test")
    cfg = JudgeConfig.from_env(api_key_env="MY_KEY", timeout=3.0, temperature=None)
    assert (cfg.base_url, cfg.model, cfg.api_key, cfg.timeout) == (
        "http://127.0.0.1:1/v1",
        "judge-x",
        "sk-test",
        3.0,
    )
    assert cfg.resolved_api == "chat"  # a local server: vLLM, llama.cpp, ...
    assert cfg.endpoint == "http://127.0.0.1:1/v1/chat/completions"
    openai = JudgeConfig(base_url="https://api.openai.com/v1")
    assert openai.resolved_api == "responses"
    assert openai.endpoint == "https://api.openai.com/v1/responses"
    assert JudgeConfig(base_url="https://api.openai.com/v1", api="chat").resolved_api == "chat"
    with pytest.raises(ValueError, match="api must be"):
        JudgeConfig(api="completions")  # type: ignore[arg-type]
    msgs = build_messages(["dog"], "data:image/png;base64,AA", "data:image/png;base64,BB", "low")
    body = JudgeClient(JudgeConfig(reasoning_effort="low", extra_body={"seed": 1})).payload(msgs)
    assert body["reasoning"] == {"effort": "low"} and body["seed"] == 1
    assert "temperature" not in body and "messages" not in body
    assert [p["type"] for p in body["input"][0]["content"]] == [
        "input_image",
        "input_text",
        "input_image",
    ]
    assert body["input"][0]["content"][0]["detail"] == "low"
    chat = JudgeClient(JudgeConfig(api="chat", reasoning_effort="low")).payload(msgs)
    assert chat["reasoning_effort"] == "low" and chat["messages"] == msgs


def test_dry_run_sends_nothing_and_counts_calls(project):
    with FakeJudgeServer() as server:
        ev = evaluate(
            project["lens"],
            project["images"],
            project["out"],
            fast_config(server),
            patches_per_layer=3,
            dry_run=True,
        )
        assert not server.attempts and ev.run is None
        assert ev.estimate.calls == 6 and ev.estimate.cached == 0
        assert ev.estimate.input_tokens > 6 * 510  # two images per call, plus the prompt
        assert not (project["out"] / "evaluation_results.json").exists()
        evaluate(
            project["lens"],
            project["images"],
            project["out"],
            fast_config(server),
            patches_per_layer=3,
        )
        est = estimate_cost(ev.tasks, "fake-judge", project["out"] / "judge_cache.jsonl")
        assert est.calls == 0 and est.cached == 6
    # the cost: the judge model's list price, a dated snapshot's, or the one given
    assert ev.estimate.dollars is None and "--price" in ev.estimate.describe()
    for model in ("gpt-5", "gpt-5-2025-08-07"):
        est = estimate_cost(ev.tasks, model)
        want = (est.input_tokens * 1.25 + est.output_tokens * 10.0) / 1e6
        assert est.dollars == pytest.approx(want) and f"${want:,.2f}" in est.describe()
    assert estimate_cost(ev.tasks, "gpt-5-mini").dollars < est.dollars
    assert estimate_cost(ev.tasks, "gpt-5x").dollars is None
    mine = estimate_cost(ev.tasks, "qwen", price=(2.0, 0.0))
    assert mine.dollars == pytest.approx(mine.input_tokens * 2.0 / 1e6)


def test_wrong_key_stops_the_run(project):
    with FakeJudgeServer(api_key="right") as server:
        with pytest.raises(FatalJudgeError):
            evaluate(
                project["lens"],
                project["images"],
                project["out"],
                fast_config(server, api_key="wrong"),
                patches_per_layer=3,
                concurrency=1,
            )
        assert not server.successes
    assert not read_cache(project["out"] / "judge_cache.jsonl")


def test_cache_tolerates_a_torn_line_and_refuses_a_second_run(tmp_path: Path):
    path = tmp_path / "c.jsonl"
    with JudgeCache(path) as cache:
        cache.append({"key": "a", "status": "failed", "error": "x"})
        cache.append({"key": "a", "status": "ok", "interpretable": True})
        cache.append({"key": "a", "status": "ok", "interpretable": False})
        with pytest.raises(RuntimeError, match="in use"):
            JudgeCache(path).open()
    with open(path, "ab") as f:
        f.write(b'{"key": "b", "sta')  # killed mid-write
    with JudgeCache(path) as cache:
        cache.append({"key": "b", "status": "ok"})
    recs = read_cache(path)
    assert recs["a"]["interpretable"] is True and recs["b"]["status"] == "ok"


def _ok_lines(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(1 for line in path.read_bytes().splitlines() if b'"status": "ok"' in line)


@pytest.mark.slow
@pytest.mark.parametrize("api", ["chat", "responses"])
def test_killed_run_resumes_without_judging_any_patch_twice(project, api):
    cache = project["out"] / "judge_cache.jsonl"
    log = project["root"] / "judge.log"
    with (
        FakeJudgeServer(
            FakeJudge(RELATED), faults=["429", "500", "malformed"], reply_delay=0.15
        ) as server,
        open(log, "wb") as out,
    ):
        cmd = [
            sys.executable,
            "-m",
            "reproduce.judge",
            "judge",
            "--results-dir",
            str(project["lens"]),
            "--images-dir",
            str(project["images"]),
            "--output-dir",
            str(project["out"]),
            "--patches-per-layer",
            "6",
            "--base-url",
            server.url,
            "--model",
            "fake-judge",
            "--concurrency",
            "2",
            "--backoff",
            "0.01",
            "--timeout",
            "5",
            "--api-key-env",
            "NO_SUCH_KEY_VAR",
            "--api",
            api,
        ]
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while _ok_lines(cache) < 3:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "the judge run made no progress"
                time.sleep(0.02)
            server.hold()  # new requests wait unanswered; let answered ones reach the cache
            while server.inflight or _ok_lines(cache) != server.total_successes():
                assert time.monotonic() < deadline
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        server.release(drop=True)  # the dead run's waiting requests get no answer
        done_before = server.total_successes()
        assert 3 <= done_before < 12
        assert not (project["out"] / "evaluation_results.json").exists()
        with open(cache, "ab") as f:
            f.write(b'{"key": "latentlens/olmo-vit/L4/img')  # torn last line

        ev = evaluate(
            project["lens"],
            project["images"],
            project["out"],
            fast_config(server, api=api),
            patches_per_layer=6,
            concurrency=2,
        )
        keys = {t.key("fake-judge") for t in ev.tasks}
        assert len(keys) == 12 and not ev.run.failures
        assert ev.run.reused == done_before and ev.run.sent == 12 - done_before
        assert dict(server.successes) == dict.fromkeys(keys, 1)
    assert sum(item["total_count"] for item in ev.results) == 12


# ---------------------------------------------------------------- aggregation, figures, CLI


def _item(layer: int, flags: list[bool | None]) -> dict:
    """A layer item; None marks a failed patch."""
    patches = [
        {
            "image_idx": i,
            "patch_row": 1,
            "patch_col": 1,
            "candidate_words": ["w"],
            "judgment": None if f is None else {},
            "interpretable": bool(f),
            **({"failed": True} if f is None else {}),
        }
        for i, f in enumerate(flags)
    ]
    n = sum(bool(f) for f in flags)
    return {
        "layer": layer,
        "method": "x",
        "grid_size": 24,
        "patches": patches,
        "interpretable_count": n,
        "total_count": len(flags),
        "interpretable_fraction": n / len(flags),
    }


@pytest.fixture
def eval_dir(tmp_path: Path) -> Path:
    T, F, X = True, False, None
    fixture = {
        ("latentlens", "olmo-vit"): [
            _item(0, [T, T, F]),
            _item(8, [T, T, T, F]),
            _item(31, [T, X]),
        ],
        ("latentlens", "qwen-dino"): [_item(0, [T, F]), _item(8, [F, F, T]), _item(27, [T, T])],
        ("logitlens", "olmo-vit"): [_item(0, [F, F, F]), _item(8, [T, F, F]), _item(31, [T, F])],
        ("nn", "olmo-vit"): [_item(0, [F, T]), _item(8, [F, F]), _item(31, [X, F])],
    }
    for (lens, model), items in fixture.items():
        d = tmp_path / lens / model
        d.mkdir(parents=True)
        (d / "evaluation_results.json").write_text(json.dumps(items))
    return tmp_path


def test_aggregate_equals_a_count_by_hand(eval_dir: Path):
    scores = aggregate(eval_dir)
    assert scores == {
        "latentlens": {
            "olmo-vit": {"0": 66.67, "8": 75.0, "31": 50.0},
            "qwen-dino": {"0": 50.0, "8": 33.33, "27": 100.0},
        },
        "logitlens": {"olmo-vit": {"0": 0.0, "8": 33.33, "31": 50.0}},
        "embeddinglens": {"olmo-vit": {"0": 50.0, "8": 0.0, "31": 0.0}},
    }
    assert model_means(scores)["latentlens"] == {"olmo-vit": 63.89, "qwen-dino": 61.11}
    excl = aggregate(eval_dir, failures="exclude")
    assert excl["latentlens"]["olmo-vit"]["31"] == 100.0
    assert excl["embeddinglens"]["olmo-vit"]["31"] == 0.0


def _png_ok(path: Path) -> None:
    img = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert path.stat().st_size > 10_000 and img.shape[0] > 300 and img.shape[1] > 500
    assert img.std() > 5  # not blank


def test_figures_render_and_table_lists_the_papers_numbers(eval_dir: Path, tmp_path: Path):
    scores = aggregate(eval_dir)
    fig = plot_lens(scores, "latentlens")
    assert len(fig.axes[0].lines) == 3  # two models and their mean
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "8", "31/27"]
    assert len(plot_lenses(scores, load_paper_results()).axes[0].lines) == 6
    paper = load_paper_results()
    assert paper["lenses"]["latentlens"]["mean"] == 74.36
    table = comparison_table(scores, paper)
    for number in (
        "74.36",
        "21.73",
        "29.70",
        "72.30",
        "78.30",
        "68.80",
        "79.70",
        "77.40",
        "62.30",
        "76.10",
        "79.90",
        "74.30",
        "62.12",
    ):
        assert number in table
    assert "| OLMo+CLIP | 63.89 | 72.30 | 27.78 | — | 16.67 | — |" in table
    paths = write_report(eval_dir, tmp_path / "report")
    for key in ("figure_latentlens", "figure_logitlens", "figure_embeddinglens", "figure_by_lens"):
        _png_ok(paths[key])
    assert json.loads(paths["scores"].read_text()) == scores
    summary = paths["summary"].read_text()
    assert "74.36" in summary and "failed" in summary


def test_cli_dry_run_and_aggregate(project, eval_dir: Path):
    runner = CliRunner()
    res = runner.invoke(
        cli,
        [
            "judge",
            "--results-dir",
            str(project["lens"]),
            "--images-dir",
            str(project["images"]),
            "--output-dir",
            str(project["out"]),
            "--patches-per-layer",
            "2",
            "--layers",
            "4",
            "--dry-run",
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--price",
            "3,0",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "2 judge calls" in res.output and "tokens" in res.output and "$0.0" in res.output
    res = runner.invoke(
        cli,
        [
            "judge",
            "--results-dir",
            str(project["lens"]),
            "--images-dir",
            str(project["images"]),
            "--output-dir",
            str(project["out"]),
            "--patches-per-layer",
            "2",
            "--fake-judge",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "0 failure(s)" in res.output and (project["out"] / "evaluation_results.json").exists()
    res = runner.invoke(cli, ["aggregate", str(eval_dir), "--out", str(project["root"] / "agg")])
    assert res.exit_code == 0, res.output
    assert "74.36" in res.output and (project["root"] / "agg" / "interpretability.json").exists()


def test_every_layer_judges_the_same_patches_by_default(project):
    # The paper: one judge process per layer, each seeded 42 (SPEC §7, corrected).
    def plan(**kw):
        tasks = plan_tasks(
            project["lens"],
            project["images"],
            lens="latentlens",
            model="olmo-vit",
            encoder="clip",
            patches_per_layer=3,
            **kw,
        )
        by_layer: dict[int, list[tuple[int, int, int]]] = {}
        for t in tasks:
            by_layer.setdefault(t.layer, []).append((t.image_idx, t.patch_row, t.patch_col))
        return by_layer

    per_layer = plan()
    assert per_layer == plan(seeding="per-layer")
    assert per_layer[0] == per_layer[4] == [(0, 2, 2), (1, 1, 2), (2, 3, 1)]  # pinned
    once = plan(seeding="once")  # the released script: one generator through the layers
    assert once[0] == per_layer[0] and once[4] == [(0, 2, 4), (1, 2, 3), (2, 2, 1)]
    assert plan(layers=[4]) == {4: per_layer[4]}  # a layer alone draws what it draws in a run
    with pytest.raises(ValueError, match="seeding"):
        plan(seeding="twice")


def test_paper_models_use_the_released_evaluators_patch_rule_by_default():
    from reproduce.judge.names import default_convention

    assert default_convention("olmo-vit") == default_convention("qwen2vl") == "original"
    assert default_convention("my-own-vlm") == "encoder"


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_a_truncated_reply_is_a_failure_with_a_hint_never_re_sent(project, api):
    with FakeJudgeServer(fault_for=lambda key, attempt: "length") as server:
        ev = evaluate(
            project["lens"],
            project["images"],
            project["out"],
            fast_config(server, max_retries=3, api=api),
            patches_per_layer=2,
        )
        assert ev.run.failures and all(f["error_kind"] == "length" for f in ev.run.failures)
        assert all("max-completion-tokens" in f["error"] for f in ev.run.failures)
        assert set(server.attempts.values()) == {1}  # billed once, not re-sent


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_an_unsupported_parameter_stops_every_worker(project, api):
    arrivals = itertools.count()

    def fault_for(key: str, attempt: int) -> str:
        # the first request is refused for good; the others are told to come back soon
        return "unsupported" if next(arrivals) == 0 else "429"

    with FakeJudgeServer(fault_for=fault_for, retry_after=0.4) as server:
        with pytest.raises(FatalJudgeError, match="not supported"):
            evaluate(
                project["lens"],
                project["images"],
                project["out"],
                fast_config(server, temperature=0.0, api=api),
                patches_per_layer=4,
                concurrency=3,
            )
        time.sleep(0.6)  # past the Retry-After the waiting workers were given
        # only the first wave left; the workers waiting out their 429 sent nothing more
        assert sum(server.attempts.values()) <= 3
        assert set(server.attempts.values()) == {1}


def test_gpt5_judges_get_the_papers_effort_and_verbosity_everywhere():
    from reproduce.options import judge_config

    opts = dict(
        judge_model="gpt-5",
        base_url="http://127.0.0.1:9/v1",
        api_key_env="NO_SUCH_KEY_VAR",
        timeout=1.0,
        max_retries=0,
        backoff=0.1,
        temperature=None,
        max_completion_tokens=None,
        image_detail=None,
        extra_body=None,
        reasoning_effort=None,
        verbosity=None,
    )
    cfg = judge_config(opts)
    assert (cfg.reasoning_effort, cfg.verbosity) == ("low", "low")
    body = JudgeClient(cfg).payload([{"role": "user", "content": "x"}])
    assert body["reasoning_effort"] == "low" and body["verbosity"] == "low"
    paper = judge_config({**opts, "base_url": "https://api.openai.com/v1", "api": None})
    assert paper.resolved_api == "responses"  # the paper's call
    body = JudgeClient(paper).payload([{"role": "user", "content": "x"}])
    assert body["reasoning"] == {"effort": "low"} and body["text"] == {"verbosity": "low"}
    local = judge_config({**opts, "judge_model": "qwen2.5-vl-72b"})
    assert local.reasoning_effort is None and local.verbosity is None  # vLLM may refuse them
    assert "verbosity" not in JudgeClient(local).payload([])


def test_without_the_sdk_the_client_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # import openai → ImportError
    with pytest.raises(ImportError, match=r"\.\[judge\]"):
        JudgeClient(JudgeConfig())


def test_a_server_without_the_responses_api_suggests_chat():
    msgs = build_messages(["dog"], "data:image/png;base64,AA", "data:image/png;base64,BB")
    with FakeJudgeServer() as server:
        # the fake server speaks both; a base URL one level off makes /responses a 404
        config = JudgeConfig(
            base_url=server.url + "/nope", model="m", api="responses", max_retries=0
        )
        with JudgeClient(config) as client, pytest.raises(FatalJudgeError, match="--api chat"):
            client.judge(msgs, request_key="k")
