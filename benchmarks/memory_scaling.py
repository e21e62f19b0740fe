"""Memory scaling: each stage's peak RSS on stores of N and 4·N rows (more with --factors), the
growth per row between them, and that growth extrapolated to 10⁸ and 10⁹ rows.

The promise under test: no stage's memory grows with the store's row count beyond small,
documented per-row index structures. Rows are narrow (a toy tree at d=16, a random 1-layer
GPT-2 with d=32 over generated text, an imported d=16 array with token ids), so the activations
themselves are small and any per-row (or per-chunk, per-segment) structure shows in the slope.
The shuffle's budget is small (`--budget`, 8 MiB by default) so every store is a budget or more
large: below one budget, finalize's buffers simply fill up to it, which is not growth.

Stages, each a `python -m kukla …` process of its own (peak RSS from `wait4`, imports included),
run on 8,192-row stores too, their floor: the slope between the two largest sizes is the growth,
and the shuffling stages' peak over their floor is set against the budget:

    harvest-toy      kukla harvest --source toy-tree (writes, then finalizes: the two-pass shuffle)
    harvest-text     kukla harvest of a tiny model over text, --no-finalize (a store with windows/*)
    finalize         kukla store finalize of that store (the shuffle, windows/token_id, windows/row)
    import           kukla store import --tokens of a [sequences, context, d] array (writes + finalizes)
    info, verify     kukla store info / verify of the text store
    train            kukla train on the text store (a few hundred steps, width 64)
    evaluate         kukla evaluate of that dictionary on the text store (no model: downstream and
                     absorption off; contexts from windows/*, the latent tables and the browser on).
                     It reads only the held-out rows, min(1% of rows, 2²⁰): its growth stops at
                     1.05·10⁸ rows, so its 10⁹ figure is its 10⁸ one.
    finalize-pairs   (opt-in: slow) finalize of the text store again under a budget 4× smaller: pass 2
                     reads where each bucket lies in each run, n_runs·n_buckets entries (quadratic in
                     rows/budget), from a scratch file; this stage has 16× the pairs of `finalize` at
                     the same rows, so its memory should not move while its time grows with the pairs
                     (one read per pair and array)

    python benchmarks/memory_scaling.py                      # N = 2¹⁸ rows: ~6 minutes
    python benchmarks/memory_scaling.py --rows 1048576       # N = 2²⁰ (and 4·N): ~12 minutes
    python benchmarks/memory_scaling.py --factors 1,4,16     # add 16·N
    python benchmarks/memory_scaling.py --dry-run            # every stage once on 4096 rows (no slope)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's kukla, and tests/ for the tiny model

CONTEXT = 64  # tokens per window of the text stores (the tiny model's n_ctx)
TARGETS = (10**8, 10**9)
STAGES = ("harvest-toy", "harvest-text", "finalize", "finalize-pairs", "import", "info", "verify", "train",
          "evaluate")
DEFAULT_STAGES = tuple(s for s in STAGES if s != "finalize-pairs")
SHUFFLING = ("harvest-toy", "finalize", "finalize-pairs", "import")  # the stages that run the budgeted shuffle
FLOOR = 8192  # rows of the floor stores: each stage's RSS with imports and small buffers only
SLACK_MB = 16  # what a shuffling stage may use past its budget: a segment being written, the allocator's slack
PAIRS_BUDGET = 4  # finalize-pairs' budget is --budget / this: 16x the (run, bucket) pairs


def parse_size(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[:-len(unit)]) * factor)
    return int(text)


def peak_rss(command: list[str]) -> None:
    """`--peak-rss CMD…`: run CMD and print its peak RSS in KiB on the last line. A child's
    ru_maxrss starts at its parent's high-water mark (vfork shares the parent's memory until
    exec), so every stage is started from this small process, not from the driver."""
    proc = subprocess.Popen(command)
    _, status, usage = os.wait4(proc.pid, 0)
    print(f"\npeak_rss_kib {usage.ru_maxrss}", flush=True)
    raise SystemExit(os.waitstatus_to_exitcode(status))


def run_stage(args: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run `python -m kukla ARGS`; (peak RSS in MB, wall seconds). A failure stops the benchmark."""
    start = time.perf_counter()
    with log.open("ab") as out:
        out.write(("\n$ kukla " + " ".join(args) + "\n").encode())
        out.flush()
        code = subprocess.run([sys.executable, __file__, "--peak-rss", sys.executable, "-m", "kukla", "-q", *args],
                              stdout=out, stderr=out, env=env, cwd=REPO).returncode
    if code != 0:
        raise SystemExit(f"kukla {' '.join(args)} failed (exit {code}); see {log}")
    last = log.read_text().rstrip().rsplit("\n", 1)[-1]
    return int(last.split()[-1]) / 1024, time.perf_counter() - start


