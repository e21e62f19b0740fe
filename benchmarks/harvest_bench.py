"""Harvest throughput: kukla vs bare `run_with_cache` vs SAELens' CacheActivationsRunner.

Same model, same hook, same context size, same number of windows (the first windows of
the text, packed with a BOS each). By default the three run in one process with their
repeats interleaved, so each sees the same machine load; `--separate` gives each its own
process and so its own peak RSS. Model loading is not timed; after one untimed warm-up
batch each way runs `--repeat` times on the same tokens and the fastest run counts. CPU
seconds (process time) are printed beside wall seconds: the steadier figure on a shared
machine. Rates count forwarded positions (windows × context)
so the three are comparable; kukla also reports its stored rows (BOS/EOS left out).

    python benchmarks/harvest_bench.py                       # Gemma-3-270m, 32 windows of 128
    python benchmarks/harvest_bench.py --windows 64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _windows(model, args) -> list:
    from kukla.pipeline.harvest.text import iter_texts, iter_windows

    texts = iter_texts(args.text, None, "train", None, "text")
    windows = []
    for window in iter_windows(texts, model.tokenizer, args.context):
        windows.append(window)
        if len(windows) == args.windows:
            return windows
    raise SystemExit(f"{args.text} holds fewer than {args.windows} windows")


def way_kukla(model, args, work: Path) -> dict:
    from kukla.pipeline.harvest import HarvestConfig, harvest
    from kukla.storage import open_store

    from kukla.storage import finalize_store

    stored = int(sum(w.keep.sum() for w in _windows(model, args)))
    best = None
    for attempt in range(args.repeat):
        out = work / f"kukla-{attempt}.zarr"
        config = HarvestConfig(output=str(out), model=args.model, dataset=args.text, hook=[args.hook],
                               context_size=args.context, tokens=stored, batch_size=args.batch,
                               segment_windows=args.segment_windows, finalize=False)
        start, cpu = time.perf_counter(), time.process_time()
        harvest(config, model=model)
        written = time.perf_counter() - start
        finalize_store(config.output, seed=0)
        total = time.perf_counter() - start
        assert open_store(config.output).n_rows == stored
        if best is None or total < best["seconds"]:
            best = {"seconds": total, "cpu_seconds": time.process_time() - cpu,
                    "seconds_without_finalize": written, "stored_rows": stored,
                    "disk_mb": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6}
    return best


def way_bare(model, args, work: Path) -> dict:
    import numpy as np
    import torch

    from kukla.pipeline.hooks import expand_hook, stop_at_layer

    hook = expand_hook(args.hook)
    windows = torch.from_numpy(np.stack([w.tokens for w in _windows(model, args)]))
    stop = stop_at_layer([hook], model.cfg.n_layers)
    times = []
    for _ in range(args.repeat):
        start, cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for i in range(0, len(windows), args.batch):
                _, cache = model.run_with_cache(windows[i:i + args.batch], names_filter=[hook], stop_at_layer=stop)
                cache[hook].cpu()
        times.append((time.perf_counter() - start, time.process_time() - cpu))
    seconds, cpu_seconds = min(times)
    return {"seconds": seconds, "cpu_seconds": cpu_seconds}


def way_saelens(model, args, work: Path) -> dict:
    import datasets
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

    from kukla.pipeline.hooks import expand_hook

    tokens = args.windows * args.context
    d_in = model.cfg.d_model
    hf_model, texts = _hf_model(args.model), datasets.Dataset.from_json(args.text)
    best = None
    for attempt in range(args.repeat):  # a fresh runner reads the same first tokens again
        out = work / f"saelens-{attempt}"
        cfg = CacheActivationsRunnerConfig(
            dataset_path=args.text, model_name=args.model, model_batch_size=args.batch,
            hook_name=expand_hook(args.hook), d_in=d_in, training_tokens=tokens, context_size=args.context,
            device="cpu", dtype="float32", buffer_size_gb=tokens * d_in * 4 / 1e9,
            new_cached_activations_path=str(out),
            model_from_pretrained_kwargs={"hf_model": hf_model, "tokenizer": model.tokenizer},
        )
        runner = CacheActivationsRunner(cfg, override_dataset=texts)
        start, cpu = time.perf_counter(), time.process_time()
        dataset = runner.run()
        seconds = time.perf_counter() - start
        if best is None or seconds < best["seconds"]:
            best = {"seconds": seconds, "cpu_seconds": time.process_time() - cpu, "rows": len(dataset) * args.context,
                    "disk_mb": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6}
    return best


def _hf_model(name: str):
    """SAELens loads by TransformerLens name; offline, it needs the HF model handed over."""
    import torch
    from transformers import AutoModelForCausalLM

    from kukla.pipeline.models import EMBEDDED_MODEL, convert_embedded_gemma

    folder = convert_embedded_gemma() if name == EMBEDDED_MODEL else Path(name)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _warm_up(model, args) -> None:
    """One untimed batch, so no way pays for first-call allocations."""
    import torch

    with torch.inference_mode():
        model(torch.zeros((args.batch, args.context), dtype=torch.long), stop_at_layer=1)


WAYS = {"kukla": way_kukla, "run_with_cache": way_bare, "saelens": way_saelens}


def run_ways(args) -> None:
    """Run the asked ways in this process; with several, interleave their repeats so each
    sees the same machine load (peak RSS is then the process's, not one way's)."""
    import copy

    import torch

    from kukla.pipeline.models import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    _warm_up(model, args)
    ways = list(WAYS) if args.way == "all" else [args.way]
    once = copy.copy(args)
    once.repeat = 1
    best: dict[str, dict] = {}
    work = Path(tempfile.mkdtemp(prefix="harvest-bench-"))
    try:
        for attempt in range(args.repeat):
            for way in ways:
                folder = work / f"{way}-{attempt}"
                folder.mkdir()
                result = WAYS[way](model, once, folder)
                if way not in best or result["seconds"] < best[way]["seconds"]:
                    best[way] = result
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for way, result in best.items():
        result.update(way=way, peak_rss_mb=_peak_mb(), positions=args.windows * args.context)
        print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="google/gemma-3-270m")
    parser.add_argument("--hook", default="resid_post:6")
    parser.add_argument("--text", default="/work/shared/data/tinystories/train.jsonl")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--segment-windows", type=int, default=64)
    parser.add_argument("--way", choices=[*WAYS, "all"], help="run in this process (used by the driver)")
    parser.add_argument("--separate", action="store_true",
                        help="one process per way (own peak RSS) instead of interleaved repeats in one process")
    args = parser.parse_args()
    if args.way:
        return run_ways(args)
    results = {}
    for way in WAYS if args.separate else ["all"]:
        cmd = [sys.executable, __file__, "--way", way, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            print(f"{way}: FAILED\n{out.stderr[-3000:]}")
        results.update({r["way"]: r for r in (json.loads(line[7:]) for line in lines)})
    print(f"model {args.model}, hook {args.hook}, {args.windows} windows × {args.context} = "
          f"{args.windows * args.context} positions, batch {args.batch}, {args.threads} torch thread(s)")
    r_base = results.get("run_with_cache", {})
    base = r_base.get("seconds")
    for way, r in results.items():
        rate = r["positions"] / r["seconds"]
        ratio = f"{base / r['seconds']:.2f}× bare speed" if base else ""
        extra = ""
        if way == "kukla":
            extra = (f", {r['stored_rows']} rows stored, without finalize {r['positions'] / r['seconds_without_finalize']:.0f} tok/s"
                     f", {r['disk_mb']:.1f} MB on disk")
        elif way == "saelens":
            extra = f", {r['rows']} rows stored, {r['disk_mb']:.1f} MB on disk"
        cpu_rate = r["positions"] / r["cpu_seconds"]
        cpu_ratio = f" ({cpu_rate / (r_base['positions'] / r_base['cpu_seconds']):.2f}× bare)" if base else ""
        print(f"{way:15s} {rate:8.0f} tok/s  {r['seconds']:7.2f} s  {cpu_rate:8.0f} tok/CPU-s{cpu_ratio}  "
              f"peak RSS {r['peak_rss_mb']:6.0f} MB  {ratio}{extra}")


if __name__ == "__main__":
    main()
