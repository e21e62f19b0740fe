"""Harvest throughput: kukla vs bare `run_with_cache` (kukla's weight layout and TransformerLens' own) vs SAELens' CacheActivationsRunner.

Same model, same hook, same context size, same number of windows (the first windows of
the text, packed with a BOS each). By default the three run in one process with their
repeats interleaved, so each sees the same machine load; `--separate` gives each its own
process and so its own peak RSS. Model loading is not timed; after one untimed warm-up
batch each way runs `--repeat` times on the same tokens and the fastest run counts. CPU
seconds (process time) are printed beside wall seconds: the steadier figure on a shared
machine. Rates count forwarded positions (windows × context)
so the three are comparable; kukla also reports its stored rows (BOS/EOS left out). The bare
loop is the physical limit here: the same forward with nothing stored.

    python benchmarks/harvest_bench.py                       # Gemma-3-270m, 64 windows of 128
    python benchmarks/harvest_bench.py --device cuda --model-dtype bfloat16 --windows 512 --batch 32
    python benchmarks/harvest_bench.py --dry-run             # tiny random GPT-2 by the same path, seconds
    python benchmarks/harvest_bench.py --shape gemma-2-2b --hook resid_post:12 --device cuda --model-dtype bfloat16

`--shape gemma-2-2b` needs neither the network nor Gemma's weights: it builds, on this machine, a
Hugging Face cache holding `google/gemma-2-2b` as a download leaves it, but with random bf16
weights (transformers' `Gemma2Config` defaults are Gemma-2-2B's shape, the one TransformerLens
hard-codes for that name) and a character tokenizer padded to its 256000-token vocabulary, and
generated text; every way then loads `gemma-2-2b` by name, offline, as a user's harvest does.
`--layers 2` shrinks it to its first two layers (full width): the check of that path on a CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
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
    from kukla.pipeline.text import iter_texts, iter_windows

    texts = iter_texts(args.text, None, "train", None, "text")
    windows = []
    for window in iter_windows(texts, model.tokenizer, args.context):
        windows.append(window)
        if len(windows) == args.windows:
            return windows
    raise SystemExit(f"{args.text} holds fewer than {args.windows} windows")


def _sync(args) -> None:
    """Wait for the device, so a timer stops after the work, not after its launch."""
    import torch

    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def way_kukla(model, args, work: Path) -> dict:
    from kukla.pipeline.harvest import HarvestConfig, harvest
    from kukla.storage import finalize_store, open_store

    stored = int(sum(w.keep.sum() for w in _windows(model, args)))
    best = None
    for attempt in range(args.repeat):
        out = work / f"kukla-{attempt}.zarr"
        config = HarvestConfig(output=str(out), model=args.model, dataset=args.text, hook=[args.hook],
                               context_size=args.context, tokens=stored, batch_size=args.batch,
                               segment_windows=args.segment_windows, finalize=False, device=args.device,
                               model_dtype=args.model_dtype, store_dtype=args.store_dtype)
        start, cpu = time.perf_counter(), time.process_time()
        harvest(config, model=model)
        written, written_cpu = time.perf_counter() - start, time.process_time() - cpu
        finalize_store(config.output, seed=0)
        total = time.perf_counter() - start
        assert open_store(config.output).n_rows == stored
        if best is None or total < best["seconds"]:
            best = {"seconds": total, "cpu_seconds": time.process_time() - cpu,
                    "seconds_without_finalize": written, "cpu_seconds_without_finalize": written_cpu,
                    "stored_rows": stored,
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
                batch = windows[i:i + args.batch].to(args.device)
                _, cache = model.run_with_cache(batch, names_filter=[hook], stop_at_layer=stop)
                cache[hook].cpu()
        _sync(args)
        times.append((time.perf_counter() - start, time.process_time() - cpu))
    seconds, cpu_seconds = min(times)
    return {"seconds": seconds, "cpu_seconds": cpu_seconds}


def way_saelens(model, args, work: Path) -> dict:
    import datasets
    import torch
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

    from kukla.pipeline.hooks import expand_hook

    tokens = args.windows * args.context
    d_in = model.cfg.d_model
    texts = datasets.Dataset.from_json(args.text)
    # SAELens stores in its config's dtype through pyarrow, which has no bfloat16: float16 is as wide
    stored = "float16" if args.model_dtype == "bfloat16" else args.model_dtype
    width = torch.finfo(getattr(torch, stored)).bits // 8  # one buffer of exactly `tokens`: SAELens rounds buffers up
    if args.shape:  # a Hub name SAELens loads itself, as kukla did
        loading = {"first_n_layers": args.layers} if args.layers else {}
    else:
        loading = {"hf_model": _hf_model(args.model, args.model_dtype), "tokenizer": model.tokenizer}
    best = None
    for attempt in range(args.repeat):  # a fresh runner reads the same first tokens again
        out = work / f"saelens-{attempt}"
        cfg = CacheActivationsRunnerConfig(
            dataset_path=args.text, model_name=args.model, model_batch_size=args.batch,
            hook_name=expand_hook(args.hook), d_in=d_in, training_tokens=tokens, context_size=args.context,
            device=args.device, dtype=stored, buffer_size_gb=(tokens * d_in * width + 1) / 1e9,  # + 1: no float shortfall
            new_cached_activations_path=str(out),
            model_from_pretrained_kwargs={**loading, "dtype": args.model_dtype},
        )
        runner = CacheActivationsRunner(cfg, override_dataset=texts)
        start, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
        dataset = runner.run()
        _sync(args)
        seconds = time.perf_counter() - start
        assert len(dataset) * args.context == tokens, f"SAELens cached {len(dataset)} windows, not {args.windows}"
        if best is None or seconds < best["seconds"]:
            best = {"seconds": seconds, "cpu_seconds": time.process_time() - cpu,
                    "children_cpu_seconds": _children_cpu() - children, "rows": len(dataset) * args.context,
                    "disk_mb": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6}
    return best


def _children_cpu() -> float:
    """CPU seconds of finished child processes (work a way hands to a pool is not process time)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _hf_model(name: str, dtype: str):
    """SAELens loads by TransformerLens name; offline, it needs the HF model handed over."""
    from transformers import AutoModelForCausalLM

    from kukla.config import torch_dtype
    from kukla.pipeline.models import EMBEDDED_MODEL, convert_embedded_gemma

    folder = convert_embedded_gemma() if name == EMBEDDED_MODEL else Path(name)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(dtype))


