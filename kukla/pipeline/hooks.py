"""Hook points: short forms, validation against a model, and how far the forward must run.

A hook is named either by its TransformerLens name (`blocks.6.hook_resid_post`) or by a
short form `kind:layer` (`resid_post:6`). Names are checked against the model before any
work starts, and their widths are measured with one forward pass over a few tokens, so a
hook that exists but never fires (e.g. `hook_mlp_in` without TL's `use_hook_mlp_in`) or
that is not one vector per token (attention patterns) is refused up front. That pass runs
only block 0: TransformerLens builds every block from the one config, so `blocks.6.X` fires
with the width `blocks.0.X` has, and the probe skips reading the weights of the blocks between
(on Gemma-3-270m, `resid_post:6`: 0.01 CPU-s instead of 0.04).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from kukla.errors import KuklaError

if TYPE_CHECKING:  # hook names are parsed without loading transformer_lens (the CLI stays fast)
    import torch
    from transformer_lens import HookedTransformer

SHORT_FORMS: dict[str, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_in": "blocks.{layer}.hook_attn_in",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_in": "blocks.{layer}.hook_mlp_in",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "mlp_pre": "blocks.{layer}.mlp.hook_pre",
    "mlp_post": "blocks.{layer}.mlp.hook_post",
    "z": "blocks.{layer}.attn.hook_z",
}
"""`kind` of a short form `kind:layer` → the TransformerLens name it stands for."""

# TransformerLens only calls these hook points once a model flag is set.
_FLAG_FOR_SUFFIX = {
    "hook_mlp_in": "set_use_hook_mlp_in",
    "hook_attn_in": "set_use_attn_in",
    "hook_q_input": "set_use_split_qkv_input",
    "hook_k_input": "set_use_split_qkv_input",
    "hook_v_input": "set_use_split_qkv_input",
    "hook_result": "set_use_attn_result",
}
# What to pick instead when TransformerLens refuses a flag for this architecture.
_INSTEAD = {"hook_attn_in": ", e.g. the same block's hook_q_input, hook_k_input or hook_v_input (split_qkv_input)"}
_NOT_PER_TOKEN = ("hook_pattern", "hook_attn_scores")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def expand_hook(spec: str) -> str:
    """`resid_post:6` → `blocks.6.hook_resid_post`; a full name is returned unchanged."""
    if ":" not in spec:
        return spec
    kind, _, layer = spec.partition(":")
    if kind not in SHORT_FORMS:
        raise KuklaError(f"unknown hook kind {kind!r} in {spec!r}; short forms are "
                         f"{', '.join(f'{k}:LAYER' for k in SHORT_FORMS)}, or give a full TransformerLens name")
    if not layer.isdigit():
        raise KuklaError(f"hook {spec!r}: the layer after ':' must be a whole number, like {kind}:6")
    return SHORT_FORMS[kind].format(layer=int(layer))


def short_form(name: str) -> str:
    """`blocks.6.hook_resid_post` → `resid_post:6` (the full name when there is no short form)."""
    for kind, template in SHORT_FORMS.items():
        pattern = re.escape(template).replace(re.escape("{layer}"), r"(\d+)")
        match = re.fullmatch(pattern, name)
        if match:
            return f"{kind}:{match.group(1)}"
    return name


def hook_layer(name: str, n_layers: int) -> int:
    """The last block a hook needs: its block index, −1 before the blocks, n_layers after them."""
    match = _BLOCK.match(name)
    if match:
        return int(match.group(1))
    return -1 if name in ("hook_embed", "hook_pos_embed", "hook_tokens") else n_layers


def stop_at_layer(hooks: list[str], n_layers: int) -> int | None:
    """TransformerLens' `stop_at_layer` for these hooks: the forward ends after the last needed block."""
    last = max(hook_layer(h, n_layers) for h in hooks)
    return None if last >= n_layers else last + 1


def enable_hooks(model: HookedTransformer, hooks: list[str]) -> None:
    """Set the TransformerLens flags without which some hook points never fire."""
    for hook in hooks:
        for suffix, setter in _FLAG_FOR_SUFFIX.items():
            if not hook.endswith(suffix):
                continue
            try:
                getattr(model, setter)(True)
            except AssertionError as exc:  # TransformerLens' word for "this architecture has no such hook"
                raise KuklaError(f"hook {hook!r} cannot fire in this model ({exc}); pick another hook"
                                 f"{_INSTEAD.get(suffix, '')}") from None


