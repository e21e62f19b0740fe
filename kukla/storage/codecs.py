"""Store dtypes and compression codecs.

zarr-python 3.1.6 has no bfloat16 data type, so bf16 activations are stored as their
uint16 bit pattern (the top half of a float32) and the real dtype lives in the store's
attributes; `to_stored`/`from_stored` are the only places that know.

Codec names (see `benchmarks/RESULTS.md` for the measurement behind the default):
`none`, `zstd-<level>`, `blosc-<zstd|lz4|lz4hc|zlib>-<level>-<noshuffle|shuffle|bitshuffle>`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import numcodecs
import numpy as np
from zarr.codecs import BloscCodec, ZstdCodec

from kukla.errors import KuklaError

if TYPE_CHECKING:
    import torch

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