def _load(args):
    """kukla's own load; a shrunken shape is the name's first `--layers` layers (TransformerLens
    knows the name's layer count, so it must be told)."""
    from kukla.config import torch_dtype
    from kukla.pipeline.models import load_model, skip_per_call_weight_copies

    if not args.layers:
        return load_model(args.model, device=args.device, dtype=args.model_dtype)
    from transformer_lens import HookedTransformer

    return skip_per_call_weight_copies(HookedTransformer.from_pretrained_no_processing(
        args.model, first_n_layers=args.layers, device=args.device, dtype=torch_dtype(args.model_dtype)).eval())


def _warm_up(model, args) -> None:
    """One untimed batch, so no way pays for first-call allocations."""
    import torch

    with torch.inference_mode():
        model(torch.zeros((args.batch, args.context), dtype=torch.long, device=args.device), stop_at_layer=1)
    _sync(args)


def as_transformer_lens_lays_it_out(model):
    """A copy of `model` with every weight contiguous again: the layout TransformerLens (and so
    SAELens) loads, whose forward copies weights per call (`models.skip_per_call_weight_copies`)."""
    import copy

    plain = copy.deepcopy(model)
    for parameter in plain.parameters():
        parameter.data = parameter.data.contiguous()
    return plain


WAYS = {"kukla": way_kukla, "run_with_cache": way_bare, "saelens": way_saelens,
        "run_with_cache-tl-layout": way_bare}