def _refuses_flag(model: HookedTransformer, suffix: str) -> bool:
    """Whether TransformerLens refuses the flag a `suffix` hook needs, asked by setting it to its current value."""
    setter = _FLAG_FOR_SUFFIX[suffix]
    try:
        getattr(model, setter)(getattr(model.cfg, setter.removeprefix("set_")))
    except AssertionError:
        return True
    return False


def _block0_cache(model: HookedTransformer, names: list[str]) -> dict[str, torch.Tensor]:
    """These hooks' activations on 3 tokens, from a forward that stops after the last block they need."""
    import torch  # here, not at the top: configs expand hook names without torch

    probe = torch.zeros((1, 3), dtype=torch.long, device=model.cfg.device)
    with torch.inference_mode():
        _, cache = model.run_with_cache(probe, names_filter=names, stop_at_layer=stop_at_layer(names, model.cfg.n_layers))
    return cache.cache_dict


def _usable_block0_hooks(model: HookedTransformer) -> list[str]:
    """Block 0's hooks `resolve_hooks` accepts: per token, and firing (after their flag, where
    TransformerLens allows it). An attention-only model builds `hook_mlp_in` / `hook_mlp_out` but
    never calls them; grouped-query attention refuses `hook_attn_in`'s flag."""
    names = [n for n in model.hook_dict if n.startswith("blocks.0.") and not n.endswith(_NOT_PER_TOKEN)]
    gated = {n: suffix for n in names for suffix in _FLAG_FOR_SUFFIX if n.endswith(suffix)}
    fired = _block0_cache(model, [n for n in names if n not in gated])
    allowed = {n for n, suffix in gated.items() if not _refuses_flag(model, suffix)}
    return sorted(n for n in names if n in fired or n in allowed)


def _unknown_hook_message(spec: str, name: str, model: HookedTransformer) -> str:
    n_layers = model.cfg.n_layers
    match = _BLOCK.match(name)
    if match and int(match.group(1)) >= n_layers:
        return f"hook {spec!r}: layer {match.group(1)} is out of range; this model has layers 0–{n_layers - 1}"
    usable = _usable_block0_hooks(model)
    kinds = [k for k, t in SHORT_FORMS.items() if t.format(layer=0) in usable]
    return (f"unknown hook {spec!r}; valid: {', '.join(kinds)} with layers 0–{n_layers - 1} "
            f"(e.g. {kinds[0] if kinds else 'resid_post'}:0), or a full name such as {', '.join(usable[:4])}, …")


def resolve_hooks(model: HookedTransformer, specs: list[str]) -> dict[str, int]:
    """Validate hooks against `model`: {full name: width per token}, in the order given.

    Sets the model flags the hooks need, then measures the widths with one short forward
    pass through block 0 (`[n_heads, d_head]` hooks such as `hook_z` are flattened per token).
    """
    if not specs:
        raise KuklaError("no hook given; pass at least one, e.g. --hook resid_post:0")
    names: list[str] = []
    for spec in specs:
        name = expand_hook(spec)
        if name not in model.hook_dict:
            raise KuklaError(_unknown_hook_message(spec, name, model))
        if name.endswith(_NOT_PER_TOKEN):
            raise KuklaError(f"hook {spec!r} is not one vector per token (attention scores); pick another hook")
        if name in names:
            raise KuklaError(f"hook {spec!r} is given twice")
        names.append(name)
    enable_hooks(model, names)
    stand_ins = {name: _BLOCK.sub("blocks.0.", name) for name in names}
    cache = _block0_cache(model, list(stand_ins.values()))
    widths: dict[str, int] = {}
    for name in names:
        if stand_ins[name] not in cache:
            raise KuklaError(f"hook {name!r} exists but does not fire in this model's forward pass; pick another hook")
        act = cache[stand_ins[name]]
        if act.ndim < 3 or tuple(act.shape[:2]) != (1, 3):
            raise KuklaError(f"hook {name!r} is not one vector per token (shape {tuple(act.shape)})")
        widths[name] = math.prod(act.shape[2:])
    return widths