def build_inputs(work: Path, max_rows: int) -> dict[str, Path]:
    """The tiny model, enough text for the largest text store, and the import arrays (per size)."""
    from tests.harvest.conftest import build_tiny_model_dir

    model = build_tiny_model_dir(work / "tiny-model", n_layers=1, n_ctx=CONTEXT)
    texts = work / "texts.jsonl"
    rng = np.random.default_rng(0)
    words = np.array(["the", "cat", "sat", "on", "a", "mat", "Tom", "saw", "big", "red", "ball", "and", "ran", "home"])
    chars = 0
    with texts.open("w") as f:  # each character is a token (the model's tokenizer is char-level)
        while chars < max_rows * 1.1 + 10_000:
            text = " ".join(words[rng.integers(0, len(words), rng.integers(4, 24))]) + "."
            f.write(json.dumps({"text": text}) + "\n")
            chars += len(text) + 1
    return {"model": model, "texts": texts}


def import_arrays(work: Path, rows: int, d: int = 16) -> tuple[Path, Path]:
    """[rows / CONTEXT, CONTEXT, d] float32 activations and their token ids, written in blocks."""
    sequences = max(1, rows // CONTEXT)
    acts, ids = work / f"import-acts-{rows}.npy", work / f"import-ids-{rows}.npy"
    x = np.lib.format.open_memmap(acts, mode="w+", dtype=np.float32, shape=(sequences, CONTEXT, d))
    t = np.lib.format.open_memmap(ids, mode="w+", dtype=np.int32, shape=(sequences, CONTEXT))
    rng = np.random.default_rng(rows)
    for lo in range(0, sequences, 4096):
        hi = min(sequences, lo + 4096)
        x[lo:hi] = rng.standard_normal((hi - lo, CONTEXT, d), dtype=np.float32)
        t[lo:hi] = rng.integers(4, 60, (hi - lo, CONTEXT))
    x.flush()
    t.flush()
    del x, t
    return acts, ids


def measure(rows: int, args: argparse.Namespace, inputs: dict[str, Path], env: dict[str, str],
            log: Path) -> dict[str, tuple[float, float]]:
    """Every stage on stores of `rows` rows: {stage: (peak RSS MB, seconds)}."""
    work = Path(args.out) / f"rows-{rows}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    budget = str(args.budget)
    text, toy = str(work / "text.zarr"), str(work / "toy.zarr")
    steps, batch = args.steps, 1024
    plan = {
        "harvest-toy": ["harvest", "--source", "toy-tree", toy, "--tokens", str(rows), "--toy-dim", "16",
                        "--toy-tree", "4,2", "--memory-budget", budget],
        "harvest-text": ["harvest", text, "--model", str(inputs["model"]), "--dataset", str(inputs["texts"]),
                         "--hook", "resid_post:0", "--context-size", str(CONTEXT), "--tokens", str(rows),
                         "--batch-size", "64", "--device", "cpu", "--no-finalize"],
        "finalize": ["store", "finalize", text, "--memory-budget", budget],
        "info": ["store", "info", text],
        "verify": ["store", "verify", text],
        "train": ["train", text, "--hook", "resid_post:0", "--width", "64", "--k", "4", "--tokens",
                  str(steps * batch), "--batch-size", str(batch), "--checkpoint-every", "0", "--device", "cpu",
                  "--init-tokens", "4096", "--calibration-tokens", "4096", "--out", str(work / "train")],
        "evaluate": ["evaluate", str(work / "train" / "matryoshka-batchtopk-w64-k4-s0"), "--store", text,
                     "--out", str(work / "report"), "--no-downstream", "--no-absorption", "--device", "cpu",
                     "--batch-size", "4096"],
    }
    results: dict[str, tuple[float, float]] = {}
    for stage in STAGES:
        if stage not in args.stages:
            continue
        if stage == "import":
            acts, ids = import_arrays(work, rows)
            cmd = ["store", "import", str(work / "import.zarr"), "--hook", f"resid_post:0={acts}", "--tokens",
                   str(ids), "--memory-budget", budget]
        elif stage == "finalize-pairs":
            small = str(work / "text-pairs.zarr")
            run_stage([small if a == text else a for a in plan["harvest-text"]], env, log)  # unfinalized, again
            cmd = ["store", "finalize", small, "--memory-budget", str(max(1 << 16, args.budget // PAIRS_BUDGET))]
        else:
            cmd = plan[stage]
        results[stage] = run_stage(cmd, env, log)
        print(f"  {rows:>11,} rows  {stage:15s} {results[stage][0]:8.0f} MB  {results[stage][1]:6.1f} s",
              flush=True)
    for key in ("import-acts", "import-ids"):
        for path in work.glob(f"{key}-*.npy"):
            path.unlink()
    return results


def report(sizes: list[int], results: dict[int, dict[str, tuple[float, float]]], budget: int) -> None:
    """Peak RSS per stage per size, the slope between the two largest sizes, its extrapolation,
    and what the shuffling stages use over their floor against the budget."""
    if len(sizes) < 3:  # the dry run: every stage ran, no slope to show
        return
    lo, hi = sizes[-2], sizes[-1]
    head = "".join(f"{n:>12,}" for n in sizes)
    print(f"\npeak RSS (MB) by rows ({FLOOR:,}: the floor); growth = ΔRSS/Δrows between {lo:,} and {hi:,} rows, "
          f"extrapolated (MB over the {hi:,}-row figure); over floor: the {hi:,}-row peak less the floor")
    print(f"{'stage':15s}{head}{'bytes/row':>11s}" + "".join(f"{'@' + f'{t:.0e}':>11s}" for t in TARGETS)
          + f"{'over floor':>12s}")
    flagged, over = [], []
    for stage in STAGES:
        if stage not in results[hi]:
            continue
        peaks = [results[n][stage][0] for n in sizes]
        per_row = (peaks[-1] - peaks[-2]) * 1e6 / (hi - lo)
        # evaluate reads the held-out rows, min(1%, 2**20): its growth stops at 100·2**20 rows
        extra = [max(0.0, per_row) * ((min(t, 100 << 20) if stage == "evaluate" else t) - hi) / 1e6 for t in TARGETS]
        print(f"{stage:15s}" + "".join(f"{p:12.0f}" for p in peaks) + f"{per_row:11.1f}"
              + "".join(f"{e:11.0f}" for e in extra) + f"{peaks[-1] - peaks[0]:12.0f}")
        if extra[0] > 1000:
            flagged.append(stage)
        limit = (budget // PAIRS_BUDGET if stage == "finalize-pairs" else budget) / 1e6
        if stage in SHUFFLING and peaks[-1] - peaks[0] > 1.25 * limit + SLACK_MB:
            over.append(f"{stage} ({peaks[-1] - peaks[0]:.0f} MB over its floor, budget {limit:.0f} MB)")
    print("stages over ~1 GB extra at 10⁸ rows: " + (", ".join(flagged) if flagged else "none"))
    print(f"shuffling stages over 1.25× their budget + {SLACK_MB} MB: " + (", ".join(over) if over else "none"))


def main() -> None:
    if sys.argv[1:2] == ["--peak-rss"]:
        return peak_rss(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1 << 18, help="N: rows of the smallest stores")
    parser.add_argument("--factors", default="1,4", help="store sizes in multiples of N (the slope uses the last two)")
    parser.add_argument("--budget", type=parse_size, default=8 << 20,
                        help="finalize memory budget (bytes, or 8MiB); keep N's stores larger than it")
    parser.add_argument("--steps", type=int, default=300, help="training steps (batch 1024)")
    parser.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                        help=f"comma-separated, from {','.join(STAGES)} (default: all but finalize-pairs)")
    parser.add_argument("--out", default="/tmp/memory_scaling", help="scratch folder (deleted first)")
    parser.add_argument("--dry-run", action="store_true", help="every stage once on 4096 rows, 20 steps: a smoke test")
    args = parser.parse_args()
    if args.dry_run:
        args.rows, args.factors, args.steps, args.budget = 4096, "1", 20, 1 << 16
    args.stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage {unknown[0]!r}: choose from {', '.join(STAGES)}")
    needs = {"finalize": "harvest-text", "finalize-pairs": "harvest-text", "info": "finalize",
             "verify": "finalize", "train": "finalize", "evaluate": "train"}
    missing = [(s, needs[s]) for s in args.stages if s in needs and needs[s] not in args.stages]
    if missing:
        parser.error(f"stage {missing[0][0]} needs stage {missing[0][1]}")
    sizes = [args.rows * int(f) for f in args.factors.split(",")]
    sizes = sizes if args.dry_run else [FLOOR, *sizes]
    if len(sizes) < 3 and not args.dry_run:
        parser.error("give at least two --factors: the growth is the slope between the last two")
    shutil.rmtree(args.out, ignore_errors=True)
    Path(args.out).mkdir(parents=True)
    log = Path(args.out) / "stages.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    inputs = build_inputs(Path(args.out), max(sizes))
    print(f"budget {args.budget >> 10} KiB (finalize-pairs: {max(1 << 16, args.budget // PAIRS_BUDGET) >> 10} KiB); "
          f"rows {', '.join(f'{n:,}' for n in sizes)}; one torch thread; log {log}", flush=True)
    results = {rows: measure(rows, args, inputs, env, log) for rows in sizes}
    report(sizes, results, args.budget)
    if args.dry_run:
        shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
