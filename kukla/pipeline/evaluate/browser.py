"""The latent browser's data: a small index of every latent, and per-latent detail in pages.

The index (level, density, max activation, top token, tree parent, best match) is what the
page searches and filters, so it is plain JSON of a few numbers per latent. The detail
(contexts with per-token activations, histogram, nearest latents, logit lens, children,
matches) is cut into pages of `PAGE_LATENTS` latents, each gzip-compressed and base64'd into
its own script element: the browser decodes a page only when one of its latents is opened,
so a 65k-latent report opens as fast as its index parses.

Shading: each context token's activation of the latent whose top context it is. The tokens around a top-activating row sit anywhere in the shuffled store, so their
activations are re-encoded from their stored rows. Rows are read a whole store chunk at a
time (each chunk once), fullest chunks first, up to `MAX_READ_ROWS` rows: on a 1e8-row
store a 65k-latent dictionary's contexts touch nearly every chunk, and reading the whole
store for shading would cost more than the evaluation. Tokens left unread get no value
(NaN), and the caller says how many.

Logit lens: which tokens a latent's output pushes up or down. A direction d in the residual stream changes the logits by d · W_U (no final LayerNorm: the
lens reads the direction, not one token's scale). SAEs on the residual stream are read this
way directly; a transcoder (or SAE) whose target writes into the residual stream
(`hook_mlp_out`, `hook_attn_out`) is read through that direct path. Other hooks are not in
the residual basis, so they get no lens.
"""

from __future__ import annotations

import base64
import gzip
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from kukla.pipeline.evaluate.contexts import RowContexts, TokenText
from kukla.pipeline.evaluate.latents import (HISTOGRAM_EDGES, ActivationHistogram, CoFiring, latent_levels,
                                             max_correlation, mean_max_correlation, nearest_latents)
from kukla.progress import progress
from kukla.storage import Store


MAX_READ_ROWS = 1 << 22
ENCODE_ROWS = 1024


def _batches(rows: np.ndarray, lo: int, hi: int, size: int = ENCODE_ROWS) -> list[tuple[int, int]]:
    """Split the sorted rows[lo:hi] into spans of at most `size` distinct rows."""
    starts = lo + np.flatnonzero(np.r_[True, rows[lo + 1:hi] != rows[lo:hi - 1]])  # first pair of each row
    bounds = [*starts[::size].tolist(), hi]
    return list(zip(bounds[:-1], bounds[1:]))


def chunks_to_read(store: Store, rows: np.ndarray, max_rows: int = MAX_READ_ROWS) -> list[int]:
    """Store chunks holding `rows`, fullest first, within the budget of rows read (sorted)."""
    chunk = rows // store.chunk_rows
    ids, counts = np.unique(chunk, return_counts=True)
    chosen, budget = [], max_rows
    for c in ids[np.argsort(-counts, kind="stable")].tolist():
        size = min(store.chunk_rows, store.n_rows - c * store.chunk_rows)
        if size > budget:
            break
        chosen.append(c)
        budget -= size
    return sorted(chosen)


@torch.no_grad()
def context_activations(store: Store, hook: str, encode: Callable[[torch.Tensor], torch.Tensor],
                        source_rows: np.ndarray, latents: np.ndarray, device: str,
                        max_rows: int = MAX_READ_ROWS, desc: str = "context shading") -> np.ndarray:
    """z[source_rows[i], latents[i]] for every pair (NaN where the row is −1 or was not read); the
    bar `desc` counts the rows read (up to `max_rows`, each encoded: d·F multiply-adds a row)."""
    out = np.full(len(source_rows), np.nan, dtype=np.float32)
    valid = np.flatnonzero(source_rows >= 0)
    if len(valid) == 0:
        return out
    rows, lat = source_rows[valid], latents[valid]
    order = np.argsort(rows, kind="stable")
    rows, lat, valid = rows[order], lat[order], valid[order]
    chunks = chunks_to_read(store, np.unique(rows), max_rows)
    sizes = [min(store.chunk_rows, store.n_rows - c * store.chunk_rows) for c in chunks]
    with progress(sum(sizes), desc) as bar:
        for c, size in zip(chunks, sizes):
            start = c * store.chunk_rows
            lo, hi = np.searchsorted(rows, [start, start + store.chunk_rows])
            if lo < hi:
                _shade_chunk(store, hook, encode, rows, lat, valid, out, start, lo, hi, device)
            bar.update(size)
    return out


