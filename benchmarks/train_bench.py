"""Training throughput: kukla's full optimiser step vs SAELens' on the same activations and config.

    python benchmarks/train_bench.py            # CPU: d=640, F=10240, k=64, batch 4096
    python benchmarks/train_bench.py --gpu      # GPU: d=2304, F=32768, k=64, batch 4096, bf16 autocast

A step is everything a trainer does per batch. kukla: `train_step` (loss, backward,
decoder-gradient projection, clip 1.0, Adam, decoder renormalisation, dead-latent update).
SAELens 6: what `SAETrainer._train_step` does (`training_forward_pass`, backward, clip 1.0,
Adam) on `BatchTopKTrainingSAE` / `MatryoshkaBatchTopKTrainingSAE`. Both get the same
batches: sparse sums of random unit directions, like residual-stream activations. Levels are
F·{1/32, 3/32, 7/32, 15/32, 1} for both. Each case runs in its own process (its own peak
memory). On CPU the figure is tokens per CPU-second of one thread, which other load on a
shared machine barely moves; wall-clock tokens/s is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
CASES = [("kukla", "batchtopk"), ("saelens", "batchtopk"),
         ("kukla", "matryoshka-batchtopk"), ("saelens", "matryoshka-batchtopk")]


def levels(width: int) -> list[int]:
    return [width * n // 32 for n in (1, 3, 7, 15)] + [width]


def activations(args: argparse.Namespace, device: torch.device) -> list[torch.Tensor]:
    """A few batches of sparse sums of random directions (the same for every case: seeded)."""
    g = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(4 * args.d, args.d, generator=g), dim=1)
    batches = []
    for _ in range(2):
        active = (torch.rand(args.batch, 4 * args.d, generator=g) < 32 / (4 * args.d)).float()
        batches.append((active * torch.rand(active.shape, generator=g) * 3) @ directions)
    return [b.to(device) for b in batches]


def kukla_step(args: argparse.Namespace, device: torch.device, batches: list[torch.Tensor]):
    from kukla.pipeline.train.config import TrainConfig
    from kukla.pipeline.train.distributed import Ranks
    from kukla.pipeline.train.sweep import build_trainees, train_step

    config = TrainConfig(store=Path("unused"), out=Path("unused"), hook="h", arch=args.arch, width=[args.width],
                         k=[args.k], levels=levels(args.width) if args.arch.startswith("matryoshka") else None,
                         batch_size=args.batch, warmup=0.0)
    ranks = Ranks(rank=0, world=1, device=device)
    members = config.members(args.d, args.d)
    mean_norm = float(batches[0].norm(dim=1).mean())
    trainees = build_trainees(config, members, ranks, (mean_norm, None), (batches[0][:1024].cpu(),))
    return lambda i: train_step(trainees, (batches[i % len(batches)],), i, 10**6, config, ranks)


def saelens_step(args: argparse.Namespace, device: torch.device, batches: list[torch.Tensor]):
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                        MatryoshkaBatchTopKTrainingSAEConfig)
    from sae_lens.saes.sae import TrainStepInput

    common = dict(d_in=args.d, d_sae=args.width, k=args.k, device=str(device), dtype="float32")
    if args.arch == "matryoshka-batchtopk":
        sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            **common, matryoshka_widths=levels(args.width)))
    else:
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4, betas=(0.9, 0.999))
    since_fired = torch.zeros(args.width, device=device)
    frequency = torch.zeros(args.width, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(i: int) -> None:
        sae.train()
        with autocast:
            out = sae.training_forward_pass(TrainStepInput(
                sae_in=batches[i % len(batches)], coefficients={}, dead_neuron_mask=since_fired > 1000,
                n_training_steps=i, is_logging_step=False))
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


def run_case(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if args.gpu else "cpu")
    torch.manual_seed(0)
    batches = activations(args, device)
    step = (kukla_step if args.trainer == "kukla" else saelens_step)(args, device, batches)
    wall, cpu = [], []
    for i in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up allocators and kernels
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return {"tokens_per_s": args.batch / median(wall), "tokens_per_cpu_s": args.batch / median(cpu),
            "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="GPU config: d=2304, F=32768 (bf16 autocast)")
    parser.add_argument("--d", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--k", type=float, default=64)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trainer", choices=["kukla", "saelens"])
    parser.add_argument("--arch")
    args = parser.parse_args()
    args.d = args.d or (2304 if args.gpu else 640)
    args.width = args.width or (32768 if args.gpu else 10240)
    torch.set_num_threads(args.threads)
    if args.trainer:
        print(json.dumps(run_case(args)))
        return
    where = torch.cuda.get_device_name() if args.gpu else f"CPU, {args.threads} thread(s)"
    print(f"d={args.d} F={args.width} k={args.k:g} batch={args.batch} on {where}; torch {torch.__version__}")
    rate = "tokens_per_s" if args.gpu else "tokens_per_cpu_s"
    results = {}
    for trainer, arch in CASES:
        flags = ["--d", str(args.d), "--width", str(args.width), "--k", str(args.k), "--batch", str(args.batch),
                 "--steps", str(args.steps), "--threads", str(args.threads), *(["--gpu"] if args.gpu else [])]
        out = subprocess.run([sys.executable, __file__, *flags, "--trainer", trainer, "--arch", arch],
                             check=True, capture_output=True, text=True).stdout
        r = results[trainer, arch] = json.loads(out.strip().splitlines()[-1])
        print(f"{trainer:8s} {arch:21s} {r[rate]:9.0f} {rate.replace('_', ' ')}  "
              f"({r['tokens_per_s']:.0f} tok/s wall)  peak {r['peak_mb']:.0f} MB")
    for arch in ("batchtopk", "matryoshka-batchtopk"):
        ratio = results["kukla", arch][rate] / results["saelens", arch][rate]
        print(f"{arch:21s} kukla / SAELens: {ratio:.2f}x")


if __name__ == "__main__":
    main()
