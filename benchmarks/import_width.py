"""Peak RSS of `kukla store import` of wide rows (d=2304, Gemma-2-2B's width) under a small
shuffle budget, beside the process's floor (`kukla store info` of the same store: imports, no
rows) and the budget: what a segment in flight costs on top (`importer.SEGMENT_BYTES`).

No anchor: SAELens has no import of activations saved by another tool (its cache runner writes
its own). Each command runs from `memory_scaling.py`'s small launcher, so its peak is its own.

    python benchmarks/import_width.py                    # 98,304 rows of d=2304: ~1 minute
    python benchmarks/import_width.py --rows 32768 --d 4096
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_scaling import CONTEXT, import_arrays, parse_size, run_stage  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=98304)
    parser.add_argument("--d", type=int, default=2304)
    parser.add_argument("--budget", type=parse_size, default=64 << 20)
    parser.add_argument("--out", default="/tmp/import_width", help="scratch folder (deleted first)")
    args = parser.parse_args()
    work = Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    acts, ids = import_arrays(work, args.rows, args.d)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    log, store = work / "log.txt", work / "store.zarr"
    peak, wall = run_stage(["store", "import", str(store), "--hook", f"resid_post:0={acts}", "--tokens", str(ids),
                            "--memory-budget", f"{args.budget}"], env, log)
    floor, _ = run_stage(["store", "info", str(store)], env, log)
    rows = args.rows // CONTEXT * CONTEXT
    print(f"import of {rows:,} rows x {args.d} float32 ({rows * args.d * 4 / 1e6:,.0f} MB) under a "
          f"{args.budget / 2**20:.0f} MiB budget: peak {peak:,.0f} MB in {wall:.1f} s; floor {floor:,.0f} MB; "
          f"over the floor {peak - floor:,.0f} MB = {(peak - floor) / (args.budget / 2**20):.1f}x the budget")


if __name__ == "__main__":
    main()