def _shade_chunk(store: Store, hook: str, encode: Callable[[torch.Tensor], torch.Tensor], rows: np.ndarray,
                 lat: np.ndarray, valid: np.ndarray, out: np.ndarray, start: int, lo: int, hi: int, device: str) -> None:
    """out[valid[i]] = z[rows[i], lat[i]] for the pairs lo..hi, whose rows lie in the chunk at `start`."""
    acts = store.read(hook, start, start + store.chunk_rows)
    for a, b in _batches(rows, lo, hi):  # encode ENCODE_ROWS distinct rows at a time: z is [rows, F]
        wanted, inverse = np.unique(rows[a:b] - start, return_inverse=True)
        z = encode(acts[torch.from_numpy(wanted)].to(device))
        values = z[torch.from_numpy(inverse).to(device), torch.from_numpy(lat[a:b]).to(device)]
        out[valid[a:b]] = values.float().cpu().numpy()


RESIDUAL_SPACE = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")
WRITES_TO_RESIDUAL = ("hook_mlp_out", "hook_attn_out")


def lens_path(hook: str, width: int, d_model: int) -> str | None:
    """How a decoder writing to `hook` reaches the logits, in words; None when it does not directly."""
    if width != d_model:
        return None
    if hook.endswith(RESIDUAL_SPACE):
        return f"logit lens: decoder direction (at {hook}) · W_U, no final LayerNorm"
    if hook.endswith(WRITES_TO_RESIDUAL):
        return f"direct path: decoder direction (written to {hook}, added to the residual stream) · W_U"
    return None


