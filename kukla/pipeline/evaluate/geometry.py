"""Decoder geometry: how close each latent's decoder direction comes to another's or to a truth.

Done in row chunks so F = 65k latents never needs the full F×F cosine matrix: peak memory
is `chunk_elements` floats beside the normalised decoder.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _unit_rows(w: Tensor) -> Tensor:
    w = w.detach().float()
    return w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)


def nearest_latents(w_dec: Tensor, k: int, chunk_elements: int = 1 << 24) -> tuple[Tensor, Tensor]:
    """For each decoder row, the `k` *other* rows of largest cosine: (cosines [F, k], indices [F, k]),
    closest first (NaN / −1 where there are fewer than k others)."""
    unit = _unit_rows(w_dec)
    n = unit.shape[0]
    take = min(k, n - 1)
    values = torch.full((n, k), float("nan"))
    index = torch.full((n, k), -1, dtype=torch.long)
    if take < 1:
        return values, index
    rows = max(1, chunk_elements // n)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        sims = unit[start:stop] @ unit.T
        sims[torch.arange(stop - start), torch.arange(start, stop)] = float("-inf")
        top = sims.topk(take, dim=1)
        values[start:stop, :take] = top.values.cpu()
        index[start:stop, :take] = top.indices.cpu()
    return values, index


def max_cosine_to_others(w_dec: Tensor, chunk_elements: int = 1 << 24) -> Tensor:
    """For each decoder row, the largest cosine similarity to any *other* row ([F])."""
    return nearest_latents(w_dec, 1, chunk_elements)[0][:, 0]


def best_match(truth: Tensor, w_dec: Tensor, chunk_elements: int = 1 << 24) -> tuple[Tensor, Tensor]:
    """For each true direction (rows of `truth`), its max cosine to the decoder rows and that latent."""
    t_unit, d_unit = _unit_rows(truth), _unit_rows(w_dec).to(truth.device)
    rows = max(1, chunk_elements // d_unit.shape[0])
    best, index = [], []
    for start in range(0, t_unit.shape[0], rows):
        sims = t_unit[start:start + rows] @ d_unit.T
        value, idx = sims.max(dim=1)
        best.append(value.cpu())
        index.append(idx.cpu())
    return torch.cat(best), torch.cat(index)


def cosine_matrix(truth: Tensor, w_dec: Tensor) -> Tensor:
    """Cosine of every true direction with every latent ([n_truth, F]); for small toy plots."""
    return (_unit_rows(truth) @ _unit_rows(w_dec).to(truth.device).T).cpu()
