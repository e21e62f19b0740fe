"""The store is all evaluate needs: contexts and their shading from windows/*, not from the dataset.

A real tiny model (random GPT-2, char tokenizer) is harvested; the windows are checked against
an independent packing of the same text with the tokenizer alone, and evaluate then runs with
the dataset file deleted.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import string
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from kukla.pipeline.dictionary import load_dictionary
from kukla.pipeline.evaluate import AbsorptionConfig, DownstreamConfig, EvaluateConfig, evaluate
from kukla.pipeline.evaluate.contexts import row_contexts
from kukla.pipeline.harvest.config import HarvestConfig
from kukla.pipeline.harvest.run import harvest
from kukla.pipeline.models import load_model
from kukla.storage import open_store
from kukla.storage.importer import import_arrays
from tests.evaluate.helpers import make_dictionary
from tests.harvest.conftest import build_tiny_model_dir, write_texts

HOOK = "blocks.0.hook_resid_post"
CTX = 16


@pytest.fixture(scope="module")
def harvested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("contexts")
    model_dir = build_tiny_model_dir(root / "model")
    texts = write_texts(root / "texts.jsonl", n_docs=120)
    store = root / "store.zarr"
    for rank in (1, 0):  # two ranks (rank 0 finalizes), a budget of several buckets and slabs
        harvest(HarvestConfig(output=store, model=str(model_dir), hook=[HOOK], dataset=str(texts), context_size=CTX,
                              tokens=2500, store_dtype="float32", segment_windows=8, world=2, rank=rank,
                              holdout_rows=600, memory_budget=1 << 16))
    return store, texts, model_dir


def _packed_windows(texts: Path, model_dir: Path) -> np.ndarray:
    """BOS + the next CTX − 1 tokens of the documents joined by EOS: the packing, done by hand."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stream: list[int] = []
    for line in texts.read_text().splitlines():
        stream += tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    body = CTX - 1
    return np.array([[tokenizer.bos_token_id, *stream[i:i + body]] for i in range(0, len(stream) - body + 1, body)])


def test_every_stored_rows_context_from_the_store_is_the_window_harvest_saw(harvested) -> None:
    store_path, texts, model_dir = harvested
    store = open_store(store_path)
    expected = _packed_windows(texts, model_dir)
    windows = store.read("windows/token_id").numpy()
    full = min(len(expected), store.n_windows - 1)  # the budget's last window may stop early
    assert store.n_windows > 10 and np.array_equal(windows[:full], expected[:full])
    seq, pos = store.read("tokens/sequence").numpy(), store.read("tokens/position").numpy()
    contexts = row_contexts(store, list(range(store.n_rows)), CTX - 1)
    for row in range(store.n_rows):
        p = int(pos[row])
        context = contexts.token_ids[row, CTX - 1 - p:]
        assert context.tolist() == expected[seq[row], :p + 1].tolist()  # from BOS up to the row's token
        assert (contexts.token_ids[row, :CTX - 1 - p] == -1).all()  # nothing before the window
    sources = contexts.source_rows[:, -1]
    assert np.array_equal(sources, np.arange(store.n_rows))  # each row's own token is its own row
    assert (contexts.source_rows[pos > 0, CTX - 1 - pos[pos > 0]] == -1).all()  # BOS: never a stored row


def test_an_imported_store_with_token_ids_shows_each_rows_context(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, (20, CTX))
    np.save(tmp_path / "acts.npy", rng.standard_normal((20, CTX, 8)).astype(np.float32))
    np.save(tmp_path / "ids.npy", ids)
    import_arrays(tmp_path / "s", {HOOK: str(tmp_path / "acts.npy")}, tokens=tmp_path / "ids.npy", dtype="float32")
    store = open_store(tmp_path / "s")
    contexts = row_contexts(store, list(range(store.n_rows)), 3)
    seq, pos = store.read("tokens/sequence").numpy(), store.read("tokens/position").numpy()
    for row in range(store.n_rows):
        first = max(0, pos[row] - 3)
        assert contexts.token_ids[row, 3 - (pos[row] - first):].tolist() == ids[seq[row], first:pos[row] + 1].tolist()
        assert contexts.source_rows[row, -1] == row


def _pages(html: str) -> list[dict]:
    blobs = re.findall(r'<script type="application/octet-stream" id="page-0-\d+">([^<]*)</script>', html)
    return [latent for blob in blobs for latent in json.loads(gzip.decompress(base64.b64decode(blob)))]


