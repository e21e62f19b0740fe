"""One segment through the model: every hook from one forward pass, rows aligned across hooks.

What crosses to the host is only what the store keeps: each batch's kept positions are
gathered, cast to the store dtype and reduced to per-hook row norms *on the device*, then
copied into one host buffer per segment. On CUDA the buffer is pinned and the copies run on
a side stream, so batch i's copy overlaps batch i+1's forward; nothing waits for them until
the writer thread calls `SegmentRows.rows` (`run.SegmentCommitter`).

Outliers: a token is dropped from *every* hook when its norm at *any* hook exceeds
`outlier_factor` × that hook's median norm over the segment's kept tokens. Dropping it
everywhere keeps rows aligned (a transcoder's input and target lose the same token), and
a per-segment median is fixed by the plan, so resumed and multi-rank runs drop the same
tokens.

Massive activations: see `massive.py`; a segment carries its rows' norms so the flags are
set from them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformer_lens import HookedTransformer

from kukla.pipeline.massive import massive_flags, reference_median
from kukla.pipeline.hooks import stop_at_layer
from kukla.config import torch_dtype

if TYPE_CHECKING:
    from kukla.pipeline.harvest.run import Segment


def moved_dtype(store_dtype: str) -> torch.dtype:
    """The dtype rows cross to the host in: the store's, except float16, which moves float32
    so the writer can name an overflow instead of storing inf."""
    return torch_dtype("float32" if store_dtype == "float16" else store_dtype)


def outlier_mask(norms: np.ndarray, factor: float) -> np.ndarray:
    """True where a row's norm at any hook (`norms` [rows, hooks]) is above `factor` × that
    hook's median norm."""
    if not len(norms):
        return np.zeros(0, dtype=bool)
    return massive_flags(norms, reference_median(norms), factor).astype(bool)  # the same rule, own median


@dataclass
class SegmentRows:
    """A segment's rows on their way to the host; on CUDA the copies may still be in flight."""

    segment: Segment
    acts: torch.Tensor
    """[planned rows, Σ widths] host buffer, every hook side by side, in `moved_dtype`."""
    norms: torch.Tensor
    """[planned rows, hooks] float32 row norms, computed on the device."""
    widths: dict[str, int]
    copied: torch.cuda.Event | None
    """Recorded after the segment's last copy (None on CPU: the copies are done)."""

    def wait(self) -> None:
        if self.copied is not None:
            self.copied.synchronize()

    def rows(self, *, outlier_factor: float | None, massive_median: np.ndarray | None,
             massive_ratio: float | None) -> dict[str, np.ndarray | torch.Tensor]:
        """The rows for `StoreWriter.write_segment`, outliers dropped (their count is planned −
        written), with `tokens/massive` when a massive reference is given, and the segment's
        whole windows (`windows/*`), so the store alone shows any row in its context."""
        self.wait()
        windows = self.segment.windows
        rows: dict[str, np.ndarray | torch.Tensor] = {
            "tokens/token_id": np.concatenate([w.tokens[w.keep] for w in windows]),
            "tokens/sequence": np.concatenate([np.full(int(w.keep.sum()), w.index, dtype=np.int64)
                                               for w in windows]),
            "tokens/position": np.concatenate([np.flatnonzero(w.keep) for w in windows]).astype(np.int64),
        }
        whole = {"windows/sequence": np.array([w.index for w in windows], dtype=np.int64),
                   "windows/token_id": np.stack([w.tokens for w in windows])}
        columns = torch.split(self.acts, list(self.widths.values()), dim=1)
        rows.update({f"acts/{hook}": column for hook, column in zip(self.widths, columns)})
        norms = self.norms.numpy()
        if massive_median is not None and massive_ratio is not None:
            rows["tokens/massive"] = massive_flags(norms, massive_median, massive_ratio)
        if outlier_factor is not None:
            drop = outlier_mask(norms, outlier_factor)
            if drop.any():  # masking copies every array of the segment; skip it when nothing is dropped
                keep = np.flatnonzero(~drop)
                rows = {k: v[torch.from_numpy(keep)] if isinstance(v, torch.Tensor) else v[keep]
                        for k, v in rows.items()}
        return rows | whole  # every window whole, the dropped rows' positions too (windows/row: −1)


