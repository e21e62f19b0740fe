"""The latent browser's data: a small index of every latent, and per-latent detail in pages.

The index (level, density, max activation, top token, tree parent, best match) is what the
page searches and filters, so it is plain JSON of a few numbers per latent. The detail
(contexts with per-token activations, histogram, nearest latents, logit lens, children,
matches) is cut into pages of `PAGE_LATENTS` latents, each gzip-compressed and base64'd into
its own script element: the browser decodes a page only when one of its latents is opened,
so a 65k-latent report opens as fast as its index parses.
"""

from __future__ import annotations

import base64
import gzip
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kukla.pipeline.evaluate.contexts import RowContexts
from kukla.pipeline.evaluate.geometry import nearest_latents
from kukla.pipeline.evaluate.latents import HISTOGRAM_EDGES, ActivationHistogram, latent_levels
from kukla.pipeline.evaluate.lens import lens_path, logit_lens
from kukla.pipeline.evaluate.matching import max_correlation, mean_max_correlation
from kukla.pipeline.evaluate.shading import MAX_READ_ROWS, context_activations
from kukla.pipeline.evaluate.tree import CoFiring
from kukla.storage import Store

PAGE_LATENTS = 256
NEAREST = 8
LENS_TOKENS = 8
CHILDREN = 12
MATCH_ROWS = 4096
"""Held-out rows the cross-dictionary correlations are computed on."""


class BrowserStats:
    """What the browser needs from the eval stream beyond the metrics: histograms and co-firing."""

    def __init__(self, width: int, levels: list[int]) -> None:
        self.histogram = ActivationHistogram(width)
        self.cofiring = CoFiring(levels)

    def update(self, z: Tensor) -> None:
        self.histogram.update(z)
        self.cofiring.update(z)


@dataclass
class BrowserInput:
    """One dictionary as the browser sees it (what evaluate's Entry holds, minus the metrics)."""

    name: str
    dictionary: Any
    input_hook: str
    target_hook: str
    stats: BrowserStats
    top_rows: list[list[int]]
    columns: dict[str, Tensor]
    extra: dict[str, Any] = field(default_factory=dict)


def _round(values: Any, digits: int = 4) -> list[Any]:
    return [None if not np.isfinite(v) else float(f"{v:.{digits}g}") for v in np.asarray(values, dtype=np.float64)]


def _encode_page(records: list[dict[str, Any]]) -> str:
    raw = json.dumps(records, separators=(",", ":")).encode()
    return base64.b64encode(gzip.compress(raw, compresslevel=6, mtime=0)).decode("ascii")


def _matches(inputs: list[BrowserInput], store: Store, scored: range, device: str) -> None:
    """Fill extra['match'] (per latent) and extra['matching'] (summary) for each pair of one hook,
    on the first scored rows (not the calibration split, which tuned the thresholds)."""
    start, n = scored.start, min(MATCH_ROWS, len(scored))
    groups: dict[tuple[str, str], list[BrowserInput]] = {}
    for item in inputs:
        groups.setdefault((item.input_hook, item.target_hook), []).append(item)
    for (hook, _), members in groups.items():
        if len(members) < 2:
            continue
        x = store.read(hook, start, start + n).to(device)
        codes = {m.name: torch.cat([m.dictionary.encode(b) for b in x.split(1024)]).float() for m in members}
        for a in members:
            for b in members:
                if a is b:
                    continue
                best, index = max_correlation(codes[a.name], codes[b.name])
                a.extra.setdefault("match", {})[b.name] = (best, index)
                a.extra.setdefault("matching", {})[b.name] = {"mean_max_correlation": mean_max_correlation(best),
                                                              "rows": n}


def _shaded_contexts(item: BrowserInput, store: Store, contexts: RowContexts, device: str) -> list[list[dict[str, Any]]]:
    """Per latent, its top contexts: token ids and this latent's activation at each token."""
    row_at = {r: i for i, r in enumerate(contexts.rows.tolist())}
    pairs = [(f, row_at[r]) for f, rows in enumerate(item.top_rows) for r in rows]
    if not pairs:
        return [[] for _ in item.top_rows]
    latent, at = (np.asarray(v, dtype=np.int64) for v in zip(*pairs))
    width = contexts.source_rows.shape[1]
    sources = contexts.source_rows[at].reshape(-1)
    acts = context_activations(store, item.input_hook, item.dictionary.encode, sources, np.repeat(latent, width),
                               device).reshape(len(pairs), width)
    unread = int(np.isnan(acts[contexts.source_rows[at] >= 0]).sum())  # tokens with a row left unread
    if unread:
        item.extra["unshaded_tokens"] = unread
    out: list[list[dict[str, Any]]] = [[] for _ in item.top_rows]
    for (f, i), values in zip(pairs, acts):
        ids = contexts.token_ids[i]
        keep = ids >= 0
        out[f].append({"row": int(contexts.rows[i]), "ids": ids[keep].tolist(), "acts": _round(values[keep], 3)})
    return out