def run_ways(args) -> None:
    """Run the asked ways in this process; with several, interleave their repeats (in a rotated
    order) so each sees the same machine load (peak RSS is then the process's, not one way's)."""
    import copy

    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = _load(args)
    print(f"loaded {args.model} ({args.device}, {args.model_dtype}) in {time.perf_counter() - start:.0f} s", flush=True)
    _warm_up(model, args)
    ways = [w for w in WAYS if not (args.no_saelens and w == "saelens")] if args.way == "all" else [args.way]
    models = {way: as_transformer_lens_lays_it_out(model) if way.endswith("tl-layout") else model for way in ways}
    once = copy.copy(args)
    once.repeat = 1
    best: dict[str, dict] = {}
    cpu_rates: dict[str, list[int]] = {}
    work = Path(tempfile.mkdtemp(prefix="harvest-bench-"))
    try:
        for attempt in range(args.repeat):
            for way in ways[attempt % len(ways):] + ways[:attempt % len(ways)]:  # rotated: no way always follows another
                folder = work / f"{way}-{attempt}"
                folder.mkdir()
                result = WAYS[way](models[way], once, folder)
                cpu_rates.setdefault(way, []).append(round(args.windows * args.context / result["cpu_seconds"]))
                if way not in best or result["seconds"] < best[way]["seconds"]:
                    best[way] = result
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for way, result in best.items():
        result.update(way=way, peak_rss_mb=_peak_mb(), positions=args.windows * args.context,
                      every_cpu_rate=cpu_rates[way])
        print("RESULT " + json.dumps(result), flush=True)


def _gemma_2_2b(**overrides):
    from transformers import Gemma2Config

    return Gemma2Config(**overrides)  # its defaults are Gemma-2-2B's shape, the one TransformerLens hard-codes for the name


