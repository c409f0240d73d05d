"""The explorer site: its data equal the results it was made from; the pages work in a real
browser (Chromium through Selenium): panels, deep links, spans, crops, the video slider, keys.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from latentlens.errors import ExploreError
from latentlens.explore import Group, Site, Token, write_site
from latentlens.results import Neighbor
from tests.browser import chrome, ready, severe_console_errors, wait_for
from tests.vlm_families import build, noise

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
LENSES = ("latentlens", "logitlens", "embeddinglens")
CORPUS = [
    "the dog saw the dog near the park",
    "a red car parked next to the old house",
    "the cat sleeps on a soft blue chair",
    "two dogs play with a ball in the green park",
    "the man and the woman hold the ball",
    "white clouds float over the tall mountain",
]


def read_js(path: Path) -> dict:
    """The payload of a data script ``LL.xxx({...});``."""
    text = path.read_text(encoding="ascii")
    return json.loads(text[text.index("(") + 1 : text.rindex(")")])


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, Path]:
    """explain-image JSON (LLaVA-NeXT: a global and a high-res grid, three lenses) and
    explain-video JSON (Qwen2-VL: two temporal groups), from tiny models and real banks."""
    from latentlens.explain import explain_image, explain_video
    from latentlens.extract import build_index

    tmp = tmp_path_factory.mktemp("explore")
    out: dict[str, Path] = {}

    s = build("llava_next")
    index = build_index(
        "tiny-llava-next", CORPUS, layers=[1, 2], model=s.model,
        tokenizer=s.processor.tokenizer, show_progress=False,
    )  # fmt: skip
    image = noise(56, 40, 3)
    (tmp / "pictures").mkdir()
    image.save(tmp / "pictures" / "photo.png")
    ex = explain_image(
        s.model, s.processor, image, index, [0, 2], top_k=3, size=None, num_patches=2,
        lenses=list(LENSES),
    )  # fmt: skip
    ex.image_name, ex.image_path = "photo.png", str(tmp / "pictures" / "photo.png")
    out["image"] = tmp / "photo_latentlens.json"
    out["image"].write_text(json.dumps(ex.to_dict(all_patches=True)), encoding="utf-8")

    v = build("qwen2_vl")
    vindex = build_index(
        "tiny-qwen2-vl", CORPUS, layers=[1, 2], model=v.model,
        tokenizer=v.processor.tokenizer, show_progress=False,
    )  # fmt: skip
    frames = [noise(48, 32, 20 + i) for i in range(4)]
    gif = tmp / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    vex = explain_video(v.model, v.processor, frames, vindex, [1, 2], top_k=3, num_patches=2)
    vex.video_name, vex.video_paths = "clip.gif", [str(gif)]
    out["video"] = tmp / "clip_latentlens.json"
    out["video"].write_text(json.dumps(vex.to_dict()), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def site(results, tmp_path_factory) -> Path:
    from click.testing import CliRunner

    from latentlens.cli import main as cli

    out = tmp_path_factory.mktemp("site") / "site"
    res = CliRunner().invoke(
        cli, ["explore", str(results["image"]), str(results["video"]), "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "index.html" in res.output
    return out


def model_dir(site: Path, name_part: str) -> Path:
    manifest = json.loads((site / ".latentlens-site.json").read_text())
    (folder,) = [m["folder"] for m in manifest["models"] if name_part in m["name"]]
    return site / folder


# ── the data ───────────────────────────────────────────────────────────────────────────


def test_site_data_equal_the_results(site, results):
    doc = json.loads(results["image"].read_text())
    d = model_dir(site, "llava")
    meta = read_js(d / "data" / "0" / "meta.js")
    patches = doc["layers"]["0"]["patches"]
    assert [t[0] for t in meta["tokens"]] == [p["patch_idx"] for p in patches]
    groups = [g["name"] for g in meta["groups"]]
    assert sorted(groups) == sorted({p["crop"] for p in patches}) and len(groups) == 2
    w, h = Image.open(doc["image_path"]).size
    for t, p in zip(meta["tokens"], patches):
        assert groups[t[1]] == p["crop"] and (t[2], t[3]) == (p["patch_row"], p["patch_col"])
        x0, y0, x1, y1 = p["pixel_box"]
        assert t[4:] == pytest.approx([x0 / w, y0 / h, x1 / w, y1 / h], abs=1e-5)
    for layer in ("0", "2"):
        data = read_js(d / "data" / "0" / f"L{layer}.js")
        assert set(data) >= {*LENSES, "captions"}
        for i, p in enumerate(doc["layers"][layer]["patches"]):
            got = [(n[0], n[1], n[2], data["captions"][n[3]], n[4]) for n in data["latentlens"][i]]
            want = [
                (n["token_str"], round(n["similarity"], 6), n["contextual_layer"], n["caption"],
                 n.get("char_span"))
                for n in p["nearest_contextual_neighbors"]
            ]  # fmt: skip
            assert got == want
            assert [(n[0], n[1], n[2]) for n in data["logitlens"][i]] == [
                (x["token"], round(x["logit"], 6), round(x["probability"], 6))
                for x in p["top_predictions"]
            ]
            assert [(n[0], n[1]) for n in data["embeddinglens"][i]] == [
                (x["token"], round(x["similarity"], 6)) for x in p["nearest_neighbors"]
            ]
    model = read_js(d / "data" / "model.js")
    assert model["layers"] == [0, 2] and model["lenses"] == list(LENSES)

    vdoc = json.loads(results["video"].read_text())
    vmeta = read_js(model_dir(site, "qwen2") / "data" / "0" / "meta.js")
    assert vmeta["kind"] == "video" and len(vmeta["pictures"]) == 4
    assert [g["picture"] for g in vmeta["groups"]] == [0, 2]
    vpatches = vdoc["layers"]["1"]["patches"]
    assert [vmeta["groups"][t[1]]["picture"] for t in vmeta["tokens"]] == [
        p["frames"][0] for p in vpatches
    ]


def test_site_is_swapped_in_whole_and_never_over_a_foreign_folder(tmp_path, results):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ExploreError, match="not a latentlens site"):
        write_site([results["image"]], foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"

    out = write_site([results["image"]], tmp_path / "site")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom), Site(out) as s:
        s.model("other").add_image(
            0, pictures=[Image.new("RGB", (4, 4))], groups=[Group("image", 0)],
            tokens=[Token(0, 0, 0, 0, (0, 0, 1, 1))],
        )  # fmt: skip
        raise Boom
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # the old site, whole
    assert not list(tmp_path.glob(".site.tmp-*"))  # and no half-written sibling left
    # a writer killed with -9 leaves its temporary folder: the next run removes it
    dead = tmp_path / ".site.tmp-999999999"
    (dead / "pictures").mkdir(parents=True)
    live = tmp_path / f".site.tmp-{os.getppid()}"  # a running writer's is kept
    live.mkdir()
    write_site([results["image"]], out)
    assert not dead.exists() and live.exists()
    again = tmp_path / "again.json"
    again.write_text(results["image"].read_text())
    write_site([results["image"], again], out)  # an earlier site is replaced
    assert (out / model_dir(out, "llava").name / "data" / "1" / "meta.js").is_file()


def test_explore_errors_say_what_is_wrong(tmp_path, results):
    bad = tmp_path / "other.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(ExploreError, match="not the JSON of latentlens explain"):
        write_site([bad], tmp_path / "s1")
    doc = json.loads(results["image"].read_text())
    doc["image_path"] = str(tmp_path / "gone.png")
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(doc))
    with pytest.raises(ExploreError, match="--images"):
        write_site([moved], tmp_path / "s2")
    # --images finds it by name
    write_site([moved], tmp_path / "s3", images_dir=Path(results["image"]).parent / "pictures")
    with pytest.raises(ExploreError, match="does not exist"):
        write_site([tmp_path / "nope.json"], tmp_path / "s4")
    png = tmp_path / "x_latentlens.png"
    png.write_bytes(b"")
    with pytest.raises(ExploreError, match="x_latentlens.json"):
        write_site([png], tmp_path / "s5")
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()
    # a folder: other JSON files are passed over; one with no explanation at all is refused
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "other.json").write_text('{"hello": 1}')
    with pytest.raises(ExploreError, match="holds no explain-image"):
        write_site([mixed], tmp_path / "s6")
    (mixed / "photo.json").write_text(results["image"].read_text())
    out = write_site([mixed], tmp_path / "s7")
    manifest = json.loads((out / ".latentlens-site.json").read_text())
    assert [m["images"] for m in manifest["models"]] == [1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExploreError, match="holds no explain-image"):
        write_site([tmp_path / "empty"], tmp_path / "s8")


# ── in a real browser ──────────────────────────────────────────────────────────────────


def panel_rows(d, lens: str) -> list[list[str]]:
    rows = d.find_elements("css selector", f"#lens-{lens} tr.nb")
    return [[td.text for td in r.find_elements("tag name", "td")] for r in rows]


def open_page(d, url: str) -> None:
    d.get(url)
    wait_for(d, ready)


def test_image_page_panels_equal_the_json(site, results):
    doc = json.loads(results["image"].read_text())
    page = model_dir(site, "llava") / "image.html"
    patches = doc["layers"]["2"]["patches"]
    hi = [p for p in patches if p["crop"] == "high-res"]
    target = hi[len(hi) // 2 + 1]
    with chrome() as d:
        open_page(d, f"{page.as_uri()}#image=0&layer=2&patch={target['patch_idx']}")
        assert d.find_element("id", "layer").get_attribute("value") == "2"
        assert d.find_element("id", "group").get_attribute("value") is not None
        title = d.find_element("id", "patch-title").text
        assert f"patch {target['patch_idx']}" in title and "high-res" in title
        assert f"row {target['patch_row']}, col {target['patch_col']}" in title
        _check_panels(d, target)
        # click another patch of the shown grid: panels and address follow
        cells = d.find_elements("css selector", "#boxes .cell")
        assert len(cells) == len(hi)
        other = next(c for c in cells if c.get_attribute("data-token") != str(target["patch_idx"]))
        other.click()
        pid = int(other.get_attribute("data-token"))
        wait_for(d, lambda d: f"patch={pid}" in d.current_url)
        _check_panels(d, next(p for p in patches if p["patch_idx"] == pid))
        # keys: right arrow moves one column, "," goes to the layer before
        d.find_element("tag name", "body").send_keys("\ue014")  # ArrowRight
        p0 = next(p for p in patches if p["patch_idx"] == pid)
        right = [
            p for p in patches
            if p["crop"] == p0["crop"] and p["patch_row"] == p0["patch_row"]
            and p["patch_col"] == p0["patch_col"] + 1
        ]  # fmt: skip
        moved = right[0] if right else p0
        wait_for(d, lambda d: f"patch={moved['patch_idx']}" in d.current_url)
        d.find_element("tag name", "body").send_keys(",")
        wait_for(d, lambda d: "layer=0" in d.current_url and ready(d))
        l0 = next(p for p in doc["layers"]["0"]["patches"] if p["patch_idx"] == moved["patch_idx"])
        _check_panels(d, l0)
        # the other crop: its own grid of boxes
        from selenium.webdriver.support.ui import Select

        Select(d.find_element("id", "group")).select_by_visible_text("global")
        wait_for(d, ready)
        n_global = sum(1 for p in patches if p["crop"] == "global")
        assert len(d.find_elements("css selector", "#boxes .cell")) == n_global
        assert severe_console_errors(d) == []


def _check_panels(d, patch: dict) -> None:
    latent = panel_rows(d, "latentlens")
    want = patch["nearest_contextual_neighbors"]
    assert [r[0] for r in latent] == [json.dumps(n["token_str"]) for n in want]
    assert [float(r[1]) for r in latent] == pytest.approx([n["similarity"] for n in want], abs=6e-4)
    assert [r[2] for r in latent] == [f"L{n['contextual_layer']}" for n in want]
    assert [r[3] for r in latent] == [n["caption"] for n in want]
    marks = d.find_elements("css selector", "#lens-latentlens tr.nb mark")
    assert [m.text for m in marks] == [
        n["caption"][slice(*n["char_span"])] for n in want if n.get("char_span")
    ]
    logit = panel_rows(d, "logitlens")
    assert [r[0] for r in logit] == [json.dumps(x["token"]) for x in patch["top_predictions"]]
    for r, x in zip(logit, patch["top_predictions"]):
        assert float(r[1].rstrip("%")) == pytest.approx(100 * x["probability"], abs=0.06)
        assert float(r[2]) == pytest.approx(x["logit"], abs=6e-3)
    emb = panel_rows(d, "embeddinglens")
    assert [r[0] for r in emb] == [json.dumps(x["token"]) for x in patch["nearest_neighbors"]]
    assert [float(r[1]) for r in emb] == pytest.approx(
        [x["similarity"] for x in patch["nearest_neighbors"]], abs=6e-4
    )


def test_video_page_slider_changes_frames_and_grid(site, results):
    vdoc = json.loads(results["video"].read_text())
    page = model_dir(site, "qwen2") / "image.html"
    patches = vdoc["layers"]["2"]["patches"]
    with chrome() as d:
        open_page(d, f"{page.as_uri()}#image=0&layer=2")
        slider = d.find_element("id", "frame")
        assert slider.is_displayed() and slider.get_attribute("max") == "1"
        assert not d.find_element("id", "group").is_displayed()
        src0 = d.find_element("id", "picture").get_attribute("src")
        first = {c.get_attribute("data-token") for c in d.find_elements("css selector", ".cell")}
        assert first == {str(p["patch_idx"]) for p in patches if p["frames"] == [0, 1]}
        d.execute_script(
            "const s=document.getElementById('frame'); s.value='1';"
            "s.dispatchEvent(new Event('input'));"
        )
        wait_for(d, lambda d: d.find_element("id", "picture").get_attribute("src") != src0)
        assert d.find_element("id", "frame-label").text == "frames 2–3"
        second = [c.get_attribute("data-token") for c in d.find_elements("css selector", ".cell")]
        assert set(second) == {str(p["patch_idx"]) for p in patches if p["frames"] == [2, 3]}
        cell = d.find_elements("css selector", ".cell")[3]
        cell.click()
        pid = int(cell.get_attribute("data-token"))
        target = next(p for p in patches if p["patch_idx"] == pid)
        got = [r[0] for r in panel_rows(d, "latentlens")]
        assert got == [json.dumps(n["token_str"]) for n in target["nearest_contextual_neighbors"]]
        assert "frames 2–3" in d.find_element("id", "patch-title").text
        # the deep link brings the same view back in a fresh page
        url = d.current_url
        d.get("about:blank")
        open_page(d, url)
        assert d.find_element("id", "frame").get_attribute("value") == "1"
        assert f"patch {pid}" in d.find_element("id", "patch-title").text
        assert severe_console_errors(d) == []


def test_the_highlight_is_the_rows_own_occurrence(tmp_path):
    caption = "the bank robber sat near the bank"
    nb = Neighbor("bank", 0.9, caption, 7, 5, 1, char_span=(29, 33))
    bad = "<img src=x onerror=\"document.title='pwned'\"> <i>"
    evil = Neighbor("<i>", 0.5, bad, 2, 6, 1, char_span=(bad.rindex("<i>"), len(bad)))
    with Site(tmp_path / "site") as s:
        pages = s.model("m")
        pages.add_image(
            0, pictures=[Image.new("RGB", (8, 8))], groups=[Group("image", 0)],
            tokens=[Token(0, 0, 0, 0, (0, 0, 1, 1))],
        )  # fmt: skip
        pages.add_layer(0, 1, {"latentlens": [[nb, evil]]})
    with chrome() as d:
        open_page(d, (tmp_path / "site" / "m" / "image.html").as_uri() + "#image=0&layer=1&patch=0")
        first, second = d.find_elements("css selector", "#lens-latentlens tr.nb td.cap")
        assert first.get_attribute("innerHTML") == "the bank robber sat near the <mark>bank</mark>"
        # captions and tokens are text, never markup
        assert second.text == evil.caption and second.find_element("tag name", "mark").text == "<i>"
        assert not d.find_elements("css selector", "#panels img, #panels i")
        assert d.title != "pwned"
        body = d.find_element("id", "lens-logitlens").text
        assert "not computed" in body


def test_results_without_addresses_get_a_uniform_grid(tmp_path, results):
    doc = json.loads(results["image"].read_text())
    for layer in doc["layers"].values():
        layer["patches"] = [p for p in layer["patches"] if p["crop"] == "high-res"]
        for p in layer["patches"]:
            for key in ("pixel_box", "crop", "sequence_position", "frame", "frames"):
                p.pop(key)
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(doc))
    out = write_site([bare], tmp_path / "site")
    meta = read_js(model_dir(out, "llava") / "data" / "0" / "meta.js")
    gh, gw = doc["grid"]
    assert [g["name"] for g in meta["groups"]] == ["image"]
    for t in meta["tokens"]:
        r, c = t[2], t[3]
        assert t[4:] == pytest.approx([c / gw, r / gh, (c + 1) / gw, (r + 1) / gh], abs=1e-5)


def test_landing_and_model_pages_link_through(site):
    with chrome() as d:
        d.get((site / "index.html").as_uri())
        links = d.find_elements("css selector", "a.model-link")
        assert len(links) == 2
        assert all("no judge results" in c.text for c in d.find_elements("css selector", ".card"))
        links[0].click()
        thumbs = wait_for(d, lambda d: d.find_elements("css selector", "a.thumb"))
        assert len(thumbs) == 1
        img = thumbs[0].find_element("tag name", "img")
        assert d.execute_script("return arguments[0].naturalWidth", img) > 0
        thumbs[0].click()
        wait_for(d, ready)
        assert re.search(r"#image=0&layer=\d+$", d.current_url)
        assert d.execute_script("return document.getElementById('picture').naturalWidth") > 0
        assert severe_console_errors(d) == []