def build(inputs: list[BrowserInput], store: Store, contexts: RowContexts | None, tokenizer: Any | None,
          w_u: Tensor | None, scored: range, device: str) -> tuple[dict[str, Any], list[str]]:
    """The browser payload for every dictionary, and notes on what it lacks."""
    notes: list[str] = []
    _matches(inputs, store, scored, device)
    used: set[int] = set()
    out: dict[str, Any] = {}
    for item in inputs:
        data, ids = _dictionary_payload(item, store, contexts, w_u, device, notes)
        used |= ids
        out[item.name] = data
    vocab = {i: (tokenizer.decode([i]) if tokenizer is not None else f"[{i}]") for i in sorted(used)}
    return {"page_latents": PAGE_LATENTS, "histogram_edges": _round(HISTOGRAM_EDGES.numpy(), 3),
            "vocab": vocab, "dictionaries": out}, notes


def _dictionary_payload(item: BrowserInput, store: Store, contexts: RowContexts | None, w_u: Tensor | None,
                        device: str, notes: list[str]) -> tuple[dict[str, Any], set[int]]:
    d = item.dictionary
    width, levels = d.width, list(d.levels)
    w_dec = d.W_dec.detach()
    near_cos, near_idx = nearest_latents(w_dec, NEAREST)
    parent, fraction = item.stats.cofiring.tree()
    shaded = _shaded_contexts(item, store, contexts, device) if contexts is not None else [[] for _ in range(width)]
    path = lens_path(item.target_hook, d.d_out, w_u.shape[0]) if w_u is not None else None
    lens = logit_lens(w_dec, w_u, LENS_TOKENS) if path is not None and w_u is not None else None
    if item.extra.get("unshaded_tokens"):
        notes.append(f"{item.name}: {item.extra['unshaded_tokens']} context tokens are not shaded (their rows "
                     f"lie beyond the {MAX_READ_ROWS}-row read budget); their activation shows as '?'")
    if w_u is None:
        notes.append(f"{item.name}: no logit lens (no model loaded; run without --no-downstream for it)")
    elif path is None:
        notes.append(f"{item.name}: no logit lens ({item.target_hook} is not in the residual stream's basis)")
    children: list[list[tuple[int, float]]] = [[] for _ in range(width)]
    for j in np.flatnonzero(parent.numpy() >= 0).tolist():
        children[int(parent[j])].append((j, float(fraction[j])))
    used: set[int] = set()
    top_token = []
    records = []
    hist = item.stats.histogram.counts.numpy()
    for f in range(width):
        ctx_f = shaded[f]
        for c in ctx_f:
            used.update(c["ids"])
        top_token.append(ctx_f[0]["ids"][-1] if ctx_f else -1)
        nz = np.flatnonzero(hist[f])
        record: dict[str, Any] = {
            "contexts": ctx_f,
            "histogram": [int(nz[0]), hist[f, nz[0]:nz[-1] + 1].tolist()] if len(nz) else None,
            "nearest": [[int(j), c] for j, c in zip(near_idx[f].tolist(), _round(near_cos[f].numpy(), 3)) if j >= 0],
            "children": [[j, round(s, 3)] for j, s in sorted(children[f], key=lambda t: -t[1])[:CHILDREN]],
            "match": {b: [int(index[f]), _round([best[f]], 3)[0]] for b, (best, index) in item.extra.get("match", {}).items()},
        }
        if lens is not None:
            for side in ("top", "bottom"):
                ids = lens[f"{side}_ids"][f].tolist()
                used.update(ids)
                record[f"lens_{side}"] = [[i, v] for i, v in zip(ids, _round(lens[f"{side}_values"][f].numpy(), 3))]
        records.append(record)
    index: dict[str, Any] = {
        "level": latent_levels(width, levels).tolist(),
        "density": _round(item.columns["density"].numpy()),
        "max_activation": _round(item.columns["max_activation"].numpy()),
        "top_token": top_token,
        "lens_token": lens["top_ids"][:, 0].tolist() if lens is not None else None,
        "parent": parent.tolist(),
        "parent_fraction": _round(fraction.numpy(), 3),
        "children": [len(c) for c in children],
        "best_match": {b: _round(best.numpy(), 3) for b, (best, _) in item.extra.get("match", {}).items()},
    }
    pages = [_encode_page(records[s:s + PAGE_LATENTS]) for s in range(0, width, PAGE_LATENTS)]
    return {"width": width, "levels": levels, "matryoshka": len(levels) > 1, "lens": path,
            "hook": item.target_hook, "index": index, "pages": pages}, used