@pytest.mark.slow
def test_evaluate_of_a_store_whose_dataset_is_gone_still_shows_and_shades_contexts(
        tmp_path: Path, harvested) -> None:
    store_path, texts, model_dir = harvested
    moved = tmp_path / "texts.jsonl"
    texts.rename(moved)  # the dataset is gone
    try:
        g = torch.Generator().manual_seed(0)
        path = make_dictionary(tmp_path / "d", torch.randn(32, 16, generator=g), torch.randn(16, 32, generator=g),
                               hook=HOOK)
        out = evaluate(EvaluateConfig(dictionaries=[path], store=store_path, out=tmp_path / "report",
                                      downstream=DownstreamConfig(contexts=4, batch_size=4),
                                      absorption=AbsorptionConfig(enabled=False),
                                      context_tokens=6), model=load_model(str(model_dir)))
    finally:
        moved.rename(texts)
    report = json.loads((out / "metrics.json").read_text())
    assert any("the store's own windows" in note for note in report["notes"])
    assert report["dictionaries"]["d"]["downstream"]["contexts"] == 4
    table = pq.read_table(out / "latents_d.parquet").to_pylist()
    shown = [text for latent in table for text in latent["top_contexts"]]
    assert shown and all("«" in text and "»" in text for text in shown)
    store, dictionary = open_store(store_path), load_dictionary(path)
    checked = 0
    for latent, page in enumerate(_pages((out / "report.html").read_text())):
        for context in page["contexts"]:
            row = context["row"]
            assert context["ids"][-1] == int(store.read("tokens/token_id", row, row + 1))
            with torch.no_grad():
                own = float(dictionary.encode(store.read(HOOK, row, row + 1))[0, latent])
            assert context["acts"][-1] == pytest.approx(own, rel=1e-2, abs=2e-3)  # the shading is the row's own code
            checked += 1
    assert checked > 0


def _byte_fallback_tokenizer(folder: Path):
    """A Llama-style tokenizer: ASCII letters, '▁' for spaces, every other character as UTF-8 byte tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", "▁", *string.ascii_letters, *".,!", *(f"<0x{b:02X}>" for b in range(256))]
    core = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, [], unk_token="<unk>", byte_fallback=True))
    core.normalizer = normalizers.Replace(" ", "▁")
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def test_a_character_split_into_byte_tokens_shows_whole_on_the_token_that_completes_it(tmp_path: Path) -> None:
    """Emoji, CJK and accents are several byte tokens each; alone each decodes to U+FFFD, which
    the browser and the latent table must never show in their place."""
    tokenizer = _byte_fallback_tokenizer(tmp_path / "tokenizer")
    text = "Tom saw 😀 and a café in 日本!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # the characters outside the vocabulary are bytes
    n_seq, width = 300, 8
    rng = np.random.default_rng(0)
    np.save(tmp_path / "ids.npy", np.array([[tokenizer.bos_token_id, *ids]] * n_seq))
    np.save(tmp_path / "acts.npy", rng.standard_normal((n_seq, len(ids) + 1, width)).astype(np.float32))
    store = tmp_path / "s"
    import_arrays(store, {HOOK: str(tmp_path / "acts.npy")}, tokens=tmp_path / "ids.npy", dtype="float32",
                  model=str(tmp_path / "tokenizer"), holdout_rows=1200)
    g = torch.Generator().manual_seed(0)
    path = make_dictionary(tmp_path / "d", torch.randn(width, 16, generator=g), torch.randn(16, width, generator=g))
    out = evaluate(EvaluateConfig(dictionaries=[path], store=store, out=tmp_path / "report",
                                  downstream=DownstreamConfig(enabled=False), absorption=AbsorptionConfig(enabled=False),
                                  context_tokens=len(ids)))
    full = [tokenizer.bos_token_id, *ids]
    for latent in pq.read_table(out / "latents_d.parquet").to_pylist():
        for shown, row in zip(latent["top_contexts"], latent["top_rows"]):
            p = int(open_store(store).read("tokens/position", row, row + 1))
            upto = tokenizer.decode(full[:p + 1])
            before = next(t for j in range(p, -1, -1) if "\ufffd" not in (t := tokenizer.decode(full[:j])))
            if upto.endswith("\ufffd"):  # the row's token starts or continues a character: its name shows
                assert shown.endswith("«" + tokenizer.convert_ids_to_tokens(full[p]) + "»")
            else:  # the token that completes a character carries all of it
                assert shown == before + "«" + upto[len(before):] + "»"
    html = (out / "report.html").read_text()
    data = json.loads(re.search(r'<script type="application/json" id="kukla-data">(.*?)</script>', html, re.S).group(1))
    assert not any("\ufffd" in piece for piece in data["vocab"].values())
    records = [c for page in _pages(html) for c in page["contexts"]]
    split = [c for c in records if "text" in c]
    assert split and all(len(c["text"]) == len(c["ids"]) and "\ufffd" not in "".join(c["text"]) for c in split)
    assert any("😀" in c["text"][-1] for c in split)  # the emoji's last byte, highlighted, shows the emoji
