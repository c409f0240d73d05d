// latentlens explorer: the image page. No framework, no build step; works from file://.
// Data arrive as scripts calling LL.model / LL.image / LL.layer (see latentlens/explore/site.py).
(function () {
  "use strict";
  const LENSES = ["latentlens", "logitlens", "embeddinglens"];
  const LABELS = {latentlens: "LatentLens", logitlens: "LogitLens", embeddinglens: "EmbeddingLens"};
  const TINTS = [
    ["none", "none"],
    ["latentlens", "LatentLens top similarity"],
    ["ratio", "LatentLens ÷ EmbeddingLens top similarity"],
    ["logitlens", "LogitLens top probability"],
    ["embeddinglens", "EmbeddingLens top similarity"],
    ["judge", "judge verdict (LatentLens)"],
  ];
  const $ = (id) => document.getElementById(id);
  const T0 = performance.now();

  const S = {model: null, image: null, layer: null, group: 0, patch: null, pinned: false,
             tint: "latentlens", hover: null};
  const META = {};      // key → image meta
  const LAYERS = {};    // "key/layer" → layer data
  const waiting = {};   // script src → [resolve, reject]

  function esc(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;",
      '"': "&quot;", "'": "&#39;"}[c]));
  }
  function mark(caption, span) {
    // the bank row's own occurrence of the token (its character span), never a search
    if (!span) return esc(caption);
    const [i, j] = span;
    return esc(caption.slice(0, i)) + "<mark>" + esc(caption.slice(i, j)) + "</mark>" +
      esc(caption.slice(j));
  }
  const show = (tok) => esc(JSON.stringify(tok));

  function load(src) {
    return new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = src;
      s.onload = () => resolve();
      s.onerror = () => reject(new Error("cannot load " + src));
      document.head.appendChild(s);
    });
  }
  async function meta(key) {
    if (!META[key]) await load(`data/${key}/meta.js`);
    return META[key];
  }
  async function layerData(key, layer) {
    const id = key + "/" + layer;
    if (!LAYERS[id]) await load(`data/${key}/L${layer}.js`);
    return LAYERS[id];
  }

  const queued = window.LL_QUEUE || []; // data the page started loading before this script
  window.LL = {
    model(m) { S.model = m; start(); },
    image(d) { META[d.key] = d; },
    layer(d) { LAYERS[d.key + "/" + d.layer] = d; },
  };
  for (const [kind, d] of queued) window.LL[kind](d);

  // ── state ↔ address bar ──────────────────────────────────────────────────────────
  function parseHash() {
    const out = {};
    for (const part of location.hash.replace(/^#/, "").split("&")) {
      const [k, v] = part.split("=");
      if (k) out[decodeURIComponent(k)] = decodeURIComponent(v || "");
    }
    return out;
  }
  function writeHash() {
    const parts = [`image=${S.image}`, `layer=${S.layer}`];
    if (S.pinned && S.patch !== null) parts.push(`patch=${S.patch}`);
    if (S.tint !== "latentlens") parts.push(`tint=${S.tint}`);
    const h = "#" + parts.join("&");
    if (location.hash !== h) history.replaceState(null, "", h);
  }

  // ── page ─────────────────────────────────────────────────────────────────────────
  function start() {
    const m = S.model;
    document.title = `${m.label} — latentlens`;
    const sel = $("image-select");
    sel.innerHTML = m.images.map((im) =>
      `<option value="${im.key}">${esc(im.name || "image " + im.key)}</option>`).join("");
    $("layer").innerHTML = m.layers.map((l) => `<option value="${l}">${l}</option>`).join("");
    $("tint").innerHTML = TINTS.map(([v, t]) => `<option value="${v}">${esc(t)}</option>`).join("");
    sel.onchange = () => go({image: +sel.value, patch: null});
    $("prev").onclick = () => step(-1);
    $("next").onclick = () => step(1);
    $("layer").onchange = () => go({layer: +$("layer").value});
    $("group").onchange = () => go({group: +$("group").value, patch: null});
    $("frame").oninput = () => go({group: +$("frame").value, patch: null});
    $("tint").onchange = () => go({tint: $("tint").value});
    document.addEventListener("keydown", onKey);
    window.addEventListener("hashchange", () => fromHash());
    fromHash();
  }

  function fromHash() {
    const h = parseHash();
    const m = S.model;
    const keys = m.images.map((im) => im.key);
    const image = keys.includes(+h.image) ? +h.image : keys[0];
    const layer = m.layers.includes(+h.layer) ? +h.layer : m.layers[0];
    const tint = TINTS.some(([v]) => v === h.tint) ? h.tint : "latentlens";
    const patch = h.patch === undefined || h.patch === "" ? null : +h.patch;
    go({image, layer, tint, patch, pinned: patch !== null}, true);
  }

  function step(d) {
    const keys = S.model.images.map((im) => im.key);
    const i = keys.indexOf(S.image);
    go({image: keys[(i + d + keys.length) % keys.length], patch: null});
  }

  let pending = 0;
  async function go(change, fromAddress) {
    const ticket = ++pending;
    const imageChanged = change.image !== undefined && change.image !== S.image;
    Object.assign(S, change);
    if (change.patch === null && !("pinned" in change)) S.pinned = false;
    document.body.dataset.ready = "0";
    let m;
    try {
      [m] = await Promise.all([meta(S.image), layerData(S.image, S.layer)]);
    } catch (err) {
      $("patch-title").textContent = String(err.message || err);
      document.body.dataset.ready = "error";
      return;
    }
    if (ticket !== pending) return; // a newer change is on its way
    const byId = tokenIndex(m);
    if (S.patch !== null && byId.has(S.patch)) S.group = m.tokens[byId.get(S.patch)][1];
    else if (S.patch !== null) { S.patch = null; S.pinned = false; }
    if (imageChanged && change.group === undefined && S.patch === null) S.group = m.tokens[0][1];
    if (S.group >= m.groups.length) S.group = 0;
    const t1 = performance.now();
    render(m);
    if (!fromAddress || S.pinned) writeHash();
    document.body.dataset.ready = "1";
    // for benchmarks: when the script started, data arrived, drawing ended (ms since load)
    window.LL_TIMING = {scriptStart: T0, dataReady: t1, drawn: performance.now()};
  }

  function tokenIndex(m) {
    if (!m._byId) {
      m._byId = new Map(m.tokens.map((t, i) => [t[0], i]));
      m._byCell = new Map(m.tokens.map((t, i) => [`${t[1]},${t[2]},${t[3]}`, i]));
    }
    return m._byId;
  }

  function render(m) {
    $("image-select").value = String(S.image);
    $("layer").value = String(S.layer);
    $("tint").value = S.tint;
    $("caption").textContent = m.caption || "";
    const video = m.kind === "video";
    const many = m.groups.length > 1;
    $("group-box").style.display = many && !video ? "" : "none";
    $("frame-box").style.display = many && video ? "" : "none";
    if (many && !video) {
      $("group").innerHTML = m.groups.map((g, i) =>
        `<option value="${i}">${esc(g.name)}</option>`).join("");
      $("group").value = String(S.group);
    }
    if (many && video) {
      $("frame").max = String(m.groups.length - 1);
      $("frame").value = String(S.group);
      $("frame-label").textContent = m.groups[S.group].name;
    }
    const pic = $("picture");
    const src = m.pictures[m.groups[S.group].picture];
    if (pic.getAttribute("src") !== src) pic.setAttribute("src", src);
    drawBoxes(m);
    panels(m);
  }

  function topScore(lens, cell) {
    if (!cell || !cell.length) return null;
    if (lens === "logitlens") return cell[0][2] !== null ? cell[0][2] : cell[0][1];
    return cell[0][1];
  }

  function tintValues(m, L, idx) {
    if (S.tint === "none" || S.tint === "judge") return null;
    const vals = idx.map((i) => {
      if (S.tint === "ratio") {
        const a = topScore("latentlens", (L.latentlens || [])[i]);
        const b = topScore("embeddinglens", (L.embeddinglens || [])[i]);
        return a !== null && b ? a / b : null;
      }
      return topScore(S.tint, (L[S.tint] || [])[i]);
    });
    const ok = vals.filter((v) => v !== null && isFinite(v));
    if (!ok.length) return null;
    const lo = Math.min(...ok), hi = Math.max(...ok);
    return vals.map((v) => (v === null || !isFinite(v) ? null : hi > lo ? (v - lo) / (hi - lo) : 1));
  }

  function drawBoxes(m) {
    const L = LAYERS[S.image + "/" + S.layer] || {};
    const idx = [];
    m.tokens.forEach((t, i) => { if (t[1] === S.group) idx.push(i); });
    const tv = tintValues(m, L, idx);
    const verdicts = ((m.judge || {}).latentlens || {})[S.layer] || {};
    const out = [];
    idx.forEach((i, k) => {
      const t = m.tokens[i];
      const [x0, y0, x1, y1] = t.slice(4);
      let style = `left:${x0 * 100}%;top:${y0 * 100}%;width:${(x1 - x0) * 100}%;height:${(y1 - y0) * 100}%`;
      if (tv && tv[k] !== null) style += `;background:rgba(255,120,0,${(0.04 + 0.36 * tv[k]).toFixed(3)})`;
      const v = verdicts[t[0]];
      let cls = "cell";
      if (v) cls += " judged";
      if (S.tint === "judge" && v) cls += v.ok ? " ok" : " ko";
      if (t[0] === S.patch) cls += S.pinned ? " sel" : " hl";
      out.push(`<div class="${cls}" data-token="${t[0]}" data-row="${t[2]}" data-col="${t[3]}" ` +
               `style="${style}" title="row ${t[2]}, col ${t[3]}"></div>`);
    });
    const boxes = $("boxes");
    boxes.innerHTML = out.join("");
    boxes.onmouseover = (ev) => {
      const id = ev.target.dataset && ev.target.dataset.token;
      if (id === undefined || S.pinned) return;
      S.patch = +id;
      markCells();
      panels(m);
    };
    boxes.onclick = (ev) => {
      const id = ev.target.dataset && ev.target.dataset.token;
      if (id === undefined) return;
      const same = S.pinned && S.patch === +id;
      S.patch = +id;
      S.pinned = !same;
      markCells();
      panels(m);
      writeHash();
    };
  }

  function markCells() {
    for (const c of $("boxes").children) {
      const on = +c.dataset.token === S.patch;
      c.classList.toggle("sel", on && S.pinned);
      c.classList.toggle("hl", on && !S.pinned);
    }
  }

  function panels(m) {
    const L = LAYERS[S.image + "/" + S.layer] || {};
    const byId = tokenIndex(m);
    const i = S.patch === null ? undefined : byId.get(S.patch);
    if (i === undefined) {
      $("patch-title").textContent = "hover a patch";
      for (const lens of LENSES) $("lens-" + lens).querySelector(".body").innerHTML =
        '<span class="muted">hover a patch</span>';
      $("judge").innerHTML = "";
      document.body.dataset.patch = "";
      return;
    }
    const t = m.tokens[i];
    const g = m.groups[t[1]].name;
    $("patch-title").textContent =
      `patch ${t[0]} · row ${t[2]}, col ${t[3]}${m.groups.length > 1 ? " · " + g : ""} · layer ${S.layer}`;
    document.body.dataset.patch = String(t[0]);
    for (const lens of LENSES) {
      const body = $("lens-" + lens).querySelector(".body");
      const rows = L[lens];
      if (!rows) {
        body.innerHTML = '<span class="muted">not computed at this layer</span>';
        continue;
      }
      body.innerHTML = table(lens, rows[i], L.captions || []);
    }
    judgeBox(m, t[0]);
  }

  function table(lens, cell, captions) {
    if (!cell || !cell.length) return '<span class="muted">nothing</span>';
    let out = "<table>";
    for (const n of cell) {
      if (lens === "latentlens") {
        const [tok, sim, ctx, cap, span] = n;
        out += `<tr class="nb" data-token="${esc(tok)}" data-score="${sim}">` +
          `<td class="tok">${show(tok)}</td><td class="num">${sim.toFixed(3)}</td>` +
          `<td><span class="badge" title="found in bank layer ${ctx}">L${ctx}</span></td>` +
          `<td class="cap">${mark(captions[cap], span)}</td></tr>`;
      } else if (lens === "logitlens") {
        const [tok, logit, prob] = n;
        const p = prob === null ? "" : (100 * prob).toFixed(prob >= 0.001 ? 1 : 3) + "%";
        out += `<tr class="nb" data-token="${esc(tok)}" data-score="${prob === null ? logit : prob}">` +
          `<td class="tok">${show(tok)}</td><td class="num">${p}</td>` +
          `<td class="num muted" title="logit">${logit.toFixed(2)}</td></tr>`;
      } else {
        const [tok, sim] = n;
        out += `<tr class="nb" data-token="${esc(tok)}" data-score="${sim}">` +
          `<td class="tok">${show(tok)}</td><td class="num">${sim.toFixed(3)}</td></tr>`;
      }
    }
    return out + "</table>";
  }

  function judgeBox(m, id) {
    const out = [];
    for (const lens of LENSES) {
      const v = (((m.judge || {})[lens] || {})[S.layer] || {})[id];
      if (!v) continue;
      const verdict = v.failed ? "judge failed" : v.ok ? "interpretable" : "not interpretable";
      const words = (name, list) => list.length ? `<div><b>${name}:</b> ${list.map(esc).join(", ")}</div>` : "";
      out.push(`<div class="verdict ${v.ok ? "ok" : "ko"}" data-lens="${lens}">` +
        `<div class="head">${LABELS[lens]} judge: <b>${verdict}</b></div>` +
        words("candidate words", v.words) + words("concrete", v.concrete) +
        words("abstract", v.abstract) + words("global", v.global) +
        (v.reasoning ? `<div class="muted">${esc(v.reasoning)}</div>` : "") + "</div>");
    }
    $("judge").innerHTML = out.length ? "<h3>Judge</h3>" + out.join("") : "";
  }

  // ── keyboard ─────────────────────────────────────────────────────────────────────
  function onKey(ev) {
    if (ev.target && ["SELECT", "INPUT"].includes(ev.target.tagName) && ev.key.startsWith("Arrow")) return;
    const m = META[S.image];
    if (!m) return;
    const moves = {ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0]};
    if (moves[ev.key]) {
      ev.preventDefault();
      tokenIndex(m);
      let i = S.patch === null ? undefined : m._byId.get(S.patch);
      if (i === undefined || m.tokens[i][1] !== S.group) {
        i = m.tokens.findIndex((t) => t[1] === S.group);
      } else {
        const [dr, dc] = moves[ev.key];
        const t = m.tokens[i];
        const j = m._byCell.get(`${t[1]},${t[2] + dr},${t[3] + dc}`);
        if (j !== undefined) i = j;
      }
      S.patch = m.tokens[i][0];
      S.pinned = true;
      markCells();
      panels(m);
      writeHash();
      return;
    }
    const layers = S.model.layers;
    const li = layers.indexOf(S.layer);
    if (ev.key === "," || ev.key === "PageUp") go({layer: layers[Math.max(0, li - 1)]});
    else if (ev.key === "." || ev.key === "PageDown") go({layer: layers[Math.min(layers.length - 1, li + 1)]});
    else if (ev.key === "[" || ev.key === "]") {
      const n = m.groups.length;
      go({group: (S.group + (ev.key === "]" ? 1 : -1) + n) % n, patch: null});
    } else if (ev.key === "n") step(1);
    else if (ev.key === "p") step(-1);
    else if (ev.key === "Escape") {
      S.pinned = false;
      markCells();
      writeHash();
    } else return;
    ev.preventDefault();
  }
})();
