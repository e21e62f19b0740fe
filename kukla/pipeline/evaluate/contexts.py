"""Token contexts: the text around a store row, and whole windows for the downstream metrics.

A store with windows (`windows/token_id`, `windows/row`: every harvest since they exist, and
imports given token ids) answers both from itself: a row's window is its `tokens/sequence`,
its context the window's ids before its `tokens/position`, and the row of each context token
`windows/row` at the same place. Older stores have rows only, shuffled, so the tokens before
a row live anywhere in the store: one chunked scan of `tokens/sequence` and `tokens/position`
collects them for all requested rows at once (memory: the requested rows × context length).

Downstream metrics need whole windows. They are re-made from the store's dataset spec exactly
as the harvest made them (`kukla.pipeline.text`: same tokenizer, packing, BOS policy), taking
the windows *after* the harvested ones, so the model is scored on text no dictionary trained
on; without the dataset, the store's own windows serve (harvested text, said in a note).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kukla.errors import KuklaError
from kukla.progress import progress
from kukla.storage import Store

logger = logging.getLogger(__name__)

SCAN_ROWS = 1 << 20
POSITION_SPAN = 1 << 24
"""Positions in a window stay below this (keys are sequence · span + position)."""


def has_token_ids(store: Store) -> bool:
    """Whether the store's rows come from text (toy and imported rows carry −1)."""
    if store.n_windows:
        return True
    if store.n_rows == 0 or "tokens/token_id" not in store.specs:
        return False
    return bool((store.read("tokens/token_id", store.n_rows - 1, store.n_rows) >= 0).all())


@dataclass
class RowContexts:
    """The windows around requested rows: token ids and the store row of each position."""

    rows: np.ndarray
    """The requested rows, sorted and unique ([R])."""
    token_ids: np.ndarray
    """[R, context + 1]: ids from `context` tokens before each row up to the row itself (−1: not in the store)."""
    source_rows: np.ndarray
    """[R, context + 1]: the store row holding each of those tokens (−1 where none does)."""

    def ids(self) -> dict[int, list[int]]:
        return {row: self.token_ids[i].tolist() for i, row in enumerate(self.rows.tolist())}


def row_contexts(store: Store, rows: list[int], context_tokens: int) -> RowContexts:
    """For each row, its window from `context_tokens` before it up to itself: from the store's
    windows where it has them, else from one scan of the store."""
    wanted = np.unique(np.asarray(rows, dtype=np.int64))
    seq = store.read_rows("tokens/sequence", wanted).numpy().astype(np.int64)
    pos = store.read_rows("tokens/position", wanted).numpy().astype(np.int64)
    offsets = np.arange(-context_tokens, 1)
    if store.n_windows:
        return _window_contexts(store, wanted, seq, pos[:, None] + offsets)
    span = POSITION_SPAN
    keys = seq[:, None] * span + (pos[:, None] + offsets)  # [rows, context + 1] (seq, position) keys
    needed = np.unique(keys)
    tokens = np.full(len(needed), -1, dtype=np.int64)
    sources = np.full(len(needed), -1, dtype=np.int64)
    with progress(store.n_rows, "contexts (token scan)") as bar:
        for start in range(0, store.n_rows, SCAN_ROWS):
            stop = min(start + SCAN_ROWS, store.n_rows)
            chunk_keys = (store.read("tokens/sequence", start, stop).numpy().astype(np.int64) * span
                          + store.read("tokens/position", start, stop).numpy())
            hit = np.isin(chunk_keys, needed)
            if hit.any():
                at = np.searchsorted(needed, chunk_keys[hit])
                tokens[at] = store.read("tokens/token_id", start, stop).numpy()[hit]
                sources[at] = start + np.flatnonzero(hit)
            bar.update(stop - start)
    at = np.searchsorted(needed, keys)
    outside = (pos[:, None] + offsets) < 0
    found, source = tokens[at], sources[at]
    found[outside], source[outside] = -1, -1
    return RowContexts(wanted, found, source)


