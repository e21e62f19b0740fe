"""The dictionary directory (FORMATS.md §2): SAELens-loadable weights plus our metadata.

`cfg.json` + `sae_weights.safetensors` follow SAELens 6 (`SAE.load_from_disk`), with the
training-time activation scales folded into the weights so they act on raw activations:
W_enc ← s_in·W_enc, W_dec ← W_dec/s_out, b_dec ← b_dec/s_out (pre-activations, hence codes
and thresholds, are unchanged). `kukla.json` holds what SAELens has no place for; it is written
last, so a directory without it is either a plain SAELens one or an interrupted save. It holds
the weights' SHA-256, checked on load; a plain SAELens directory has none, so its weights are
at least refused when they hold NaN or inf.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kukla.atomic import atomic_path, write_atomic
from kukla.config import from_dict, to_dict
from kukla.errors import KuklaError
from kukla.pipeline.dictionary.config import DictionaryConfig
from kukla.pipeline.dictionary.model import Dictionary
from kukla.pipeline.dictionary.rules import RULES, rule_loading

CFG_FILE, WEIGHTS_FILE, KUKLA_FILE = "cfg.json", "sae_weights.safetensors", "kukla.json"
FORMAT, FORMAT_VERSION = "kukla-dictionary", 1
SAELENS_FORMAT_VERSION = "6.0.0"  # the cfg.json layout we write (SAELens ≥ 6 reads it as-is)

# SAELens metadata fields (Neuronpedia reads them) taken from the trainer's metadata when present.
_SAELENS_METADATA_KEYS = ("model_name", "context_size", "dataset_path", "prepend_bos",
                          "exclude_special_tokens", "model_class_name")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2, allow_nan=False).encode())


def _finite_or_none(value: torch.Tensor) -> float | None:
    number = float(value)
    return None if math.isnan(number) else number


def saelens_architecture(dictionary: Dictionary) -> str | None:
    """The SAELens class a saved dictionary loads as; None where SAELens has none (TopK transcoders)."""
    return dictionary.rule.saelens[dictionary.cfg.transcoder]


def _hooks(dictionary: Dictionary, metadata: dict[str, Any]) -> dict[str, str | None]:
    hooks = dict(metadata.get("hooks") or {})
    target = hooks.get("target") or (None if dictionary.cfg.transcoder else hooks.get("input"))
    return {"input": hooks.get("input"), "target": target}


@torch.no_grad()
def save_dictionary(dictionary: Dictionary, directory: str | Path, metadata: dict[str, Any]) -> Path:
    """Write `directory` (created if needed); returns it.

    metadata: JSON-ready; `hooks` ({"input", "target"}), `model_name`, `context_size`,
    `dataset_path`, `prepend_bos` also go into SAELens' cfg.json; all of it goes into
    kukla.json under "metadata" (training config, store fingerprint, summary, ...).
    """
    cfg = dictionary.cfg
    if dictionary.rule.calibrated and not dictionary.calibrated:
        raise KuklaError("a BatchTopK dictionary is saved with its inference threshold: "
                         "run calibrate_threshold on held-out rows before save_dictionary")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / KUKLA_FILE).unlink(missing_ok=True)  # until rewritten, the directory is not finished

    s_in, s_out = float(dictionary.input_scale), float(dictionary.target_scale)
    weights = {
        "W_enc": dictionary.W_enc.float() * s_in,
        "b_enc": dictionary.b_enc.float(),
        "W_dec": dictionary.output_directions.float(),
        "b_dec": dictionary.b_dec.float() / s_out,
    }
    arch = saelens_architecture(dictionary)
    threshold = dictionary.rule.threshold(dictionary)
    if threshold is not None:
        weights["threshold"] = threshold.float().expand(cfg.width)
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp))
    weights_sha256 = _sha256(directory / WEIGHTS_FILE)

    hooks = _hooks(dictionary, metadata)
    saelens_metadata: dict[str, Any] = {key: metadata[key] for key in _SAELENS_METADATA_KEYS if key in metadata}
    saelens_metadata.update(sae_lens_version=SAELENS_FORMAT_VERSION, sae_lens_training_version=None,
                            hook_name=hooks["input"], hook_head_index=None)
    if cfg.transcoder:
        saelens_metadata["hook_name_out"] = hooks["target"]
    saelens_cfg: dict[str, Any] = {
        "architecture": arch or f"kukla_{cfg.activation}_transcoder",
        "d_in": cfg.d_in, "d_sae": cfg.width, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": not cfg.transcoder, "normalize_activations": "none",
        "reshape_activations": "none", "metadata": saelens_metadata,
    }
    if cfg.transcoder:
        saelens_cfg["d_out"] = dictionary.d_out
    saelens_cfg.update(dictionary.rule.saelens_fields(cfg))
    _write_json(directory / CFG_FILE, saelens_cfg)

    _write_json(directory / KUKLA_FILE, {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "arch": cfg.arch or cfg.label, "activation": cfg.activation, "prefixes": cfg.prefixes,
        "transcoder": cfg.transcoder, "levels": dictionary.levels,
        "hooks": hooks, "d_in": cfg.d_in, "d_out": dictionary.d_out, "width": cfg.width,
        "k": cfg.k, "threshold": None if threshold is None else _finite_or_none(threshold.max()),
        "per_latent_thresholds": threshold is not None and bool(threshold.unique().numel() > 1),
        "inference_l0": _finite_or_none(dictionary.inference_l0), **_cap_note(dictionary),
        "scales": {"input": s_in, "target": s_out}, "saelens_architecture": arch,
        "config": to_dict(cfg), "metadata": metadata, "weights_sha256": weights_sha256,
    })
    return directory


def _cap_note(dictionary: Dictionary) -> dict[str, Any]:
    """kukla.json's per-token L0 cap, which SAELens' JumpReLU cannot express (it loads without it)."""
    cap = int(dictionary.l0_cap)
    if not cap:
        return {}
    return {"l0_cap": cap, "saelens_note": f"kukla keeps at most {cap} latents per token; SAELens' JumpReLU "
                                           "has no such cap, so in SAELens massive-activation tokens fire more"}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise KuklaError(f"cannot read {path}: {exc}") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_weights(directory: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The weights, refused when they differ from the checksum in kukla.json or hold NaN/inf."""
    path = directory / WEIGHTS_FILE
    if sha256 is not None and _sha256(path) != sha256:
        raise KuklaError(f"{path} is damaged: its SHA-256 differs from the one in {KUKLA_FILE}; "
                         "restore it from a checkpoint (out/checkpoints/step-*/) or retrain")
    try:
        weights = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise KuklaError(f"cannot read {path}: {exc}") from None
    bad = [name for name, value in weights.items() if value.is_floating_point() and not value.isfinite().all()]
    if bad:
        raise KuklaError(f"{path}: tensor {bad[0]!r} holds NaN or inf: the weights are damaged or diverged; "
                         "use another checkpoint")
    return weights


