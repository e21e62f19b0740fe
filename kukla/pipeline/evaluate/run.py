"""`evaluate(config) -> Path`: every metric for several dictionaries on one store, one report.

One pass over the held-out rows feeds every dictionary (reconstruction, sparsity, per-level,
top activations, toy truth); then the model runs once for the downstream metrics (clean and
ablated passes shared by all dictionaries) and once for the absorption words. The report
directory gets metrics.json LAST: a directory without it is an unfinished report.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from transformer_lens import HookedTransformer

from kukla.atomic import staged_files, write_atomic
from kukla.config import to_dict, usable_device
from kukla.errors import KuklaError, Preempted, stop_on_sigterm
from kukla.pipeline.dictionary import Dictionary, calibration_rows, evaluation_rows, load_dictionary
from kukla.pipeline.evaluate import browser
from kukla.pipeline.evaluate import contexts as ctx
from kukla.pipeline.evaluate.config import EvaluateConfig
from kukla.pipeline.evaluate.latents import TopActivations, nearest_latents, write_latent_table
from kukla.pipeline.evaluate.reconstruction import ReconstructionStats, Splice, evaluate_downstream
from kukla.pipeline.evaluate.report import (calibration_overlap, caveats, trained_elsewhere, training_curves, write_html,
                                            write_markdown)
from kukla.pipeline.massive import has_flags, massive_by_norm, massive_ratio, massive_rows
from kukla.pipeline.text import special_ids
from kukla.pipeline.toy import TOY_ACTIVITY, TOY_DIRECTIONS, TOY_PARENT, ToyTruth
from kukla.progress import progress
from kukla.storage import Store, open_store
from kukla.storage.location import check_output_dir

logger = logging.getLogger(__name__)


@dataclass
class Entry:
    """One dictionary under evaluation and its running statistics."""

    name: str
    path: Path
    dictionary: Dictionary
    input_hook: str
    target_hook: str
    stats: ReconstructionStats
    top: TopActivations
    browse: browser.BrowserStats = field(init=False)
    toy: ToyTruth | None = None
    downstream: dict[str, Any] | None = None
    absorption: dict[str, Any] | None = None
    tails: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.browse = browser.BrowserStats(self.dictionary.width, self.dictionary.levels)

    @functools.cached_property
    def nearest(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each latent's nearest others by decoder cosine (values, indices [F, NEAREST]), closest first:
        one F²·d pass for the metrics and the browser (output_directions is W_dec over one scale, so
        the cosines are W_dec's)."""
        return nearest_latents(self.dictionary.output_directions.detach(), browser.NEAREST,
                               desc=f"decoder cosines ({self.name})")

    @property
    def transcoder(self) -> bool:
        return bool(self.dictionary.cfg.transcoder)


def _hooks_of(dictionary: Dictionary, path: Path, store: Store) -> tuple[str, str]:
    hooks = (dictionary.metadata or {}).get("hooks") or {}
    source, target = hooks.get("input"), hooks.get("target")
    if source is None:
        if len(store.hooks) != 1:
            raise KuklaError(f"{path} does not record its hook and store {store.url} has several "
                             f"({', '.join(store.hooks)}): save the dictionary with its hook name")
        source = next(iter(store.hooks))
    target = target or source
    for hook, width, what in ((source, dictionary.d_in, "d_in"), (target, dictionary.d_out, "d_out")):
        if hook not in store.hooks:
            raise KuklaError(f"{path} reads hook {hook!r}, which store {store.url} lacks; "
                             f"its hooks: {', '.join(store.hooks)}")
        if store.hooks[hook] != width:
            raise KuklaError(f"{path} has {what} {width} but hook {hook!r} in store {store.url} is "
                             f"{store.hooks[hook]} wide: this dictionary was trained on another model or hook")
    return source, target


