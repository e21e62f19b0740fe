"""Tiny real models and text for harvest tests, built offline in a few hundred milliseconds.

`tiny_model_dir` is a local Hugging Face folder (a 2-layer GPT-2 with random weights and a
character-level tokenizer), so subprocess tests load it the way users load a saved model;
`tiny_model` is the HookedTransformer kukla loads from it; `config_model` is a random
HookedTransformer built straight from a `HookedTransformerConfig` with that tokenizer.
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from collections.abc import Sequence
from typing import Any
from pathlib import Path

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from kukla.pipeline.models import load_model

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
ALPHABET = string.ascii_letters + string.digits + " .,;:!?'\"-\n"


def char_tokenizer(words: Sequence[str] = (), size: int | None = None):
    """A character-level fast tokenizer (<pad> 0, <bos> 1, <eos> 2, <unk> 3); `words` join its vocabulary as
    word-initial tokens ("Ġword", as absorption looks for them) that text never tokenizes to, and `size`
    pads it with tokens no text reaches, to a real model's vocabulary size."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = SPECIALS + list(ALPHABET) + [f"Ġ{w}" for w in words]
    tokens += [f"<unused{i}>" for i in range((size or len(tokens)) - len(tokens))]
    core = Tokenizer(models.WordLevel({tok: i for i, tok in enumerate(tokens)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def build_tiny_model_dir(folder: Path, *, n_layers: int = 2, n_ctx: int = 64, words: Sequence[str] = ()) -> Path:
    """A random GPT-2 and a char tokenizer (`char_tokenizer(words)`) saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = char_tokenizer(words)
    tokenizer.save_pretrained(folder)
    vocab = tokenizer.get_vocab()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_positions=n_ctx, n_ctx=n_ctx, n_embd=32, n_layer=n_layers, n_head=4,
                        bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"], pad_token_id=vocab["<pad>"])
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def write_texts(path: Path, n_docs: int = 40, seed: int = 0) -> Path:
    """A jsonl of short, varied documents (lengths 20–120 characters)."""
    rng = torch.Generator().manual_seed(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "Tom", "saw", "big", "red", "ball", "and", "ran", "home"]
    with path.open("w") as f:
        for _ in range(n_docs):
            n = int(torch.randint(4, 24, (1,), generator=rng))
            text = " ".join(words[int(i)] for i in torch.randint(len(words), (n,), generator=rng)) + "."
            f.write(json.dumps({"text": text, "id": _}) + "\n")
    return path


def harvest_tiny_text(root: Path, hooks: list[str], *, n_docs: int, **settings: Any) -> tuple[Path, Path, Path]:
    """A tiny GPT-2 folder and `n_docs` documents under `root`, harvested at `hooks` in float32 into
    root/store.zarr (`settings`: the rest of HarvestConfig): (store, texts, model folder)."""
    from kukla.pipeline.harvest.config import HarvestConfig
    from kukla.pipeline.harvest.run import harvest

    model_dir = build_tiny_model_dir(root / "model")
    texts = write_texts(root / "texts.jsonl", n_docs=n_docs)
    store = root / "store.zarr"
    harvest(HarvestConfig(output=store, model=str(model_dir), hook=hooks, dataset=str(texts), store_dtype="float32",
                          **settings))
    return store, texts, model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> HookedTransformer:
    return load_model(str(tiny_model_dir))


@pytest.fixture
def texts(tmp_path: Path) -> Path:
    return write_texts(tmp_path / "texts.jsonl")


@pytest.fixture
def long_texts(tmp_path: Path) -> Path:
    return write_texts(tmp_path / "long.jsonl", n_docs=200)


@pytest.fixture(scope="session")
def config_model(tiny_model_dir: Path) -> HookedTransformer:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = HookedTransformerConfig(n_layers=3, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=32,
                                  d_vocab=len(tokenizer), act_fn="gelu", normalization_type="LN", seed=0)
    return HookedTransformer(cfg, tokenizer=tokenizer).eval()


REPO = Path(__file__).resolve().parents[2]


def _kukla_cli(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    child_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                 **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "kukla", *args], cwd=REPO, env=child_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture
def kukla_cli():
    """Starts `python -m kukla ...` as a real child process (one torch thread, no network)."""
    return _kukla_cli


def read_rows(path: str) -> dict[str, np.ndarray]:
    """Every row-aligned array of a finalized store, as numpy."""
    from kukla.storage import open_store

    store = open_store(path)
    return {name: store.read(name).numpy() for name in store.specs}


def rows_by_token(rows: dict[str, np.ndarray]) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    """Rows keyed by (sequence, position), the provenance every model row carries."""
    keys = list(zip(rows["tokens/sequence"].tolist(), rows["tokens/position"].tolist()))
    assert len(set(keys)) == len(keys), "a token is stored twice"
    return {key: {name: array[i] for name, array in rows.items()} for i, key in enumerate(keys)}


@pytest.fixture
def store_rows():
    """(read_rows, rows_by_token): read a finalized store back, and index it by token."""
    return read_rows, rows_by_token
