"""A single self-contained HTML page to explore every visual token of an image.

The page holds the image (base64 PNG) and the neighbours of every patch at every layer
(inline JSON); hovering a patch shows them, clicking pins the patch. No server, no network.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from latentlens.results import ImageExplanation

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
function esc(s){return s.replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));}
function mark(caption, tok){
  const t = tok.trim(); const i = t ? caption.toLowerCase().indexOf(t.toLowerCase()) : -1;
  if(i < 0) return esc(caption);
  return esc(caption.slice(0,i)) + '<b>' + esc(caption.slice(i,i+t.length)) + '</b>' + esc(caption.slice(i+t.length));
}
function show(p){
  const r = Math.floor(p / D.grid[1]), c = p % D.grid[1];
  document.getElementById('title').textContent = `patch ${p} (row ${r}, col ${c})`;
  let out = '';
  for (const layer of D.layers){
    out += `<table class="layer"><tr><th colspan="4">layer ${layer}</th></tr>`;
    for (const n of D.neighbors[layer][p]){
      out += `<tr><td class="sim">${n[1].toFixed(3)}</td><td class="tok">${esc(JSON.stringify(n[0]))}</td>`+
             `<td>L${n[2]}</td><td class="cap">${mark(D.captions[n[3]], n[0])}</td></tr>`;
    }
    out += '</table>';
  }
  document.getElementById('tables').innerHTML = out;
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
    buf = io.BytesIO()
    ex.image.resize((display_size, display_size)).save(buf, format="PNG")
    captions: dict[str, int] = {}
    neighbors = {}
    for layer in ex.layers:
        neighbors[str(layer)] = [
            [
                [
                    n.token_str,
                    round(n.similarity, 4),
                    n.contextual_layer,
                    captions.setdefault(n.caption, len(captions)),
                ]
                for n in patch
            ]
            for patch in ex.neighbors[layer]
        ]
    data = {
        "grid": list(ex.grid),
        "layers": [str(x) for x in ex.layers],
        "highlighted": ex.patches,
        "captions": list(captions),
        "neighbors": neighbors,
    }
    # "</" must not appear inside the <script> element.
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    subs = {
        "__TITLE__": html.escape(ex.image_name or "image"),
        "__SIZE__": str(display_size),
        "__W__": str(ex.grid[1]),
        "__H__": str(ex.grid[0]),
        "__IMG__": base64.b64encode(buf.getvalue()).decode(),
        "__CAPTION__": html.escape(
            f"{ex.model_name or 'model'} · bank {ex.bank_name or '?'} · top-{ex.top_k} · "
            f"{ex.grid[0]}×{ex.grid[1]} visual tokens · red boxes: sampled patches"
        ),
        "__DATA__": payload,
    }
    page = _PAGE
    for key, value in subs.items():
        page = page.replace(key, value)
    return page
