"""The final store's on-disk format: layout, metadata, array geometry, dtypes and codecs (docs/FORMATS.md §1).

```
PATH/zarr.json                     group; attrs["kukla"] = metadata (state writing → finalizing → finalized)
PATH/acts/<hook>, tokens/*, truth/* row-aligned final arrays (after finalize)
PATH/windows/token_id, windows/row  the rows' context windows and each position's row (optional)
PATH/static/<name>                 store-level arrays
PATH/manifest.parquet              one row per written segment (rank, segment, rows, ...)
PATH/_parts/rank-RRRRR/...         per-rank segments, journal, lock (gone after finalize)
PATH/_finalize/...                 the shuffle's plan, runs and progress (gone after finalize)
```

zarr-python 3.1.6 has no bfloat16 data type, so bf16 activations are stored as their
uint16 bit pattern (the top half of a float32) and the real dtype lives in the store's
attributes; `to_stored`/`from_stored` are the only places that know.

Codec names (see `benchmarks/RESULTS.md` for the measurement behind the default):
`none`, `zstd-<level>`, `blosc-<zstd|lz4|lz4hc|zlib>-<level>-<noshuffle|shuffle|bitshuffle>`.

`_parts/`, each rank's part of a store being written, is kukla.storage.part's.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

import kukla
from kukla.errors import KuklaError
from kukla.storage.location import Location

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
TOKEN_ARRAYS = {"tokens/token_id": np.dtype(np.int32), "tokens/sequence": np.dtype(np.int64),
                "tokens/position": np.dtype(np.int32)}
#: Row-aligned arrays a store may lack (old and imported stores: readers treat a missing one as
#: unknown); like truth/*, a writer gives them in every segment or in none.
OPTIONAL_TOKEN_ARRAYS = {"tokens/massive": np.dtype(np.uint8)}
#: Window-aligned arrays ([n_windows, context_size]; window w holds the rows whose tokens/sequence is w):
#: every token id of the window, and the final row holding each position (−1 where none does).
WINDOW_ARRAYS = {"windows/token_id": np.dtype(np.int32), "windows/row": np.dtype(np.int64)}
#: Keys of the `kukla` attributes that kukla owns; the caller's meta may not use them.
RESERVED = ("format_version", "kukla_version", "state", "dtype", "codec", "world", "fingerprint",
            "chunk_rows", "n_rows", "holdout_rows", "shuffle_seed", "shuffle_buckets", "hook_stats", "truth",
            "n_windows")
TARGET_CHUNK_BYTES = 4 << 20
TARGET_SHARD_BYTES = 256 << 20

#: Chosen by `benchmarks/store_bench.py` (docs/FORMATS.md states the rule): bf16 activations
#: compress 1.26x at best with fast codecs (their 7 mantissa bits are noise), while decoding zstd-1
#: alone costs more CPU than reading, checksumming and copying raw rows together, so raw chunks
#: (still CRC32C-checked) are the default; zstd-1 stays an option where bytes cost more than CPU
#: (object storage, archives).
DEFAULT_CODEC = "none"

#: How each store dtype sits on disk.
STORED_NUMPY = {"bfloat16": np.dtype(np.uint16), "float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}
FP16_MAX = float(np.finfo(np.float16).max)
_CODEC_RE = re.compile(r"^(?:none|zstd-(-?\d+)|blosc-(zstd|lz4|lz4hc|zlib)-(\d)-(noshuffle|shuffle|bitshuffle))$")


def meta_fingerprint(meta: dict[str, Any]) -> str:
    """A short hash of the caller's metadata but its `where` (the paths the inputs were read by):
    the same run always gives the same store, from any host's mount of its inputs."""
    text = json.dumps({k: v for k, v in meta.items() if k != "where"}, sort_keys=True, default=str,
                      separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_meta(meta: dict[str, Any]) -> dict[str, int]:
    """The hooks {name: width} of a caller's meta, or a one-line error."""
    if not isinstance(meta, dict) or not isinstance(meta.get("hooks"), dict) or not meta["hooks"]:
        raise KuklaError("store meta needs 'hooks': {hook_name: width} with at least one hook")
    clash = [key for key in RESERVED if key in meta]
    if clash:
        raise KuklaError(f"store meta may not set {clash[0]!r}: kukla records it itself")
    hooks = {}
    for name, width in meta["hooks"].items():
        if not isinstance(width, int) or width <= 0 or "/" in name:
            raise KuklaError(f"hook {name!r}: width must be a positive int and the name may not hold '/'")
        hooks[name] = width
    return hooks


def chunk_rows_for(widths: list[int], itemsize: int) -> int:
    """Rows per chunk: a power of two keeping the widest hook's chunk near 4 MiB."""
    row_bytes = max(widths) * itemsize
    rows = 1 << max(0, int(math.log2(max(1, TARGET_CHUNK_BYTES // row_bytes))))
    return int(min(max(rows, 64), 1 << 16))


def holdout_default(n_rows: int) -> int:
    """min(1% of rows, 2**20), and at least 1 when there are 2 rows or more."""
    if n_rows <= 1:
        return 0
    return max(1, min(n_rows // 100, 1 << 20))


@dataclass
class ArraySpec:
    """One row-aligned array: its name, the width of a row and its on-disk dtype."""

    name: str
    row_shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    def to_json(self) -> list[Any]:
        return [self.name, list(self.row_shape), self.dtype.str]

    @classmethod
    def from_json(cls, value: list[Any]) -> "ArraySpec":
        return cls(value[0], tuple(value[1]), np.dtype(value[2]))


def array_specs(attrs: dict[str, Any]) -> list[ArraySpec]:
    """Every row-aligned array of a store, in a fixed order: hooks, tokens, truth."""
    stored = STORED_NUMPY[attrs["dtype"]]
    specs = [ArraySpec(f"acts/{hook}", (width,), stored) for hook, width in attrs["hooks"].items()]
    specs += [ArraySpec(name, (), dtype) for name, dtype in TOKEN_ARRAYS.items()]
    specs += [ArraySpec.from_json(value) for value in attrs.get("truth") or []]
    return specs


def window_specs(attrs: dict[str, Any]) -> list[ArraySpec]:
    """The window-aligned arrays of a finalized store: none unless its writer gave windows."""
    if not attrs.get("n_windows"):
        return []
    return [ArraySpec(name, (int(attrs["context_size"]),), dtype) for name, dtype in WINDOW_ARRAYS.items()]


def create_array(group: zarr.Group, spec: ArraySpec, n_rows: int, chunk_rows: int, shard_rows: int,
                 codec: str) -> zarr.Array:
    """A sharded, compressed, checksummed array for `spec` (empty chunks still written, so a
    missing shard file means damage rather than zeros)."""
    shard_rows = max(chunk_rows, shard_rows - shard_rows % chunk_rows)
    return group.create_array(
        spec.name, shape=(n_rows, *spec.row_shape), dtype=spec.dtype,
        chunks=(chunk_rows, *spec.row_shape), shards=(shard_rows, *spec.row_shape),
        compressors=(*compressors(codec, spec.dtype.itemsize), Crc32cCodec()),
        fill_value=0, overwrite=True, config={"write_empty_chunks": True},
    )


def open_array(group: zarr.Group, spec: ArraySpec, n_rows: int, chunk_rows: int, url: str) -> zarr.Array:
    """A final array, refused in one line when its zarr.json is unreadable or disagrees with the
    store's own attributes (a dtype edited from uint16 to int16 would otherwise read as garbage)."""
    try:
        array = group[spec.name]
    except Exception as exc:  # noqa: BLE001 - a missing or torn zarr.json surfaces as many error types
        raise KuklaError(f"{url}/{spec.name}/zarr.json is missing or damaged ({type(exc).__name__}): restore it "
                         "from a copy, or rebuild the store") from None
    expected = {"data_type": spec.dtype, "shape": (n_rows, *spec.row_shape), "chunk rows": chunk_rows}
    found = {"data_type": array.dtype, "shape": tuple(array.shape), "chunk rows": array.chunks[0]}
    for key, value in expected.items():
        if found[key] != value:
            raise KuklaError(f"{url}/{spec.name}/zarr.json says {key} {found[key]}, the store's attributes say "
                             f"{value}: the array metadata was altered; restore it from a copy, or rebuild the store")
    return array


def data_crc32(data: np.ndarray) -> int:
    """The checksum kept in a static array's attributes (`crc32`), over its C-order bytes."""
    return zlib.crc32(memoryview(np.ascontiguousarray(data)).cast("B"))


def shard_key(spec: ArraySpec, shard_index: int) -> str:
    """The object holding shard `shard_index` of an array (default "/" chunk keys)."""
    return "/".join([spec.name, "c", str(shard_index)] + ["0"] * len(spec.row_shape))


def write_manifest(location: Location, key: str, entries: list[dict[str, Any]]) -> None:
    """A Parquet table with one row per segment (rank, segment, rows, offset in the merge order,
    sequence range), for pyarrow/pandas users and for `kukla store verify`."""
    import pyarrow as pa  # deferred: most readers never need it
    import pyarrow.parquet as pq

    rows = np.array([e["rows"] for e in entries], dtype=np.int64)
    columns = {
        "rank": np.array([e["rank"] for e in entries], np.int32),
        "segment": np.array([e["segment"] for e in entries], np.int64),
        "rows": rows,
        "input_offset": np.cumsum(rows) - rows,
        "first_sequence": np.array([e["first_sequence"] for e in entries], np.int64),
        "last_sequence": np.array([e["last_sequence"] for e in entries], np.int64),
    }
    # from_buffers, not pa.array: pa.array imports pandas to probe its input (0.7 CPU-s per call here)
    table = pa.Table.from_arrays([pa.Array.from_buffers(pa.from_numpy_dtype(c.dtype), len(c), [None, pa.py_buffer(c)])
                                  for c in columns.values()], names=list(columns))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    location.put_bytes(key, sink.getvalue().to_pybytes())


@dataclass
class HookStats:
    """Running sums over rows of one hook (float64), mergeable across segments and ranks."""

    rows: int = 0
    sum_norm: float = 0.0
    sum_sq_norm: float = 0.0
    max_abs: float = 0.0

    def add(self, x: np.ndarray) -> None:
        """Per-row squared norms in float32 (640-term sums), accumulated over rows in float64."""
        sq = np.einsum("ij,ij->i", x, x).astype(np.float64)
        self.rows += x.shape[0]
        self.sum_norm += float(np.sqrt(sq).sum())
        self.sum_sq_norm += float(sq.sum())
        self.max_abs = max(self.max_abs, float(x.max(initial=0.0)), -float(x.min(initial=0.0)))  # no |x| copy

    def merge(self, other: "HookStats") -> None:
        self.rows += other.rows
        self.sum_norm += other.sum_norm
        self.sum_sq_norm += other.sum_sq_norm
        self.max_abs = max(self.max_abs, other.max_abs)

    def summary(self, width: int) -> dict[str, float]:
        """mean_norm = E‖x‖; scale = √d / E‖x‖ (SAELens-style normalisation factor)."""
        mean_norm = self.sum_norm / self.rows if self.rows else 0.0
        return {
            "rows": self.rows, "sum_norm": self.sum_norm, "sum_sq_norm": self.sum_sq_norm,
            "max_abs": self.max_abs, "mean_norm": mean_norm,
            "rms_norm": math.sqrt(self.sum_sq_norm / self.rows) if self.rows else 0.0,
            "scale": math.sqrt(width) / mean_norm if mean_norm else 1.0,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "HookStats":
        return cls(int(value["rows"]), float(value["sum_norm"]), float(value["sum_sq_norm"]), float(value["max_abs"]))


@dataclass
class Attributes:
    """Read and write the `kukla` attributes in the root zarr.json, atomically."""

    location: Location
    value: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, location: Location) -> "Attributes":
        if not location.exists():
            raise KuklaError(f"{location.url} does not exist: give the path of a kukla store "
                             "(made by `kukla harvest` or `kukla store import`)")
        try:
            value = location.read_json("zarr.json").get("attributes", {}).get("kukla")
        except (OSError, json.JSONDecodeError, AttributeError):  # OSError: missing, or PATH is a file
            value = None
        if not isinstance(value, dict) or "format_version" not in value:
            raise KuklaError(f"{location.url} is not a kukla store (no kukla metadata in zarr.json): "
                             "check the path")
        if value["format_version"] > FORMAT_VERSION:
            raise KuklaError(f"{location.url} has store format {value['format_version']}; this kukla "
                             f"reads up to {FORMAT_VERSION}: upgrade kukla")
        return cls(location, value)

    def write(self) -> None:
        doc = {"zarr_format": 3, "node_type": "group", "attributes": {"kukla": self.value}}
        self.location.put_bytes("zarr.json", json.dumps(doc, indent=1, default=str).encode())


def new_attributes(meta: dict[str, Any], *, dtype: str, codec: str, world: int, chunk_rows: int) -> dict[str, Any]:
    return {**meta, "format_version": FORMAT_VERSION, "kukla_version": kukla.__version__,
            "state": "writing", "dtype": dtype, "codec": codec, "world": world,
            "fingerprint": meta_fingerprint(meta), "chunk_rows": chunk_rows}


def check_codec(name: str) -> str:
    """The codec name, or a one-line error (checked before anything is written)."""
    match = _CODEC_RE.match(name)
    if match and match.group(1) is not None and not -131072 <= int(match.group(1)) <= 22:
        raise KuklaError(f"codec {name!r}: zstd levels run from -131072 to 22 (1-3 is fast, 19-22 is small); "
                         f"e.g. {DEFAULT_CODEC}")
    if not match:
        raise KuklaError(
            f"unknown codec {name!r}: use none, zstd-<level> or blosc-<zstd|lz4|lz4hc|zlib>-<0-9>-"
            f"<noshuffle|shuffle|bitshuffle> (default {DEFAULT_CODEC})"
        )
    return name


def _parse(name: str) -> tuple[str | None, ...]:
    match = _CODEC_RE.match(check_codec(name))
    assert match is not None
    return match.groups()


def compressors(name: str, itemsize: int) -> tuple[Any, ...]:
    """The zarr v3 bytes-to-bytes codecs for a codec name (numcodecs does the work)."""
    zstd_level, cname, clevel, shuffle = _parse(name)
    if name == "none":
        return ()
    if zstd_level is not None:
        return (ZstdCodec(level=int(zstd_level)),)
    return (BloscCodec(cname=cname, clevel=int(clevel), shuffle=shuffle, typesize=itemsize),)


def numcodecs_codec(name: str) -> Any:
    """The same compression as a plain numcodecs codec (for segment blobs), None for `none`."""
    zstd_level, cname, clevel, shuffle = _parse(name)
    if name == "none":
        return None
    if zstd_level is not None:
        return numcodecs.Zstd(level=int(zstd_level))
    modes = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
             "bitshuffle": numcodecs.Blosc.BITSHUFFLE}
    return numcodecs.Blosc(cname=cname, clevel=int(clevel), shuffle=modes[shuffle])


def as_numpy(array: Any) -> np.ndarray:
    """A numpy view of a numpy array or torch tensor (bf16 tensors become float32)."""
    import torch  # here, not at the top: the CLI reads codec names without torch

    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.dtype == torch.bfloat16:
            array = array.float()
        return array.numpy()
    return np.asarray(array)


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and return the bit patterns."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def to_stored(array: Any, dtype: str, what: str) -> np.ndarray:
    """Convert activations to their on-disk form, refusing NaN/inf and fp16 overflow."""
    import torch

    if isinstance(array, torch.Tensor) and array.dtype == torch.bfloat16 and dtype == "bfloat16":
        bits = array.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)
        if np.any((bits & 0x7F80) == 0x7F80):
            raise KuklaError(f"{what}: {int(np.sum((bits & 0x7F80) == 0x7F80))} values are NaN or inf: "
                             "check the model's numerics (or drop those rows) before writing")
        return bits
    x = as_numpy(array)
    if x.dtype.kind not in "fiu":
        raise KuklaError(f"{what}: unsupported dtype {x.dtype}: activations must be floating point")
    finite = np.isfinite(x)
    if not finite.all():
        raise KuklaError(f"{what}: {int(x.size - finite.sum())} values are NaN or inf: "
                         "check the model's numerics (or drop those rows) before writing")
    if dtype == "float32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "float16":
        peak = float(np.abs(x).max(initial=0.0))
        if peak > FP16_MAX:
            raise KuklaError(f"{what}: values reach {peak:.4g}, beyond float16's range ({FP16_MAX:g}): "
                             "write with dtype bfloat16 or float32")
        return np.ascontiguousarray(x, dtype=np.float16)
    bits = _bf16_bits(x.astype(np.float32, copy=False))
    if np.any((bits & 0x7F80) == 0x7F80):
        raise KuklaError(f"{what}: values overflow bfloat16: write with dtype float32")
    return bits


def from_stored(array: np.ndarray, dtype: str) -> torch.Tensor:
    """The torch tensor (bf16 when stored as bits) for an on-disk array, without copying."""
    import torch

    array = np.ascontiguousarray(array)
    tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
    if dtype == "bfloat16" and array.dtype == np.uint16:
        return tensor.view(torch.bfloat16)
    return tensor
