"""What a harvest stores is what the model computes, for exactly the planned tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kukla.pipeline.harvest import HarvestConfig, harvest
from kukla.storage import open_store


def _expected_windows(tokenizer, docs: list[str], context_size: int, budget: int) -> tuple[torch.Tensor, set]:
    """Packing written out independently: docs + EOS concatenated, cut into BOS-led windows;
    the first `budget` non-special positions are the planned rows."""
    stream, keep = [], []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        stream += ids + [tokenizer.eos_token_id]
        keep += [True] * len(ids) + [False]
    body = context_size - 1
    windows, planned = [], set()
    for w, start in enumerate(range(0, len(stream), body)):
        part = stream[start:start + body]
        windows.append([tokenizer.bos_token_id] + part + [tokenizer.pad_token_id] * (body - len(part)))
        for p, kept in enumerate(keep[start:start + body]):
            if kept and len(planned) < budget:
                planned.add((w, p + 1))
    return torch.tensor(windows), planned


def test_stored_rows_equal_run_with_cache_for_the_planned_tokens(config_model, texts: Path, tmp_path: Path,
                                                                 store_rows) -> None:
    read_rows, rows_by_token = store_rows
    hooks = ["resid_pre:0", "mlp_in:1", "mlp_post:0", "mlp_out:1", "blocks.0.attn.hook_z"]
    config = HarvestConfig(output=str(tmp_path / "s.zarr"), dataset=str(texts), hook=hooks, context_size=24,
                           tokens=700, segment_windows=3, batch_size=2, store_dtype="float32")
    harvest(config, model=config_model)

    docs = [json.loads(line)["text"] for line in texts.read_text().splitlines()]
    windows, planned = _expected_windows(config_model.tokenizer, docs, 24, 700)
    stored = rows_by_token(read_rows(config.output))
    assert set(stored) == planned

    names = ["blocks.0.hook_resid_pre", "blocks.1.hook_mlp_in", "blocks.0.mlp.hook_post", "blocks.1.hook_mlp_out",
             "blocks.0.attn.hook_z"]
    with torch.no_grad():
        _, cache = config_model.run_with_cache(windows, names_filter=names)  # full forward, no stop
    for (w, p), row in stored.items():
        assert row["tokens/token_id"] == windows[w, p]
        for name in names:
            np.testing.assert_allclose(row[f"acts/{name}"], cache[name][w, p].reshape(-1).numpy(), atol=1e-5)
    meta = open_store(config.output).meta
    assert meta["hooks"] == {"blocks.0.hook_resid_pre": 16, "blocks.1.hook_mlp_in": 16, "blocks.0.mlp.hook_post": 32,
                             "blocks.1.hook_mlp_out": 16, "blocks.0.attn.hook_z": 16}
    assert meta["special_tokens"]["excluded"] and meta["source"] == "model"


def test_outlier_tokens_are_dropped_from_every_hook_and_counted(config_model, texts: Path, tmp_path: Path,
                                                                store_rows) -> None:
    read_rows, _ = store_rows
    out = str(tmp_path / "s.zarr")
    harvest(HarvestConfig(output=out, dataset=str(texts), hook=["resid_post:0", "resid_post:1"], context_size=24,
                          tokens=500, segment_windows=4, outlier_factor=1.05, store_dtype="float32"),
            model=config_model)
    rows = read_rows(out)
    planned, dropped = open_store(out).read("static/harvest_rows_rank_00000").tolist()
    assert planned == 500 and 0 < dropped < 500
    assert len(rows["tokens/sequence"]) == planned - dropped
    assert len(rows["acts/blocks.0.hook_resid_post"]) == len(rows["acts/blocks.1.hook_resid_post"])


def test_rows_cross_to_the_host_in_the_store_dtype_with_their_norms(config_model, texts: Path) -> None:
    import itertools

    from kukla.pipeline.harvest.forward import SegmentForward
    from kukla.pipeline.harvest.run import Segment
    from kukla.pipeline.text import iter_texts, iter_windows

    texts_in = iter_texts(str(texts), None, "train", None, "text")
    windows = tuple(itertools.islice(iter_windows(texts_in, config_model.tokenizer, 24), 5))
    segment = Segment(0, int(sum(w.keep.sum() for w in windows)), windows)
    widths = {"blocks.1.hook_resid_post": 16, "blocks.0.mlp.hook_post": 32}
    pending = SegmentForward(config_model, widths, batch_size=2, store_dtype="bfloat16")(segment)
    assert pending.acts.dtype == torch.bfloat16 and pending.acts.shape == (segment.planned_rows, 48)

    tokens = torch.tensor(np.stack([w.tokens for w in windows]))
    keep = torch.tensor(np.concatenate([w.keep for w in windows]))
    with torch.no_grad():
        _, cache = config_model.run_with_cache(tokens, names_filter=list(widths))  # one batch, full forward
    expected = [cache[h].reshape(-1, cache[h].shape[-1])[keep] for h in widths]
    torch.testing.assert_close(pending.acts.float(), torch.cat(expected, 1).bfloat16().float(), rtol=2 ** -7, atol=1e-6)
    norms = torch.stack([x.double().norm(dim=1) for x in expected], 1).float()
    torch.testing.assert_close(pending.norms, norms, rtol=1e-5, atol=1e-6)


def test_jsonl_texts_are_the_texts_datasets_reads(tmp_path: Path) -> None:
    """The line-by-line .jsonl reader gives what `datasets` gives for the same file: order,
    unicode, escapes, blank lines skipped, empty and missing texts left out."""
    import datasets

    from kukla.pipeline.text import iter_texts

    rows = [{"text": "Tom saw a cat.", "id": 0}, {"text": "", "id": 1}, {"text": "naïve café ✓ \"quoted\"\nnew line"},
            {"id": 3}, {"text": "Last one.", "id": 4}]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[2:]))
    theirs = [r["text"] for r in datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)
              if r["text"]]
    assert list(iter_texts(str(path), None, "train", None, "text")) == theirs
    assert theirs == ["Tom saw a cat.", "naïve café ✓ \"quoted\"\nnew line", "Last one."]
