"""Logit lens of decoder directions: which tokens a latent's output pushes up or down.

A direction d in the residual stream changes the logits by d · W_U (no final LayerNorm: the
lens reads the direction, not one token's scale). SAEs on the residual stream are read this
way directly; a transcoder (or SAE) whose target writes into the residual stream
(`hook_mlp_out`, `hook_attn_out`) is read through that direct path. Other hooks are not in
the residual basis, so they get no lens.
"""

from __future__ import annotations

import torch
from torch import Tensor

RESIDUAL_SPACE = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")
WRITES_TO_RESIDUAL = ("hook_mlp_out", "hook_attn_out")


def lens_path(hook: str, width: int, d_model: int) -> str | None:
    """How a decoder writing to `hook` reaches the logits, in words; None when it does not directly."""
    if width != d_model:
        return None
    if hook.endswith(RESIDUAL_SPACE):
        return f"logit lens: decoder direction (at {hook}) · W_U, no final LayerNorm"
    if hook.endswith(WRITES_TO_RESIDUAL):
        return f"direct path: decoder direction (written to {hook}, added to the residual stream) · W_U"
    return None


@torch.no_grad()
def logit_lens(w_dec: Tensor, w_u: Tensor, k: int, chunk_elements: int = 1 << 26) -> dict[str, Tensor]:
    """Top and bottom `k` tokens of each decoder row through the unembedding W_U [d, vocab]:
    ids and logit changes, [F, k] each, largest (resp. smallest) first."""
    w_u = w_u.detach().float()
    w_dec = w_dec.detach().float().to(w_u.device)
    k = min(k, w_u.shape[1])
    rows = max(1, chunk_elements // w_u.shape[1])
    parts: dict[str, list[Tensor]] = {"top_ids": [], "top_values": [], "bottom_ids": [], "bottom_values": []}
    for start in range(0, w_dec.shape[0], rows):
        logits = w_dec[start:start + rows] @ w_u
        for side, largest in (("top", True), ("bottom", False)):
            best = logits.topk(k, dim=1, largest=largest)
            parts[f"{side}_ids"].append(best.indices.cpu())
            parts[f"{side}_values"].append(best.values.cpu())
    return {name: torch.cat(chunks) for name, chunks in parts.items()}
