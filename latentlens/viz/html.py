"""A single self-contained HTML page to explore every visual token of an image.

The page holds the image (base64 PNG) and the neighbours of every patch at every layer
(inline JSON); hovering a patch shows them, clicking pins the patch. No server, no network.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from latentlens.results import ImageExplanation, Neighbor, VideoExplanation

# esc / mark (highlight a neighbour's own occurrence by its span) / the per-layer tables,
# shared by both pages
_COMMON_JS = """function esc(s){return s.replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));}
function mark(caption, span){
  // the bank row's own occurrence of the token (its character span), never a search
  if(!span) return esc(caption);
  const [i, j] = span;
  return esc(caption.slice(0,i)) + '<b>' + esc(caption.slice(i,j)) + '</b>' + esc(caption.slice(j));
}
function tables(t){
  let out = '';
  for (const layer of D.layers){
    out += `<table class="layer"><tr><th colspan="4">layer ${layer}</th></tr>`;
    for (const n of D.neighbors[layer][t]){
      out += `<tr><td class="sim">${n[1].toFixed(3)}</td><td class="tok">${esc(JSON.stringify(n[0]))}</td>`+
             `<td>L${n[2]}</td><td class="cap">${mark(D.captions[n[3]], n[4])}</td></tr>`;
    }
    out += '</table>';
  }
  document.getElementById('tables').innerHTML = out;
}"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>latentlens — __TITLE__</title>
<style>
body{font:14px system-ui,sans-serif;margin:16px;color:#222;display:flex;gap:24px;align-items:flex-start}
#wrap{position:relative;width:__SIZE__px;height:__SIZE__px;flex:none}
#wrap img{width:100%;height:100%;display:block}
#grid{position:absolute;inset:0;display:grid;grid-template-columns:repeat(__W__,1fr);grid-template-rows:repeat(__H__,1fr)}
.cell{border:1px solid rgba(255,255,255,.18);box-sizing:border-box;cursor:pointer}
.cell:hover{background:rgba(255,255,0,.25)}
.cell.hl{outline:2px solid red;outline-offset:-2px}
.cell.sel{background:rgba(255,0,0,.35)}
#panel{min-width:420px;max-width:760px}
table{border-collapse:collapse;margin-bottom:12px;width:100%}
td,th{padding:2px 6px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
th{background:#f4f4f4}.sim{font-family:monospace}.tok{font-weight:600}.cap{color:#555}
.cap b{color:#b00}
</style></head><body>
<div><div id="wrap"><img alt="input image" src="data:image/png;base64,__IMG__"><div id="grid"></div></div>
<p>__CAPTION__</p></div>
<div id="panel"><h2 id="title">hover a patch</h2><div id="tables"></div></div>
<script id="data" type="application/json">__DATA__</script>
<script>
const D = JSON.parse(document.getElementById('data').textContent);
const grid = document.getElementById('grid');
let pinned = null;
__COMMON_JS__
function show(p){
  const r = Math.floor(p / D.grid[1]), c = p % D.grid[1];
  document.getElementById('title').textContent = `patch ${p} (row ${r}, col ${c})`;
  tables(p);
}
for (let p = 0; p < D.grid[0] * D.grid[1]; p++){
  const d = document.createElement('div');
  d.className = 'cell' + (D.highlighted.includes(p) ? ' hl' : '');
  d.dataset.patch = p;
  d.addEventListener('mouseenter', () => { if (pinned === null) show(p); });
  d.addEventListener('click', () => {
    if (pinned !== null) grid.children[pinned].classList.remove('sel');
    pinned = (pinned === p) ? null : p;
    if (pinned !== null){ d.classList.add('sel'); show(p); }
  });
  grid.appendChild(d);
}
show(D.highlighted.length ? D.highlighted[0] : 0);
document.body.dataset.ready = 'yes';
</script></body></html>
"""


def explorer_html(ex: ImageExplanation, display_size: int = 512) -> str:
    """The explorer page for one :class:`~latentlens.explain.ImageExplanation`, as a string."""
    data = {
        "grid": list(ex.grid),
        "highlighted": ex.patches,
        **_neighbor_data(ex.layers, ex.neighbors),
    }
    subs = {
        "__TITLE__": html.escape(ex.image_name or "image"),
        "__SIZE__": str(display_size),
        "__W__": str(ex.grid[1]),
        "__H__": str(ex.grid[0]),
        "__IMG__": _png_b64(ex.image, (display_size, display_size)),
        "__CAPTION__": html.escape(
            f"{ex.model_name or 'model'} · bank {ex.bank_name or '?'} · top-{ex.top_k} · "
            f"{ex.grid[0]}×{ex.grid[1]} visual tokens · red boxes: sampled patches"
        ),
    }
    return _fill(_PAGE, data, subs)


def _png_b64(image: Any, size: tuple[int, int]) -> str:
    """``image`` resized to ``size`` as a base64 PNG."""
    buf = io.BytesIO()
    image.resize(size).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _neighbor_data(layers: list[int], neighbors: dict[int, list[list[Neighbor]]]) -> dict[str, Any]:
    """The pages' neighbour tables: ``{layer: [token: [[token, similarity, bank layer,
    caption index, char span | null], …]]}``, each caption stored once."""
    captions: dict[str, int] = {}
    table = {
        str(layer): [
            [
                [
                    n.token_str,
                    round(n.similarity, 4),
                    n.contextual_layer,
                    captions.setdefault(n.caption, len(captions)),
                    list(n.char_span) if n.char_span else None,
                ]
                for n in token
            ]
            for token in neighbors[layer]
        ]
        for layer in layers
    }
    return {"layers": [str(x) for x in layers], "captions": list(captions), "neighbors": table}


def _fill(template: str, data: dict[str, Any], subs: dict[str, str]) -> str:
    """The page: the shared script, ``subs``, then the data (last, so no caption is taken for
    a placeholder; ``</`` escaped inside ``<script>``)."""
    page = template.replace("__COMMON_JS__", _COMMON_JS)
    for key, value in subs.items():
        page = page.replace(key, value)
    return page.replace("__DATA__", json.dumps(data, ensure_ascii=False).replace("</", "<\\/"))


_VIDEO_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>latentlens — __TITLE__</title>
<style>
body{font:14px system-ui,sans-serif;margin:16px;color:#222;display:flex;gap:24px;align-items:flex-start}
#wrap{position:relative;width:__SIZE__px;flex:none}
#wrap img{width:100%;display:block}
#grid{position:absolute;inset:0;display:grid}
.cell{border:1px solid rgba(255,255,255,.25)}
.cell:hover,.cell.sel{outline:2px solid #ff0;z-index:1}
.cell.hl{border:2px solid red}
table.layer{border-collapse:collapse;margin:6px 0 14px}
table.layer td,table.layer th{padding:2px 8px;text-align:left;vertical-align:top}
.sim{font-variant-numeric:tabular-nums;color:#555}.tok{font-family:monospace}.cap{color:#444;max-width:560px}
.cap b{color:#b00}
</style></head><body>
<div><div id="wrap"><img id="frame" alt="video frame"><div id="grid"></div></div>
<p><label>temporal group <input id="slider" type="range" min="0" max="__LAST__" value="0"></label>
<span id="frames"></span></p><p>__CAPTION__</p></div>
<div id="panel"><h2 id="title">hover a token</h2><div id="tables"></div></div>
<script id="data" type="application/json">__DATA__</script>
<script>
const D = JSON.parse(document.getElementById('data').textContent);
const grid = document.getElementById('grid'), img = document.getElementById('frame');
let pinned = null;
__COMMON_JS__
function show(t){
  const a = D.tokens[t];
  document.getElementById('title').textContent =
    `token ${t}: frames ${a[0]}-${a[1]}, row ${a[2]}, col ${a[3]} (position ${a[4]})`;
  tables(t);
}
function group(g){
  const G = D.groups[g];
  img.src = 'data:image/png;base64,' + D.images[g];
  document.getElementById('frames').textContent = `frames ${G.frames[0]}-${G.frames[1]}`;
  grid.style.gridTemplateColumns = `repeat(${G.grid[1]},1fr)`;
  grid.style.gridTemplateRows = `repeat(${G.grid[0]},1fr)`;
  grid.innerHTML = ''; pinned = null;
  for (const t of G.tokens){
    const d = document.createElement('div');
    d.className = 'cell' + (D.highlighted.includes(t) ? ' hl' : '');
    d.dataset.token = t;
    d.addEventListener('mouseenter', () => { if (pinned === null) show(t); });
    d.addEventListener('click', () => {
      grid.querySelectorAll('.sel').forEach(e => e.classList.remove('sel'));
      pinned = (pinned === t) ? null : t;
      if (pinned !== null){ d.classList.add('sel'); show(t); }
    });
    grid.appendChild(d);
  }
  show(G.tokens[0]);
}
document.getElementById('slider').addEventListener('input', e => group(+e.target.value));
group(0);
document.body.dataset.ready = 'yes';
</script></body></html>
"""