@torch.no_grad()
def load_dictionary(directory: str | Path) -> Dictionary:
    """A Dictionary from one of ours or from a plain SAELens directory (standard, topk, jumprelu,
    batchtopk, transcoder, jumprelu_transcoder); `.metadata` holds kukla.json (or hooks for SAELens)."""
    directory = Path(directory)
    if not (directory / CFG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise KuklaError(f"{directory} is not a dictionary directory: expected {CFG_FILE} and {WEIGHTS_FILE} "
                         f"(SAELens format), written by `kukla train` or SAELens")
    if (directory / KUKLA_FILE).is_file():
        return _load_ours(directory)
    return _load_saelens(directory)


def _current_config(config: dict) -> dict:
    """A saved config as this version reads it: kukla before the `prefixes` setting wrote
    prefixes = "sampled" (then the sampling mode of matryoshka-prefix only) and an activation for
    every arch; every arch but matryoshka-prefix sets both itself."""
    if config.get("arch") not in (None, "matryoshka-prefix"):
        return {key: value for key, value in config.items() if key not in ("activation", "prefixes")}
    return config


def _load_ours(directory: Path) -> Dictionary:
    info = _read_json(directory / KUKLA_FILE)
    if info.get("format") != FORMAT or info.get("format_version", 0) > FORMAT_VERSION:
        raise KuklaError(f"{directory / KUKLA_FILE} is not a kukla dictionary this version can read "
                         f"(format {info.get('format')!r} v{info.get('format_version')})")
    dictionary = Dictionary(from_dict(DictionaryConfig, _current_config(info["config"]),
                                      source=str(directory / KUKLA_FILE)))
    weights = _read_weights(directory, info.get("weights_sha256"))
    s_in, s_out = info["scales"]["input"], info["scales"]["target"]
    dictionary.W_enc.copy_(weights["W_enc"] / s_in)
    dictionary.b_enc.copy_(weights["b_enc"])
    dictionary.W_dec.copy_(weights["W_dec"] * s_out)
    dictionary.b_dec.copy_(weights["b_dec"] * s_out)
    dictionary.input_scale.fill_(s_in)
    dictionary.target_scale.fill_(s_out)
    if "threshold" in weights:
        dictionary.rule.load_threshold(dictionary, weights["threshold"])
    dictionary.l0_cap.fill_(int(info.get("l0_cap") or 0))
    if info.get("inference_l0") is not None:
        dictionary.inference_l0.fill_(info["inference_l0"])
    dictionary.metadata = info
    return dictionary


def _load_saelens(directory: Path) -> Dictionary:
    cfg = _read_json(directory / CFG_FILE)
    arch = cfg.get("architecture", "standard")
    meta = cfg.get("metadata") or {}
    rule = rule_loading(arch)
    if rule is None:
        supported = [name for r in RULES.values() for name in r.loads_from]
        raise KuklaError(f"{directory}: SAELens architecture {arch!r} is not supported "
                         f"(expected one of {', '.join(supported)})")
    if cfg.get("normalize_activations", "none") != "none":
        raise KuklaError(f"{directory}: normalize_activations={cfg['normalize_activations']!r}; fold the "
                         "normalisation into the weights first (SAELens: fold_activation_norm_scaling_factor)")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise KuklaError(f"{directory}: rescale_acts_by_decoder_norm is not supported; save it with "
                         "normalised decoder rows first (SAELens: fold_W_dec_norm)")
    transcoder = arch == rule.saelens[True]
    dictionary = Dictionary(DictionaryConfig(
        d_in=cfg["d_in"], width=cfg["d_sae"], activation=rule.name, prefixes="none", k=cfg.get("k"),  # type: ignore[arg-type]
        d_out=cfg.get("d_out") if transcoder else None, transcoder=transcoder))
    weights = _read_weights(directory)
    dictionary.W_enc.copy_(weights["W_enc"])
    dictionary.W_dec.copy_(weights["W_dec"])
    dictionary.b_dec.copy_(weights["b_dec"])
    b_enc = weights.get("b_enc", torch.zeros(cfg["d_sae"]))
    if not transcoder and not cfg.get("apply_b_dec_to_input", True):  # SAELens encodes x, we encode x − b_dec
        b_enc = b_enc + weights["b_dec"] @ weights["W_enc"]
    dictionary.b_enc.copy_(b_enc)
    threshold = weights.get("threshold", weights.get("topk_threshold"))
    if threshold is not None:
        dictionary.rule.load_threshold(dictionary, threshold)
    input_hook = meta.get("hook_name") or cfg.get("hook_name")
    dictionary.metadata = {"hooks": {"input": input_hook, "target": meta.get("hook_name_out") or input_hook},
                           "saelens": cfg}
    return dictionary
