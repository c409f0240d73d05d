"""Write the explorer: a static site that works from ``file://`` and any static server.

Layout of a site (``SITE/``)::

    index.html                       landing page: the models, interpretability per layer
    assets/explorer.css, .js         one stylesheet, one script (no build tools)
    pictures/<hash>.jpg              what each image page shows (shared between models)
    thumbs/<hash>.jpg                thumbnails
    <model>/index.html               model page: lenses × layers, thumbnails
    <model>/image.html               image page; the image, layer, patch in the URL hash
    <model>/data/model.js            the model's images (loaded by the image page)
    <model>/data/<key>/meta.js       one image: pictures, token boxes, judge verdicts
    <model>/data/<key>/L<layer>.js   one image at one layer: the three lenses' neighbours
    .latentlens-site.json            what this site holds (marks the folder as ours)

Data files are scripts calling ``LL.model`` / ``LL.image`` / ``LL.layer``, inserted on
demand by the image page: a browser loads local scripts from ``file://`` where it refuses
``fetch``. The site is written into a temporary sibling folder and swapped in at the end, so
an interrupted run leaves the previous site as it was.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from PIL import Image

from latentlens.errors import ExploreError
from latentlens.explore.plot import layer_plot
from latentlens.results import Neighbor

LENSES: tuple[str, ...] = ("latentlens", "logitlens", "embeddinglens")
LENS_LABELS = {
    "latentlens": "LatentLens",
    "logitlens": "LogitLens",
    "embeddinglens": "EmbeddingLens",
}
MARKER = ".latentlens-site.json"
SITE_VERSION = 1
PICTURE_MAX_SIDE = 1024
THUMB_SIDE = 160


@dataclass(frozen=True)
class Token:
    """One visual token as the image page draws it.

    Attributes:
        id: its index in the results (``patch_idx``; what deep links name).
        group: index into the image's groups (a crop, or a video's temporal group).
        row, col: its place in the group's grid.
        box: ``(x0, y0, x1, y1)`` as fractions of the group's picture.
    """

    id: int
    group: int
    row: int
    col: int
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Group:
    """A set of tokens drawn over one picture: a crop (``high-res``, ``tile 0,1``, …) or a
    temporal group of a video (``frames 2-3``)."""

    name: str
    picture: int


@dataclass(frozen=True)
class Verdict:
    """The judge's answer for one patch at one layer of one lens."""

    interpretable: bool
    candidate_words: tuple[str, ...] = ()
    concrete: tuple[str, ...] = ()
    abstract: tuple[str, ...] = ()
    global_: tuple[str, ...] = ()
    reasoning: str = ""
    failed: bool = False


Judgements = Mapping[str, Mapping[int, Mapping[int, Verdict]]]
"""``lens → layer → token id → verdict``."""


def grid_tokens(rows: int, cols: int, group: int = 0) -> list[Token]:
    """Row-major tokens of a uniform ``rows × cols`` grid over the whole picture.

    Cell ``i`` spans ``[i/G, (i+1)/G)``: the same cells the judge draws (integer pixel
    edges at its size round to these).
    """
    return [
        Token(r * cols + c, group, r, c, (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows))
        for r in range(rows)
        for c in range(cols)
    ]


