"""One segment through the model: every hook from one forward pass, rows aligned across hooks.

Outliers: a token is dropped from *every* hook when its norm at *any* hook exceeds
`outlier_factor` × that hook's median norm over the segment's kept tokens. Dropping it
everywhere keeps rows aligned (a transcoder's input and target lose the same token), and
a per-segment median is fixed by the plan, so resumed and multi-rank runs drop the same
tokens.
"""

from __future__ import annotations

import numpy as np
import torch
from transformer_lens import HookedTransformer

from kukla.pipeline.harvest.plan import Segment
from kukla.pipeline.hooks import stop_at_layer


def outlier_mask(norms: dict[str, np.ndarray], factor: float) -> np.ndarray:
    """True where a token's norm at any hook is above `factor` × that hook's median norm."""
    drop = np.zeros(len(next(iter(norms.values()))), dtype=bool)
    for values in norms.values():
        if len(values):
            drop |= values > factor * np.median(values)
    return drop


def harvest_segment(model: HookedTransformer, hooks: list[str], segment: Segment, *,
                    batch_size: int, outlier_factor: float | None) -> dict[str, np.ndarray]:
    """The segment's rows for `StoreWriter.write_segment`: its windows through `model`,
    stopping after the last needed block, outliers dropped (their count is planned − written)."""
    stop = stop_at_layer(hooks, model.cfg.n_layers)
    parts: dict[str, list[np.ndarray]] = {h: [] for h in hooks}
    for start in range(0, len(segment.windows), batch_size):
        windows = segment.windows[start:start + batch_size]
        tokens = torch.from_numpy(np.stack([w.tokens for w in windows])).to(model.cfg.device)
        # kept positions as indices (from the CPU masks): boolean indexing on the device
        # would sync once per hook to count them
        keep = torch.from_numpy(np.flatnonzero(np.concatenate([w.keep for w in windows]))).to(model.cfg.device)
        with torch.inference_mode():
            _, cache = model.run_with_cache(tokens, names_filter=hooks, stop_at_layer=stop)
            # all hooks side by side, so the batch crosses to the host in one copy, not one per hook
            flat = [cache.cache_dict[h].flatten(0, 1).flatten(1) for h in hooks]
            acts = torch.cat(flat, dim=1).index_select(0, keep).float().cpu().numpy()
        for hook, act in zip(hooks, np.split(acts, np.cumsum([f.shape[1] for f in flat])[:-1], axis=1)):
            parts[hook].append(act)
    acts = {h: np.concatenate(parts[h]) for h in hooks}
    windows = segment.windows
    rows = {
        "tokens/token_id": np.concatenate([w.tokens[w.keep] for w in windows]),
        "tokens/sequence": np.concatenate([np.full(int(w.keep.sum()), w.index, dtype=np.int64) for w in windows]),
        "tokens/position": np.concatenate([np.flatnonzero(w.keep) for w in windows]).astype(np.int64),
    }
    rows.update({f"acts/{h}": a for h, a in acts.items()})
    if outlier_factor is not None:
        drop = outlier_mask({h: np.linalg.norm(a, axis=1) for h, a in acts.items()}, outlier_factor)
        if drop.any():  # masking copies every array of the segment; skip it when nothing is dropped
            rows = {k: v[~drop] for k, v in rows.items()}
    return rows