def load_entries(config: EvaluateConfig, store: Store, device: str) -> list[Entry]:
    """Load and check every dictionary against the store before any work starts."""
    entries: list[Entry] = []
    slugs: set[str] = set()
    for path, name in zip(config.dictionaries, dictionary_names(config.dictionaries)):
        if not Path(path).is_dir():
            what = "is a file" if Path(path).exists() else "does not exist"
            raise KuklaError(f"dictionary directory {path} {what}: give a folder kukla train wrote (or a SAELens one)")
        dictionary = load_dictionary(path).to(device).eval()
        source, target = _hooks_of(dictionary, Path(path), store)
        while _slug(name) in slugs:  # unique file names too: "a b" and "a_b" would share latents_a_b.parquet
            name = f"{Path(path).resolve().parent.name}/{name}"
        slugs.add(_slug(name))
        entries.append(Entry(name, Path(path), dictionary, source, target,
                             ReconstructionStats(dictionary.width, dictionary.levels),
                             TopActivations(dictionary.width, config.top_examples)))
    return entries


def dictionary_names(paths: list[Path]) -> list[str]:
    """Each dictionary's name in the report: its folder's name, with as many parent folders as set it
    apart from every other folder of that name (two sweeps' same member: `sweep-a/…-s1`, `sweep-b/…-s1`),
    so no name is left bare to pass for the other run's."""
    parts = [Path(p).resolve().parts[1:] for p in paths]  # the root ("/") names nothing
    names = []
    for i, own in enumerate(parts):
        others = [other for j, other in enumerate(parts) if j != i]
        n = next((n for n in range(1, len(own)) if all(other[-n:] != own[-n:] for other in others)), len(own))
        names.append("/".join(own[-n:]))
    return names


def _attach_toy_truth(store: Store, entries: list[Entry]) -> bool:
    if store.meta.get("source") != "toy-tree" or TOY_ACTIVITY not in store.specs:
        return False
    directions = store.read(TOY_DIRECTIONS).numpy()
    parent = store.read(TOY_PARENT).numpy()
    for entry in entries:
        entry.toy = ToyTruth(directions, parent, entry.dictionary.W_dec.detach())
    return True


def eval_batches(store: Store, hooks: list[str], rows: range, batch_size: int,
                 device: str) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """The store's rows `rows`, in order, as ({hook or truth/<name>: rows}, store row indices) batches."""
    for lo in range(rows.start, rows.stop, batch_size):
        hi = min(lo + batch_size, rows.stop)
        yield {h: store.read(h, lo, hi).to(device) for h in hooks}, torch.arange(lo, hi)


@torch.no_grad()
def stream_heldout(config: EvaluateConfig, store: Store, entries: list[Entry], device: str) -> range:
    """One pass over the evaluation split (the held-out rows after the calibration split), feeding
    every dictionary; returns the rows evaluated."""
    hooks = sorted({h for e in entries for h in (e.input_hook, e.target_hook)})
    split = evaluation_rows(store)
    scored = split if config.max_tokens is None else split[:config.max_tokens]
    names = hooks + ([TOY_ACTIVITY] if _attach_toy_truth(store, entries) else [])  # truth rows beside the acts
    with progress(len(scored), "evaluate (held-out rows)") as bar:
        for acts, rows in eval_batches(store, names, scored, config.batch_size, device):
            activity = acts.get(TOY_ACTIVITY)
            for e in entries:
                z = e.dictionary.encode(acts[e.input_hook])
                levels = e.dictionary.decode_prefixes(z, e.dictionary.levels)  # the last is the full width
                e.stats.update(acts[e.target_hook], levels[-1], z, levels, rows)
                e.top.update(z, rows.to(z.device))
                e.browse.update(z)
                if e.toy is not None and activity is not None:
                    e.toy.update(z, activity)
            bar.update(len(rows))
    return scored


