"""Text in, context windows out: the deterministic token order every harvest rank agrees on, and
that evaluate re-makes for its downstream windows (after the harvested ones).

Documents are **packed**: their tokens are concatenated in dataset order, each document
followed by a separator (EOS, else BOS), and cut into windows of `context_size`, each
starting with a BOS. Packing wastes no forward compute on padding (SAELens packs too);
one-document-per-window padding would spend most of a window on pads for short texts
such as TinyStories. Only the dataset's last window is padded.

A window carries a `keep` mask: the positions that become store rows. BOS, separators,
pads and any other special token are left out unless `keep_special_tokens` is set; the
mask is built from positions, not token ids, since many tokenizers share one id for
BOS, EOS and pad.

Local files are read through `datasets` like Hub datasets: .json and .parquet give one
document per row; a .txt file gives one document per line. A .jsonl file (one JSON object per
line) is read line by line, only as far as the harvest needs: `datasets` parses a whole block
of the file first (0.045 CPU-s per run here, 40× the lines' own cost) and costs ≈ 1 s to import.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kukla.errors import KuklaError

LOCAL_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Window:
    """One context window: `context_size` token ids and which positions are stored."""

    index: int
    """Position of the window in the dataset's window order (its `tokens/sequence` value)."""
    tokens: np.ndarray
    """[context_size] int64 token ids, BOS first."""
    keep: np.ndarray
    """[context_size] bool: positions that become store rows."""


def dataset_spec(dataset: str, subset: str | None, split: str, revision: str | None, text_column: str) -> dict[str, Any]:
    """What the store's metadata says about its text: a Hub dataset by name and revision, a local
    file by its name and size, not its path (`local_path`), so a rerun that reads the same file
    by another path (another host's mount of it) is the same run."""
    path = local_path(dataset)
    return {"name": dataset if path is None else path.name, "local": path is not None, "subset": subset,
            "split": split if path is None else "train", "revision": revision, "text_column": text_column,
            **({} if path is None else {"bytes": path.stat().st_size})}


def local_path(name_or_path: str) -> Path | None:
    """The absolute path of a local file or folder, None for a Hub name."""
    path = Path(name_or_path).expanduser()
    return path.resolve() if path.exists() else None


def iter_texts(dataset: str, subset: str | None, split: str, revision: str | None, text_column: str) -> Iterator[str]:
    """The texts in dataset order, streamed (local files and Hub datasets alike)."""
    path = Path(dataset).expanduser()
    if not path.exists() and (path.suffix in LOCAL_FORMATS or dataset.startswith((".", "/", "~"))):
        raise KuklaError(f"dataset file {path.absolute()} does not exist: check the path (a Hub dataset is "
                         "named owner/name, without a file suffix)")
    try:
        if path.exists():
            if path.suffix not in LOCAL_FORMATS:
                raise KuklaError(f"{path}: unknown file type; use one of {', '.join(LOCAL_FORMATS)}")
            rows = (_json_lines(path) if path.suffix == ".jsonl" else
                    _datasets().load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train",
                                             streaming=True))
        else:
            rows = _datasets().load_dataset(dataset, subset, split=split, revision=revision, streaming=True)
    except KuklaError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for "cannot get it"
        raise KuklaError(f"cannot open dataset {dataset!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                         " (a Hub dataset needs network; offline, pass a local .txt/.jsonl/.parquet file)") from None
    seen = False
    for row in rows:
        if not seen and text_column not in row:
            raise KuklaError(f"dataset {dataset!r} has no column {text_column!r}; its columns are "
                             f"{', '.join(row)}: pass --dataset-text-column")
        seen = True
        text = row.get(text_column)  # a JSON line without it has no text, as `datasets` reads it
        if text:
            yield str(text)
    if not seen:
        raise KuklaError(f"dataset {dataset!r} (split {split!r}) is empty: give one that holds text")


def _datasets() -> Any:
    import datasets  # deferred: a second of import that a .jsonl harvest does not need

    return datasets


def _json_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The objects of a JSON-lines file in order, blank lines skipped."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise KuklaError(f"{path} line {number} is not JSON ({exc.msg}): fix or remove that line") from None
            if not isinstance(row, dict):
                raise KuklaError(f"{path} line {number} is not a JSON object: give one object per line, "
                                 "e.g. {\"text\": ...}")
            yield row


def special_token_policy(tokenizer: Any, keep_special_tokens: bool) -> dict[str, Any]:
    """The metadata entry that says which positions the store leaves out."""
    return {
        "packing": "documents concatenated with a separator, windows start with BOS",
        "bos_token_id": tokenizer.bos_token_id,
        "separator_token_id": _separator_id(tokenizer),
        "pad_token_id": _pad_id(tokenizer),
        "excluded": [] if keep_special_tokens else ["bos", "separator", "pad", "special"],
    }


def special_ids(tokenizer: Any) -> list[int]:
    """The token ids a harvest leaves out unless `keep_special_tokens`: BOS, the separator, the pad
    and every other special token."""
    ids = {*tokenizer.all_special_ids, tokenizer.bos_token_id, _separator_id(tokenizer), _pad_id(tokenizer)}
    return sorted(i for i in ids if i is not None)


def _separator_id(tokenizer: Any) -> int:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _separator_id(tokenizer)


def iter_windows(texts: Iterator[str], tokenizer: Any, context_size: int, *,
                 keep_special_tokens: bool = False, tokenize_batch: int = 32) -> Iterator[Window]:
    """Pack tokenized texts into BOS-led windows, in order, with their `keep` masks."""
    if tokenizer.bos_token_id is None:
        raise KuklaError("the tokenizer has no BOS token; kukla starts every window with one")
    special = np.array(special_ids(tokenizer), dtype=np.int64)
    separator, pad = _separator_id(tokenizer), _pad_id(tokenizer)
    body = context_size - 1
    ids: list[int] = []
    keep: list[bool] = []
    index = 0

    def window(ids_part: list[int], keep_part: list[bool]) -> Window:
        n_pad = body - len(ids_part)
        tokens = np.array([tokenizer.bos_token_id, *ids_part, *[pad] * n_pad], dtype=np.int64)
        mask = np.array([keep_special_tokens, *keep_part, *[keep_special_tokens] * n_pad], dtype=bool)
        return Window(index, tokens, mask)

    batch: list[str] = []
    for text in _then_none(texts):
        if text is not None:
            batch.append(text)
            if len(batch) < tokenize_batch:
                continue
        for doc in tokenizer(batch, add_special_tokens=False)["input_ids"] if batch else []:
            doc = np.asarray(doc, dtype=np.int64)
            doc_keep = np.ones(len(doc), dtype=bool) if keep_special_tokens else ~np.isin(doc, special)
            ids.extend(doc.tolist())
            ids.append(separator)
            keep.extend(doc_keep.tolist())
            keep.append(keep_special_tokens)
            while len(ids) >= body:
                yield window(ids[:body], keep[:body])
                index += 1
                del ids[:body], keep[:body]
        batch = []
    if any(keep):
        yield window(ids, keep)


def _then_none(items: Iterator[str]) -> Iterator[str | None]:
    """The items, then a None that tells the consumer to flush."""
    yield from items
    yield None
