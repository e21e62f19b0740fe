"""Fast path for TopK/BatchTopK training: work only where latents are active.

The encoder's forward matmul is dense anyway (selection needs every pre-activation), but its
backward only has to reach the selected entries: with nnz = k·B of them, the weight gradient
costs nnz·d instead of B·F·d (and the input bias's F·d). Decoding gathers k decoder rows per token. Both use
`embedding_bag` (a gather-and-weighted-sum with its own backward), so no nnz×d tensor is built.

The aux-k term takes the dead latents' columns of the same pre-activations with a dense
backward over those columns (`columns_at`): its gradient always reaches the dead latents'
encoder (sparsify's fused kernel drops it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _bag_offsets(keys: Tensor, n_bags: int) -> Tensor:
    """Start offset of each bag for entries already sorted by bag key (a search, not a bincount:
    no output size to read back on a GPU)."""
    return torch.searchsorted(keys, torch.arange(n_bags, device=keys.device, dtype=keys.dtype))


class _GatherPreacts(torch.autograd.Function):
    """pre[rows, cols] from pre = (x_s − bias)·W_enc + b_enc computed without grad; sparse backward.

    rows/cols may come in any order. The input bias (an SAE's b_dec) is shared by all rows, so
    its gradient is −W_enc·(Σ of the selected entries' gradients per latent): no per-row input
    gradient is formed.
    """

    @staticmethod
    def forward(ctx, x_s: Tensor, bias: Tensor | None, W_enc: Tensor, b_enc: Tensor,  # type: ignore[override]
                pre: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        ctx.save_for_backward(x_s if bias is None else x_s - bias, W_enc, rows, cols)
        return pre[rows, cols]

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x_c, W_enc, rows, cols = ctx.saved_tensors
        width = W_enc.shape[1]
        grad = grad.to(x_c.dtype)  # under autocast the gathered values may be bf16
        per_latent = torch.zeros(width, dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
        grad_bias = grad_W = None
        if ctx.needs_input_grad[1]:
            grad_bias = -(W_enc @ per_latent)
        if ctx.needs_input_grad[2]:  # column c: Σ_b g[b,c] · x_c[b]
            order = torch.argsort(cols, stable=True)
            grad_W = F.embedding_bag(rows[order], x_c, _bag_offsets(cols[order], width),
                                     mode="sum", per_sample_weights=grad[order]).t()
        grad_b = per_latent if ctx.needs_input_grad[3] else None
        return None, grad_bias, grad_W, grad_b, None, None, None


def encode_at(x_s: Tensor, bias: Tensor | None, W_enc: Tensor, b_enc: Tensor, pre: Tensor,
              rows: Tensor, cols: Tensor) -> Tensor:
    """Pre-activations at the selected entries, with a sparse backward (x_s carries no gradient)."""
    return _GatherPreacts.apply(x_s.detach(), bias, W_enc, b_enc, pre, rows, cols)


class _GatherColumns(torch.autograd.Function):
    """pre[:, cols] from the same no-grad pre-activations (aux-k's dead latents), dense backward
    over those columns only, so aux-k needs no second encoder pass."""

    @staticmethod
    def forward(ctx, x_s: Tensor, bias: Tensor | None, W_enc: Tensor, b_enc: Tensor,  # type: ignore[override]
                pre: Tensor, cols: Tensor) -> Tensor:
        ctx.save_for_backward(x_s if bias is None else x_s - bias, W_enc, cols)
        return pre[:, cols]

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x_c, W_enc, cols = ctx.saved_tensors
        grad = grad.to(x_c.dtype)
        column_sums = grad.sum(dim=0)
        grad_bias = -(W_enc[:, cols] @ column_sums) if ctx.needs_input_grad[1] else None
        grad_W = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_W = torch.zeros_like(W_enc).index_copy_(1, cols, x_c.t() @ grad)
        if ctx.needs_input_grad[3]:
            grad_b = torch.zeros(W_enc.shape[1], dtype=grad.dtype, device=grad.device).index_copy_(0, cols, column_sums)
        return None, grad_bias, grad_W, grad_b, None, None


def columns_at(x_s: Tensor, bias: Tensor | None, W_enc: Tensor, b_enc: Tensor, pre: Tensor, cols: Tensor) -> Tensor:
    """Pre-activations of the given latents for every row, without recomputing them."""
    return _GatherColumns.apply(x_s.detach(), bias, W_enc, b_enc, pre, cols)


def decode_segments(rows: Tensor, cols: Tensor, values: Tensor, W_dec: Tensor,
                    bounds: list[int] | Tensor, n_rows: int) -> Tensor:
    """[B, G, d_out] segment contributions, one bag of gathered decoder rows per (token, segment).

    Entries must come row-major with ascending columns, as the selections return them: that
    already orders the bags. Bounds may be a device tensor (drawn prefixes): never read back.
    """
    n_segments = len(bounds)
    segment = sum((cols >= bound).long() for bound in bounds[:-1]) if n_segments > 1 else torch.zeros_like(cols)
    out = F.embedding_bag(cols, W_dec, _bag_offsets(rows * n_segments + segment, n_rows * n_segments),
                          mode="sum", per_sample_weights=values.to(W_dec.dtype))
    return out.reshape(n_rows, n_segments, W_dec.shape[1])


class _PrefixErrors(torch.autograd.Function):
    """Σ_b ‖t_b − Σ_{i≤j} s_bi‖² for every prefix j of the segments s [B, G, d], with one [B, d]
    residual updated in place (autograd's cumsum keeps G of them and walks them 5 times).

    Backward: ∂/∂s_i = −2 Σ_{j≥i} g_j r_j, walking the residuals back from the last one
    (r_{j−1} = r_j + s_j), again in place; ∂/∂t = 2 Σ_j g_j r_j. Always in float32, also under
    CUDA autocast (a bf16 sum of squares would lose the small prefix differences).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, target: Tensor, segments: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        residual = target.clone()
        errors = []
        for j in range(segments.shape[1]):
            residual -= segments[:, j]
            flat = residual.view(-1)
            errors.append(torch.dot(flat, flat))
        ctx.save_for_backward(segments, residual)
        ctx.mark_non_differentiable(residual)
        return torch.stack(errors), residual

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: Tensor, _: Tensor):  # type: ignore[override]
        segments, residual = ctx.saved_tensors
        residual = residual.clone()
        acc = torch.zeros_like(residual)
        grad_segments = torch.empty_like(segments)
        for j in reversed(range(segments.shape[1])):
            acc.addcmul_(residual, grad[j] * -2.0)
            grad_segments[:, j] = acc
            residual += segments[:, j]
        return (-acc if ctx.needs_input_grad[0] else None), grad_segments


def prefix_errors(target: Tensor, segments: Tensor) -> tuple[Tensor, Tensor]:
    """[G] squared errors of the prefix reconstructions, and the full one's residual (detached)."""
    return _PrefixErrors.apply(target, segments)