def slug(name: str) -> str:
    """A folder name for a model: letters, digits, ``-``, ``_`` and ``.`` only."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return s or "model"


def _js(call: str, payload: Any) -> str:
    # ASCII-only JSON: the file reads the same whatever charset the browser assumes.
    return f"{call}({json.dumps(payload, ensure_ascii=True, separators=(',', ':'))});\n"


def _r(x: float, nd: int = 6) -> float:
    return round(float(x), nd)


def _layer_rows(lens: str, rows: Sequence[Sequence[Neighbor]], captions: dict[str, int]) -> list:
    """Compact per-token lists for one lens at one layer (what explorer.js reads)."""
    out = []
    for row in rows:
        cell = []
        for n in row:
            if lens == "latentlens":
                cap = captions.setdefault(n.caption, len(captions))
                span = list(n.char_span) if n.char_span else None
                cell.append([n.token_str, _r(n.similarity), n.contextual_layer, cap, span])
            elif lens == "logitlens":
                p = None if n.probability is None else _r(n.probability, 6)
                cell.append([n.token_str, _r(n.similarity), p])
            else:
                cell.append([n.token_str, _r(n.similarity)])
        out.append(cell)
    return out


def _verdict_json(v: Verdict) -> dict[str, Any]:
    return {
        "ok": v.interpretable,
        "failed": v.failed,
        "words": list(v.candidate_words),
        "concrete": list(v.concrete),
        "abstract": list(v.abstract),
        "global": list(v.global_),
        "reasoning": v.reasoning,
    }


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@dataclass
class _ImageEntry:
    key: int
    name: str
    caption: str
    thumb: str
    kind: str


@dataclass
class ModelPages:
    """The pages and data of one model; made by :meth:`Site.model`.

    Call :meth:`add_image` once per image (its pictures, token boxes, verdicts), then
    :meth:`add_layer` for each (image, layer) in any order.
    """

    site: Site
    name: str
    label: str
    folder: str
    family: str = ""
    bank: str = ""
    llm: str | None = None
    encoder: str | None = None
    interpretability: dict[str, dict[int, float]] = field(default_factory=dict)
    images: list[_ImageEntry] = field(default_factory=list)
    layers: dict[str, set[int]] = field(default_factory=dict)
    _tokens: dict[int, int] = field(default_factory=dict)

    @property
    def _dir(self) -> Path:
        return self.site._tmp / self.folder

    def add_image(
        self,
        key: int,
        *,
        pictures: Sequence[Image.Image],
        groups: Sequence[Group],
        tokens: Sequence[Token],
        name: str = "",
        caption: str = "",
        kind: str = "image",
        judge: Judgements | None = None,
    ) -> None:
        """Write one image's pictures and ``meta.js``.

        Raises:
            ExploreError: a repeated key, no token, or a token naming a missing group.
        """
        if key in self._tokens:
            raise ExploreError(f"{self.name}: image {key} added twice")
        if not tokens:
            raise ExploreError(f"{self.name}: image {key} ({name}) has no visual token")
        if any(not 0 <= t.group < len(groups) for t in tokens) or any(
            not 0 <= g.picture < len(pictures) for g in groups
        ):
            raise ExploreError(f"{self.name}: image {key}: a token or group names nothing")
        paths = [self.site.picture(p) for p in pictures]
        verdicts = {
            lens: {
                str(layer): {str(t): _verdict_json(v) for t, v in sorted(per.items())}
                for layer, per in sorted(by_layer.items())
            }
            for lens, by_layer in (judge or {}).items()
        }
        meta = {
            "key": key,
            "name": name,
            "caption": caption,
            "kind": kind,
            "pictures": ["../" + p for p, _ in paths],
            "groups": [{"name": g.name, "picture": g.picture} for g in groups],
            "tokens": [[t.id, t.group, t.row, t.col, *(_r(x, 5) for x in t.box)] for t in tokens],
            "judge": verdicts,
        }
        _write_text(self._dir / "data" / str(key) / "meta.js", _js("LL.image", meta))
        self._tokens[key] = len(tokens)
        self.images.append(_ImageEntry(key, name, caption, "../" + paths[0][1], kind))

    def add_layer(
        self, key: int, layer: int, lenses: Mapping[str, Sequence[Sequence[Neighbor]]]
    ) -> None:
        """Write one image's neighbours at one layer: ``lens → [one list per token]``, the
        tokens in the order given to :meth:`add_image`.

        Raises:
            ExploreError: an unknown image or lens, or a token count that does not match.
        """
        if key not in self._tokens:
            raise ExploreError(f"{self.name}: layer {layer} of image {key}, which was not added")
        captions: dict[str, int] = {}
        payload: dict[str, Any] = {"key": key, "layer": layer}
        for lens, rows in lenses.items():
            if lens not in LENSES:
                raise ExploreError(f"unknown lens {lens!r}; expected one of {', '.join(LENSES)}")
            if len(rows) != self._tokens[key]:
                raise ExploreError(
                    f"{self.name}: image {key}, layer {layer}, {lens}: {len(rows)} token lists "
                    f"for {self._tokens[key]} tokens"
                )
            payload[lens] = _layer_rows(lens, rows, captions)
            self.layers.setdefault(lens, set()).add(layer)
        payload["captions"] = list(captions)
        _write_text(self._dir / "data" / str(key) / f"L{layer}.js", _js("LL.layer", payload))

    def _all_layers(self) -> list[int]:
        return sorted(set().union(*self.layers.values())) if self.layers else []

    def _finish(self) -> None:
        self.images.sort(key=lambda e: e.key)
        lenses = [x for x in LENSES if x in self.layers]
        model = {
            "name": self.name,
            "label": self.label,
            "family": self.family,
            "bank": self.bank,
            "layers": self._all_layers(),
            "lenses": lenses,
            "lensLayers": {x: sorted(self.layers[x]) for x in lenses},
            "images": [
                {"key": e.key, "name": e.name, "caption": e.caption, "kind": e.kind}
                for e in self.images
            ],
        }
        _write_text(self._dir / "data" / "model.js", _js("LL.model", model))
        _write_text(self._dir / "image.html", _image_page(self))
        _write_text(self._dir / "index.html", _model_page(self))


class Site:
    """A static explorer site under construction; use as a context manager.

    ``with Site("site/") as site: pages = site.model("olmo-vit"); pages.add_image(...)``
    writes everything into a temporary sibling folder; leaving the block without an error
    puts it in place of ``out_dir`` (a previous site there is replaced; any other non-empty
    folder is refused), an error leaves ``out_dir`` untouched.
    """

    def __init__(self, out_dir: str | os.PathLike[str], title: str = "latentlens explorer"):
        self.out = Path(out_dir).expanduser().resolve()
        self.title = title
        if self.out.exists() and not self._replaceable(self.out):
            raise ExploreError(
                f"{self.out} exists and is not a latentlens site: choose another output "
                "folder or remove it"
            )
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._sweep_stale()
        self._tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        if self._tmp.exists():
            shutil.rmtree(self._tmp)
        self._tmp.mkdir()
        self.models: dict[str, ModelPages] = {}
        self._pictures: dict[str, tuple[str, str]] = {}

    def _sweep_stale(self) -> None:
        """Remove what a killed writer of this site left beside it (its temporary or
        replaced folder), unless that writer is still running."""
        for leftover in self.out.parent.glob(f".{self.out.name}.*-*"):
            kind, _, pid = leftover.name.rpartition("-")
            if not kind.endswith((".tmp", ".old")) or not pid.isdigit():
                continue
            try:
                os.kill(int(pid), 0)
                alive = int(pid) != os.getpid()
            except ProcessLookupError:
                alive = False
            except PermissionError:  # another user's live process
                alive = True
            if not alive:
                shutil.rmtree(leftover, ignore_errors=True)

    @staticmethod
    def _replaceable(path: Path) -> bool:
        return path.is_dir() and ((path / MARKER).is_file() or not any(path.iterdir()))

    def __enter__(self) -> Site:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def model(
        self,
        name: str,
        *,
        label: str | None = None,
        family: str = "",
        bank: str = "",
        llm: str | None = None,
        encoder: str | None = None,
        interpretability: Mapping[str, Mapping[int, float]] | None = None,
    ) -> ModelPages:
        """The pages of one model (made on first use).

        ``llm`` and ``encoder`` place it in the landing page's LLM × encoder grid;
        ``interpretability`` is ``lens → layer → percent`` from the judge.
        """
        if name not in self.models:
            folder = slug(name)
            taken = {m.folder for m in self.models.values()}
            while folder in taken or folder in ("assets", "pictures", "thumbs"):
                folder += "_"
            self.models[name] = ModelPages(
                self,
                name,
                label or name,
                folder,
                family,
                bank,
                llm,
                encoder,
                {k: dict(v) for k, v in (interpretability or {}).items()},
            )
        return self.models[name]

    def picture(self, image: Image.Image) -> tuple[str, str]:
        """Save a picture (once per content) and its thumbnail: their site-relative paths."""
        rgb = image.convert("RGB")
        digest = hashlib.sha1(
            rgb.tobytes() + repr(rgb.size).encode(), usedforsecurity=False
        ).hexdigest()[:16]
        if digest not in self._pictures:
            pic, thumb = f"pictures/{digest}.jpg", f"thumbs/{digest}.jpg"
            for rel, side in ((pic, PICTURE_MAX_SIDE), (thumb, THUMB_SIDE)):
                target = self._tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                copy = rgb.copy()
                copy.thumbnail((side, side), Image.Resampling.LANCZOS)
                copy.save(target, format="JPEG", quality=90)
            self._pictures[digest] = (pic, thumb)
        return self._pictures[digest]

    def close(self) -> None:
        """Write the landing page and assets, then put the site in place."""
        if not self.models:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise ExploreError("nothing to show: no model was added to the site")
        for m in self.models.values():
            m._finish()
        assets = self._tmp / "assets"
        assets.mkdir(exist_ok=True)
        for name in ("explorer.js", "explorer.css"):
            (assets / name).write_bytes(
                (files("latentlens.explore") / "static" / name).read_bytes()
            )
        _write_text(self._tmp / "index.html", _landing_page(self))
        manifest = {
            "format": "latentlens-site",
            "version": SITE_VERSION,
            "title": self.title,
            "models": [
                {
                    "name": m.name,
                    "folder": m.folder,
                    "images": len(m.images),
                    "layers": m._all_layers(),
                    "lenses": [x for x in LENSES if x in m.layers],
                }
                for m in self.models.values()
            ],
        }
        _write_text(self._tmp / MARKER, json.dumps(manifest, indent=1))
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self._tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# ── pages ───────────────────────────────────────────────────────────────────────────────

_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="stylesheet" href="{root}assets/explorer.css">
</head>"""

