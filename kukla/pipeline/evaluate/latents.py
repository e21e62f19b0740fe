"""The per-latent table: level, density, activation statistics, top-activating rows.

The top rows are tracked with a running top-k over the stream ([F, k] values and row
ids), so memory is F·k whatever the number of eval tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from kukla.atomic import atomic_path


class TopActivations:
    """The k largest activations of every latent seen so far, with their store row ids."""

    def __init__(self, width: int, k: int) -> None:
        self.k = k
        self.values = torch.full((width, 0), float("-inf"))
        self.rows = torch.zeros((width, 0), dtype=torch.long)

    def update(self, z: Tensor, rows: Tensor) -> None:
        """Merge a batch of codes [B, F] whose store rows are `rows` [B]."""
        k = min(self.k, z.shape[0])
        if k == 0:
            return
        values, index = z.detach().float().topk(k, dim=0)  # [k, F]
        values, index = values.T.cpu(), index.T.cpu()
        batch_rows = rows.cpu().long()[index]
        merged_values = torch.cat([self.values, values], dim=1)
        merged_rows = torch.cat([self.rows, batch_rows], dim=1)
        keep = merged_values.topk(min(self.k, merged_values.shape[1]), dim=1).indices
        self.values = merged_values.gather(1, keep)
        self.rows = merged_rows.gather(1, keep)

    def top_rows(self) -> list[list[int]]:
        """Per latent, the row ids of its top activations that actually fired (> 0), best first."""
        fired = self.values > 0
        return [r[f].tolist() for r, f in zip(self.rows, fired)]


HISTOGRAM_EDGES = torch.logspace(-3, 4, 29, dtype=torch.float64)
"""Activation histogram bins (4 per decade, 1e-3 to 1e4; values outside land in the end bins)."""


class ActivationHistogram:
    """Per-latent counts of its nonzero activations in log-spaced bins ([F, bins]): the
    shape of each latent's activation distribution at F·bins memory."""

    def __init__(self, width: int) -> None:
        self.counts = torch.zeros((width, len(HISTOGRAM_EDGES) - 1), dtype=torch.long)

    def update(self, z: Tensor) -> None:
        """Add a batch of codes [B, F]."""
        token, latent = (z > 0).nonzero(as_tuple=True)
        if latent.numel() == 0:
            return
        edges = HISTOGRAM_EDGES[1:-1].to(z.device, torch.float32)
        bins = torch.bucketize(z[token, latent].float().contiguous(), edges, right=True)
        flat = (latent * self.counts.shape[1] + bins).cpu()
        self.counts.view(-1).add_(torch.bincount(flat, minlength=self.counts.numel()))


def latent_levels(width: int, levels: list[int]) -> np.ndarray:
    """Index of the first Matryoshka level that contains each latent (0 for a plain dictionary)."""
    return np.searchsorted(np.asarray(levels), np.arange(width), side="right").astype(np.int32)


def write_latent_table(path: Path, *, levels: list[int], columns: dict[str, Tensor],
                       top_rows: list[list[int]], contexts: list[list[str]] | None = None) -> Path:
    """Write the Parquet table: one row per latent."""
    width = len(top_rows)
    data: dict[str, pa.Array] = {
        "latent": pa.array(np.arange(width, dtype=np.int64)),
        "level": pa.array(latent_levels(width, levels)),
    }
    for name, values in columns.items():
        data[name] = pa.array(values.double().cpu().numpy())
    data["top_rows"] = pa.array(top_rows, type=pa.list_(pa.int64()))
    if contexts is not None:
        data["top_contexts"] = pa.array(contexts, type=pa.list_(pa.string()))
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(data), tmp)
    return path
