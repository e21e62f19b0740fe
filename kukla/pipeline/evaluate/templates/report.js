// kukla report: the latent browser and the Matryoshka tree. Reads the embedded JSON index,
// and decodes a page of per-latent detail (gzip + base64 in a script element) only when one
// of its latents is opened. Nothing here makes a request.
"use strict";
const DATA = JSON.parse(document.getElementById("kukla-data").textContent);
const NAMES = Object.keys(DATA.dictionaries);
const ROWS_PER_PAGE = 50;
const pageCache = new Map();
const $ = (id) => document.getElementById(id);
const state = { dict: 0, list: [], page: 0, open: null };

function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
function piece(id) { return id < 0 ? "" : (DATA.vocab[id] ?? `[${id}]`); }
function shown(id) {  // a token as one visible word: escapes for newlines, ␣ for spaces
  return JSON.stringify(piece(id)).slice(1, -1).replace(/ /g, "␣");
}
function fmt(v, digits = 3) { return v === null || v === undefined ? "n/a" : Number(v).toPrecision(digits); }
function dictData() { return DATA.dictionaries[NAMES[state.dict]]; }

async function detailPage(di, p) {
  const key = `${di}/${p}`;
  if (!pageCache.has(key)) {
    pageCache.set(key, (async () => {
      const text = document.getElementById(`page-${di}-${p}`).textContent.trim();
      const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
      const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
      return JSON.parse(await new Response(stream).text());
    })());
  }
  return pageCache.get(key);
}
async function latentRecord(di, latent) {
  const size = DATA.page_latents;
  return (await detailPage(di, Math.floor(latent / size)))[latent % size];
}

function bestMatch(ix, i) {
  const values = Object.values(ix.best_match).map((m) => m[i]).filter((v) => v !== null);
  return values.length ? Math.max(...values) : null;
}

function filterLatents() {
  const d = dictData(), ix = d.index;
  const q = $("search").value.trim().toLowerCase();
  const level = $("level").value;
  const dmin = $("dmin").value === "" ? -Infinity : Number($("dmin").value);
  const dmax = $("dmax").value === "" ? Infinity : Number($("dmax").value);
  const out = [];
  for (let i = 0; i < d.width; i++) {
    if (level !== "" && ix.level[i] !== Number(level)) continue;
    const dens = ix.density[i] > 0 ? Math.log10(ix.density[i]) : -Infinity;
    if (dens < dmin || dens > dmax) continue;
    if (q) {
      if (/^\d+$/.test(q)) { if (String(i) !== q) continue; }
      else {
        const words = piece(ix.top_token[i]) + "\u0000" + (ix.lens_token ? piece(ix.lens_token[i]) : "");
        if (!words.toLowerCase().includes(q)) continue;
      }
    }
    out.push(i);
  }
  const key = $("sort").value;
  const by = {
    density: (i) => -(ix.density[i] ?? 0), max: (i) => -(ix.max_activation[i] ?? 0),
    match: (i) => bestMatch(ix, i) ?? 2, children: (i) => -ix.children[i],
  }[key];
  if (by) out.sort((a, b) => by(a) - by(b) || a - b);
  state.list = out;
  state.page = 0;
  renderList();
}

function renderList() {
  const d = dictData(), ix = d.index, pages = Math.max(1, Math.ceil(state.list.length / ROWS_PER_PAGE));
  state.page = Math.min(state.page, pages - 1);
  const rows = state.list.slice(state.page * ROWS_PER_PAGE, (state.page + 1) * ROWS_PER_PAGE);
  const hasMatch = Object.keys(ix.best_match).length > 0;
  let html = `<tr><th>latent</th><th>level</th><th>density</th><th>max act</th><th class="t">top token</th>` +
    (hasMatch ? `<th>best match</th>` : "") + (d.matryoshka ? `<th>parent</th>` : "") + `</tr>`;
  for (const i of rows) {
    html += `<tr class="row${state.open === i ? " open" : ""}" data-latent="${i}"><td>${i}</td><td>${ix.level[i]}</td>` +
      `<td>${fmt(ix.density[i])}</td><td>${fmt(ix.max_activation[i])}</td><td class="t">${esc(shown(ix.top_token[i]))}</td>` +
      (hasMatch ? `<td>${fmt(bestMatch(ix, i))}</td>` : "") + (d.matryoshka ? `<td>${ix.parent[i] >= 0 ? ix.parent[i] : ""}</td>` : "") + `</tr>`;
  }
  $("latents").innerHTML = html;
  $("count").textContent = `${state.list.length} of ${d.width} latents of ${NAMES[state.dict]}`;
  $("pageinfo").textContent = `page ${state.page + 1} of ${pages}`;
}

