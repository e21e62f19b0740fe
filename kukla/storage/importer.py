"""`kukla store import`: activations a user already has (.npy, .safetensors) → a finalized,
globally shuffled store, so stores made by other tools train the same way as harvested ones."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kukla.errors import KuklaError, preemption_point, stop_on_sigterm
from kukla.progress import progress
from kukla.config import StoreDtype, coerce
from kukla.storage.format import DEFAULT_CODEC, check_codec
from kukla.storage.location import Location
from kukla.storage.finalize import check_memory_budget, finalize_store
from kukla.storage.store import open_store
from kukla.storage.part import StoreWriter, run_state

logger = logging.getLogger(__name__)

FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64", "F16", "BF16", "F32", "F64"}
SEGMENT_BYTES = 32 << 20
"""The float32 rows of every hook one segment reads at most, whatever the width: writing a segment
and shuffling it take several copies (98k rows of one d=2304 hook under a 64 MiB budget peaked at
2.4 GB with 65,536-row segments, at 370 MB with these, 250 MB being the process's floor). Each
segment's journal entry stays in finalize's memory: at d=2304, ~0.8 byte a row, as harvest's."""


@dataclass
class Source:
    """One hook's input file, read lazily by leading index (rows = leading dims flattened).

    The file is mapped for each read only (`mapped`): a mapping held for the whole import keeps
    every page read so far resident, so the process's RSS would grow to the input's size."""

    path: Path
    key: str | None
    shape: tuple[int, ...]

    @property
    def width(self) -> int:
        return self.shape[-1]

    @property
    def per_index(self) -> int:
        """Rows per leading index ([n_seq, ctx, d] files have ctx rows per sequence)."""
        return math.prod(self.shape[1:-1])

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Leading indices [lo, hi) as float32 rows: a copy, so the mapping closes on return."""
        block = mapped(self.path, self.key)[lo:hi]
        if isinstance(block, torch.Tensor):  # a float32 slice may be the mapping's own pages: copied too
            return block.to(torch.float32, copy=True).reshape(-1, self.width).numpy()
        return np.array(block, dtype=np.float32).reshape(-1, self.width)


def mapped(path: Path, key: str | None = None) -> Any:
    """The array in `path` (a .npy, or tensor `key` of a .safetensors file), memory-mapped for as
    long as it (or a slice of it) is referenced: its pages leave the process with the mapping."""
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r")
    from safetensors import safe_open

    return safe_open(str(path), framework="pt").get_slice(key)


def open_source(spec: str, hook: str) -> Source:
    """`FILE` or `FILE:KEY` (a tensor inside a .safetensors file)."""
    text, key = spec, None
    if not os.path.exists(text) and ":" in text:
        text, key = text.rsplit(":", 1)
    path = Path(text)
    if not path.exists():
        raise KuklaError(f"--hook {hook}={spec}: {path} does not exist")
    if path.suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as exc:
            raise KuklaError(f"{path} is not a readable .npy file ({exc}): it may be truncated; write it again") from None
        dtype = str(array.dtype)
        shape = array.shape
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise KuklaError(f"{path} is not a readable .safetensors file ({exc}): it may be truncated; "
                             "write it again") from None
        keys = list(handle.keys())
        if key is None:
            if len(keys) != 1 and hook not in keys:
                raise KuklaError(f"{path} holds tensors {', '.join(keys)}: name one as --hook {hook}={path}:KEY")
            key = hook if hook in keys else keys[0]
        if key not in keys:
            raise KuklaError(f"{path} has no tensor {key!r}; it holds {', '.join(keys)}")
        array = handle.get_slice(key)
        dtype, shape = array.get_dtype(), tuple(array.get_shape())
    else:
        raise KuklaError(f"--hook {hook}={spec}: unsupported file type {path.suffix!r}: give a .npy or .safetensors file")
    if dtype not in FLOAT_DTYPES:
        raise KuklaError(f"{path}: unsupported dtype {dtype}: activations must be float16, bfloat16, float32 or float64")
    if len(shape) < 2 or 0 in shape:
        raise KuklaError(f"{path}: shape {tuple(shape)} is not [rows, width] (or [..., width]) with rows")
    return Source(path, key, tuple(shape))


def open_tokens(path: str | Path, leading: tuple[int, ...]) -> Path:
    """The file of every row's token ids, checked to be [sequences, context_size] integers matching
    the activations' leading dims (read a block at a time, as `Source` reads its file)."""
    path = Path(path)
    if path.suffix != ".npy" or not path.exists():
        raise KuklaError(f"--tokens {path}: give an existing .npy file of token ids [sequences, context_size]")
    try:
        ids = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:
        raise KuklaError(f"{path} is not a readable .npy file ({exc}): it may be truncated; write it again") from None
    if not np.issubdtype(ids.dtype, np.integer) or ids.shape != leading or len(leading) != 2:
        raise KuklaError(f"--tokens {path}: {ids.dtype} {tuple(ids.shape)} does not fit the activations: give "
                         f"integer ids shaped like their leading dims [sequences, context_size], here {leading}, "
                         "with activation files [sequences, context_size, width]")
    return path


def import_arrays(out: str | Path, hooks: dict[str, str], *, dtype: str = "bfloat16", codec: str = DEFAULT_CODEC,
                  drop_nonfinite: bool = False, seed: int = 0, memory_budget_bytes: int = 2 << 30,
                  overwrite: bool = False, rows_per_segment: int = 1 << 16, tokens: str | Path | None = None,
                  model: str | None = None, holdout_rows: int | None = None) -> tuple[int, int]:
    """Import, shuffle and finalize; returns (rows stored, rows dropped for NaN/inf).

    `tokens` (.npy [sequences, context_size], for activations [sequences, context_size, width])
    gives every row its token id, sequence and position, and the store keeps each sequence as a
    window, so evaluate shows contexts; `model` names the model (or tokenizer) they come from.
    `holdout_rows` is the store's evaluation tail (default: 1% of rows, at most 2**20).

    Rerunning the same import after a kill or a full disk resumes it (writing or
    finalizing); after it finished, keeps the store (the input files may be read by other
    paths: a file is its name, size and mtime). With `overwrite`, an existing store at `out`
    is left alone until the new one is complete: the new one is built beside it
    (`<out>.importing`) and replaces it at the end, so bad input (NaN rows, a kill) never
    costs the old store.
    """
    if not hooks:
        raise KuklaError("give at least one --hook NAME=FILE")
    check_codec(codec)
    check_memory_budget(memory_budget_bytes)
    sources = {hook: open_source(spec, hook) for hook, spec in hooks.items()}
    rows = {hook: s.rows for hook, s in sources.items()}
    leading = {hook: s.shape[0] for hook, s in sources.items()}
    if len(set(rows.values())) != 1 or len(set(leading.values())) != 1:
        listed = ", ".join(f"{h}={rows[h]} ({sources[h].path.name})" for h in hooks)
        raise KuklaError(f"hooks have different row counts: {listed}: every hook needs one row per token, in order")
    first = next(iter(sources.values()))
    ids = None if tokens is None else open_tokens(tokens, first.shape[:-1])
    files = {h: (s.path, s.key) for h, s in sources.items()} | ({} if tokens is None else {"tokens": (Path(tokens), None)})
    meta = {"source": "import", "hooks": {h: s.width for h, s in sources.items()},
            "files": {h: {"name": path.name, "key": key, "bytes": path.stat().st_size,
                          "mtime": path.stat().st_mtime} for h, (path, key) in files.items()},
            "where": {h: str(path.resolve()) for h, (path, _) in files.items()},  # outside the fingerprint
            "drop_nonfinite": drop_nonfinite}
    if ids is not None:
        meta["context_size"] = int(first.shape[1])
    if model is not None:
        meta["model"] = {"name": model}
    dtype = coerce("dtype", StoreDtype, dtype)
    target = Location(out)
    staging = Location(f"{target.url}.importing")
    staged = overwrite and (staging.exists() or (target.exists() and bool(target.listdir(""))
                                                 and run_state(target, meta, dtype=dtype, codec=codec) is None))
    build = staging if staged else target
    state = run_state(build, meta, dtype=dtype, codec=codec)
    with stop_on_sigterm():
        if state == "finalized" and not staged and not overwrite:  # a retried job: its store is whole
            logger.info("%s: this import's rows are all written (finalized): kept", build.url)
        elif state != "finalizing" and not (staged and state == "finalized"):
            _write(build.url, sources, ids, meta, dtype=dtype, codec=codec, drop_nonfinite=drop_nonfinite,
                   overwrite=overwrite, rows_per_segment=rows_per_segment)
        finalize_store(build.url, memory_budget_bytes=memory_budget_bytes, seed=seed, holdout_rows=holdout_rows)
        if staged:
            target.remove("")
            target.fs.mv(staging.root, target.root, recursive=True)
    stored = open_store(out).n_rows
    return stored, first.rows - stored


def _write(out: str, sources: dict[str, Source], ids: Path | None, meta: dict[str, Any], *, dtype: str,
           codec: str, drop_nonfinite: bool, overwrite: bool, rows_per_segment: int) -> None:
    """The write phase: every source's rows in segments (resumed from the journal)."""
    first = next(iter(sources.values()))
    rows = min(rows_per_segment, SEGMENT_BYTES // (4 * sum(s.width for s in sources.values())))
    step = max(1, rows // max(1, first.per_index))
    with StoreWriter.open(out, meta, dtype=dtype, codec=codec, overwrite=overwrite) as writer:
        with progress(first.rows, "import") as bar:
            for segment, lo in enumerate(range(0, first.shape[0], step)):
                preemption_point()
                hi = min(first.shape[0], lo + step)
                if segment not in writer.committed:
                    block = {f"acts/{h}": s.read(lo, hi) for h, s in sources.items()}
                    keep = np.logical_and.reduce([np.isfinite(x).all(axis=1) for x in block.values()])
                    block |= {} if ids is None else _token_rows(ids, lo, hi)
                    if not keep.all():
                        if not drop_nonfinite:
                            writer.close()
                            writer.location.remove("")
                            bad = lo * first.per_index + int(np.argmin(keep))
                            raise KuklaError(f"row {bad} holds NaN or inf: fix the input, or pass --drop-nonfinite to "
                                             "drop such rows (the count is reported)")
                        block = {name: x if name.startswith("windows/") else x[keep] for name, x in block.items()}
                    writer.write_segment(segment, block)
                bar.update((hi - lo) * first.per_index)
        writer.finish()


def _token_rows(ids: Path, lo: int, hi: int) -> dict[str, np.ndarray]:
    """Sequences [lo, hi) as rows' tokens/* (sequence = leading index) and as whole windows."""
    window = np.array(mapped(ids)[lo:hi], dtype=np.int64)
    n, width = window.shape
    return {"tokens/token_id": window.reshape(-1), "tokens/sequence": np.repeat(np.arange(lo, hi), width),
            "tokens/position": np.tile(np.arange(width), n),
            "windows/sequence": np.arange(lo, hi), "windows/token_id": window}
