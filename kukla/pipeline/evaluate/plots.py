"""Report figures as base64 PNG, so report.html is one self-contained file (no URLs)."""

from __future__ import annotations

import base64
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _outlines(dicts: dict[str, dict[str, Any]], hist_of: Any, xlabel: str, ylabel: str) -> str:
    """One step outline per dictionary; `hist_of(metrics)` gives (counts, edges, legend label)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for name, metrics in dicts.items():
        counts, edges, label = hist_of(metrics["reconstruction"])
        ax.stairs(counts, edges, label=f"{name} ({label})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return _png(fig)


def density_histogram(dicts: dict[str, dict[str, Any]]) -> str:
    """log10 feature density of the live latents, one outline per dictionary."""
    def hist(r: dict[str, Any]) -> tuple[Any, Any, str]:
        h = r["log10_density_histogram"]
        return h["count"], h["edges"], f"{r['dead_latents']} dead"

    return _outlines(dicts, hist, "log10 fraction of eval tokens on which the latent fires", "latents")


def l0_histogram(dicts: dict[str, dict[str, Any]]) -> str:
    """Active latents per token, as a fraction of tokens."""
    def hist(r: dict[str, Any]) -> tuple[Any, Any, str]:
        counts = np.asarray(r["l0_histogram"]["count"], dtype=float)
        return counts / max(counts.sum(), 1), np.arange(len(counts) + 1) - 0.5, f"mean {r['l0']:.1f}"

    return _outlines(dicts, hist, "L0 (active latents per token)", "fraction of tokens")


def level_ev(dicts: dict[str, dict[str, Any]]) -> str:
    """EV using only each Matryoshka prefix, against the prefix width."""
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for name, metrics in dicts.items():
        levels = metrics["reconstruction"]["levels"]
        ax.plot([lv["width"] for lv in levels], [lv["explained_variance"] for lv in levels], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("latents used (prefix width)")
    ax.set_ylabel("explained variance")
    ax.legend(fontsize=7)
    return _png(fig)


def truth_heatmap(name: str, cosines: list[list[float]], truth_names: list[str], columns: list[int]) -> str:
    """Cosine of each true feature (rows) with the matched latents and the closest others (columns)."""
    matrix = np.asarray(cosines)
    fig, ax = plt.subplots(figsize=(min(12, 2 + 0.2 * len(columns)), min(10, 1.4 + 0.2 * len(truth_names))))
    im = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r", aspect="auto")
    ax.set_yticks(range(len(truth_names)), truth_names, fontsize=6)
    ax.set_xticks(range(len(columns)), [str(c) for c in columns], fontsize=5, rotation=90)
    ax.set_xlabel("latent (matched ones first)")
    ax.set_title(f"{name}: decoder–truth cosine", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    return _png(fig)


def absorption_per_letter(dicts: dict[str, dict[str, Any]]) -> str | None:
    """Mean absorption fraction per first letter, grouped bars per dictionary."""
    rows = {n: m["absorption"]["per_letter"] for n, m in dicts.items() if m.get("absorption", {}).get("per_letter")}
    if not rows:
        return None
    letters = sorted({letter for per in rows.values() for letter in per})
    fig, ax = plt.subplots(figsize=(8, 3.2))
    width = 0.8 / len(rows)
    for i, (name, per) in enumerate(rows.items()):
        values = [per.get(letter, {}).get("mean_absorption_fraction", np.nan) for letter in letters]
        ax.bar(np.arange(len(letters)) + i * width, values, width, label=name)
    ax.set_xticks(np.arange(len(letters)) + 0.4 - width / 2, letters)
    ax.set_ylabel("mean absorption fraction")
    ax.set_xlabel("first letter")
    ax.legend(fontsize=7)
    return _png(fig)


def frontier(dicts: dict[str, dict[str, Any]], metric: tuple[str, str], ylabel: str) -> str | None:
    """One point per dictionary: L0 against `metric`; Matryoshka (squares) apart from plain (circles)."""
    points = [(name, m["reconstruction"]["l0"], m.get(metric[0], {}).get(metric[1]), len(m["levels"]) > 1)
              for name, m in dicts.items()]
    points = [p for p in points if p[2] is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for matryoshka, marker, label in ((True, "s", "Matryoshka"), (False, "o", "plain")):
        chosen = [p for p in points if p[3] == matryoshka]
        if chosen:
            ax.scatter([p[1] for p in chosen], [p[2] for p in chosen], marker=marker, s=50, label=label)
    middle = (min(p[1] for p in points) + max(p[1] for p in points)) / 2
    for name, l0, value, _ in points:  # a name reads away from the nearer side, inside the frame
        left = l0 > middle
        ax.annotate(name, (l0, value), fontsize=6, xytext=(-4 if left else 4, 4), textcoords="offset points",
                    ha="right" if left else "left")
    ax.margins(0.15)
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return _png(fig)


def training_curves(name: str, curves: dict[str, list[float]]) -> str:
    """Loss terms, FVU, L0, dead latents and learning rate over training tokens, one panel each."""
    tokens = curves["tokens"]
    losses = [k for k in curves if "loss" in k]
    panels = [("loss terms", losses)] + [(k, [k]) for k in ("fvu", "l0", "dead_pct", "lr") if k in curves]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            ax.plot(tokens, curves[key], label=key)
        if title == "loss terms" and len(keys) > 1:
            ax.legend(fontsize=6)
        if title in ("loss terms", "fvu") and all(v > 0 for k in keys for v in curves[k]):
            ax.set_yscale("log")
        ax.set_title(f"{name}: {title}" if ax is axes[0][0] else title, fontsize=8)
        ax.set_xlabel("tokens", fontsize=7)
        ax.tick_params(labelsize=6)
    return _png(fig)