function histogramSvg(hist) {
  if (!hist) return "<p class='hint'>never fired on the eval rows</p>";
  const [first, counts] = hist, edges = DATA.histogram_edges, w = 300, h = 70;
  const peak = Math.max(...counts), bar = w / counts.length;
  const bars = counts.map((c, k) => `<rect x="${k * bar}" y="${h - (h * c) / peak}" width="${bar - 1}" height="${(h * c) / peak}">` +
    `<title>${fmt(edges[first + k])}–${fmt(edges[first + k + 1])}: ${c}</title></rect>`).join("");
  return `<svg class="hist" width="${w}" height="${h + 14}" role="img" aria-label="activation histogram">${bars}` +
    `<text x="0" y="${h + 12}" font-size="10">${fmt(edges[first])}</text>` +
    `<text x="${w}" y="${h + 12}" font-size="10" text-anchor="end">${fmt(edges[first + counts.length])}</text></svg>`;
}

function contextHtml(c) {
  const peak = Math.max(...c.acts.map((a) => (a === null ? 0 : a)), 1e-12);
  const last = c.acts.length - 1;
  const toks = c.ids.map((id, k) => {
    const a = c.acts[k];
    const alpha = a === null ? 0 : Math.max(0, a) / peak;
    const cls = "tok" + (k === last ? " max" : "") + (a === null ? " unread" : "");
    return `<span class="${cls}" style="background: rgba(255,140,0,${alpha.toFixed(3)})" title="${a === null ? "?" : fmt(a, 3)}">${esc(c.text ? c.text[k] : piece(id))}</span>`;
  }).join("");
  return `<div class="context"><span class="ctxval">${fmt(c.acts[last], 3)}</span>${toks}</div>`;
}

function latentLink(di, j, extra = "") {
  return `<span class="lat" data-dict="${di}" data-latent="${j}">${NAMES[di] === NAMES[state.dict] ? "" : esc(NAMES[di]) + " "}#${j}${extra}</span>`;
}

async function openLatent(i) {
  state.open = i;
  renderList();
  const di = state.dict, d = dictData(), ix = d.index;
  const r = await latentRecord(di, i);
  if (state.open !== i || state.dict !== di) return;
  const lensHtml = (side) => r[`lens_${side}`].map(([id, v]) => `<span class="pill" title="${fmt(v, 4)}">${esc(shown(id))}</span>`).join("");
  const matches = Object.entries(r.match).map(([b, [j, corr]]) => `${latentLink(NAMES.indexOf(b), j)} (corr ${fmt(corr)})`).join(" ");
  const parent = ix.parent[i] >= 0 ? `${latentLink(di, ix.parent[i])} fires on ${Math.round(100 * ix.parent_fraction[i])}% of its firings` : "none";
  $("detail").innerHTML =
    `<h3 id="latent-title">${esc(NAMES[di])} · latent ${i}</h3>` +
    `<p>level ${ix.level[i]} · density ${fmt(ix.density[i])} · max activation ${fmt(ix.max_activation[i])}</p>` +
    `<h4>Top-activating contexts</h4><div id="contexts">${r.contexts.length ? r.contexts.map(contextHtml).join("") : "<p class='hint'>no context (it never fired, or the store keeps no tokens)</p>"}</div>` +
    `<h4>Activation histogram (nonzero activations)</h4>${histogramSvg(r.histogram)}` +
    `<h4>Nearest latents by decoder cosine</h4><p>${r.nearest.map(([j, c]) => latentLink(di, j, ` (${fmt(c)})`)).join(" ")}</p>` +
    (r.lens_top ? `<h4>Logit lens</h4><p class="why">${esc(d.lens)}</p><p>up: ${lensHtml("top")}</p><p>down: ${lensHtml("bottom")}</p>` : "") +
    (d.matryoshka ? `<h4>Matryoshka tree</h4><p>parent: ${parent}</p><p>children: ${r.children.map(([j, s]) => latentLink(di, j, ` (${Math.round(100 * s)}%)`)).join(" ") || "none"}</p>` : "") +
    (matches ? `<h4>Best match in other dictionaries (activation correlation)</h4><p>${matches}</p>` : "");
}

