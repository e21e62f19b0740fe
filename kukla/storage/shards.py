"""Direct reads and writes of the final arrays' shard objects (Zarr v3 `sharding_indexed`).

A shard holds its chunks back to back and ends with an index: one (offset, nbytes) pair of
little-endian uint64 per chunk (2**64 − 1 twice for a chunk that is not there), then the
index's CRC32C. Each chunk is the codec's output for `chunk_rows` rows followed by its own
CRC32C. Reading through the index with `preadv` straight into the caller's buffer skips
zarr's per-call machinery and the copies behind it (the reader's hot path is one read and one
checksum per chunk); writing the same bytes here lets finalize workers write whole shards in
parallel without sharing any zarr state. Anything zarr would read as zeros (a missing shard or
chunk) or fail on (a checksum mismatch) is refused with a one-line `KuklaError` instead.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

import google_crc32c
import numcodecs
import numpy as np

from kukla.errors import KuklaError
from kukla.storage.format import ArraySpec, shard_key
from kukla.storage.location import Location

EMPTY = np.uint64(2**64 - 1)


def crc32c(data: np.ndarray) -> int:
    """CRC32C of a contiguous array's bytes (google_crc32c: GB/s, the same sum zarr writes)."""
    return int(google_crc32c.value(data.reshape(-1).view(np.uint8)))