class _Captured(Exception):
    """Raised by the last of the hooks to fire: nothing the forward computes after it is kept."""


def capture(model: HookedTransformer, tokens: torch.Tensor, hooks: list[str],
            stop: int | None) -> dict[str, torch.Tensor]:
    """Every hook's activation from one forward that ends as soon as the last of them fires: an
    `ln_final` harvest never computes the unembedding, a `resid_mid` one never the block's MLP."""
    cache: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: object) -> None:
        cache[hook.name] = act  # type: ignore[attr-defined]
        if len(cache) == len(hooks):
            raise _Captured

    try:
        model.run_with_hooks(tokens, fwd_hooks=[(h, keep) for h in hooks], stop_at_layer=stop, return_type=None)
    except _Captured:
        pass
    return cache


class SegmentForward:
    """Runs segments through `model` at `hooks`, stopping where the last of them fires."""

    def __init__(self, model: HookedTransformer, widths: dict[str, int], *, batch_size: int,
                 store_dtype: str) -> None:
        self.model, self.widths, self.batch_size = model, widths, batch_size
        self.hooks = list(widths)
        self.stop = stop_at_layer(self.hooks, model.cfg.n_layers)
        self.device = torch.device(model.cfg.device)
        self.dtype = moved_dtype(store_dtype)
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None

    def _batches(self, segment: Segment) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(kept rows [n, Σ widths] in the moved dtype, their norms [n, hooks] float32) per
        batch, on the device."""
        for start in range(0, len(segment.windows), self.batch_size):
            windows = segment.windows[start:start + self.batch_size]
            tokens = torch.from_numpy(np.stack([w.tokens for w in windows])).to(self.device, non_blocking=True)
            # kept positions as indices (from the CPU masks): boolean indexing on the device
            # would sync once per hook to count them
            keep = torch.from_numpy(np.flatnonzero(np.concatenate([w.keep for w in windows])))
            keep = keep.to(self.device, non_blocking=True)
            with torch.inference_mode():
                cache = capture(self.model, tokens, self.hooks, self.stop)
                flat = [cache[h].flatten(0, 1).flatten(1).index_select(0, keep) for h in self.hooks]
                norms = torch.stack([torch.linalg.vector_norm(x.float(), dim=1) for x in flat], dim=1)
                # all hooks side by side, so the batch crosses to the host in one copy, not one per hook
                acts = flat[0].to(self.dtype) if len(flat) == 1 else torch.cat(flat, dim=1).to(self.dtype)
            yield acts, norms

    def norms(self, segment: Segment) -> np.ndarray:
        """Only the row norms [planned rows, hooks] (the massive-activation reference)."""
        parts = [norms.cpu() for _, norms in self._batches(segment)]
        return torch.cat(parts).numpy() if parts else np.zeros((0, len(self.hooks)), dtype=np.float32)

    def __call__(self, segment: Segment) -> SegmentRows:
        """Launch the segment's forward passes and copies; the host buffers fill as they finish."""
        n, width = segment.planned_rows, sum(self.widths.values())
        acts = torch.empty((n, width), dtype=self.dtype, pin_memory=self.cuda)
        norms = torch.empty((n, len(self.hooks)), dtype=torch.float32, pin_memory=self.cuda)
        offset = 0
        for batch_acts, batch_norms in self._batches(segment):
            rows = slice(offset, offset + batch_acts.shape[0])
            offset = rows.stop
            if self.copy_stream is None:
                acts[rows].copy_(batch_acts)
                norms[rows].copy_(batch_norms)
                continue
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                acts[rows].copy_(batch_acts, non_blocking=True)
                norms[rows].copy_(batch_norms, non_blocking=True)
            batch_acts.record_stream(self.copy_stream)  # not reused by the next forward before copied
            batch_norms.record_stream(self.copy_stream)
        copied = None
        if self.copy_stream is not None:
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)
        return SegmentRows(segment, acts, norms, self.widths, copied)
