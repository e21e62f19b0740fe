"""Activation rules: which latents are active for a batch of pre-activations.

Training rules return the selected entries as (rows, cols) so the sparse path can gather and
scatter there; the chosen values are relu(pre) at those entries. Inference rules return codes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def select_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest pre-activations of every row (TopK, per token)."""
    cols = pre.topk(k, dim=-1, sorted=False).indices
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
    return rows, cols.reshape(-1)


def batch_topk_count(k: float, n_rows: int) -> int:
    """How many entries BatchTopK keeps for a batch: round(k·B), the per-token average k."""
    return max(1, int(round(k * n_rows)))


def select_batch_topk(pre: Tensor, k: float) -> tuple[Tensor, Tensor]:
    """The round(k·B) largest positive pre-activations of the whole batch (BatchTopK).

    Selected once over the whole dictionary: every Matryoshka prefix reuses this set, so a
    prefix's codes are exactly the full codes restricted to its latents.
    """
    flat = pre.reshape(-1)
    n = min(batch_topk_count(k, pre.shape[0]), flat.numel())
    idx = flat.topk(n, sorted=False).indices
    idx = idx[flat[idx] > 0].sort().values  # non-positive entries are zero after relu: not active
    width = pre.shape[1]
    return idx // width, idx % width


def select_dead_topk(pre: Tensor, dead: Tensor, k_aux: int) -> tuple[Tensor, Tensor]:
    """Per row, the top min(k_aux, #dead) pre-activations among dead latents (aux-k)."""
    dead_cols = dead.nonzero().squeeze(1)
    k = min(k_aux, dead_cols.numel())
    if k == 0:
        empty = torch.zeros(0, dtype=torch.long, device=pre.device)
        return empty, empty
    top = pre.index_select(1, dead_cols).topk(k, dim=-1, sorted=False).indices
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
    return rows, dead_cols[top.reshape(-1)]


def jumprelu(pre: Tensor, threshold: Tensor) -> Tensor:
    """relu(pre) where pre > threshold, else 0: BatchTopK at inference (SAELens' JumpReLU)."""
    return pre.relu() * (pre > threshold).to(pre.dtype)


def topk_codes(pre: Tensor, k: int) -> Tensor:
    """Dense TopK codes: relu of each row's k largest pre-activations (SAELens' TopK)."""
    top = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