@torch.no_grad()
def logit_lens(w_dec: Tensor, w_u: Tensor, k: int, chunk_elements: int = 1 << 26,
               desc: str = "logit lens") -> dict[str, Tensor]:
    """Top and bottom `k` tokens of each decoder row through the unembedding W_U [d, vocab]:
    ids and logit changes, [F, k] each, largest (resp. smallest) first. F·d·vocab multiply-adds,
    within 1.1× the bare matmul (`benchmarks/logit_lens.py`, 2 CPU cores: 4.2 ms a latent at
    Gemma-3-270m's shape, 10.5 ms at Gemma-2-2B's, 11 min at 65k latents; a GPU: seconds). A bar `desc`."""
    w_u = w_u.detach().float()
    w_dec = w_dec.detach().float().to(w_u.device)
    k = min(k, w_u.shape[1])
    rows = max(1, chunk_elements // w_u.shape[1])
    parts: dict[str, list[Tensor]] = {"top_ids": [], "top_values": [], "bottom_ids": [], "bottom_values": []}
    with progress(w_dec.shape[0], desc, unit="latent") as bar:
        for start in range(0, w_dec.shape[0], rows):
            logits = w_dec[start:start + rows] @ w_u
            for side, largest in (("top", True), ("bottom", False)):
                best = logits.topk(k, dim=1, largest=largest)
                parts[f"{side}_ids"].append(best.indices.cpu())
                parts[f"{side}_values"].append(best.values.cpu())
            bar.update(min(rows, w_dec.shape[0] - start))
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


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
    nearest: tuple[Tensor, Tensor]
    """Nearest latents by decoder cosine ([F, NEAREST] values, indices), as evaluate computed them."""
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
                best, index = max_correlation(codes[a.name], codes[b.name], desc=f"matching ({a.name} → {b.name})")
                a.extra.setdefault("match", {})[b.name] = (best, index)
                a.extra.setdefault("matching", {})[b.name] = {"mean_max_correlation": mean_max_correlation(best),
                                                              "rows": n}


def _shaded_contexts(item: BrowserInput, store: Store, contexts: RowContexts, text: TokenText,
                     device: str) -> list[list[dict[str, Any]]]:
    """Per latent, its top contexts: token ids, this latent's activation at each token and, where a
    character spans tokens, each token's share of the text (`TokenText.pieces`)."""
    row_at = {r: i for i, r in enumerate(contexts.rows.tolist())}
    pairs = [(f, row_at[r]) for f, rows in enumerate(item.top_rows) for r in rows]
    if not pairs:
        return [[] for _ in item.top_rows]
    latent, at = (np.asarray(v, dtype=np.int64) for v in zip(*pairs))
    width = contexts.source_rows.shape[1]
    sources = contexts.source_rows[at].reshape(-1)
    acts = context_activations(store, item.input_hook, item.dictionary.encode, sources, np.repeat(latent, width),
                               device, desc=f"context shading ({item.name})").reshape(len(pairs), width)
    unread = int(np.isnan(acts[contexts.source_rows[at] >= 0]).sum())  # tokens with a row left unread
    if unread:
        item.extra["unshaded_tokens"] = unread
    out: list[list[dict[str, Any]]] = [[] for _ in item.top_rows]
    for (f, i), values in zip(pairs, acts):
        ids = contexts.token_ids[i]
        keep = ids >= 0
        record = {"row": int(contexts.rows[i]), "ids": ids[keep].tolist(), "acts": _round(values[keep], 3)}
        if (pieces := text.pieces(record["ids"])) is not None:
            record["text"] = pieces
        out[f].append(record)
    return out


def build(inputs: list[BrowserInput], store: Store, contexts: RowContexts | None, text: TokenText,
          w_u: Tensor | None, scored: range, device: str) -> tuple[dict[str, Any], list[str]]:
    """The browser payload for every dictionary, and notes on what it lacks."""
    notes: list[str] = []
    _matches(inputs, store, scored, device)
    used: set[int] = set()
    out: dict[str, Any] = {}
    for item in inputs:
        data, ids = _dictionary_payload(item, store, contexts, text, w_u, device, notes)
        used |= ids
        out[item.name] = data
    vocab = {i: text.alone(i) for i in sorted(used)}
    return {"page_latents": PAGE_LATENTS, "histogram_edges": _round(HISTOGRAM_EDGES.numpy(), 3),
            "vocab": vocab, "dictionaries": out}, notes


def _dictionary_payload(item: BrowserInput, store: Store, contexts: RowContexts | None, text: TokenText,
                        w_u: Tensor | None, device: str, notes: list[str]) -> tuple[dict[str, Any], set[int]]:
    d = item.dictionary
    width, levels = d.width, list(d.levels)
    w_dec = d.output_directions.detach()  # raw units: the lens gives the logit change per unit of activation
    near_cos, near_idx = item.nearest
    parent, fraction = item.stats.cofiring.tree()
    shaded = (_shaded_contexts(item, store, contexts, text, device) if contexts is not None
              else [[] for _ in range(width)])
    path = lens_path(item.target_hook, d.d_out, w_u.shape[0]) if w_u is not None else None
    lens = (logit_lens(w_dec, w_u, LENS_TOKENS, desc=f"logit lens ({item.name})")
            if path is not None and w_u is not None else None)
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
    top_token = [ctx_f[0]["ids"][-1] if ctx_f else -1 for ctx_f in shaded]
    hist = item.stats.histogram.counts.numpy()
    match = item.extra.get("match", {})
    pages = []
    with progress(width, f"browser pages ({item.name})", unit="latent") as bar:  # 65k latents: about a minute
        for first in range(0, width, PAGE_LATENTS):
            page = range(first, min(first + PAGE_LATENTS, width))
            pages.append(_encode_page([_latent_record(f, shaded[f], hist[f], (near_cos[f], near_idx[f]), children[f],
                                                      match, lens, used) for f in page]))
            bar.update(len(page))
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
    return {"width": width, "levels": levels, "matryoshka": len(levels) > 1, "lens": path,
            "hook": item.target_hook, "index": index, "pages": pages}, used


def _latent_record(f: int, contexts: list[dict[str, Any]], hist: np.ndarray, near: tuple[Tensor, Tensor],
                   children: list[tuple[int, float]], match: dict[str, tuple[Tensor, Tensor]],
                   lens: dict[str, Tensor] | None, used: set[int]) -> dict[str, Any]:
    """Latent f's detail on its browser page; the token ids it shows join `used`."""
    for c in contexts:
        used.update(c["ids"])
    nz = np.flatnonzero(hist)
    near_cos, near_idx = near
    record: dict[str, Any] = {
        "contexts": contexts,
        "histogram": [int(nz[0]), hist[nz[0]:nz[-1] + 1].tolist()] if len(nz) else None,
        "nearest": [[int(j), c] for j, c in zip(near_idx.tolist(), _round(near_cos.numpy(), 3)) if j >= 0],
        "children": [[j, round(s, 3)] for j, s in sorted(children, key=lambda t: -t[1])[:CHILDREN]],
        "match": {b: [int(index[f]), _round([best[f]], 3)[0]] for b, (best, index) in match.items()},
    }
    if lens is not None:
        for side in ("top", "bottom"):
            ids = lens[f"{side}_ids"][f].tolist()
            used.update(ids)
            record[f"lens_{side}"] = [[i, v] for i, v in zip(ids, _round(lens[f"{side}_values"][f].numpy(), 3))]
    return record
