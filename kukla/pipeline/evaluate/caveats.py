"""Per-dictionary warnings: what a careful reader must know before comparing these numbers.

Each warning is one sentence that starts with the metric it qualifies. They go to metrics.json
(`dictionaries[name]["warnings"]`) and beside the numbers in the report: a sample too small to
compare dictionaries, a threshold calibrated on the scored rows, a dead-latent window the run
never reached, a splice that hurts more than mean ablation, massive rows that dominate EV.
"""

from __future__ import annotations

from typing import Any

MIN_EV_TOKENS = 10_000
"""Below this many eval rows EV and L0 move by more than ~0.01 between samples."""
DEAD_TOKENS_PER_LATENT = 10
"""Dead-latent counts need this many eval tokens per latent to tell rare latents from dead ones."""
MIN_CE_TOKENS = 10_000
"""Below this many predicted tokens CE recovered and KL move by more than a few hundredths."""
MIN_ABSORPTION_LETTERS = 20
"""Below this many probe-able letters (of 26) the mean absorption is too noisy to rank dictionaries."""
MASSIVE_SHARE = 0.1
"""Warn when the massive-activation rows hold more than this share of the eval variance."""


def calibration_overlap(metadata: dict[str, Any], fingerprint: str, evaluated: range) -> tuple[list[int] | None, str | None]:
    """The dictionary's calibration rows (when known) and a warning when they may be among the scored rows."""
    config, training = metadata.get("config") or {}, metadata.get("metadata") or {}
    calibration = training.get("calibration")
    if calibration is None:
        batchtopk = config.get("arch") in ("batchtopk", "matryoshka-batchtopk") or (
            config.get("arch") == "matryoshka-prefix" and config.get("activation") == "batchtopk")
        if batchtopk and (training.get("store") or {}).get("fingerprint") == fingerprint:
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


def dictionary_warnings(m: dict[str, Any], metadata: dict[str, Any]) -> list[str]:
    """Warnings for one dictionary's metrics (`m`: its metrics.json entry; `metadata`: its kukla.json)."""
    out: list[str] = []
    rec = m["reconstruction"]
    n = rec["n_tokens"]
    if n < MIN_EV_TOKENS:
        out.append(f"explained variance and L0: only {n:,} eval rows; differences of a few hundredths "
                   "between dictionaries may be noise")
    if n < DEAD_TOKENS_PER_LATENT * m["width"]:
        out.append(f"dead latents: {n:,} eval tokens for {m['width']:,} latents; a latent firing on fewer than "
                   f"1 in {n:,} tokens counts as dead (needs ≥ {DEAD_TOKENS_PER_LATENT * m['width']:,} tokens)")
    share = rec.get("massive_variance_share")
    if share is not None and share > MASSIVE_SHARE:
        out.append(f"explained variance: {rec['massive_rows_excluded']} massive-activation rows hold "
                   f"{share:.0%} of the eval variance; without them EV is "
                   f"{rec['explained_variance_without_massive']:.3f}")
    tail = rec.get("l0_tail") or {}
    k = (metadata.get("config") or {}).get("k")
    if k and tail.get("max", 0) > 10 * k:
        out.append(f"L0: some tokens fire {tail['max']} latents (p99.9 {tail['p99.9']}, k = {k:g})")
    window = (metadata.get("metadata") or {}).get("dead_window")
    if window is not None and not window.get("engaged", True):
        out.append(f"dead latents: the dead-latent window ({window['tokens']:,} tokens) was longer than the run, "
                   "so aux-k never engaged")
    out += _downstream_warnings(m.get("downstream"))
    absorption = m.get("absorption")
    if absorption is not None and absorption["letters_kept"] < MIN_ABSORPTION_LETTERS:
        out.append(f"absorption: only {absorption['letters_kept']} of {absorption['letters_total']} letters "
                   "passed the probe gate; too few to rank dictionaries by absorption")
    return out


def _downstream_warnings(d: dict[str, Any] | None) -> list[str]:
    if d is None:
        return []
    out = []
    predicted = d["contexts"] * (d["context_size"] - 1)
    if predicted < MIN_CE_TOKENS:
        out.append(f"CE loss recovered and KL: only {predicted:,} predicted tokens ({d['contexts']} contexts); "
                   "differences of a few hundredths may be noise")
    mean_recovered = d.get("ce_loss_recovered_mean_ablation")
    if mean_recovered is not None and mean_recovered < 0:
        out.append(f"CE loss recovered {mean_recovered:.2f} against mean ablation: splicing the dictionary in "
                   f"raises the LM loss from {d['ce_loss_clean']:.2f} to {d['ce_loss_spliced']:.2f} nats/token "
                   f"(ΔLM {d['delta_lm_loss']:.2f}), more than replacing the activation by its mean "
                   f"({d['ce_loss_mean_ablation']:.2f}); the zero-ablation figure "
                   f"{d.get('ce_loss_recovered_zero_ablation', float('nan')):.2f} flatters it")
    return out