e = html.escape


def _plot(m: ModelPages, width: int = 220, height: int = 110) -> str:
    if not m.interpretability:
        return '<p class="muted">no judge results</p>'
    return layer_plot(
        {LENS_LABELS.get(k, k): v for k, v in m.interpretability.items()}, width, height
    )


def _landing_page(site: Site) -> str:
    models = list(site.models.values())
    gridded = [m for m in models if m.llm and m.encoder]
    others = [m for m in models if not (m.llm and m.encoder)]
    parts = [_HEAD.format(title=e(site.title), root=""), '<body class="landing">']
    parts.append(f"<header><h1>{e(site.title)}</h1>")
    parts.append(
        "<p>What each visual token means, read three ways: <b>LatentLens</b> (nearest "
        "contextual text tokens), <b>LogitLens</b> and <b>EmbeddingLens</b>. The plots show "
        "the share of patches the judge found interpretable, per layer.</p></header>"
    )
    if gridded:
        llms = list(dict.fromkeys(m.llm for m in gridded))
        encs = list(dict.fromkeys(m.encoder for m in gridded))
        cell = {(m.llm, m.encoder): m for m in gridded}
        parts.append('<h2>LLM × vision encoder</h2><table class="model-grid"><tr><th></th>')
        parts += [f"<th>{e(str(x))}</th>" for x in encs]
        parts.append("</tr>")
        for llm in llms:
            parts.append(f"<tr><th>{e(str(llm))}</th>")
            for enc in encs:
                m = cell.get((llm, enc))
                parts.append("<td>" + (_model_card(m) if m else '<span class="muted">—</span>'))
                parts.append("</td>")
            parts.append("</tr>")
        parts.append("</table>")
    if others:
        parts.append(f"<h2>{'Other models' if gridded else 'Models'}</h2><div class='cards'>")
        parts += [f'<div class="card">{_model_card(m)}</div>' for m in others]
        parts.append("</div>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _model_card(m: ModelPages) -> str:
    n = len(m.images)
    layers = m._all_layers()
    span = f"layers {layers[0]}–{layers[-1]}" if layers else "no layer"
    return (
        f'<a class="model-link" href="{e(m.folder)}/index.html">{e(m.label)}</a>'
        f'<div class="muted">{n} image{"s" if n != 1 else ""}, {span}</div>{_plot(m)}'
    )


def _model_page(m: ModelPages) -> str:
    layers = m._all_layers()
    lenses = [x for x in LENSES if x in m.layers]
    parts = [_HEAD.format(title=e(f"{m.label} — latentlens"), root="../"), '<body class="model">']
    parts.append(
        f'<header><a href="../index.html">all models</a> › <h1>{e(m.label)}</h1>'
        f'<p class="muted">{e(m.family)}{" · bank " + e(m.bank) if m.bank else ""}</p></header>'
    )
    parts.append('<div class="summary"><table class="lens-layers"><tr><th>lens</th>')
    parts += [f"<th>L{x}</th>" for x in layers]
    parts.append("</tr>")
    for lens in lenses:
        parts.append(f"<tr><th>{LENS_LABELS[lens]}</th>")
        for x in layers:
            pct = m.interpretability.get(lens, {}).get(x)
            if x not in m.layers[lens]:
                parts.append('<td class="muted">—</td>')
            elif pct is not None:
                parts.append(f'<td title="judged interpretable">{pct:.0f}%</td>')
            else:
                parts.append("<td>✓</td>")
        parts.append("</tr>")
    parts.append(f"</table>{_plot(m, 320, 150)}</div>")
    parts.append('<h2>Images</h2><div class="thumbs">')
    first = layers[0] if layers else 0
    for im in m.images:
        title = im.caption or im.name
        parts.append(
            f'<a class="thumb" href="image.html#image={im.key}&amp;layer={first}" '
            f'title="{e(title)}"><img loading="lazy" src="{e(im.thumb)}" alt="{e(im.name)}">'
            f"<span>{e(im.name or str(im.key))}</span></a>"
        )
    parts.append("</div></body></html>\n")
    return "\n".join(parts)


def _image_page(m: ModelPages) -> str:
    lens_sections = "\n".join(
        f'<section class="lens" id="lens-{x}"><h3>{LENS_LABELS[x]}</h3>'
        f'<div class="body muted">hover a patch</div></section>'
        for x in LENSES
    )
    return (
        _HEAD.format(title=e(f"{m.label} — image"), root="../")
        + f"""
<body class="image-page">
<header><a href="../index.html">all models</a> › <a href="index.html">{e(m.label)}</a> ›
<button id="prev" title="previous image (p)">◀</button>
<select id="image-select" aria-label="image"></select>
<button id="next" title="next image (n)">▶</button></header>
<main>
<div id="left">
 <div id="controls">
  <label>layer <select id="layer"></select></label>
  <label id="group-box">crop <select id="group"></select></label>
  <label id="frame-box">frames <input type="range" id="frame" min="0" value="0">
   <span id="frame-label"></span></label>
  <label>tint <select id="tint"></select></label>
 </div>
 <div id="stage"><img id="picture" alt="image"><div id="boxes"></div></div>
 <p id="caption"></p>
 <p class="help muted">Hover a patch; click pins it. Keys: arrows move, , . change layer,
 [ ] change crop or frames, n p change image, Esc unpins. The address bar keeps the view.</p>
</div>
<div id="right">
 <h2 id="patch-title">hover a patch</h2>
 <div id="panels">
{lens_sections}
 </div>
 <section id="judge"></section>
</div>
</main>
<script>
// The addressed image's data start loading with the page, not after the script chain;
// explorer.js takes over what arrived (window.LL_QUEUE).
window.LL_QUEUE = [];
window.LL = {{
  image: function (d) {{ LL_QUEUE.push(["image", d]); }},
  layer: function (d) {{ LL_QUEUE.push(["layer", d]); }},
  model: function (d) {{ LL_QUEUE.push(["model", d]); }}
}};
(function () {{
  var h = {{}};
  location.hash.replace(/^#/, "").split("&").forEach(function (p) {{
    var kv = p.split("=");
    if (kv[0]) h[kv[0]] = decodeURIComponent(kv[1] || "");
  }});
  if (/^[0-9]+$/.test(h.image || "")) {{
    document.write('<script src="data/' + h.image + '/meta.js"><\/script>');
    if (/^[0-9]+$/.test(h.layer || ""))
      document.write('<script src="data/' + h.image + '/L' + h.layer + '.js"><\/script>');
  }}
}})();
</script>
<script src="../assets/explorer.js"></script>
<script src="data/model.js"></script>
</body></html>
"""
    )
