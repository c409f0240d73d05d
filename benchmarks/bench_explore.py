"""Explorer load times in a real browser, against a bare-script roofline, interleaved.

    python benchmarks/bench_explore.py                  # 300 images × 9 layers × 3 lenses, 24×24
    python benchmarks/bench_explore.py --images 30 --repeats 3

Writes a synthetic site of the paper's size (576 tokens per image, top-5 per lens, 9 layers,
random captions with spans) with the same writer `latentlens explore` uses, then opens it in
headless Chromium (Debian's chromium + chromium-driver through Selenium) from file://.

Columns (medians over --repeats rounds; each round loads ours and its roofline back to
back, so a busy machine slows both alike):
  landing          index.html to its load event (inline SVG plots, no script)
  model page       one model's page with all its thumbnails to its load event
  image page       image.html#image=K&layer=L&patch=P to the three panels drawn (the page's
                   own clock; the stages line splits it: script start, data in, drawn)
  roofline         a blank page that only loads the same two data scripts (meta + layer)
  layer switch     the next layer's data loaded and everything redrawn (ours only)
  image switch     the next image's meta + layer loaded and redrawn ("n" key; ours only)
Writer: seconds and MiB written. Peak memory of the writer from VmHWM.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from latentlens.explore import Group, Site, Verdict, grid_tokens  # noqa: E402
from latentlens.results import Neighbor  # noqa: E402

WORDS = (
    "the a dog cat car house tree street man woman red blue green small large sky grass water "
    "boat table chair window road field mountain river bird ball white black sits runs near "
    "behind under over next to with old new tall short bright dark wooden metal glass"
).split()


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_hwm() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def synthetic_site(out: Path, images: int, layers: int, grid: int, top_k: int, seed: int) -> float:
    """Write the site; returns seconds."""
    rng = random.Random(seed)
    captions = [" ".join(rng.choices(WORDS, k=rng.randint(6, 14))) for _ in range(2000)]
    layer_ids = [round(i * 31 / max(1, layers - 1)) for i in range(layers)]
    t0 = time.perf_counter()
    with Site(out, title="bench") as site:
        pages = site.model(
            "olmo-vit", label="OLMo+CLIP", llm="OLMo", encoder="CLIP",
            interpretability={x: {layer: rng.uniform(0, 100) for layer in layer_ids}
                              for x in ("latentlens", "logitlens", "embeddinglens")},
        )  # fmt: skip
        tokens = grid_tokens(grid, grid)
        for key in range(images):
            pic = Image.effect_noise((336, 336), 60 + key % 40).convert("RGB")
            judge = {
                lens: {layer: {rng.randrange(grid * grid): Verdict(rng.random() < 0.5, ("dog",))}
                       for layer in layer_ids}
                for lens in ("latentlens", "logitlens", "embeddinglens")
            }  # fmt: skip
            pages.add_image(key, pictures=[pic], groups=[Group("image", 0)], tokens=tokens,
                            name=f"{key:05d}.jpg", caption=rng.choice(captions), judge=judge)  # fmt: skip
            for layer in layer_ids:
                latent, logit, emb = [], [], []
                for _ in tokens:
                    row = []
                    for _ in range(top_k):
                        cap = rng.choice(captions)
                        w = rng.choice(cap.split())
                        i = cap.index(w)
                        row.append(Neighbor(w, rng.random(), cap, 3, 1, rng.choice(layer_ids),
                                            char_span=(i, i + len(w))))  # fmt: skip
                    latent.append(row)
                    logit.append([Neighbor(rng.choice(WORDS), rng.uniform(5, 20),
                                           probability=rng.random() / 5) for _ in range(top_k)])  # fmt: skip
                    emb.append([Neighbor(rng.choice(WORDS), rng.random()) for _ in range(top_k)])
                pages.add_layer(key, layer, {"latentlens": latent, "logitlens": logit,
                                             "embeddinglens": emb})  # fmt: skip
    return time.perf_counter() - t0


SWITCH = """const done = arguments[arguments.length - 1];
document.body.dataset.ready = "0";
const t0 = performance.now();
TRIGGER
(function poll() {
  if (document.body.dataset.ready === "1") done(window.LL_TIMING.drawn - t0);
  else setTimeout(poll, 0);
})();"""

ROOFLINE = """<!DOCTYPE html><html><head><meta charset="utf-8"><script>
const T0 = performance.now(); window.LL = {image(){}, layer(){}, model(){}};
</script></head><body>
<script src="data/__KEY__/meta.js"></script><script src="data/__KEY__/L__LAYER__.js"></script>
<script>document.body.dataset.ready = "1"; window.LL_DONE = performance.now();</script>
</body></html>"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--grid", type=int, default=24)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="Site folder (default: a temporary one).")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.browser import find_browser

    found = find_browser()
    if not isinstance(found, tuple):
        sys.exit(f"bench_explore needs a browser: {found}")
    tmp = tempfile.TemporaryDirectory()
    out = Path(args.out or Path(tmp.name) / "site")
    reset_hwm()
    secs = synthetic_site(out, args.images, args.layers, args.grid, args.top_k, seed=0)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    layer_files = sorted((out / "olmo-vit" / "data" / "0").glob("L*.js"))
    per_layer = statistics.median(p.stat().st_size for p in layer_files) / 2**20
    print(
        f"site: {args.images} images × {args.layers} layers × 3 lenses, {args.grid}×{args.grid} "
        f"tokens, top-{args.top_k}: written in {secs:.1f} s, {size:.0f} MiB "
        f"({per_layer:.2f} MiB per image-layer file), writer peak RSS {vm_hwm_mib():.0f} MiB"
    )
    layers = [int(p.stem[1:]) for p in layer_files]
    layers.sort()
    mid = layers[len(layers) // 2]
    (out / "olmo-vit" / "roofline.html").write_text(
        ROOFLINE.replace("__KEY__", str(args.images // 2)).replace("__LAYER__", str(mid))
    )

    from tests.browser import chrome

    cols: dict[str, list[float]] = {
        k: []
        for k in ("landing", "model page", "image page", "roofline", "layer switch", "image switch")
    }
    stages: dict[str, list[float]] = {"script start": [], "data ready": [], "drawn": []}
    nav = (
        "const n = performance.getEntriesByType('navigation')[0];"
        "return n.loadEventEnd > 0 ? n.loadEventEnd : null;"
    )
    with chrome() as d:

        def wait(script: str) -> float:
            end = time.monotonic() + 60
            while time.monotonic() < end:
                v = d.execute_script(script)
                if v is not None:
                    return float(v)
                time.sleep(0.005)
            raise TimeoutError(script)

        ready = (
            "return document.body && document.body.dataset.ready === '1' ? "
            "performance.now() : null;"
        )
        for r in range(args.repeats):
            key = (r * 37) % args.images
            d.get("about:blank")
            d.get((out / "index.html").as_uri())
            cols["landing"].append(wait(nav))
            d.get("about:blank")
            d.get((out / "olmo-vit" / "index.html").as_uri())
            cols["model page"].append(wait(nav))
            d.get("about:blank")
            page = (out / "olmo-vit" / "image.html").as_uri()
            d.get(page + f"#image={key}&layer={mid}&patch=300")
            wait(ready)
            timing = d.execute_script("return window.LL_TIMING")
            cols["image page"].append(timing["drawn"])
            for stage, name in (("script start", "scriptStart"), ("data ready", "dataReady"),
                                ("drawn", "drawn")):  # fmt: skip
                stages[stage].append(timing[name])
            # the switches, timed inside the page (no WebDriver round trip in the figure)
            layer_js = (
                "const s=document.getElementById('layer');"
                f"s.value='{layers[-1]}'; s.dispatchEvent(new Event('change'));"
            )
            key_js = "document.dispatchEvent(new KeyboardEvent('keydown', {key: 'n'}));"
            cols["layer switch"].append(d.execute_async_script(SWITCH.replace("TRIGGER", layer_js)))
            cols["image switch"].append(d.execute_async_script(SWITCH.replace("TRIGGER", key_js)))
            d.get("about:blank")
            d.get((out / "olmo-vit" / "roofline.html").as_uri())
            cols["roofline"].append(wait("return window.LL_DONE === undefined ? null : LL_DONE;"))
    med = {k: statistics.median(v) for k, v in cols.items()}
    ratio = statistics.median(
        a / b for a, b in zip(cols["image page"], cols["roofline"], strict=True)
    )
    print(f"{'':14s} {'median ms':>10s}")
    for k, v in med.items():
        print(f"{k:14s} {v:10.1f}")
    print(f"image page / roofline: {ratio:.2f}× (median of per-round ratios)")
    print(
        "image page stages (ms since navigation): "
        + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in stages.items())
    )
    tmp.cleanup()


if __name__ == "__main__":
    main()
