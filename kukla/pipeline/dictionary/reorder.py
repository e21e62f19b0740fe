"""Latent reordering (Nabeshima): keep latents sorted by how much they contribute, largest first.

A prefix scheme makes position matter: the first latents are in every prefix. Sorting by a
running mean of each latent's contribution zᵢ²‖W_dec,i‖² after every step lets a latent that
turns out general move forward into the short prefixes, instead of staying where init put it.

A permutation of the latents changes no function of the dictionary, so everything indexed by
latent moves together: encoder columns, encoder bias, decoder rows, their Adam moments, and the
per-latent buffers (dead counters, threshold, the running contribution itself). All of them are
in the dictionary's and the optimiser's state dicts, so a checkpoint resumes exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

CONTRIBUTION_DECAY = 0.99
"""Weight of the past in the running mean of each latent's contribution (≈ the last 100 batches)."""


def batch_contribution(cols: Tensor, values: Tensor, W_dec: Tensor, n_rows: int) -> Tensor:
    """[F] mean over the batch's rows of zᵢ²‖W_dec,i‖², from the active entries (cols, values)."""
    squared = torch.zeros(W_dec.shape[0], dtype=torch.float32, device=W_dec.device)
    squared.index_add_(0, cols, values.detach().float().pow(2))
    return squared * W_dec.detach().float().pow(2).sum(dim=1) / max(n_rows, 1)


#: Per-latent parameters and the dimension that indexes latents.
_LATENT_DIM = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "log_threshold": 0}
#: Per-latent buffers (indexed by latent along dim 0).
_LATENT_BUFFERS = ("threshold", "tokens_since_fired", "contribution")


@torch.no_grad()
def reorder_latents(dictionary: nn.Module, optimizer: torch.optim.Optimizer, contribution: Tensor) -> Tensor:
    """Fold this batch's contribution into the running mean, then sort the latents by it
    (descending; stable, so ties keep their order). Returns the permutation applied."""
    running = dictionary.contribution
    running.mul_(CONTRIBUTION_DECAY).add_(contribution.to(running), alpha=1 - CONTRIBUTION_DECAY)
    order = torch.argsort(running, descending=True, stable=True)
    for name, dim in _LATENT_DIM.items():
        param = getattr(dictionary, name, None)
        if param is None:  # a rule's own parameter (JumpReLU's threshold) that this one lacks
            continue
        tensors = [param] + [v for v in optimizer.state.get(param, {}).values()
                             if torch.is_tensor(v) and v.shape == param.shape]
        for tensor in tensors:
            tensor.copy_(tensor.index_select(dim, order.to(tensor.device)))
    for name in _LATENT_BUFFERS:
        buffer = getattr(dictionary, name)
        buffer.copy_(buffer.index_select(0, order.to(buffer.device)))
    return order
