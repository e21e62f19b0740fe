"""Training throughput: kukla's full optimiser step (sparse and dense paths) vs SAELens' on the
same activations, against a bare encoder matmul, and the data wait when a real store feeds it.

    python benchmarks/train_bench.py            # CPU: d=640, F=10240, k=64, batch 4096, 1 thread
    python benchmarks/train_bench.py --gpu      # GPU: d=2304, F=32768, k=64, batch 4096, bf16 autocast
    python benchmarks/train_bench.py --dry-run  # tiny sizes, seconds (the test suite runs this)

A step is everything a trainer does per batch. kukla: `train_step` (loss, backward,
decoder-gradient projection, clip 1.0, Adam, decoder renormalisation, dead-latent update).
SAELens 6: what `SAETrainer._train_step` does (`training_forward_pass`, backward, clip 1.0,
Adam, its firing counters) on `BatchTopKTrainingSAE` / `MatryoshkaBatchTopKTrainingSAE`.
All get the same batches: sparse sums of random unit directions, like residual-stream
activations. Levels are F·{1/32, 3/32, 7/32, 15/32, 1}. The physical limit is the encoder's
dense forward matmul (B×d by d×F): selection needs every pre-activation, so no step is cheaper.
"interleaved" takes kukla's Matryoshka and plain BatchTopK steps in turn in one process, so
their cost ratio is measured under the same load. "stream" is kukla's sparse Matryoshka step fed by `ActivationStream` from a store on disk
(bf16 rows, written with `StoreWriter` and shuffled by `finalize_store`); the data wait is the
share of its wall time spent waiting for the next batch.

Each case runs in its own process (its own peak memory; `--dry-run` runs them all in one). On CPU the figure is tokens per
CPU-second of one thread, at the fastest of `--steps` steps (steadier on a shared machine;
wall-clock tokens/s beside it); on a GPU,
tokens per second over `--steps` steps with one synchronisation at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from dictionary_flags import dictionary_parser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
CASES = [("matmul", "-"), ("kukla", "batchtopk"), ("kukla-dense", "batchtopk"), ("saelens", "batchtopk"),
         ("kukla", "matryoshka-batchtopk"), ("kukla-dense", "matryoshka-batchtopk"),
         ("saelens", "matryoshka-batchtopk"), ("stream", "matryoshka-batchtopk"),
         ("interleaved", "matryoshka-batchtopk")]
HOOK = "blocks.0.hook_resid_post"
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 tensor-core rate (SXM)


def levels(width: int) -> list[int]:
    return [width * n // 32 for n in (1, 3, 7, 15)] + [width]


def sparse_sums(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    """n rows, each a sparse non-negative sum of ~32 of 4d random unit directions."""
    directions = torch.nn.functional.normalize(torch.randn(4 * d, d, generator=g), dim=1)
    active = (torch.rand(n, 4 * d, generator=g) < 32 / (4 * d)).float()
    return (active * torch.rand(active.shape, generator=g) * 3) @ directions


def activations(args: argparse.Namespace, device: torch.device) -> list[torch.Tensor]:
    """Two batches (the same for every case: seeded)."""
    g = torch.Generator().manual_seed(0)
    return [sparse_sums(args.batch, args.d, g).to(device) for _ in range(2)]


def write_store(args: argparse.Namespace) -> Path:
    """A finalized bf16 store with enough rows for every step of the stream case (once per run)."""
    from kukla.storage import StoreWriter, finalize_store

    path = Path(args.store_dir) / f"d{args.d}.zarr"
    shutil.rmtree(path, ignore_errors=True)
    rows = (args.steps + 2) * args.batch
    writer = StoreWriter.open(path, {"hooks": {HOOK: args.d}, "model": "train-bench-rows"})
    g = torch.Generator().manual_seed(1)
    for segment, lo in enumerate(range(0, rows, args.batch)):
        n = min(args.batch, rows - lo)
        writer.write_segment(segment, {f"acts/{HOOK}": sparse_sums(n, args.d, g).numpy(),
                                       "tokens/token_id": np.zeros(n, np.int32),
                                       "tokens/sequence": np.arange(lo, lo + n, dtype=np.int64),
                                       "tokens/position": np.zeros(n, np.int32)})
    writer.finish()
    writer.close()
    finalize_store(path, holdout_rows=0)
    return path


def kukla_trainer(args: argparse.Namespace, device: torch.device, first: torch.Tensor, sparse: bool):
    """A one-member sweep as `kukla train` builds it; returns step(i, x)."""
    from kukla.pipeline.train.config import TrainConfig
    from kukla.pipeline.train.distributed import Ranks
    from kukla.pipeline.train.sweep import build_trainees, train_step

    config = TrainConfig(store=Path("unused"), out=Path("unused"), hook="h", arch=args.arch, width=[args.width],
                         k=[args.k], levels=levels(args.width) if args.arch.startswith("matryoshka") else None,
                         batch_size=args.batch, warmup=0.0, sparse_path=sparse)
    ranks = Ranks(rank=0, world=1, device=device)
    members = config.members(args.d, args.d)
    mean_norm = float(first.float().norm(dim=1).mean())
    trainees = build_trainees(config, members, ranks, (mean_norm, None), (first[:1024].float().cpu(),))
    return lambda i, x: train_step(trainees, (x,), i, 10**6, config, ranks)


def saelens_sae(args: argparse.Namespace, device: torch.device, widths: list[int] | None = None):
    """SAELens' BatchTopK training SAE, or its Matryoshka one (levels `widths`, default `levels`)
    when args.arch is matryoshka-batchtopk."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                        MatryoshkaBatchTopKTrainingSAEConfig)

    common = dict(d_in=args.d, d_sae=args.width, k=args.k, device=str(device), dtype="float32")
    if args.arch == "matryoshka-batchtopk":
        return MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            **common, matryoshka_widths=widths or levels(args.width)))
    return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))