def score_massive(store: Store, entries: list[Entry], scored: range) -> dict[str, Any]:
    """Flag the scored rows' massive activations (the store's flags, else the norm rule on each target
    hook) and give every dictionary its EV without them, its L0 tail and its worst rows."""
    ratio = massive_ratio(store)
    toy = store.meta.get("source") == "toy-tree"  # no model: its feature rows would pass for massive ones
    flags = (torch.zeros(0, dtype=torch.long) if toy
             else massive_rows(store, scored.start, scored.stop) if has_flags(store) else None)
    found: dict[str, int] = {}
    for hook in sorted({e.target_hook for e in entries}):
        mine = [e for e in entries if e.target_hook == hook]
        rows, norm_sq, _, _ = mine[0].stats.per_row()
        excluded = flags if flags is not None else rows[massive_by_norm(norm_sq.sqrt(), ratio)]
        total = store.read_rows(hook, excluded.numpy()).double().sum(0) if excluded.numel() else torch.zeros(1)
        for e in mine:
            e.tails = e.stats.tails(excluded, total)
        found[hook] = int(excluded.numel())
    rule = ("none: a toy-tree store has no model, so no massive activations" if toy
            else "the store's tokens/massive flags" if flags is not None
            else f"row norm above {ratio:g}× the median of the scored rows (the store has no tokens/massive flags)")
    return {"rule": rule, "rows": found}


def _load_model(config: EvaluateConfig, store: Store, model: HookedTransformer | None,
                notes: list[str]) -> HookedTransformer | None:
    """The store's model (or the override); None with a note when it cannot be had."""
    if model is not None:
        return model
    from kukla.pipeline.models import load_model

    name = config.model or store.where.get("model") or (store.meta.get("model") or {}).get("name")
    if name is None:
        problem = f"store {store.url} names no model (source {store.meta.get('source', '?')})"
    else:
        try:
            return load_model(name, device=config.device, dtype=config.model_dtype)
        except KuklaError as exc:
            problem = f"model {name!r} unavailable: {exc}"
    if config.downstream.require:
        raise KuklaError(f"{problem}; downstream metrics are required (--downstream-require): pass --model")
    notes.append(f"downstream metrics and absorption skipped: {problem}")
    return None


def run_downstream(config: EvaluateConfig, store: Store, entries: list[Entry], model: HookedTransformer,
                   notes: list[str]) -> None:
    """CE recovered / ΔLM / KL for every dictionary, on fresh windows of the store's dataset."""
    try:
        windows, unseen = ctx.fresh_windows(store, model.tokenizer, config.downstream.contexts)
    except KuklaError as exc:
        windows, unseen = ctx.stored_windows(store, config.downstream.contexts), True
        if not len(windows):
            if config.downstream.require:
                raise KuklaError(f"cannot re-read the store's text for downstream metrics: {exc}") from None
            notes.append(f"downstream metrics skipped: cannot re-read the store's text ({exc}) and the store "
                         "keeps no windows")
            return
        notes.append(f"downstream contexts are the store's own windows, harvested text (cannot re-read the "
                     f"store's text: {exc})")
    if not unseen:
        notes.append("downstream contexts include harvested text (the dataset has no more windows after it)")
    left_out = bool((store.meta.get("special_tokens") or {}).get("excluded"))  # a harvest's; an import keeps all
    splices = {e.name: Splice(e.input_hook, e.target_hook, e.dictionary.forward) for e in entries}
    means = {}
    for e in entries:
        if e.stats.target.mean is not None:
            means.setdefault(e.target_hook, e.stats.target.mean.float())
    results = evaluate_downstream(model, windows, splices, batch_size=config.downstream.batch_size,
                                  unspliced=special_ids(model.tokenizer) if left_out else [],
                                  mean_ablation=means if config.downstream.mean_ablation else None)
    for e in entries:
        e_result = results[e.name]
        e_result["contexts"] = int(windows.shape[0])
        e_result["context_size"] = int(windows.shape[1])
        e.downstream = e_result


