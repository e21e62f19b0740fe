"""Shuffle benchmark: `finalize_store` (the two-pass global shuffle) in MB of activations per
CPU-second at the store bench's size and at a 4x larger store, its fixed cost per run (the
finalize of a 256-row store), beside the disk's own write and read rates (O_DIRECT, measured in
the same run: the physical limit a shuffle that reads and writes every byte twice is bounded
by), the page-cache floor (the same bytes read once and written once with an fsync) and the
anchor: Hugging Face `datasets`' shuffle made contiguous (`shuffle` + `flatten_indices`, what
SAELens' shuffled activation cache becomes once written out; its rows are float32 as SAELens
caches them, so its MB count twice the bytes per row).

Every phase runs in its own process through `store_bench.py --phase` (same synthetic d=2304 bf16
rows, codec `none`, one thread), so each CPU figure is that process's own, imports excluded:
the finalize a harvest runs sits in a process that has them already.

    python benchmarks/shuffle_bench.py [--rows 32768] [--large 4] [--out /tmp/shuffle_bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

STORE_BENCH = str(Path(__file__).with_name("store_bench.py"))
TINY = 256  # rows: what a finalize costs whatever the store's size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32768, help="the store bench's size (151 MB at d=2304)")
    parser.add_argument("--large", type=int, default=4, help="the larger store, in multiples of --rows")
    parser.add_argument("--d", type=int, default=2304)
    parser.add_argument("--budget", type=int, default=512 << 20, help="finalize memory budget (bytes)")
    parser.add_argument("--out", default="/tmp/shuffle_bench")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    Path(args.out).mkdir(parents=True)

    def run(phase: str, rows: int) -> dict:
        out = subprocess.run([sys.executable, STORE_BENCH, "--phase", phase, "--rows", str(rows), "--d", str(args.d),
                              "--budget", str(args.budget), "--out", args.out, "--codec", "none"],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    def mb(rows: int) -> float:
        return rows * args.d * 2 / 1e6

    disk = run("disk", args.rows)
    print(f"d={args.d} bf16 rows, codec none, budget {args.budget >> 20} MiB, 1 thread; MB = bf16 activation bytes")
    print(f"disk (O_DIRECT, {mb(args.rows):.0f} MB): write {disk['direct_write_MBps']:,.0f} MB/s, "
          f"read {disk['direct_read_MBps']:,.0f} MB/s wall; a shuffle reads and writes each byte twice, so "
          f"≤ {disk['shuffle_bound_MBps']:,.0f} MB/s wall here")
    floor = mb(args.rows) / disk["cpu_s"]
    print(f"page-cache floor (read once + write once + fsync): {floor:,.0f} MB/CPU-s")
    anchor = run("shuffle-anchor", args.rows)
    anchor_rate = mb(args.rows) / anchor["cpu_s"]
    print(f"anchor: datasets shuffle + flatten_indices (float32 rows): {anchor_rate:,.0f} MB of bf16-equivalent "
          f"rows/CPU-s ({args.rows / anchor['seconds']:,.0f} rows/s wall)")
    fixed = None
    for rows in [TINY, args.rows, args.rows * args.large]:
        run("write", rows)
        fin = run("finalize", rows)
        shutil.rmtree(f"{args.out}/none.zarr")
        if rows == TINY:
            fixed = fin["cpu_s"]
            print(f"shuffle fixed cost (a {TINY}-row store): {fixed:.3f} CPU-s, {fin['seconds']:.3f} s wall")
            continue
        rate = mb(rows) / fin["cpu_s"]
        print(f"shuffle {rows:>8,} rows ({mb(rows):>5.0f} MB): {rate:>5.0f} MB/CPU-s, {mb(rows) / fin['seconds']:>5.0f} "
              f"MB/s wall ({fin['seconds'] * disk['shuffle_bound_MBps'] / mb(rows):.2f}x the disk's time), "
              f"{fin['cpu_s']:.3f} CPU-s of which {fixed:.3f} fixed; {rate / floor:.2f}x the page-cache floor, "
              f"{rate / anchor_rate:.2f}x the anchor  peak +{fin['peak_mb']:.0f} MB")


if __name__ == "__main__":
    main()
