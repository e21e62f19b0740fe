"""Warnings a reader needs beside the numbers: too few tokens or contexts, a model mismatch.

Each is a string in the dictionary's `warnings` list of metrics.json, shown next to the
table in report.html and report.md.
"""

from __future__ import annotations

from typing import Any

DEAD_MIN_TOKENS = 1_000_000
"""Below this many eval tokens a rare latent (firing once per 1e6 tokens) can look dead."""
EV_MIN_TOKENS = 10_000
DOWNSTREAM_MIN_CONTEXTS = 32


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
    contexts = (metrics.get("downstream") or {}).get("contexts")
    if contexts is not None and contexts < DOWNSTREAM_MIN_CONTEXTS:
        out.append(f"CE recovered and KL from only {contexts} context windows: too few to compare "
                   f"dictionaries (use --downstream-contexts ≥ {DOWNSTREAM_MIN_CONTEXTS})")
    trained_on = (dictionary_meta or {}).get("model_name")
    store_model = (store_meta.get("model") or {}).get("name")
    if trained_on and store_model and str(trained_on) != str(store_model):
        out.append(f"hook/model mismatch: trained on activations of {trained_on}, evaluated on a store of {store_model}")
    return out