def saelens_forward(sae, x: torch.Tensor, i: int, dead: torch.Tensor):
    """SAELens' training forward pass (loss, aux loss on the `dead` latents, feature acts) at step i."""
    from sae_lens.saes.sae import TrainStepInput

    return sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                    n_training_steps=i, is_logging_step=False))


def saelens_trainer(args: argparse.Namespace, device: torch.device):
    sae = saelens_sae(args, device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4, betas=(0.9, 0.999))
    since_fired = torch.zeros(args.width, device=device)
    frequency = torch.zeros(args.width, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(i: int, x: torch.Tensor) -> None:
        sae.train()
        with autocast:
            out = saelens_forward(sae, x, i, since_fired > 1000)
            with torch.no_grad():  # SAELens' trainer counts firing latents every step
                firing = out.feature_acts.bool().float()
                since_fired.add_(1)
                since_fired[firing.sum(0).bool()] = 0
                frequency.add_(firing.sum(0))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return step


def matmul_step(args: argparse.Namespace, device: torch.device):
    """The physical limit: the encoder's dense forward, at the step's precision."""
    w = torch.randn(args.d, args.width, device=device) / args.d**0.5
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(i: int, x: torch.Tensor) -> None:
        with autocast:
            x @ w
    return step


def timed(step, batches, device: torch.device, steps: int) -> dict:
    """Per-step CPU-s on CPU, the fastest of `steps` (other load on a shared machine only ever adds
    time, through cache and core contention); on a GPU the mean wall time over `steps`, one sync."""
    step(0, batches[0])  # warm-up: allocators, kernels, autotuning
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(1, steps + 1):
            step(i, batches[i % len(batches)])
        torch.cuda.synchronize()
        wall = cpu = (time.perf_counter() - start) / steps
    else:
        walls, cpus = [], []
        for i in range(1, steps + 1):
            t, c = time.perf_counter(), time.process_time()
            step(i, batches[i % len(batches)])
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
        wall, cpu = min(walls), min(cpus)
    return {"wall_s": wall, "cpu_s": cpu}


def streamed(args: argparse.Namespace, device: torch.device) -> dict:
    """kukla's sparse step fed by ActivationStream; the share of wall time spent waiting for rows."""
    from kukla.storage import ActivationStream, open_store

    store = open_store(Path(args.store_dir) / f"d{args.d}.zarr")
    stream = ActivationStream(store, [HOOK], args.batch, split="all", device=device,
                              dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    batches = iter(stream)
    first = next(batches).acts[0]
    step = kukla_trainer(args, device, first, sparse=True)
    step(0, first)
    wait = total = cpu = 0.0
    for i in range(1, args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        x = next(batches).acts[0]
        waited = time.perf_counter() - t
        step(i, x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wait, total, cpu = wait + waited, total + time.perf_counter() - t, cpu + time.process_time() - c
    batches.close()
    return {"wall_s": total / args.steps, "cpu_s": cpu / args.steps, "data_wait": wait / total}


def interleaved(args: argparse.Namespace, device: torch.device) -> dict:
    """kukla's sparse Matryoshka and plain BatchTopK steps taken in turn in one process: their cost
    ratio under the same load at the same moments."""
    batches = activations(args, device)
    steps = {arch: kukla_trainer(argparse.Namespace(**{**vars(args), "arch": arch}), device, batches[0], sparse=True)
             for arch in ("batchtopk", "matryoshka-batchtopk")}
    alternating = {arch: [] for arch in steps}

    def both(i: int, x: torch.Tensor) -> None:
        for arch, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter() if device.type == "cuda" else time.process_time()
            step(i, x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            alternating[arch].append((time.perf_counter() if device.type == "cuda" else time.process_time()) - t)

    result = timed(both, batches, device, args.steps)
    plain, matryoshka = (min(alternating[a][1:]) for a in ("batchtopk", "matryoshka-batchtopk"))
    return {**result, "ratio": matryoshka / plain}


def run_case(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if args.gpu else "cpu")
    torch.manual_seed(0)
    if args.trainer == "stream":
        result = streamed(args, device)
    elif args.trainer == "interleaved":
        result = interleaved(args, device)
    else:
        batches = activations(args, device)
        if args.trainer == "matmul":
            step = matmul_step(args, device)
        elif args.trainer == "saelens":
            step = saelens_trainer(args, device)
        else:
            step = kukla_trainer(args, device, batches[0], sparse=args.trainer == "kukla")
        result = timed(step, batches, device, args.steps)
    result["peak_mb"] = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                         else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return result


def report(args: argparse.Namespace, results: dict) -> None:
    """Ratios from this one run: matryoshka vs plain, kukla vs SAELens, sparse vs dense, vs the matmul."""
    key = "wall_s" if args.gpu else "cpu_s"
    rate = {case: args.batch / r[key] for case, r in results.items()}
    matmul = results["matmul", "-"][key]
    for arch in ("batchtopk", "matryoshka-batchtopk"):
        versus = f"{rate['kukla', arch] / rate['saelens', arch]:.2f}x" if ("saelens", arch) in rate else "-"
        print(f"{arch:21s} kukla / SAELens {versus}, "
              f"sparse / dense {rate['kukla', arch] / rate['kukla-dense', arch]:.2f}x, "
              f"step = {results['kukla', arch][key] / matmul:.1f} encoder matmuls")
    cost = results["kukla", "matryoshka-batchtopk"][key] / results["kukla", "batchtopk"][key]
    print(f"Matryoshka step cost / plain BatchTopK (kukla sparse): {cost:.2f}x in separate processes, "
          f"{results['interleaved', 'matryoshka-batchtopk']['ratio']:.2f}x taken in turn in one")
    stream = results["stream", "matryoshka-batchtopk"]
    print(f"data wait (store on disk → ActivationStream → step): {100 * stream['data_wait']:.1f}% of step time")
    if args.gpu:
        flops = 2 * args.batch * args.d * args.width  # the encoder forward alone
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        for case in (c for c in (("matmul", "-"), ("kukla", "matryoshka-batchtopk"), ("saelens", "matryoshka-batchtopk"))
                     if c in results):
            tflops = flops / results[case][key] / 1e12
            share = f" = {100 * tflops / peak:.0f}% of the chip's {peak:.0f} bf16 TFLOP/s" if peak else ""
            print(f"{case[0]:8s} {case[1]:21s} encoder-forward TFLOP/s per step {tflops:7.1f}{share}")


def main() -> None:
    parser = dictionary_parser(__doc__.splitlines()[0], d=None, width=None, k=64, batch=None, steps=None)
    parser.add_argument("--gpu", action="store_true", help="GPU config: d=2304, F=32768 (bf16 autocast)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, every case, seconds")
    parser.add_argument("--store-dir", default="/tmp/kukla_train_bench", help="where the stream case's store goes")
    parser.add_argument("--trainer", choices=sorted({c for c, _ in CASES}), help=argparse.SUPPRESS)
    parser.add_argument("--arch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tiny = args.dry_run
    args.d = args.d or (32 if tiny else 2304 if args.gpu else 640)
    args.width = args.width or (256 if tiny else 32768 if args.gpu else 10240)
    args.k = 4 if tiny else args.k
    args.batch = args.batch or (256 if tiny else 4096)
    args.steps = args.steps or (2 if tiny else 20 if args.gpu else 4)
    torch.set_num_threads(args.threads)
    if args.trainer:
        print(json.dumps(run_case(args)))
        return
    where = torch.cuda.get_device_name() if args.gpu else f"CPU, {args.threads} thread(s)"
    print(f"d={args.d} F={args.width} k={args.k:g} batch={args.batch} steps={args.steps} on {where}; "
          f"torch {torch.__version__}", flush=True)
    write_store(args)
    unit = "tokens/s" if args.gpu else "tokens/CPU-s"
    results = {}
    cases = CASES
    if importlib.util.find_spec("sae_lens") is None:  # a bare GPU image: kukla's figures still come
        print("saelens: not installed here, its cases are left out", flush=True)
        cases = [(trainer, arch) for trainer, arch in CASES if trainer != "saelens"]
    for trainer, arch in cases:
        if args.dry_run:  # in this process: seconds, not one interpreter start per case
            r = results[trainer, arch] = run_case(argparse.Namespace(**{**vars(args), "trainer": trainer, "arch": arch}))
        else:
            flags = ["--d", str(args.d), "--width", str(args.width), "--k", str(args.k), "--batch", str(args.batch),
                     "--steps", str(args.steps), "--threads", str(args.threads), "--store-dir", args.store_dir,
                     *(["--gpu"] if args.gpu else [])]
            out = subprocess.run([sys.executable, __file__, *flags, "--trainer", trainer, "--arch", arch],
                                 check=True, capture_output=True, text=True).stdout
            r = results[trainer, arch] = json.loads(out.strip().splitlines()[-1])
        print(f"{trainer:11s} {arch:21s} {args.batch / r['wall_s' if args.gpu else 'cpu_s']:10.0f} {unit}  "
              f"({args.batch / r['wall_s']:.0f} tok/s wall)  peak {r['peak_mb']:.0f} MB", flush=True)
    report(args, results)
    shutil.rmtree(args.store_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