def run_absorption(config: EvaluateConfig, entries: list[Entry], model: HookedTransformer,
                   notes: list[str]) -> None:
    """First-letter absorption for residual-stream SAEs (skipped with a note for the rest)."""
    from kukla.pipeline.evaluate.absorption import first_letter_absorption, word_activations

    targets = [e for e in entries if not e.transcoder and "resid" in e.input_hook]
    if not targets:
        return
    if model.tokenizer is None:
        notes.append("absorption skipped: the model has no tokenizer")
        return
    for hook in sorted({e.input_hook for e in targets}):
        words = word_activations(model, hook, n_words=config.absorption.words, seed=config.absorption.seed)
        if isinstance(words, str):
            notes.append(f"absorption skipped for {hook}: {words}")
            continue
        acts, letters = words
        for e in (e for e in targets if e.input_hook == hook):
            def encode(x: torch.Tensor, d: Dictionary = e.dictionary) -> torch.Tensor:
                return d.encode(x.to(d.W_enc.device)).cpu()

            e.absorption = first_letter_absorption(acts, letters, encode, e.dictionary.output_directions.cpu(),
                                                   config.absorption, name=e.name)


def _dictionary_metrics(e: Entry, store: Store, scored: range) -> tuple[dict[str, Any], torch.Tensor]:
    max_cos = e.nearest[0][:, 0]
    elsewhere = trained_elsewhere(e.dictionary.metadata, store.fingerprint, store.identity_digest)
    calibrated, overlap = (None, None) if elsewhere else calibration_overlap(e.dictionary.metadata, store.fingerprint,
                                                                             scored)
    out: dict[str, Any] = {
        "path": str(e.path), "kind": "transcoder" if e.transcoder else "SAE", "arch": e.dictionary.cfg.arch or e.dictionary.cfg.label,
        "hooks": {"input": e.input_hook, "target": e.target_hook}, "d_in": e.dictionary.d_in,
        "d_out": e.dictionary.d_out, "width": e.dictionary.width, "levels": e.dictionary.levels,
        "calibration_rows": calibrated, "l0_cap": int(e.dictionary.l0_cap) or None,
        "reconstruction": e.stats.summary() | (e.tails or {}),
        "decoder": {"max_cosine_mean": float(max_cos.nanmean()),
                    "latents_above_0.9": int((max_cos > 0.9).sum())},
    }
    for key, value in (("downstream", e.downstream), ("absorption", e.absorption)):
        if value is not None:
            out[key] = value
    if e.toy is not None:
        out["toy"] = e.toy.summary()
    out["warnings"] = [w for w in (overlap, elsewhere) if w]  # the rest are added with the browser's (caveats)
    return out, max_cos


def _top_contexts(config: EvaluateConfig, store: Store, entries: list[Entry]) -> ctx.RowContexts | None:
    """The windows around every dictionary's top rows (one store scan for all), None without text."""
    rows = sorted({r for e in entries for latent in e.top.top_rows() for r in latent})
    return ctx.row_contexts(store, rows, config.context_tokens) if rows and ctx.has_token_ids(store) else None


def _write_tables(entries: list[Entry], out: Path, contexts: ctx.RowContexts | None, text: ctx.TokenText,
                  max_cos: dict[str, torch.Tensor]) -> None:
    texts = ctx.render_contexts(contexts, text) if contexts else None
    for e in entries:
        top = e.top.top_rows()
        columns = e.stats.latent_columns() | {"decoder_max_cosine": max_cos[e.name]}
        latent_contexts = [[texts[r] for r in latent] for latent in top] if texts is not None else None
        write_latent_table(out / f"latents_{_slug(e.name)}.parquet", levels=e.dictionary.levels,
                           columns=columns, top_rows=top, contexts=latent_contexts)


def _browser(config: EvaluateConfig, store: Store, entries: list[Entry], contexts: ctx.RowContexts | None,
             text: ctx.TokenText, lm: HookedTransformer | None, scored: range,
             dicts: dict[str, dict[str, Any]], notes: list[str]) -> dict[str, Any]:
    """The latent browser's data; adds matching summaries and warnings to each dictionary's metrics."""
    inputs = [browser.BrowserInput(e.name, e.dictionary, e.input_hook, e.target_hook, e.browse, e.top.top_rows(),
                                   e.stats.latent_columns(), e.nearest) for e in entries]
    w_u = lm.W_U.detach() if lm is not None else None
    payload, browser_notes = browser.build(inputs, store, contexts, text, w_u, scored, config.device)
    notes.extend(browser_notes)
    for e, item in zip(entries, inputs):
        if "matching" in item.extra:
            dicts[e.name]["matching"] = item.extra["matching"]
        dicts[e.name].setdefault("warnings", []).extend(caveats(dicts[e.name], e.dictionary.metadata, store.meta))
    return payload