function renderTree() {
  const d = dictData(), ix = d.index;
  if (!d.matryoshka) { $("treeview").innerHTML = `<p class="hint">${esc(NAMES[state.dict])} has one level: no tree.</p>`; return; }
  const kids = Array.from({ length: d.width }, () => []);
  ix.parent.forEach((p, j) => { if (p >= 0) kids[p].push(j); });
  const node = (i, depth) => {
    const share = ix.parent[i] >= 0 ? `<span class="share" style="width:${(40 * ix.parent_fraction[i]).toFixed(1)}px" title="P(parent | child)"></span> ${Math.round(100 * ix.parent_fraction[i])}%` : "";
    const children = kids[i].sort((a, b) => ix.parent_fraction[b] - ix.parent_fraction[a]);
    const below = depth < 3 && children.length ? `<ul>${children.slice(0, 12).map((j) => node(j, depth + 1)).join("")}` +
      (children.length > 12 ? `<li class="hint">… ${children.length - 12} more</li>` : "") + `</ul>` : "";
    return `<li><span class="node lat" data-dict="${state.dict}" data-latent="${i}">#${i} L${ix.level[i]} ${esc(shown(ix.top_token[i]))}</span>${share}${below}</li>`;
  };
  const roots = [];
  for (let i = 0; i < d.width; i++) if (kids[i].length && ix.parent[i] < 0) roots.push(i);
  roots.sort((a, b) => kids[b].length - kids[a].length || a - b);
  $("treeview").innerHTML = roots.length
    ? `<p>${esc(NAMES[state.dict])}: ${roots.length} top-most latents with children (the 30 with most children shown, 3 levels deep).</p><ul class="tree">${roots.slice(0, 30).map((i) => node(i, 0)).join("")}</ul>`
    : `<p class="hint">No later-level latent fires mostly inside an earlier-level one.</p>`;
}

function selectDict(di) {
  state.dict = di;
  $("dict").value = String(di);
  const levels = dictData().levels;
  $("level").innerHTML = `<option value="">all</option>` + levels.map((w, k) => `<option value="${k}">${k} (up to ${w})</option>`).join("");
  state.open = null;
  $("detail").innerHTML = `<p class="hint">Open a latent from the list.</p>`;
  filterLatents();
  renderTree();
}

document.addEventListener("click", (ev) => {
  const row = ev.target.closest("tr.row");
  if (row) { openLatent(Number(row.dataset.latent)); return; }
  const link = ev.target.closest(".lat");
  if (link) {
    const di = Number(link.dataset.dict);
    if (di !== state.dict) selectDict(di);
    openLatent(Number(link.dataset.latent));
    $("browser").scrollIntoView();
  }
});
$("dict").addEventListener("change", () => selectDict(Number($("dict").value)));
for (const id of ["search", "level", "dmin", "dmax", "sort"]) $(id).addEventListener("input", filterLatents);
$("prev").addEventListener("click", () => { state.page = Math.max(0, state.page - 1); renderList(); });
$("next").addEventListener("click", () => { state.page += 1; renderList(); });
// A link to one latent: report.html#latent=<dictionary index>:<latent>.
async function openFromHash() {
  const m = /^#latent=(\d+):(\d+)$/.exec(location.hash);
  if (!m) return;
  const di = Number(m[1]), latent = Number(m[2]);
  if (di >= NAMES.length || latent >= DATA.dictionaries[NAMES[di]].width) return;  // a link made for another report
  selectDict(di);
  await openLatent(latent);
  $("browser").scrollIntoView();
}
window.addEventListener("hashchange", openFromHash);
selectDict(0);
openFromHash().then(() => { document.body.dataset.ready = "1"; });
