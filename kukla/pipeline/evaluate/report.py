"""The report: report.md and a self-contained report.html side by side, with its warnings and curves.

report.html inlines its figures as base64 PNG and the latent browser's data as embedded JSON.

Caveats are the warnings a reader needs beside the numbers: what to know before comparing them. Each is one sentence, in the dictionary's `warnings` list of metrics.json, shown next to the
table in report.html and report.md: a sample too small to compare dictionaries, a threshold
calibrated on the scored rows, massive rows that dominate EV, an L0 tail far above k, a
dead-latent window the run never reached, a splice that hurts more than mean ablation, a
model mismatch.

Training curves are read back from the `metrics.jsonl` the dictionary's training run wrote: `kukla train` writes one line per logged step and sweep member into its output directory,
beside the member's dictionary directory (out/<member>/), so the log is found from the
dictionary alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from kukla.atomic import write_atomic
from kukla.config import from_dict
from kukla.pipeline.dictionary.config import DictionaryConfig
from kukla.pipeline.evaluate import plots
from kukla.pipeline.evaluate.latents import MIN_CHILD_FIRINGS, MIN_FRACTION
from kukla.pipeline.train.log import METRICS_FILE


TEMPLATES = Path(__file__).parent / "templates"

_ROWS: list[tuple[str, tuple[str, ...], str]] = [
    ("kind", ("kind",), "s"),
    ("hook (input → target)", ("hooks",), "s"),
    ("latents", ("width",), "d"),
    ("eval tokens", ("reconstruction", "n_tokens"), "d"),
    ("explained variance", ("reconstruction", "explained_variance"), ".4f"),
    ("EV without massive-activation rows", ("reconstruction", "explained_variance_without_massive"), ".4f"),
    ("FVU", ("reconstruction", "fvu"), ".4f"),
    ("MSE", ("reconstruction", "mse"), ".4g"),
    ("cosine(x, x̂)", ("reconstruction", "cosine"), ".4f"),
    ("L0", ("reconstruction", "l0"), ".2f"),
    ("L0 p99.9 / max", ("reconstruction", "_l0_tail"), "s"),
    ("dead latents", ("reconstruction", "dead_latents"), "d"),
    ("dense latents (>1%)", ("reconstruction", "dense_latents_above_0.01"), "d"),
    ("dense latents (>10%)", ("reconstruction", "dense_latents_above_0.1"), "d"),
    ("decoder max cosine, mean", ("decoder", "max_cosine_mean"), ".3f"),
    ("decoder pairs > 0.9 (latents)", ("decoder", "latents_above_0.9"), "d"),
    ("CE loss recovered (mean abl.)", ("downstream", "ce_loss_recovered_mean_ablation"), ".4f"),
    ("CE loss recovered (zero abl.)", ("downstream", "ce_loss_recovered_zero_ablation"), ".4f"),
    ("ΔLM loss (nats)", ("downstream", "delta_lm_loss"), ".4f"),
    ("CE clean / spliced / zero-abl.", ("downstream", "_ce_triplet"), "s"),
    ("KL score", ("downstream", "kl_score"), ".4f"),
    ("KL(clean ‖ spliced)", ("downstream", "kl_div"), ".4f"),
    ("absorption (mean fraction)", ("absorption", "mean_absorption_fraction"), ".4f"),
    ("absorption (full, mean rate)", ("absorption", "mean_full_absorption_rate"), ".4f"),
    ("absorption letters kept", ("absorption", "_letters"), "s"),
    ("toy: mean max cosine", ("toy", "mean_max_cosine"), ".4f"),
    ("toy: features recovered (cos>0.9)", ("toy", "recovered_above_0.9"), "s"),
    ("toy: absorption holes (mean)", ("toy", "mean_absorption_holes"), ".4f"),
]


def _derived(metrics: dict[str, Any]) -> dict[str, Any]:
    out = dict(metrics)
    hooks = metrics.get("hooks", {})
    out["hooks"] = hooks.get("input", "?") + ("" if hooks.get("target") in (None, hooks.get("input"))
                                             else f" → {hooks['target']}")
    tail = metrics.get("reconstruction", {}).get("l0_tail")
    if tail:
        out["reconstruction"] = dict(metrics["reconstruction"], _l0_tail=f"{tail['p99.9']} / {tail['max']}")
    if "downstream" in metrics:
        d = dict(metrics["downstream"])
        d["_ce_triplet"] = f"{d['ce_loss_clean']:.3f} / {d['ce_loss_spliced']:.3f} / {d.get('ce_loss_zero_ablation', math.nan):.3f}"
        out["downstream"] = d
    if "absorption" in metrics and "letters_kept" in metrics["absorption"]:
        a = dict(metrics["absorption"])
        a["_letters"] = f"{a['letters_kept']} of {a['letters_total']}"
        out["absorption"] = a
    if "toy" in metrics:
        t = dict(metrics["toy"])
        t["recovered_above_0.9"] = f"{t['recovered_above_0.9']} of {t['n_true_features']}"
        out["toy"] = t
    return out


def _cell(metrics: dict[str, Any], path: tuple[str, ...], fmt: str) -> str:
    value: Any = metrics
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return "—"
        value = value[key]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, fmt) if fmt != "s" else str(value)


def summary_rows(dicts: dict[str, dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(label, one cell per dictionary) for every metric that at least one dictionary has."""
    derived = {name: _derived(m) for name, m in dicts.items()}
    rows = []
    for label, path, fmt in _ROWS:
        cells = [_cell(m, path, fmt) for m in derived.values()]
        if any(c != "—" for c in cells):
            rows.append((label, cells))
    return rows


