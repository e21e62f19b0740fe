"""report.md and a self-contained report.html (figures inlined as base64 PNG, the latent browser's
data as embedded JSON), side by side."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from kukla.pipeline.evaluate import plots
from kukla.pipeline.evaluate.tree import MIN_FRACTION

TEMPLATES = Path(__file__).parent / "templates"

_ROWS: list[tuple[str, tuple[str, ...], str]] = [
    ("kind", ("kind",), "s"),
    ("hook (input → target)", ("hooks",), "s"),
    ("latents", ("width",), "d"),
    ("eval tokens", ("reconstruction", "n_tokens"), "d"),
    ("explained variance", ("reconstruction", "explained_variance"), ".4f"),
    ("FVU", ("reconstruction", "fvu"), ".4f"),
    ("MSE", ("reconstruction", "mse"), ".4g"),
    ("cosine(x, x̂)", ("reconstruction", "cosine"), ".4f"),
    ("L0", ("reconstruction", "l0"), ".2f"),
    ("dead latents", ("reconstruction", "dead_latents"), "d"),
    ("dense latents (>1%)", ("reconstruction", "dense_latents_above_0.01"), "d"),
    ("dense latents (>10%)", ("reconstruction", "dense_latents_above_0.1"), "d"),
    ("decoder max cosine, mean", ("decoder", "max_cosine_mean"), ".3f"),
    ("decoder pairs > 0.9 (latents)", ("decoder", "latents_above_0.9"), "d"),
    ("CE loss recovered", ("downstream", "ce_loss_recovered"), ".4f"),
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
    lines += [f"> warning ({name}): {w}" for name, m in dicts.items() for w in m.get("warnings", [])]
    lines += [""] if any(m.get("warnings") for m in dicts.values()) else []
    lines += ["| metric | " + " | ".join(dicts) + " |", "|---|" + "---|" * len(dicts)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in summary_rows(dicts)]
    matching = [f"- {a} → {b}: {_cell(v, ('mean_max_correlation',), '.3f')} (on {v['rows']} rows)"
                for a, m in dicts.items() for b, v in m.get("matching", {}).items()]
    if matching:
        lines += ["", "## Cross-dictionary matching (mean max activation correlation)", ""] + matching
    levels = _levels_rows(dicts)
    if levels:
        lines += ["", "## Matryoshka levels (EV and L0 using only each prefix)", ""] + [f"- {line}" for line in levels]
    lines += ["", "Definitions: EV = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² over all eval tokens (float64, x̄ the token mean); "
              "CE recovered = (CE_zero − CE_dict) / (CE_zero − CE_clean); KL score = 1 − KL_dict / KL_zero.", ""]
    path.write_text("\n".join(lines))


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
    data = json.dumps(index, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    matching = {a: {b: _cell(v, ("mean_max_correlation",), ".3f") for b, v in m["matching"].items()}
                for a, m in dicts.items() if m.get("matching")}
    page = _template().render(
        names=list(dicts), store=report["store"], notes=report["notes"], rows=summary_rows(dicts),
        warnings={n: m.get("warnings", []) for n, m in dicts.items()}, levels=_levels_rows(dicts),
        sweep=_sweep_figures(dicts), matching=matching, tree_min=round(100 * MIN_FRACTION),
        training=[(f"Training: {n}", plots.training_curves(n, c)) for n, c in (training or {}).items()],
        figures=_figures(report), data=data, pages=pages,
        style=(TEMPLATES / "report.css").read_text(), script=(TEMPLATES / "report.js").read_text())
    path.write_text(page)
