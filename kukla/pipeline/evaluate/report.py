"""report.md and a self-contained report.html (figures inlined as base64 PNG), side by side."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Callable

from kukla.pipeline.evaluate import plots

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
            cells = ", ".join(f"{lv['width']}: EV {lv['explained_variance']:.3f}, L0 {lv['l0']:.1f}" for lv in levels)
            lines.append(f"{name} — {cells}")
    return lines


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    """The report as Markdown tables (no figures: those live in report.html)."""
    dicts = report["dictionaries"]
    lines = [f"# kukla evaluation: {', '.join(dicts)}", "", f"Store: `{report['store']['path']}` "
             f"({report['store']['eval_tokens']} held-out tokens evaluated).", ""]
    lines += [f"> note: {note}" for note in report["notes"]] + ([""] if report["notes"] else [])
    lines += ["| metric | " + " | ".join(dicts) + " |", "|---|" + "---|" * len(dicts)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in summary_rows(dicts)]
    levels = _levels_rows(dicts)
    if levels:
        lines += ["", "## Matryoshka levels (EV and L0 using only each prefix)", ""] + [f"- {line}" for line in levels]
    for name, m in dicts.items():
        lines += [f"> warning ({name}): {w}" for w in m.get("warnings", [])]
    lines += ["", "Definitions: EV = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² over all eval tokens (float64, x̄ the token mean); "
              "CE recovered = (CE_abl − CE_dict) / (CE_abl − CE_clean), against mean ablation (the hook replaced by "
              "its mean; below 0: the splice hurts more than that) and zero ablation; ΔLM loss = CE_dict − CE_clean, "
              "the nats per token the splice adds; KL score = 1 − KL_dict / KL_abl (mean ablation).", ""]
    path.write_text("\n".join(lines))


def _figures(report: dict[str, Any]) -> list[tuple[str, str]]:
    dicts = report["dictionaries"]
    figures: list[tuple[str, Callable[[], str | None]]] = [
        ("Feature density", lambda: plots.density_histogram(dicts)),
        ("L0 per token", lambda: plots.l0_histogram(dicts)),
    ]
    if any(len(m["reconstruction"]["levels"]) > 1 for m in dicts.values()):
        figures.append(("Explained variance per Matryoshka level", lambda: plots.level_ev(dicts)))
    figures.append(("Absorption per first letter", lambda: plots.absorption_per_letter(dicts)))
    for name, m in dicts.items():
        toy = m.get("toy")
        if toy and toy.get("cosine_matrix"):
            figures.append((f"Toy ground truth: {name}",
                            lambda toy=toy, name=name: plots.truth_heatmap(name, toy["cosine_matrix"], toy["feature_names"],
                                                                       toy["cosine_columns"])))
    return [(title, png) for title, make in figures if (png := make()) is not None]


def write_html(path: Path, report: dict[str, Any]) -> None:
    """One HTML file with the tables and every figure embedded; it fetches nothing."""
    dicts = report["dictionaries"]
    esc = html.escape
    head = "".join(f"<th>{esc(n)}</th>" for n in dicts)
    body = "".join(f"<tr><td>{esc(label)}</td>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>"
                   for label, cells in summary_rows(dicts))
    notes = "".join(f"<p class='note'>note: {esc(n)}</p>" for n in report["notes"])
    levels = "".join(f"<li>{esc(line)}</li>" for line in _levels_rows(dicts))
    figs = "".join(f"<figure><figcaption>{esc(title)}</figcaption>"
                   f"<img alt='{esc(title)}' src='data:image/png;base64,{png}'></figure>" for title, png in _figures(report))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>kukla evaluation</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
td, th {{ border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }}
td:first-child {{ text-align: left; }}
th {{ background: #eee; }}
.note {{ background: #fff4d6; padding: 0.4em; border-left: 4px solid #e0a800; }}
figure {{ display: inline-block; margin: 0.6em; vertical-align: top; }}
figcaption {{ font-weight: bold; margin-bottom: 0.3em; }}
</style></head><body>
<h1>kukla evaluation</h1>
<p>Store <code>{esc(str(report['store']['path']))}</code>: {report['store']['eval_tokens']} held-out tokens evaluated.</p>
{notes}
<table><tr><th>metric</th>{head}</tr>{body}</table>
{"<h2>Matryoshka levels</h2><ul>" + levels + "</ul>" if levels else ""}
<h2>Figures</h2>
{figs}
<p><small>EV = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² over all eval tokens (float64, x̄ the token mean).
CE recovered = (CE_zero − CE_dict) / (CE_zero − CE_clean). KL score = 1 − KL_dict / KL_zero.</small></p>
</body></html>
"""
    path.write_text(page)
