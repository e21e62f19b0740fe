"""Each context token's activation of the latent whose top context it is (for the shading).

The tokens around a top-activating row sit anywhere in the shuffled store, so their
activations are re-encoded from their stored rows. Rows are read a whole store chunk at a
time (each chunk once), fullest chunks first, up to `MAX_READ_ROWS` rows: on a 1e8-row
store a 65k-latent dictionary's contexts touch nearly every chunk, and reading the whole
store for shading would cost more than the evaluation. Tokens left unread get no value
(NaN), and the caller says how many.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

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
                        max_rows: int = MAX_READ_ROWS) -> np.ndarray:
    """z[source_rows[i], latents[i]] for every pair (NaN where the row is −1 or was not read)."""
    out = np.full(len(source_rows), np.nan, dtype=np.float32)
    valid = np.flatnonzero(source_rows >= 0)
    if len(valid) == 0:
        return out
    rows, lat = source_rows[valid], latents[valid]
    order = np.argsort(rows, kind="stable")
    rows, lat, valid = rows[order], lat[order], valid[order]
    for c in chunks_to_read(store, np.unique(rows), max_rows):
        start = c * store.chunk_rows
        lo, hi = np.searchsorted(rows, [start, start + store.chunk_rows])
        if lo == hi:
            continue
        acts = store.read(hook, start, start + store.chunk_rows)
        for a, b in _batches(rows, lo, hi):  # encode ENCODE_ROWS distinct rows at a time: z is [rows, F]
            wanted, inverse = np.unique(rows[a:b] - start, return_inverse=True)
            z = encode(acts[torch.from_numpy(wanted)].to(device))
            values = z[torch.from_numpy(inverse).to(device), torch.from_numpy(lat[a:b]).to(device)]
            out[valid[a:b]] = values.float().cpu().numpy()
    return out