def _window_contexts(store: Store, rows: np.ndarray, seq: np.ndarray, positions: np.ndarray) -> RowContexts:
    """Contexts looked up in windows/token_id and windows/row (−1 before a window's start)."""
    outside = positions < 0
    at = np.where(outside, 0, positions)
    tokens, sources = (np.take_along_axis(store.read_rows(name, seq).numpy(), at,
                                          axis=1).astype(np.int64) for name in ("windows/token_id", "windows/row"))
    tokens[outside], sources[outside] = -1, -1
    return RowContexts(rows, tokens, sources)


def stored_windows(store: Store, n_windows: int) -> torch.Tensor:
    """The store's first `n_windows` windows whose every position holds a token (harvested text)."""
    if not store.n_windows:
        return torch.empty(0, 0, dtype=torch.long)
    ids = store.read("windows/token_id", 0, min(store.n_windows, 4 * n_windows)).long()
    return ids[(ids >= 0).all(dim=1)][:n_windows]


def load_tokenizer(store: Store, model: str | None = None) -> tuple[Any | None, str | None]:
    """The tokenizer of the store's model (or of `model`) without the model: (tokenizer, None),
    or (None, why not). Reads a local folder, the converted embedded Gemma, or the HF cache."""
    from transformers import AutoTokenizer

    from kukla.pipeline.models import EMBEDDED_MODEL, convert_embedded_gemma

    summary = store.meta.get("model") or {}
    summary = summary if isinstance(summary, dict) else {"name": summary}  # a store may name its model only
    names = [n for n in (model, store.where.get("model"), summary.get("name"), summary.get("tokenizer_name")) if n]
    if not names:
        return None, f"store {store.url} names no model, so its token ids cannot be decoded"
    problems = []
    logger.info("loading the tokenizer of %s to show the contexts as text", names[0])  # Gemma's 262k tokens: ~5 s
    for name in dict.fromkeys(names):
        try:
            if str(name).lower() in (EMBEDDED_MODEL, EMBEDDED_MODEL.split("/")[1]):
                return AutoTokenizer.from_pretrained(convert_embedded_gemma()), None
            return AutoTokenizer.from_pretrained(str(name)), None
        except Exception as exc:  # noqa: BLE001 - any failure leaves token ids, with a note
            problems.append(f"{name}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
    return None, "no tokenizer for the contexts (shown as token ids): " + "; ".join(problems)


REPLACEMENT = "\ufffd"
"""What a byte token decodes to alone: a piece of a character (U+FFFD, the replacement character)."""


class TokenText:
    """What tokens read as. Most decode alone; byte-level and byte-fallback tokenizers (GPT-2,
    Llama) split a character outside their vocabulary (emoji, CJK, accents) into byte tokens that
    alone decode to U+FFFD. In a context such a character goes whole to the token that completes
    it, the others show nothing; alone (a top token, the logit lens) a byte token shows its name."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self._alone: dict[int, str] = {}
        self._split: set[int] = set()

    def alone(self, token_id: int) -> str:
        """The token's own text; its name (`<0xF0>`) for a piece of a character; `[id]` without a tokenizer."""
        if token_id not in self._alone:
            text = f"[{token_id}]" if self.tokenizer is None else self.tokenizer.decode([token_id])
            if REPLACEMENT in text:
                self._split.add(token_id)
                text = self.tokenizer.convert_ids_to_tokens(token_id)
            self._alone[token_id] = text
        return self._alone[token_id]

    def pieces(self, ids: list[int]) -> list[str] | None:
        """Each token's share of the text of `ids`, or None when every token reads as it does alone.

        Each prefix is decoded whole; a token's share is what its prefix adds to the last whole
        text. A prefix ending inside a character decodes to U+FFFD (byte-fallback decoders turn
        the whole run of bytes into U+FFFD), so its token waits, showing nothing, for the one that
        completes the character. Tokens still waiting at the end (a character the context cuts
        off) show their own text, their names for byte tokens."""
        for token_id in ids:
            self.alone(token_id)
        if self.tokenizer is None or self._split.isdisjoint(ids):
            return None
        pieces: list[str] = []
        done, waiting = "", []
        for k, text in enumerate(self.tokenizer.batch_decode([ids[:k + 1] for k in range(len(ids))])):
            whole = text.startswith(done) and REPLACEMENT not in text[len(done):]
            pieces.append(text[len(done):] if whole else "")
            done = text if whole else done
            waiting = [] if whole else [*waiting, k]
        for k in waiting:
            pieces[k] = self.alone(ids[k])
        return pieces


def render_context(ids: list[int], text: TokenText) -> str:
    """The context as text with the active (last) token in «»; token ids when there is no tokenizer."""
    *before, last = ids
    before = [t for t in before if t >= 0]
    if text.tokenizer is None:
        return " ".join(map(str, before)) + f" «{last}»"
    pieces = text.pieces([*before, last])
    if pieces is None:
        return text.tokenizer.decode(before) + "«" + text.alone(last) + "»"
    return "".join(pieces[:-1]) + "«" + pieces[-1] + "»"


def render_contexts(contexts: RowContexts, text: TokenText) -> dict[int, str]:
    """Every row's context as text (`render_context`); two decodes a row, so 65k latents' top 8
    rows take ~10 s: a bar counts them, 4096 at a time."""
    texts: dict[int, str] = {}
    with progress(len(contexts.rows), "contexts (decoding)", unit="context") as bar:
        for row, tokens in contexts.ids().items():
            texts[row] = render_context(tokens, text)
            if len(texts) % 4096 == 0 or len(texts) == len(contexts.rows):
                bar.update(len(texts) - bar.n)
    return texts


def fresh_windows(store: Store, tokenizer: Any, n_windows: int) -> tuple[torch.Tensor, bool]:
    """`n_windows` full windows of the store's dataset, re-tokenized as the harvest did; the
    second value says whether they all come after the harvested text (unseen by training).
    Finding where the harvested text ends tokenizes all of it again (the bar counts its tokens)."""
    from kukla.pipeline.text import iter_texts, iter_windows

    meta = store.meta
    if not isinstance(meta.get("dataset"), dict) or store.context_size is None:
        raise KuklaError(f"store {store.url} records no dataset to re-read")
    spec = meta["dataset"]
    keep_special = bool(meta.get("harvest", {}).get("keep_special_tokens", False))
    texts = iter_texts(store.where.get("dataset", spec["name"]), spec.get("subset"), spec.get("split", "train"),
                       spec.get("revision"), spec.get("text_column", "text"))
    harvested = int(meta.get("planned_tokens", 0))
    kept = 0
    seen: list[np.ndarray] = []
    unseen: list[np.ndarray] = []
    pad = meta.get("special_tokens", {}).get("pad_token_id")
    with progress(harvested + n_windows * store.context_size, "downstream windows (tokenizing)") as bar:
        for window in iter_windows(texts, tokenizer, store.context_size, keep_special_tokens=keep_special):
            full = not (pad is not None and window.tokens[-1] == pad and not window.keep[-1] and window.tokens[-2] == pad)
            if kept >= harvested:
                if full:
                    unseen.append(window.tokens)
                if len(unseen) >= n_windows:
                    break
            elif full and len(seen) < n_windows:
                seen.append(window.tokens)
            kept += int(window.keep.sum())
            if window.index % 64 == 0:  # a bar update per 64 windows: tokenizing them costs far more
                bar.update(min(kept, harvested) + len(unseen) * store.context_size - bar.n)
        bar.update(min(kept, harvested) + len(unseen) * store.context_size - bar.n)
    chosen = (unseen + seen)[:n_windows]
    return torch.from_numpy(np.stack(chosen)) if chosen else torch.empty(0, 0, dtype=torch.long), len(unseen) >= n_windows
