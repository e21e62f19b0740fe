"""Store benchmark: codecs, then write, shuffle (finalize) and read per CPU-second for the raw
(`none`) and `zstd-1` codecs, beside the anchors (zarr's own read of the same arrays; SAELens'
activation cache: a Hugging Face `datasets` Arrow folder of float32 rows) and the physical limit
(memcpy of the same bf16 rows; for the shuffle, the same bytes read once and written once with
an fsync, the floor under any shuffle), printed as ratios from one run.

Rows are synthetic but shaped like residual-stream activations (d=2304, Gemma-2-2B's width by
default): low-rank structure (rank 48) + isotropic noise, heavy-tailed row norms (log-normal,
σ=0.6), 1% of rows 8x larger (BOS-like), and 4 outlier dimensions with large offsets. Each phase
runs in its own process (one torch thread unless told), so its CPU time and peak RSS are its own.

    python benchmarks/store_bench.py [--rows 32768] [--d 2304] [--out /tmp/store_bench]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's kukla, not an installed one

D = 2304
PASSES = 4  # each read phase reads the store this many times, so start-up costs are amortised
CODECS = ["zstd-1", "zstd-3", "blosc-zstd-1-bitshuffle", "blosc-zstd-3-shuffle", "blosc-lz4-5-shuffle",
          "blosc-lz4-5-noshuffle"]


def synthetic_rows(n: int, seed: int = 0) -> np.ndarray:
    """float32 [n, D] rows with the structure described in the module docstring."""
    rng = np.random.default_rng(seed)
    if n > 8192:  # in blocks, so a big store does not need a big float64 temporary
        return np.concatenate([synthetic_rows(min(8192, n - lo), seed * 7919 + lo) for lo in range(0, n, 8192)])
    basis = rng.standard_normal((48, D)).astype(np.float32) / np.sqrt(48)
    x = rng.standard_normal((n, 48)).astype(np.float32) @ basis * 3.0
    x += rng.standard_normal((n, D)).astype(np.float32) * 0.5
    x *= rng.lognormal(0.0, 0.6, size=(n, 1)).astype(np.float32)
    x[rng.random(n) < 0.01] *= 8.0
    outliers = rng.choice(D, 4, replace=False)
    x[:, outliers] += rng.normal(40.0, 10.0, size=(n, 4))
    return x.astype(np.float32)


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms (imports and inputs excluded)."""

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = self._now()
        self.cpu0 = self._cpu()
        self.wall0 = time.perf_counter()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self.extra_mb = (self.peak - self.base) / 2**20
        self.cpu_s = self._cpu() - self.cpu0
        self.seconds = time.perf_counter() - self.wall0

    @staticmethod
    def _cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    @staticmethod
    def _now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def _sample(self) -> None:
        while not self.done.wait(0.005):
            self.peak = max(self.peak, self._now())


def bench_codecs(rows: np.ndarray) -> list[dict]:
    """Ratio and single-thread encode/decode MB per CPU-second per codec on bf16 chunks of 2048 rows."""
    import numcodecs

    from kukla.storage.format import numcodecs_codec, to_stored

    numcodecs.blosc.set_nthreads(1)
    bits = to_stored(rows, "bfloat16", "bench")
    chunks = [np.ascontiguousarray(bits[i:i + 2048]) for i in range(0, len(bits), 2048)]
    raw = bits.nbytes
    results = []
    for name in CODECS:
        codec = numcodecs_codec(name)
        encode = decode = float("inf")
        for _ in range(3):  # best of 3: the machine is shared
            t0 = time.process_time()
            blobs = [codec.encode(c) for c in chunks]
            t1 = time.process_time()
            for blob in blobs:
                codec.decode(blob)
            encode, decode = min(encode, t1 - t0), min(decode, time.process_time() - t1)
        results.append({"codec": name, "ratio": raw / sum(len(b) for b in blobs),
                        "encode_MBps": raw / 1e6 / encode, "decode_MBps": raw / 1e6 / decode})
    return results


