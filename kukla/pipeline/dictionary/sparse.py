"""Fast path for TopK/BatchTopK training: work only where latents are active.

The encoder's forward matmul is dense anyway (selection needs every pre-activation), but its
backward only has to reach the selected entries: with nnz = k·B of them, the weight and input
gradients cost nnz·d instead of B·F·d. Decoding gathers k decoder rows per token. Both use
`embedding_bag` (a gather-and-weighted-sum with its own backward), so no nnz×d tensor is built.

Unlike sparsify's fused kernel, gradients arriving at the gathered pre-activations always flow
back, whichever loss they come from: the aux-k entries go through the same function, so aux-k
trains the encoder of dead latents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _bag_offsets(keys: Tensor, n_bags: int) -> Tensor:
    """Start offset of each bag for entries already sorted by bag key."""
    counts = torch.bincount(keys, minlength=n_bags)
    return torch.cumsum(counts, 0) - counts


class _GatherPreacts(torch.autograd.Function):
    """pre[rows, cols] from a pre-activation matrix computed without grad; sparse backward.

    rows/cols may come in any order and from several selections (main codes and aux-k).
    """

    @staticmethod
    def forward(ctx, x_c: Tensor, W_enc: Tensor, b_enc: Tensor, pre: Tensor,  # type: ignore[override]
                rows: Tensor, cols: Tensor) -> Tensor:
        ctx.save_for_backward(x_c, W_enc, rows, cols)
        return pre[rows, cols]

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x_c, W_enc, rows, cols = ctx.saved_tensors
        width = W_enc.shape[1]
        grad_x = grad_W = grad_b = None
        grad = grad.to(x_c.dtype)  # under autocast the gathered values may be bf16
        if ctx.needs_input_grad[0]:  # row b: Σⱼ g[b,j] · W_enc[:, cols[b,j]]
            order = torch.argsort(rows, stable=True)
            grad_x = F.embedding_bag(cols[order], W_enc.t().contiguous(), _bag_offsets(rows[order], x_c.shape[0]),
                                     mode="sum", per_sample_weights=grad[order])
        if ctx.needs_input_grad[1]:  # column c: Σ_b g[b,c] · x_c[b]
            order = torch.argsort(cols, stable=True)
            by_col = cols[order]
            grad_W = F.embedding_bag(rows[order], x_c, _bag_offsets(by_col, width),
                                     mode="sum", per_sample_weights=grad[order]).t()
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(width, dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
        return grad_x, grad_W, grad_b, None, None, None


def encode_at(x_c: Tensor, W_enc: Tensor, b_enc: Tensor, pre: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Pre-activations at the selected entries, with a sparse backward."""
    return _GatherPreacts.apply(x_c, W_enc, b_enc, pre, rows, cols)


def decode_segments(rows: Tensor, cols: Tensor, values: Tensor, W_dec: Tensor,
                    bounds: list[int], n_rows: int) -> Tensor:
    """[B, G, d_out] segment contributions, one bag of gathered decoder rows per (token, segment)."""
    n_segments = len(bounds)
    segment = torch.bucketize(cols, torch.tensor(bounds, device=cols.device), right=True)
    bag = rows * n_segments + segment
    order = torch.argsort(bag, stable=True)
    bag = bag[order]
    out = F.embedding_bag(cols[order], W_dec, _bag_offsets(bag, n_rows * n_segments),
                          mode="sum", per_sample_weights=values[order].to(W_dec.dtype))
    return out.reshape(n_rows, n_segments, W_dec.shape[1])
