"""What every latent does on the eval rows: top rows, activation histogram, parent, best match, table.

The per-latent table holds level, density, activation statistics and top-activating rows. The top rows are tracked with a running top-k over the stream ([F, k] values and row
ids), so memory is F·k whatever the number of eval tokens.

The Matryoshka tree: which later-level latents fire mostly when an earlier one fires. A Matryoshka dictionary's early levels hold general features and later levels their
specialisations. A later latent j is a child of the earlier latent i whose firing it predicts
most beyond i's own density: the chance-corrected share

    κ(i, j) = (P(i fires | j fires) − P(i fires)) / (1 − P(i fires)),

0 for latents that fire independently, 1 for a child that fires only inside i, kept when at
least `min_fraction` and j fired at least `MIN_CHILD_FIRINGS` times. The share alone would
make every latent denser than `min_fraction` a parent of whatever fires beside it (on the
demo, five latents firing on 54–68 % of tokens took 1,450 of 1,750 children), and a share of 1 or 2
firings is 0 % or 100 % by chance. The tree shows P(i fires | j fires). Co-firing is counted on
eval rows with one [P, F] matmul of fire masks per batch; parents are the first `max_parents`
latents of the levels before the last, so memory is P·F counts whatever the number of tokens.

Cross-dictionary matching: for each latent of A, its best activation correlation with a latent
of B, summarised as the mean over A's live latents (mean max correlation): near 1 when B holds
every feature of A, lower where B splits (fragments) or lacks them. Correlations are
Pearson over the same eval rows for both dictionaries, computed in chunks of A's latents
so the [Fa, Fb] matrix never exists.

Decoder neighbours: each latent's nearest other latents by decoder cosine, in row chunks so
F = 65k latents never needs the full F×F cosine matrix: peak memory is `chunk_elements` floats
beside the normalised decoder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import Tensor

from kukla.atomic import atomic_path
from kukla.progress import progress


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


MAX_PARENTS = 1024
MIN_FRACTION = 0.5
MIN_CHILD_FIRINGS = 10


class CoFiring:
    """Counts of tokens on which parent candidate i and latent j both fire ([P, F]) and of j's firings."""

    def __init__(self, levels: list[int], max_parents: int = MAX_PARENTS) -> None:
        self.levels = levels
        self.parents = min(levels[-2], max_parents) if len(levels) > 1 else 0
        self.both: Tensor | None = None
        self.fired: Tensor | None = None
        self.tokens = 0

    def update(self, z: Tensor) -> None:
        """Add a batch of codes [B, F]."""
        if self.parents == 0:
            return
        fired = (z > 0).float()
        both = (fired[:, :self.parents].T @ fired).round().int()
        count = fired.sum(0).round().int()
        self.tokens += len(z)
        if self.both is None or self.fired is None:
            self.both, self.fired = both, count
        else:
            self.both += both
            self.fired += count

    def tree(self, min_fraction: float = MIN_FRACTION) -> tuple[Tensor, Tensor]:
        """Per latent: its parent (−1 for none) and P(parent fires | it fires) (NaN for none), [F] each.

        A latent's parent comes from a strictly earlier level; latents of the first level have none."""
        width = self.levels[-1]
        parent = torch.full((width,), -1, dtype=torch.long)
        fraction = torch.full((width,), float("nan"))
        if self.both is None or self.fired is None:
            return parent, fraction
        fired = self.fired.double().cpu()
        share = self.both.double().cpu() / fired.clamp(min=1)  # [P, F]: P(i fires | j fires)
        density = (fired[:self.parents] / self.tokens)[:, None]
        kappa = (share - density) / (1 - density).clamp(min=1e-12)  # a latent firing everywhere: ≤ 0
        level_start = torch.tensor([0, *self.levels[:-1]])
        start_of = level_start[torch.searchsorted(torch.tensor(self.levels), torch.arange(width), right=True)]
        allowed = torch.arange(self.parents)[:, None] < start_of[None, :]
        kappa = torch.where(allowed, kappa, torch.full_like(kappa, -1.0))
        best, index = kappa.max(dim=0)
        keep = (best >= min_fraction) & (fired >= MIN_CHILD_FIRINGS)
        parent[keep] = index[keep]
        fraction[keep] = share.gather(0, index[None])[0][keep].float()
        return parent, fraction


def _standardised(z: Tensor) -> Tensor:
    """Columns centred and scaled to unit norm (zero columns stay zero): float32 values with sums
    accumulated in float64, so a [4096, 65k] code matrix costs 1 GB, not 2."""
    centred = z.float() - (z.float().sum(0, dtype=torch.float64) / max(z.shape[0], 1)).float()
    norm = centred.pow(2).sum(0, dtype=torch.float64).sqrt().clamp(min=1e-30)
    return centred / norm.float()


@torch.no_grad()
def max_correlation(z_a: Tensor, z_b: Tensor, chunk_elements: int = 1 << 24,
                    desc: str = "matching") -> tuple[Tensor, Tensor]:
    """For each latent of A (codes z_a [N, Fa]), its largest Pearson correlation with any latent of B
    (z_b [N, Fb]) and that latent; NaN / −1 for latents of A that never vary (dead ones).
    N·Fa·Fb multiply-adds (65k latents each, 4096 rows: ~13 min on 2 CPU cores): a bar `desc`."""
    a, b = _standardised(z_a), _standardised(z_b)
    live_a, live_b = z_a.float().std(0) > 0, z_b.float().std(0) > 0
    rows = max(1, chunk_elements // max(b.shape[1], 1))
    best = torch.full((a.shape[1],), float("nan"))
    index = torch.full((a.shape[1],), -1, dtype=torch.long)
    if not bool(live_b.any()):
        return best, index
    with progress(a.shape[1], desc, unit="latent") as bar:
        for start in range(0, a.shape[1], rows):
            corr = a[:, start:start + rows].T @ b
            corr[:, ~live_b] = float("-inf")
            value, idx = corr.max(dim=1)
            best[start:start + rows], index[start:start + rows] = value.cpu(), idx.cpu()
            bar.update(min(rows, a.shape[1] - start))
    best[~live_a.cpu()] = float("nan")
    index[~live_a.cpu()] = -1
    return best, index


def mean_max_correlation(best: Tensor) -> float:
    """The summary over A's live latents (NaN when none is live)."""
    return float(best[~best.isnan()].mean()) if bool((~best.isnan()).any()) else float("nan")


def nearest_latents(w_dec: Tensor, k: int, chunk_elements: int = 1 << 24,
                    desc: str = "nearest latents") -> tuple[Tensor, Tensor]:
    """For each decoder row, the `k` *other* rows of largest cosine: (cosines [F, k], indices [F, k]),
    closest first (NaN / −1 where there are fewer than k others). F²·d multiply-adds (65k latents:
    ~1.5 min on 2 CPU cores): a bar `desc`."""
    unit = F.normalize(w_dec.detach().float(), dim=1)
    n = unit.shape[0]
    take = min(k, n - 1)
    values = torch.full((n, k), float("nan"))
    index = torch.full((n, k), -1, dtype=torch.long)
    if take < 1:
        return values, index
    rows = max(1, chunk_elements // n)
    with progress(n, desc, unit="latent") as bar:
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            sims = unit[start:stop] @ unit.T
            sims[torch.arange(stop - start), torch.arange(start, stop)] = float("-inf")
            top = sims.topk(take, dim=1)
            values[start:stop, :take] = top.values.cpu()
            index[start:stop, :take] = top.indices.cpu()
            bar.update(stop - start)
    return values, index