def phase_write(path: str, n: int, codec: str, windows: bool = True) -> dict:
    """Rows of 128-token windows, 64 windows a segment (harvest's default), given whole as
    windows/* unless `windows` is off (a store as before windows existed)."""
    from kukla.storage import StoreWriter

    rows = synthetic_rows(n)
    seg, ctx = 8192, 128
    with PeakRSS() as rss, StoreWriter.open(path, {"model": "synthetic", "hooks": {"resid": D}, "context_size": ctx},
                                            overwrite=True, codec=codec) as writer:
        for s, lo in enumerate(range(0, n, seg)):
            ids = np.arange(lo, min(n, lo + seg))
            given = {"windows/sequence": np.unique(ids // ctx),
                     "windows/token_id": np.arange(ids[0] // ctx * ctx, (ids[-1] // ctx + 1) * ctx).reshape(-1, ctx)}
            writer.write_segment(s, {"acts/resid": rows[lo:lo + seg], "tokens/token_id": ids,
                                     "tokens/sequence": ids // ctx, "tokens/position": ids % ctx}
                                 | (given if windows else {}))
        writer.finish()
    return {"rows": n, "peak_mb": rss.extra_mb, "cpu_s": rss.cpu_s, "seconds": rss.seconds}


def phase_finalize(path: str, budget: int) -> dict:
    from kukla.storage import finalize_store

    with PeakRSS() as rss:
        finalize_store(path, memory_budget_bytes=budget)
    files = [f for f in Path(path).rglob("*") if f.is_file()]
    return {"peak_mb": rss.extra_mb, "cpu_s": rss.cpu_s, "seconds": rss.seconds,
            "bytes": sum(f.stat().st_size for f in files),
            "window_bytes": sum(f.stat().st_size for f in files if "windows" in f.relative_to(path).parts)}


def phase_read(path: str, batch: int, dtype: str, threads: int, device: str) -> dict:
    import torch

    from kukla.storage import ActivationStream, open_store

    torch.set_num_threads(1)
    store = open_store(path)
    stream = ActivationStream(store, ["resid"], batch, split="all", dtype=getattr(torch, dtype), threads=threads,
                              epochs=PASSES, device=device)
    with PeakRSS() as rss:
        n = sum(b.acts[0].shape[0] for b in stream)
        if device.startswith("cuda"):
            torch.cuda.synchronize()  # the rows are in device memory, converted
    return {"rows": n, "peak_mb": rss.extra_mb, "cpu_s": rss.cpu_s, "seconds": rss.seconds}


def phase_zarr(path: str, batch: int) -> dict:
    """zarr-python's own read of the same array, batch-sized slices, as bf16 bits (no conversion)."""
    import zarr

    array = zarr.open_array(f"{path}/acts/resid", mode="r")
    with PeakRSS() as rss:
        n = sum(array[lo:lo + batch].shape[0] for _ in range(PASSES) for lo in range(0, array.shape[0], batch))
    return {"rows": n, "peak_mb": rss.extra_mb, "cpu_s": rss.cpu_s, "seconds": rss.seconds}


def phase_anchor(path: str, n: int, batch: int) -> dict:
    """The same rows in SAELens's activation-cache format (a Hugging Face `datasets` Arrow folder,
    float32 as SAELens caches them), read in batches as torch tensors."""
    import datasets
    import pyarrow as pa

    rows = synthetic_rows(n)
    column = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), D)
    folder = f"{path}.hf"
    datasets.Dataset(pa.table({"resid": column})).save_to_disk(folder)
    del rows, column
    ds = datasets.load_from_disk(folder).with_format("torch")
    with PeakRSS() as rss:
        count = sum(b["resid"].shape[0] for _ in range(PASSES) for b in ds.iter(batch_size=batch))
    shutil.rmtree(folder)
    return {"rows": count, "peak_mb": rss.extra_mb, "cpu_s": rss.cpu_s, "seconds": rss.seconds}


def phase_disk(path: str, n: int) -> dict:
    """The floor under any shuffle here: the bytes of n bf16 rows read once (from the page cache,
    into a reused buffer) and written once to a fresh file (fsync), in 64 MiB pieces; no gather,
    no CRC. Then the disk's own rates for the same bytes past the page cache (O_DIRECT, wall)."""
    from kukla.storage.location import aligned_buffer

    data = synthetic_rows(n).view(np.uint8).reshape(-1)[:n * D * 2]
    back, piece = np.empty(64 << 20, np.uint8), 64 << 20
    with open(f"{path}.in", "wb") as f:
        f.write(memoryview(data))
    with PeakRSS() as rss:
        with open(f"{path}.in", "rb") as src, open(f"{path}.out", "wb") as dst:
            while got := src.readinto(memoryview(back[:piece])):
                dst.write(memoryview(back[:got]))
            dst.flush()
            os.fsync(dst.fileno())
    direct = aligned_buffer(data.size)
    direct[:data.size] = data
    t0 = time.perf_counter()
    fd = os.open(f"{path}.direct", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    os.write(fd, memoryview(direct))
    os.fsync(fd)
    os.close(fd)
    t1 = time.perf_counter()
    fd = os.open(f"{path}.direct", os.O_RDONLY | os.O_DIRECT)
    os.preadv(fd, [direct], 0)
    os.close(fd)
    t2 = time.perf_counter()
    for suffix in [".in", ".out", ".direct"]:
        os.remove(path + suffix)
    write, read = direct.size / 1e6 / (t1 - t0), direct.size / 1e6 / (t2 - t1)
    return {"rows": n, "peak_mb": rss.extra_mb, "cpu_s": rss.cpu_s, "seconds": rss.seconds,
            "direct_write_MBps": write, "direct_read_MBps": read, "shuffle_bound_MBps": 1 / (2 / write + 2 / read)}


def phase_shuffle_anchor(path: str, n: int) -> dict:
    """Hugging Face `datasets`' global shuffle of the same rows made contiguous on disk (SAELens'
    `shuffle=True` cache, `shuffle` + `flatten_indices`), float32 rows as SAELens caches them."""
    import datasets
    import pyarrow as pa

    rows = synthetic_rows(n)
    column = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), D)
    folder = f"{path}.hf"
    datasets.Dataset(pa.table({"resid": column})).save_to_disk(folder)
    del rows, column
    ds = datasets.load_from_disk(folder)
    with PeakRSS() as rss:
        ds.shuffle(seed=0).flatten_indices(cache_file_name=f"{folder}/shuffled.arrow")
    shutil.rmtree(folder)
    return {"rows": n, "peak_mb": rss.extra_mb, "cpu_s": rss.cpu_s, "seconds": rss.seconds}


def phase_limit(n: int, batch: int) -> dict:
    """The physical limits on this CPU for the same bytes: memcpy of bf16 batches, CRC32C of them,
    zstd-1 decode of 4 MiB chunks, and torch's bf16 -> float32 into a preallocated batch."""
    import google_crc32c
    import numcodecs
    import torch

    torch.set_num_threads(1)
    src = np.ascontiguousarray(synthetic_rows(batch).view(np.uint32)[:, :D] >> 16).astype(np.uint16)
    dst = np.empty_like(src)
    zstd = numcodecs.Zstd(level=1)
    chunk_rows = (4 << 20) // (2 * D)
    blobs = [zstd.encode(src[i:i + chunk_rows]) for i in range(0, batch, chunk_rows)]
    as_bf16, f32 = torch.from_numpy(src.view(np.int16)).view(torch.bfloat16), torch.empty((batch, D))
    work = {"memcpy": lambda: np.copyto(dst, src), "crc32c": lambda: google_crc32c.value(src.reshape(-1).view(np.uint8)),
            "zstd-1 decode": lambda: [zstd.decode(b) for b in blobs], "bf16->f32": lambda: f32.copy_(as_bf16)}
    out = {}
    for name, fn in work.items():
        best = float("inf")
        for _ in range(max(3, n // batch)):
            t0 = time.process_time()
            fn()
            best = min(best, time.process_time() - t0)
        out[name] = batch / best
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--d", type=int, default=D, help="row width (default Gemma-2-2B's 2304)")
    parser.add_argument("--budget", type=int, default=512 << 20, help="finalize memory budget (bytes)")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--out", default="/tmp/store_bench")
    parser.add_argument("--device", default="cpu", help="where the reader delivers batches (cuda: pinned, converted there)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--codec", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--no-windows", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    globals()["D"] = args.d
    path = f"{args.out}/{args.codec}.zarr"
    if args.phase:
        result = {"write": lambda: phase_write(path, args.rows, args.codec, not args.no_windows),
                  "finalize": lambda: phase_finalize(path, args.budget),
                  "read": lambda: phase_read(path, args.batch, args.dtype, args.threads, args.device),
                  "zarr": lambda: phase_zarr(path, args.batch), "anchor": lambda: phase_anchor(path, args.rows, args.batch),
                  "limit": lambda: phase_limit(args.rows, args.batch),
                  "disk": lambda: phase_disk(path, args.rows),
                  "shuffle-anchor": lambda: phase_shuffle_anchor(path, args.rows)}[args.phase]()
        print(json.dumps(result))
        return
    shutil.rmtree(args.out, ignore_errors=True)
    Path(args.out).mkdir(parents=True)

    def run(phase: str, codec: str = "none", dtype: str = "bfloat16", threads: int = 1, windows: bool = True) -> dict:
        out = subprocess.run([sys.executable, __file__, "--phase", phase, "--rows", str(args.rows), "--d", str(args.d),
                              "--budget", str(args.budget), "--batch", str(args.batch), "--out", args.out,
                              "--codec", codec, "--dtype", dtype, "--threads", str(threads), "--device", args.device,
                              *(() if windows else ("--no-windows",))],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    mb = args.rows * D * 2 / 1e6
    print(f"synthetic bf16 rows, d={D}: low-rank(48)+noise, log-normal norms, 1% 8x rows, 4 outlier dims; "
          f"{args.rows} rows = {mb:.0f} MB of bf16 activations; rates per CPU-second (wall in brackets)")
    sample = synthetic_rows(min(args.rows, 8192), seed=2)
    print(f"\ncodecs on {sample.shape[0]} rows, chunks of 2048 rows, 1 thread")
    print(f"{'codec':<26}{'ratio':>7}{'encode MB/CPU-s':>17}{'decode MB/CPU-s':>17}")
    for r in bench_codecs(sample):
        print(f"{r['codec']:<26}{r['ratio']:>7.3f}{r['encode_MBps']:>17.0f}{r['decode_MBps']:>17.0f}")
    limit = run("limit")
    print("\nlimits (one core, 4096-row bf16 batches): " + ", ".join(f"{k} {v:,.0f} rows/s" for k, v in limit.items()))
    memcpy = limit["memcpy"]

    def line(name: str, r: dict, rows: int, anchor: float | None = None, versus: str = "the anchor") -> float:
        rate = rows / r["cpu_s"]
        extra = f" = {rate / anchor:.2f}x {versus}" if anchor else ""
        print(f"  {name:<40}{rate:>10,.0f} rows/CPU-s ({rows / r['seconds']:>8,.0f} wall) {rate * D * 2 / 1e6:>6.0f} MB/CPU-s"
              f"  {rate / memcpy:.2f}x memcpy{extra}  peak +{r['peak_mb']:.0f} MB")
        return rate

    anchor = run("anchor")
    print("\nanchors")
    saelens = line("SAELens cache (Arrow float32) -> torch", anchor, anchor["rows"])
    disk = line("floor: read once + write once + fsync", run("disk"), args.rows)
    for codec in ["none", "zstd-1"]:
        bare, windowed = [], []
        for _ in range(3):  # taken in turn, best of 3: the machine is shared
            run("write", codec, windows=False)
            bare.append(run("finalize", codec))
            write = run("write", codec)
            windowed.append(run("finalize", codec))
        fin = windowed[-1]
        best = {key: min(r[key] for r in windowed) / min(r[key] for r in bare) for key in ("cpu_s", "seconds")}
        print(f"\ncodec {codec}")
        print(f"  windows/* (128-token windows): store {fin['bytes'] / bare[-1]['bytes'] - 1:+.2%} bytes "
              f"({fin['window_bytes'] / 1e6:.2f} MB); finalize, best of 3 taken in turn: {best['cpu_s']:.3f}x "
              f"the CPU-s and {best['seconds']:.3f}x the wall of the same store without windows")
        line("write (StoreWriter, 8192-row segments)", write, args.rows)
        line(f"shuffle (finalize, budget {args.budget >> 20} MiB)", fin, args.rows, disk, "the floor")
        zarr_read = run("zarr", codec)
        zarr_rate = line("anchor: zarr's own read, bf16 bits", zarr_read, zarr_read["rows"])
        for dtype, threads in [("bfloat16", 1), ("bfloat16", 2), ("float32", 1), ("float32", 2)]:
            r = run("read", codec, dtype, threads)
            rate = line(f"ActivationStream -> {args.device} {dtype}, {threads} thread(s)", r, r["rows"], zarr_rate)
            print(f"  {'':<40}{'':>10} wall {r['rows'] * D * 2 / r['seconds'] / 1e9:.2f} GB/s of bf16 rows delivered")
            print(f"  {'':<40}{'':>10} vs SAELens' cache: {rate / saelens:.2f}x")
        shutil.rmtree(f"{args.out}/{codec}.zarr")


if __name__ == "__main__":
    main()
