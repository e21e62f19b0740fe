"""Warnings a reader needs beside the numbers: what to know before comparing them.

Each is one sentence, in the dictionary's `warnings` list of metrics.json, shown next to the
table in report.html and report.md: a sample too small to compare dictionaries, a threshold
calibrated on the scored rows, massive rows that dominate EV, an L0 tail far above k, a
dead-latent window the run never reached, a splice that hurts more than mean ablation, a
model mismatch.
"""

from __future__ import annotations

from typing import Any

from kukla.config import from_dict
from kukla.pipeline.dictionary.config import DictionaryConfig

DEAD_MIN_TOKENS = 1_000_000
"""Below this many eval tokens a rare latent (firing once per 1e6 tokens) can look dead."""
EV_MIN_TOKENS = 10_000
DOWNSTREAM_MIN_CONTEXTS = 32
MIN_ABSORPTION_LETTERS = 20
"""Below this many probe-able letters (of 26) the mean absorption is too noisy to rank dictionaries."""
MASSIVE_SHARE = 0.1
"""Warn when the massive-activation rows hold more than this share of the eval variance."""


def calibration_overlap(metadata: dict[str, Any], fingerprint: str, evaluated: range) -> tuple[list[int] | None, str | None]:
    """The dictionary's calibration rows (when known) and a warning when they may be among the scored rows."""
    config, training = metadata.get("config") or {}, metadata.get("metadata") or {}
    calibration = training.get("calibration")
    if calibration is None:
        calibrated = bool(config) and from_dict(DictionaryConfig, config).rule.calibrated
        if calibrated and (training.get("store") or {}).get("fingerprint") == fingerprint:
            return None, ("L0 and EV: the threshold was calibrated by an older kukla on this store's held-out "
                          "rows, which include the rows scored here: L0 ≈ k by construction")
        return None, None
    lo, hi = calibration["rows"]
    if calibration.get("store_fingerprint") != fingerprint:
        return [lo, hi], None
    shared = max(0, min(hi, evaluated.stop) - max(lo, evaluated.start))
    if shared:
        return [lo, hi], (f"L0 and EV: {shared:,} of the scored rows also calibrated this dictionary's threshold "
                          f"(rows {lo:,}–{hi:,}): they are biased toward L0 = k")
    return [lo, hi], None


def caveats(metrics: dict[str, Any], dictionary_meta: dict[str, Any] | None, store_meta: dict[str, Any]) -> list[str]:
    """The warnings for one dictionary's metrics (empty when none applies)."""
    out = []
    recon = metrics.get("reconstruction", {})
    n = int(recon.get("n_tokens", 0))
    if recon.get("dead_latents") is not None and n < DEAD_MIN_TOKENS:
        out.append(f"dead latents counted on only {n:,} eval tokens: a latent firing less than once per "
                   f"{n:,} tokens counts as dead; compare dead counts on ≥ {DEAD_MIN_TOKENS:,} tokens")
    if n < EV_MIN_TOKENS:
        out.append(f"EV, FVU and L0 from only {n:,} eval tokens: too few to rank dictionaries whose "
                   f"figures differ in the third decimal (use ≥ {EV_MIN_TOKENS:,})")
    downstream = metrics.get("downstream") or {}
    contexts = downstream.get("contexts")
    if contexts is not None and contexts < DOWNSTREAM_MIN_CONTEXTS:
        out.append(f"CE recovered and KL from only {contexts} context windows: too few to compare "
                   f"dictionaries (use --downstream-contexts ≥ {DOWNSTREAM_MIN_CONTEXTS})")
    trained_on = (dictionary_meta or {}).get("model_name")
    store_model = store_meta.get("model")
    store_model = store_model.get("name") if isinstance(store_model, dict) else store_model
    if trained_on and store_model and str(trained_on) != str(store_model):
        out.append(f"hook/model mismatch: trained on activations of {trained_on}, evaluated on a store of {store_model}")
    return out + _massive(recon, dictionary_meta or {}) + _baselines(metrics, dictionary_meta or {})


def _massive(recon: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    out = []
    share = recon.get("massive_variance_share")
    if share is not None and share > MASSIVE_SHARE:
        out.append(f"explained variance: {recon['massive_rows_excluded']} massive-activation rows hold "
                   f"{share:.0%} of the eval variance; without them EV is "
                   f"{recon['explained_variance_without_massive']:.3f}")
    tail = recon.get("l0_tail") or {}
    k = (meta.get("config") or {}).get("k")
    if k and tail.get("max", 0) > 10 * k:
        out.append(f"L0: some tokens fire {tail['max']} latents (p99.9 {tail['p99.9']}, k = {k:g})")
    return out


def _baselines(metrics: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    out = []
    window = (meta.get("metadata") or {}).get("dead_window")
    if window is not None and not window.get("engaged", True):
        out.append(f"dead latents: the dead-latent window ({window['tokens']:,} tokens) was longer than the run, "
                   "so aux-k never engaged")
    d = metrics.get("downstream") or {}
    mean_recovered = d.get("ce_loss_recovered_mean_ablation")
    if mean_recovered is not None and mean_recovered < 0:
        out.append(f"CE loss recovered {mean_recovered:.2f} against mean ablation: splicing the dictionary in "
                   f"raises the LM loss from {d['ce_loss_clean']:.2f} to {d['ce_loss_spliced']:.2f} nats/token "
                   f"(ΔLM {d['delta_lm_loss']:.2f}), more than replacing the activation by its mean "
                   f"({d['ce_loss_mean_ablation']:.2f}); the zero-ablation figure "
                   f"{d.get('ce_loss_recovered_zero_ablation', float('nan')):.2f} flatters it")
    absorption = metrics.get("absorption")
    if absorption is not None and absorption.get("letters_kept", 26) < MIN_ABSORPTION_LETTERS:
        out.append(f"absorption: only {absorption['letters_kept']} of {absorption['letters_total']} letters "
                   "passed the probe gate; too few to rank dictionaries by absorption")
    return out