def _tiny_gpt2(**overrides):
    from transformers import GPT2Config

    return GPT2Config(**{"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "n_ctx": 64, **overrides})  # TransformerLens reads its shape


SHAPES = {"gemma-2-2b": ("gemma-2-2b", "google/gemma-2-2b", _gemma_2_2b), "tiny-gpt2": ("gpt2", "gpt2", _tiny_gpt2)}
"""Each `--shape`: the TransformerLens name a user passes, the Hub repository its cache holds, its config."""


def _dry_run(args) -> None:
    """Tiny sizes on a random 2-layer GPT-2 in a local Hub cache (the path of `--shape`), in seconds."""
    args.shape, args.hook, args.context, args.windows, args.batch, args.repeat = "tiny-gpt2", "resid_post:1", 16, 8, 4, 1


def _build_shape(args, work: Path) -> None:
    """A Hub cache holding SHAPES[args.shape] as a download leaves it, with random bf16 weights made on
    args.device (seconds on a GPU) and a char tokenizer of its vocabulary's size, and generated text
    enough for every window; points this process's children at both."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.harvest.conftest import char_tokenizer, write_texts

    start = time.perf_counter()
    name, repo, shape = SHAPES[args.shape]
    config = shape(**{"num_hidden_layers": args.layers} if args.layers else {})  # through the constructor: it
    tokenizer = char_tokenizer(size=config.vocab_size)                          # derives each layer's attention
    for token in ("bos", "eos", "pad"):
        setattr(config, f"{token}_token_id", getattr(tokenizer, f"{token}_token_id"))
    cache = work / "hub"
    commit = "0" * 40
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)
    n_parameters = sum(p.numel() for p in model.parameters())
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()  # this process only waits for the ways' child from here
    os.environ["HF_HUB_CACHE"] = str(cache)
    args.model = name
    args.text = str(write_texts(work / "texts.jsonl", n_docs=args.windows * args.context // 40 + 50))
    disk = sum(f.stat().st_size for f in snapshot.iterdir()) / 1e9
    print(f"built {repo} with random bf16 weights: {config.num_hidden_layers} layers, d_model {config.hidden_size}, "
          f"{n_parameters / 1e9:.2f}B parameters, {disk:.1f} GB on disk, in {time.perf_counter() - start:.0f} s",
          flush=True)


def _report(results: dict, args) -> None:
    """One line per way: wall and per-CPU-second rates, as ratios to the bare loop and to SAELens."""
    print(f"model {args.model}, hook {args.hook}, {args.windows} windows × {args.context} = "
          f"{args.windows * args.context} positions, batch {args.batch}, {args.threads} torch thread(s), "
          f"device {args.device}, model dtype {args.model_dtype}, store dtype {args.store_dtype}")

    def rates(r: dict) -> tuple[float, float]:
        return r["positions"] / r["seconds"], r["positions"] / r["cpu_seconds"]

    anchors = {name: rates(results[way]) for name, way in (("bare", "run_with_cache"), ("SAELens", "saelens"))
               if way in results}
    for way, r in results.items():
        wall, cpu = rates(r)
        ratios = "".join(f"  {wall / a[0]:.2f}× / {cpu / a[1]:.2f}× {name}" for name, a in anchors.items())
        extra = ""
        if way == "kukla":
            extra = (f"; without finalize {r['positions'] / r['seconds_without_finalize']:.0f} tok/s, "
                     f"{r['positions'] / r['cpu_seconds_without_finalize']:.0f} tok/CPU-s; "
                     f"{r['stored_rows']} rows, {r['disk_mb']:.1f} MB on disk")
        elif way == "saelens":
            extra = (f"; {r['rows']} rows, {r['disk_mb']:.1f} MB on disk, "
                     f"{r['children_cpu_seconds']:.2f} CPU-s in child processes")
        print(f"{way:24s} {wall:8.0f} tok/s {r['seconds']:7.2f} s  {cpu:8.0f} tok/CPU-s  "
              f"peak RSS {r['peak_rss_mb']:6.0f} MB  (wall / CPU){ratios}{extra}; "
              f"tok/CPU-s of each repeat {r['every_cpu_rate']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="google/gemma-3-270m")
    parser.add_argument("--hook", default="resid_post:6")
    parser.add_argument("--text", default="/work/shared/data/tinystories/train.jsonl")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--segment-windows", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda, cuda:1)")
    parser.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype the model runs in (all three ways)")
    parser.add_argument("--store-dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                        help="dtype kukla stores")
    parser.add_argument("--dry-run", action="store_true",
                        help="--shape tiny-gpt2 at tiny sizes: every way, seconds on a CPU")
    parser.add_argument("--no-saelens", action="store_true", help="leave SAELens out")
    parser.add_argument("--shape", choices=SHAPES, help="build this model's shape with random weights and load it "
                        "by name from a local Hub cache (no network, no weights to carry)")
    parser.add_argument("--layers", type=int, help="with --shape: its first N layers only (a check on a CPU)")
    parser.add_argument("--way", choices=[*WAYS, "all"], help="run in this process (used by the driver)")
    parser.add_argument("--separate", action="store_true",
                        help="one process per way (own peak RSS) instead of interleaved repeats in one process")
    args = parser.parse_args()
    if not args.no_saelens and importlib.util.find_spec("sae_lens") is None:  # a bare GPU image
        print("saelens: not installed here, its way is left out", flush=True)
        args.no_saelens = True
    with tempfile.TemporaryDirectory(prefix="harvest-bench-tiny-") as tiny:
        if args.dry_run:
            _dry_run(args)
        if args.shape and not args.way:
            _build_shape(args, Path(tiny))
        if args.way:
            return run_ways(args)
        passed = ["--model", args.model, "--text", args.text, "--hook", args.hook, "--context", str(args.context),
                  "--windows", str(args.windows), "--batch", str(args.batch), "--repeat", str(args.repeat),
                  "--threads", str(args.threads), "--segment-windows", str(args.segment_windows),
                  "--device", args.device, "--model-dtype", args.model_dtype, "--store-dtype", args.store_dtype,
                  *(["--no-saelens"] if args.no_saelens else []),
                  *(["--shape", args.shape] if args.shape else []), *(["--layers", str(args.layers)] if args.layers else [])]
        results = {}
        for way in (w for w in WAYS if not (args.no_saelens and w == "saelens")) if args.separate else ["all"]:
            cmd = [sys.executable, __file__, "--way", way, *passed]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            print("\n".join(line for line in out.stdout.splitlines() if line.startswith("loaded ")), flush=True)
            if not lines:
                print(f"{way}: FAILED\n{out.stderr[-3000:]}")
                raise SystemExit(1)
            results.update({r["way"]: r for r in (json.loads(line[7:]) for line in lines)})
        _report(results, args)


if __name__ == "__main__":
    main()