def video_explorer_html(ex: VideoExplanation, display_size: int = 512) -> str:
    """The explorer page for a :class:`~latentlens.results.VideoExplanation`: a slider over
    the temporal groups, each group's first frame with its token grid, neighbours on hover."""
    groups, images = [], []
    for first in ex.groups:
        members = [i for i, a in enumerate(ex.addresses) if a.frame == first]
        members.sort(key=lambda i: (ex.addresses[i].row, ex.addresses[i].col))
        a0 = ex.addresses[members[0]]
        shape = (
            max(ex.addresses[i].row for i in members) + 1,
            max(ex.addresses[i].col for i in members) + 1,
        )
        groups.append(
            {"frames": list(a0.frames or (first, first)), "grid": list(shape), "tokens": members}
        )
        frame = ex.frames[first]
        height = round(display_size * frame.height / frame.width)
        images.append(_png_b64(frame, (display_size, height)))
    data = {
        "highlighted": ex.patches,
        **_neighbor_data(ex.layers, ex.neighbors),
        "groups": groups,
        "images": images,
        "tokens": [
            [*(a.frames or (a.frame, a.frame)), a.row, a.col, a.sequence_position]
            for a in ex.addresses
        ],
    }
    subs = {
        "__TITLE__": html.escape(ex.video_name or "video"),
        "__SIZE__": str(display_size),
        "__LAST__": str(len(groups) - 1),
        "__CAPTION__": html.escape(
            f"{ex.model_name or 'model'} · bank {ex.bank_name or '?'} · top-{ex.top_k} · "
            f"{len(ex.frames)} frames · {len(ex.addresses)} visual tokens"
        ),
    }
    return _fill(_VIDEO_PAGE, data, subs)
