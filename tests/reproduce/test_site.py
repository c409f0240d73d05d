"""Step 6: the tiny run's explorer site, checked against the lens files and the judge's
results, in a real browser (Chromium through Selenium)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from tests.browser import chrome, ready, severe_console_errors, wait_for

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("olmo-vit", "qwen-siglip", "qwen2vl")
LENS_FILES = {
    "latentlens": "contextual_nearest_neighbors/{run}/contextual_neighbors_visual{L}_allLayers",
    "logitlens": "logit_lens/{run}/logit_lens_layer{L}_topk5_multi-gpu",
    "embeddinglens": "nearest_neighbors/{run}/nearest_neighbors_analysis_pixmo_cap_multi-gpu_layer{L}",
}


def lens_patch(out: Path, lens: str, model: str, layer: int, image: int, row: int, col: int):
    run = model if model == "qwen2vl" else f"checkpoints_{model}"
    doc = json.loads(
        (out / "lenses" / (LENS_FILES[lens].format(run=run, L=layer) + ".json")).read_text()
    )
    images = doc["splits"]["validation"]["images"] if lens == "embeddinglens" else doc["results"]
    (im,) = [x for x in images if x["image_idx"] == image]
    (p,) = [p for p in im["chunks"][0]["patches"] if (p["patch_row"], p["patch_col"]) == (row, col)]
    return p


def verdict(out: Path, lens: str, model: str, layer: int, image: int) -> dict:
    items = json.loads((out / "eval" / lens / model / "evaluation_results.json").read_text())
    (item,) = [it for it in items if it["layer"] == layer]
    (p,) = [p for p in item["patches"] if p["image_idx"] == image]
    return p


def rows(d, lens: str) -> list[list[str]]:
    found = d.find_elements("css selector", f"#lens-{lens} tr.nb")
    return [[td.text for td in r.find_elements("tag name", "td")] for r in found]


def test_landing_page_shows_the_grid_and_the_judges_percentages(tiny_run):
    out, _, _ = tiny_run
    site = out / "site"
    report = json.loads((out / "report" / "interpretability.json").read_text())
    with chrome() as d:
        d.get((site / "index.html").as_uri())
        grid = d.find_element("css selector", "table.model-grid")
        assert [th.text for th in grid.find_elements("css selector", "tr:first-child th")][1:] == [
            "CLIP",
            "SigLIP",
        ]
        cells = {a.text: a for a in d.find_elements("css selector", "a.model-link")}
        assert set(cells) == {"OLMo+CLIP", "Qwen2+SigLIP", "Qwen2-VL-7B"}
        # each point of the plots carries its percentage: equal to the report's
        tips = [
            t.get_attribute("textContent") for t in d.find_elements("css selector", "circle title")
        ]
        assert len(tips) == 3 * 3 * 3
        for lens, label in (("latentlens", "LatentLens"), ("logitlens", "LogitLens")):
            for layer in (0, 1, 2):
                want = f"{label}, layer {layer}: {report[lens]['olmo-vit'][str(layer)]:.0f}%"
                assert want in tips
        cells["OLMo+CLIP"].click()
        table = wait_for(d, lambda d: d.find_elements("css selector", "table.lens-layers"))[0]
        assert f"{report['latentlens']['olmo-vit']['2']:.0f}%" in table.text
        thumbs = d.find_elements("css selector", "a.thumb")
        assert len(thumbs) == 6
        assert severe_console_errors(d) == []


def test_image_page_panels_equal_the_lens_files_and_the_judge(tiny_run):
    out, _, _ = tiny_run
    page = out / "site" / "olmo-vit" / "image.html"
    image, layer = 2, 1
    judged = verdict(out, "latentlens", "olmo-vit", layer, image)
    r, c = judged["patch_row"], judged["patch_col"]
    with chrome() as d:
        d.get(f"{page.as_uri()}#image={image}&layer={layer}")
        wait_for(d, ready)
        # the judge's tint marks the judged patch by its verdict
        d.find_element("css selector", "#tint option[value=judge]").click()
        wait_for(d, lambda d: "tint=judge" in d.current_url)
        cell = d.find_element("css selector", f'.cell[data-row="{r}"][data-col="{c}"]')
        assert ("ok" if judged["interpretable"] else "ko") in cell.get_attribute("class").split()
        cell.click()
        wait_for(d, lambda d: f"patch={r * 3 + c}" in d.current_url)
        want = lens_patch(out, "latentlens", "olmo-vit", layer, image, r, c)
        got = rows(d, "latentlens")
        assert [x[0] for x in got] == [
            json.dumps(n["token_str"]) for n in want["nearest_contextual_neighbors"]
        ]
        assert [float(x[1]) for x in got] == pytest.approx(
            [n["similarity"] for n in want["nearest_contextual_neighbors"]], abs=6e-4
        )
        assert [x[3] for x in got] == [n["caption"] for n in want["nearest_contextual_neighbors"]]
        marks = d.find_elements("css selector", "#lens-latentlens mark")
        assert [m.text for m in marks] == [
            n["caption"][slice(*n["char_span"])] for n in want["nearest_contextual_neighbors"]
        ]
        logit = lens_patch(out, "logitlens", "olmo-vit", layer, image, r, c)["top_predictions"]
        got = rows(d, "logitlens")
        assert [x[0] for x in got] == [json.dumps(p["token"]) for p in logit]
        for x, p in zip(got, logit):
            assert float(x[1].rstrip("%")) == pytest.approx(100 * p["probability"], abs=0.06)
        emb = lens_patch(out, "embeddinglens", "olmo-vit", layer, image, r, c)["nearest_neighbors"]
        got = rows(d, "embeddinglens")
        assert [x[0] for x in got] == [json.dumps(p["token"]) for p in emb]
        assert [float(x[1]) for x in got] == pytest.approx([p["similarity"] for p in emb], abs=6e-4)
        # the judge's verdict and words for this patch, per lens
        box = d.find_element("css selector", '#judge .verdict[data-lens="latentlens"]').text
        assert ("not interpretable" in box) != judged["interpretable"]
        assert ", ".join(judged["candidate_words"]) in box
        # a fresh page from the address restores patch, layer and tint
        url = d.current_url
        assert re.search(rf"#image={image}&layer={layer}&patch={r * 3 + c}&tint=judge$", url)
        d.get("about:blank")
        d.get(url)
        wait_for(d, ready)
        assert d.find_element("id", "tint").get_attribute("value") == "judge"
        assert (
            f"patch {r * 3 + c} · row {r}, col {c} · layer {layer}"
            == d.find_element("id", "patch-title").text
        )
        # "n" goes to the next image, the layer kept
        d.find_element("tag name", "body").send_keys("n")
        wait_for(d, lambda d: f"#image={image + 1}&layer={layer}" in d.current_url and ready(d))
        assert severe_console_errors(d) == []
        if os.environ.get("LATENTLENS_SCREENSHOT"):  # the README's picture, from this run
            d.get(url.replace("&tint=judge", ""))
            wait_for(d, ready)
            d.save_screenshot(str(ROOT / "docs" / "explorer.png"))


def test_site_pictures_are_each_encoders_view(tiny_run):
    """CLIP pads (the wide image keeps black bands), SigLIP squashes: the grid lines up."""
    out, _, _ = tiny_run
    manifest = json.loads((out / "site" / ".latentlens-site.json").read_text())
    assert [m["name"] for m in manifest["models"]] == list(MODELS)
    wide = 5  # the tiny run's one non-square image
    for model, padded in (("olmo-vit", True), ("qwen-siglip", False)):
        text = (out / "site" / model / "data" / str(wide) / "meta.js").read_text()
        meta = json.loads(text[text.index("(") + 1 : text.rindex(")")])
        pic = Image.open(out / "site" / model / meta["pictures"][0]).convert("L")
        assert pic.size == (512, 512)
        top_band = pic.crop((0, 0, 512, 20)).getextrema()[1]
        assert (top_band < 30) == padded, model