def _levels_rows(dicts: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for name, m in dicts.items():
        levels = m["reconstruction"]["levels"]
        if len(levels) > 1:
            cells = ", ".join(f"{lv['width']}: EV {_cell(lv, ('explained_variance',), '.3f')}, "
                              f"L0 {_cell(lv, ('l0',), '.1f')}" for lv in levels)
            lines.append(f"{name} — {cells}")
    return lines


def _markdown_text(name: str) -> str:
    """A name as table text: a `|` would add a cell, a `<` open an HTML tag or comment."""
    return name.replace("|", "\\|").replace("<", "&lt;")


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    """The report as Markdown tables (no figures: those live in report.html)."""
    dicts = report["dictionaries"]
    lines = [f"# kukla evaluation: {', '.join(map(_markdown_text, dicts))}", "", f"Store: `{report['store']['path']}` "
             f"({report['store']['eval_tokens']} held-out tokens evaluated).", ""]
    lines += [f"> note: {note}" for note in report["notes"]] + ([""] if report["notes"] else [])
    lines += [f"> warning ({name}): {w}" for name, m in dicts.items() for w in m.get("warnings", [])]
    lines += [""] if any(m.get("warnings") for m in dicts.values()) else []
    lines += ["| metric | " + " | ".join(_markdown_text(n) for n in dicts) + " |", "|---|" + "---|" * len(dicts)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in summary_rows(dicts)]
    matching = [f"- {a} → {b}: {_cell(v, ('mean_max_correlation',), '.3f')} (on {v['rows']} rows)"
                for a, m in dicts.items() for b, v in m.get("matching", {}).items()]
    if matching:
        lines += ["", "## Cross-dictionary matching (mean max activation correlation)", ""] + matching
    levels = _levels_rows(dicts)
    if levels:
        lines += ["", "## Matryoshka levels (EV and L0 using only each prefix)", ""] + [f"- {line}" for line in levels]
    lines += ["", "Definitions: EV = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² over all eval tokens (float64, x̄ the token mean); "
              "CE recovered = (CE_abl − CE_dict) / (CE_abl − CE_clean), against mean ablation (the hook replaced by "
              "its mean; below 0: the splice hurts more than that) and zero ablation; ΔLM loss = CE_dict − CE_clean, "
              "the nats per token the splice adds; KL score = 1 − KL_dict / KL_abl (mean ablation).", ""]
    write_atomic(path, "\n".join(lines).encode())  # a kill mid-write leaves the old file or none, never half


def _figures(report: dict[str, Any]) -> list[tuple[str, str]]:
    dicts = report["dictionaries"]
    figures: list[tuple[str, Callable[[], str | None]]] = [
        ("Feature density", lambda: plots.density_histogram(dicts)),
        ("L0 per token", lambda: plots.l0_histogram(dicts)),
    ]
    figures.append(("Absorption per first letter", lambda: plots.absorption_per_letter(dicts)))
    for name, m in dicts.items():
        toy = m.get("toy")
        if toy and toy.get("cosine_matrix"):
            figures.append((f"Toy ground truth: {name}",
                            lambda toy=toy, name=name: plots.truth_heatmap(name, toy["cosine_matrix"], toy["feature_names"],
                                                                       toy["cosine_columns"])))
    return [(title, png) for title, make in figures if (png := make()) is not None]


def _sweep_figures(dicts: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """Per hook: the frontiers (with several dictionaries) and the per-level EV curves overlaid."""
    by_hook: dict[str, dict[str, dict[str, Any]]] = {}
    for name, m in dicts.items():
        by_hook.setdefault(m["hooks"]["target"], {})[name] = m
    out = []
    for hook, group in by_hook.items():
        for title, metric, ylabel in (("L0 → explained variance", ("reconstruction", "explained_variance"), "explained variance"),
                                      ("L0 → CE loss recovered", ("downstream", "ce_loss_recovered"), "CE loss recovered")):
            png = plots.frontier(group, metric, ylabel) if len(group) > 1 else None
            if png is not None:
                out.append((f"Frontier {title} ({hook})", png))
        if any(len(m["levels"]) > 1 for m in group.values()):
            out.append((f"Explained variance per level, overlaid ({hook})", plots.level_ev(group)))
    return out


def _template() -> Any:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined)
    return env.get_template("report.html.j2")


def write_html(path: Path, report: dict[str, Any], browser: dict[str, Any] | None = None,
               training: dict[str, dict[str, list[float]]] | None = None) -> None:
    """One HTML file: tables, warnings, figures and the latent browser, all embedded; it fetches nothing."""
    dicts = report["dictionaries"]
    browser = browser or {"page_latents": 1, "histogram_edges": [], "vocab": {}, "dictionaries": {}}
    pages = [browser["dictionaries"].get(n, {}).get("pages", []) for n in dicts]
    index = {"page_latents": browser["page_latents"], "histogram_edges": browser["histogram_edges"],
             "vocab": browser["vocab"],
             "dictionaries": {n: {k: v for k, v in browser["dictionaries"][n].items() if k != "pages"}
                              for n in dicts if n in browser["dictionaries"]}}
    # Every "<" as \u003c: inside a script element "</script" ends it early and "<!--<script>" (a folder
    # name, or tokens of a web-text vocabulary) keeps it open past its end tag; neither is then JSON.
    data = json.dumps(index, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    matching = {a: {b: _cell(v, ("mean_max_correlation",), ".3f") for b, v in m["matching"].items()}
                for a, m in dicts.items() if m.get("matching")}
    page = _template().render(
        names=list(dicts), store=report["store"], notes=report["notes"], rows=summary_rows(dicts),
        warnings={n: m.get("warnings", []) for n, m in dicts.items()}, levels=_levels_rows(dicts),
        sweep=_sweep_figures(dicts), matching=matching, tree_min=round(100 * MIN_FRACTION),
        tree_firings=MIN_CHILD_FIRINGS,
        training=[(f"Training: {n}", plots.training_curves(n, c)) for n, c in (training or {}).items()],
        figures=_figures(report), data=data, pages=pages,
        style=(TEMPLATES / "report.css").read_text(), script=(TEMPLATES / "report.js").read_text())
    write_atomic(path, page.encode())


DEAD_MIN_TOKENS = 1_000_000
"""Below this many eval tokens a rare latent (firing once per 1e6 tokens) can look dead."""
EV_MIN_TOKENS = 10_000
DOWNSTREAM_MIN_CONTEXTS = 32
MIN_ABSORPTION_LETTERS = 20
"""Below this many probe-able letters (of 26) the mean absorption is too noisy to rank dictionaries."""
MASSIVE_SHARE = 0.1
"""Warn when the massive-activation rows hold more than this share of the eval variance."""


def trained_elsewhere(metadata: dict[str, Any], fingerprint: str, identity: str) -> str | None:
    """A warning when the dictionary was trained on another store than the one scored (another run,
    or the same run reshuffled or split otherwise): its held-out rows need not be unseen there. A SAELens
    directory names no store at all, so the warning says where it came from instead."""
    if "saelens" in metadata:
        saelens = metadata["saelens"].get("metadata") or {}
        origin = ", ".join(f"{key} {saelens[key]}" for key in ("sae_lens_training_version", "training_architecture",
                                                                 "model_name", "dataset_path") if saelens.get(key))
        return (f"held-out rows: a SAELens directory ({origin or 'no training record'}), not trained on a kukla "
                "store; where it trained on the same text, its training tokens are among the rows scored here")
    trained = (metadata.get("metadata") or {}).get("store") or {}
    if trained.get("identity", identity) == identity and trained.get("fingerprint", fingerprint) == fingerprint:
        return None
    return (f"held-out rows: the dictionary was trained on another store ({trained.get('path')}); where both hold "
            "the same text (shuffled or split otherwise), its training tokens are among the rows scored here")


def calibration_overlap(metadata: dict[str, Any], fingerprint: str, evaluated: range) -> tuple[list[int] | None, str | None]:
    """The dictionary's calibration rows (when known) and a warning when they may be among the scored
    rows; for a dictionary trained on this store (`trained_elsewhere` says when not)."""
    config, training = metadata.get("config") or {}, metadata.get("metadata") or {}
    calibration = training.get("calibration")
    if calibration is None:
        calibrated = bool(config) and from_dict(DictionaryConfig, config).rule.calibrated
        if calibrated and (training.get("store") or {}).get("fingerprint") == fingerprint:
            return None, ("L0 and EV: the threshold was calibrated by an older kukla on this store's held-out "
                          "rows, which include the rows scored here: L0 ≈ k by construction")
        return None, None
    lo, hi = calibration["rows"]
    if calibration.get("store_fingerprint") != fingerprint:  # rows of another store: none of these
        return None, None
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
    if "ce_loss_mean_ablation" in downstream and n < EV_MIN_TOKENS:
        out.append(f"CE recovered and KL against mean ablation: the mean they ablate to is taken over only {n:,} "
                   f"eval tokens, so the baseline moves with them (use ≥ {EV_MIN_TOKENS:,})")
    trained_on = _trained_model(dictionary_meta or {})
    store_model = store_meta.get("model")
    store_model = store_model.get("name") if isinstance(store_model, dict) else store_model
    if trained_on and store_model and str(trained_on) != str(store_model):
        out.append(f"hook/model mismatch: trained on activations of {trained_on}, evaluated on a store of {store_model}")
    return out + _massive(recon, dictionary_meta or {}) + _baselines(metrics, dictionary_meta or {})


def _trained_model(meta: dict[str, Any]) -> str | None:
    """The model a dictionary was trained on: kukla.json keeps the trainer's metadata under `metadata`,
    a SAELens directory its cfg.json (`saelens`) with the name under its own `metadata`."""
    saelens = meta.get("saelens") or {}
    return ((meta.get("metadata") or {}).get("model_name") or (saelens.get("metadata") or {}).get("model_name")
            or saelens.get("model_name"))


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


CURVE_KEYS = ("fvu", "l0", "dead_pct", "lr")


def training_curves(dictionary_dir: Path, member: str | None = None) -> dict[str, list[float]] | None:
    """Columns over steps (`tokens` and every logged figure) for one member; None when no log is there."""
    path = Path(dictionary_dir).parent / METRICS_FILE
    if not path.is_file():
        return None
    name = member or Path(dictionary_dir).name
    columns: dict[str, list[float]] = {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in lines if r.get("dictionary") == name and not r.get("final") and "tokens" in r]
    for row in rows:
        for key, value in row.items():
            if isinstance(value, (int, float)) and key not in ("step", "tokens_per_s"):
                columns.setdefault(key, []).append(float(value))
    return columns if rows else None