def _slug(name: str) -> str:
    """The name as a file name: letters, digits and -_. kept, anything else _."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return _json_safe(value.item())
    return value


REPORT_FILES = ("report.md", "report.html", "latents_*.parquet")
"""What an evaluation writes beside metrics.json, which it writes last."""


def evaluate(config: EvaluateConfig, *, model: HookedTransformer | None = None) -> Path:
    """Evaluate `config.dictionaries` on `config.store`'s held-out rows; returns the report directory.

    `model` skips loading the store's model (e.g. one built from a HookedTransformerConfig)."""
    check_output_dir(config.out, "--out")
    device = usable_device(config.device)
    store = open_store(config.store)
    if not evaluation_rows(store):
        raise KuklaError(f"store {store.url} holds no held-out rows to evaluate on after its calibration split "
                         f"({store.holdout_rows} held out): re-finalize it with held-out rows")
    entries = load_entries(config, store, device)
    final = Path(config.out)
    try:  # a report folder holds one evaluation, whole: the old one until the new one is complete
        with stop_on_sigterm(), staged_files(final, REPORT_FILES, last="metrics.json") as out:
            _evaluate(config, store, entries, device, model, out)
    except Preempted:
        raise Preempted(f"SIGTERM: the evaluation stopped; {final} keeps the report it held: rerun the same "
                        "command to evaluate") from None
    return final


def _evaluate(config: EvaluateConfig, store: Store, entries: list[Entry], device: str,
              model: HookedTransformer | None, out: Path) -> None:
    notes: list[str] = []
    scored = stream_heldout(config, store, entries, device)
    massive = score_massive(store, entries, scored)
    tokenizer, lm = None, None
    if store.meta.get("source") == "toy-tree":
        if config.downstream.require:
            raise KuklaError(f"store {store.url} is a toy-tree store: it has no model for downstream metrics")
        notes.append("toy-tree store: no model behind it, so no downstream metrics or absorption; "
                     "see the ground-truth scores instead")
    elif config.downstream.enabled or config.absorption.enabled:
        lm = _load_model(config, store, model, notes)
        if lm is not None:
            tokenizer = lm.tokenizer
            if config.downstream.enabled:
                run_downstream(config, store, entries, lm, notes)
            if config.absorption.enabled:
                run_absorption(config, entries, lm, notes)
    dicts, max_cos = {}, {}
    for e in entries:
        dicts[e.name], max_cos[e.name] = _dictionary_metrics(e, store, scored)
    contexts = _top_contexts(config, store, entries)
    if contexts is not None and tokenizer is None:
        tokenizer, problem = ctx.load_tokenizer(store, config.model)
        if problem:
            notes.append(problem)
    text = ctx.TokenText(tokenizer)
    _write_tables(entries, out, contexts, text, max_cos)
    payload = _browser(config, store, entries, contexts, text, lm, scored, dicts, notes)
    training = {e.name: c for e in entries
                if (c := training_curves(e.path, (e.dictionary.metadata or {}).get("sweep_member")))}
    calibration = calibration_rows(store)
    report = _json_safe({"store": {"path": str(config.store), "source": store.meta.get("source"),
                                   "eval_tokens": len(scored), "eval_rows": [scored.start, scored.stop],
                                   "calibration_rows": [calibration.start, calibration.stop],
                                   "massive": massive, "fingerprint": store.fingerprint},
                         "config": to_dict(config), "notes": notes, "dictionaries": dicts})
    logger.info("writing the report to %s: its figures take a few seconds a dictionary", config.out)
    write_markdown(out / "report.md", report)
    write_html(out / "report.html", report, payload, training)
    write_atomic(out / "metrics.json", json.dumps(report, indent=2).encode())