@dataclass(frozen=True)
class Layout:
    """Where one row-aligned array's rows live: its shards, chunks and codec."""

    spec: ArraySpec
    n_rows: int
    chunk_rows: int
    shard_rows: int
    codec: Any = field(compare=False)  # a numcodecs codec, or None for raw bytes (compared by `codec_id`)
    codec_id: str | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "codec_id", None if self.codec is None else self.codec.codec_id)

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * self.spec.row_bytes

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.shard_rows)

    def shard_range(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_rows, min(self.n_rows, (shard + 1) * self.shard_rows)

    @classmethod
    def from_metadata(cls, location: Location, spec: ArraySpec) -> "Layout":
        """An array's layout as its zarr.json describes it (`format.open_array` checks that
        against the store's attributes)."""
        url = f"{location.url}/{spec.name}"
        try:
            meta = location.read_json(f"{spec.name}/zarr.json")
            codecs = meta["codecs"]
            sharding = codecs[0]["configuration"]
            inner = [c["name"] for c in sharding["codecs"]]
            dtype, shape = np.dtype(meta["data_type"]), tuple(meta["shape"])
            shard_rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
            chunk_rows = int(sharding["chunk_shape"][0])
        except FileNotFoundError:
            raise KuklaError(f"{url}/zarr.json is missing: the store is damaged; run `kukla store verify "
                             f"{location.url}`") from None
        except (ValueError, KeyError, IndexError, TypeError):
            raise KuklaError(f"{url}/zarr.json is not a kukla array's metadata: the store is damaged; run "
                             f"`kukla store verify {location.url}`") from None
        if (codecs[0]["name"] != "sharding_indexed" or len(codecs) != 1 or inner[0] != "bytes"
                or inner[-1] != "crc32c" or len(inner) > 3 or sharding.get("index_location", "end") != "end"
                or [c["name"] for c in sharding["index_codecs"]] != ["bytes", "crc32c"]):
            raise KuklaError(f"{url} uses codecs {inner} that kukla did not write: rebuild the store with kukla")
        codec = numcodecs.get_codec({"id": inner[1]}) if len(inner) == 3 else None
        return cls(ArraySpec(spec.name, shape[1:], dtype), shape[0], chunk_rows, shard_rows, codec)


class ShardReader:
    """Rows [lo, hi) of one array into a caller's buffer; thread-safe, shard indexes cached."""

    def __init__(self, location: Location, layout: Layout) -> None:
        self.location, self.layout = location, layout
        self._indexes: dict[int, np.ndarray] = {}
        self._scratch = threading.local()

    def read_into(self, lo: int, hi: int, out: np.ndarray) -> None:
        """Fill `out` (hi − lo rows of the stored dtype, C-contiguous) with rows [lo, hi)."""
        lay = self.layout
        flat = out.reshape(-1).view(np.uint8)
        row_bytes = lay.spec.row_bytes
        for chunk in range(lo // lay.chunk_rows, -(-hi // lay.chunk_rows)):
            c_lo = chunk * lay.chunk_rows
            a, b = max(lo, c_lo), min(hi, c_lo + lay.chunk_rows)
            dest = flat[(a - lo) * row_bytes:(b - lo) * row_bytes]
            self._read_chunk(chunk, dest, (a - c_lo) * row_bytes)

    def _read_chunk(self, chunk: int, dest: np.ndarray, skip: int) -> None:
        """Chunk `chunk`'s decoded bytes [skip, skip + len(dest)) into `dest`, checksum verified."""
        lay = self.layout
        shard, slot = divmod(chunk, lay.chunks_per_shard)
        offset, nbytes = self._index(shard)[slot]
        if offset == EMPTY:
            raise self._error(chunk, "missing (the shard's index has no such chunk)")
        offset, nbytes = int(offset), int(nbytes)
        whole = skip == 0 and len(dest) == lay.chunk_bytes
        if lay.codec is None and nbytes != lay.chunk_bytes + 4:
            raise self._error(chunk, "damaged (wrong chunk size in the shard index)")
        if lay.codec is None and whole:  # the hot path: one read into the caller's rows
            trailer = np.empty(4, np.uint8)
            self._pread(shard, [dest, trailer], offset, nbytes, chunk)
            if crc32c(dest) != int(trailer.view("<u4")[0]):
                raise self._error(chunk, "damaged (checksum mismatch)")
            return
        raw = self._buffer("raw", nbytes)
        self._pread(shard, [raw], offset, nbytes, chunk)
        if crc32c(raw[:-4]) != int(raw[-4:].view("<u4")[0]):
            raise self._error(chunk, "damaged (checksum mismatch)")
        if lay.codec is None:
            dest[:] = raw[skip:skip + len(dest)]
            return
        target = dest if whole else self._buffer("decoded", lay.chunk_bytes)
        try:
            lay.codec.decode(raw[:-4], out=target)
        except Exception:  # noqa: BLE001 - a codec's own failure on bytes that passed the CRC
            raise self._error(chunk, f"damaged (does not decode with {lay.codec.codec_id})") from None
        if not whole:
            dest[:] = target[skip:skip + len(dest)]

    def _index(self, shard: int) -> np.ndarray:
        index = self._indexes.get(shard)
        if index is None:
            size = self.layout.chunks_per_shard * 16 + 4
            raw = np.empty(size, np.uint8)
            self._pread(shard, [raw], -size, size, shard * self.layout.chunks_per_shard)
            if crc32c(raw[:-4]) != int(raw[-4:].view("<u4")[0]):
                lo, hi = self.layout.shard_range(shard)
                raise self._rows_error(lo, hi, f"damaged (shard index checksum mismatch in {self._key(shard)})")
            index = raw[:-4].view("<u8").reshape(-1, 2).astype(np.uint64)
            self._indexes[shard] = index
        return index

    def _pread(self, shard: int, buffers: list[np.ndarray], offset: int, nbytes: int, chunk: int) -> None:
        """Read `nbytes` at `offset` (from the end when negative) into `buffers`, or refuse."""
        key = self._key(shard)
        try:
            if self.location.is_local:
                fd = os.open(self.location.join(key), os.O_RDONLY)
                try:
                    start = offset if offset >= 0 else os.fstat(fd).st_size + offset
                    got = os.preadv(fd, buffers, start) if start >= 0 else 0
                finally:
                    os.close(fd)
            else:
                start = offset if offset >= 0 else self.location.fs.size(self.location.join(key)) + offset
                data = self.location.read_range(key, start, start + nbytes) if start >= 0 else b""
                got, at = len(data), 0
                for buf in buffers:
                    piece = np.frombuffer(data, np.uint8, count=min(buf.size, len(data) - at), offset=at)
                    buf[:len(piece)] = piece
                    at += len(piece)
        except FileNotFoundError:
            lo, hi = self.layout.shard_range(shard)
            raise self._rows_error(lo, hi, f"missing (shard {key} not found)") from None
        if got != nbytes:
            raise self._error(chunk, f"damaged ({key} is truncated)")

    def _buffer(self, name: str, size: int) -> np.ndarray:
        """A per-thread scratch buffer of at least `size` bytes, reused across chunks."""
        buf = getattr(self._scratch, name, None)
        if buf is None or buf.size < size:
            buf = np.empty(size, np.uint8)
            setattr(self._scratch, name, buf)
        return buf[:size]

    def _key(self, shard: int) -> str:
        return shard_key(self.layout.spec, shard)

    def _error(self, chunk: int, what: str) -> KuklaError:
        lo = chunk * self.layout.chunk_rows
        return self._rows_error(lo, min(self.layout.n_rows, lo + self.layout.chunk_rows), what)

    def _rows_error(self, lo: int, hi: int, what: str) -> KuklaError:
        return KuklaError(f"{self.location.url}: {self.layout.spec.name} rows {lo}-{hi - 1} are {what}: the store "
                          f"is damaged; run `kukla store verify {self.location.url}` and restore or rebuild it")


def encode_shard(layout: Layout, rows: np.ndarray) -> list[np.ndarray]:
    """The bytes of one shard holding `rows` (at most `shard_rows`, stored dtype), as zarr writes
    them, in pieces to write back to back: chunks in order, the last one zero-padded, chunks past
    the rows left out of the index."""
    n_chunks = -(-len(rows) // layout.chunk_rows)
    pieces, index = [], np.full((layout.chunks_per_shard, 2), EMPTY, np.uint64)
    at = 0
    for j in range(n_chunks):
        block = rows[j * layout.chunk_rows:(j + 1) * layout.chunk_rows]
        if len(block) < layout.chunk_rows:
            padded = np.zeros((layout.chunk_rows, *block.shape[1:]), block.dtype)
            padded[:len(block)] = block
            block = padded
        block = np.ascontiguousarray(block)
        data = (np.frombuffer(layout.codec.encode(block), np.uint8) if layout.codec is not None
                else block.reshape(-1).view(np.uint8))
        pieces += [data, np.array([crc32c(data)], "<u4").view(np.uint8)]
        index[j] = (at, len(data) + 4)
        at += len(data) + 4
    index_bytes = index.astype("<u8").view(np.uint8).reshape(-1)
    return [*pieces, index_bytes, np.array([crc32c(index_bytes)], "<u4").view(np.uint8)]
