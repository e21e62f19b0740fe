"""Sparse fast path vs dense reference (and SAELens) for one training step (forward + backward).

    python benchmarks/dictionary_fast_path.py [--d 640 --width 10240 --k 64 --batch 4096 --steps 3]

Prints tokens per CPU-second (one thread: robust to other load on a shared machine; wall time
beside it) and peak RSS for each (arch, path), and the ratios to the dense reference and to
SAELens' BatchTopK / MatryoshkaBatchTopK training SAE on the same batch. Each case runs in
its own process so the peak memory is its own. By default a quarter of the latents are marked
dead so the aux-k term (k_aux = d/2 per token) is part of the work (`--dead 0`: none dead).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from dictionary_flags import dictionary_parser


def _levels(width: int) -> list[int]:
    return [width // 32, 3 * width // 32, 7 * width // 32, 15 * width // 32, width]


def saelens_step(args: argparse.Namespace, x: torch.Tensor):
    """The anchor on the same work: SAELens' (Matryoshka) BatchTopK training forward + backward."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                        MatryoshkaBatchTopKTrainingSAEConfig)
    from sae_lens.saes.sae import TrainStepInput

    common = dict(d_in=args.d, d_sae=args.width, k=args.k, aux_loss_coefficient=1 / 32)
    if args.arch == "matryoshka-batchtopk":
        sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            **common, matryoshka_widths=_levels(args.width)))
    else:
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
    dead = torch.zeros(args.width, dtype=torch.bool)
    dead[: int(args.width * args.dead)] = True

    def step() -> None:
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                       n_training_steps=1, is_logging_step=False))
        out.loss.backward()
        sae.zero_grad(set_to_none=True)
    return step


def kukla_step(args: argparse.Namespace, x: torch.Tensor):
    from kukla.pipeline.dictionary import Dictionary, DictionaryConfig, training_loss

    levels = _levels(args.width)
    cfg = DictionaryConfig(d_in=args.d, width=args.width, k=args.k, arch=args.arch,
                           levels=levels if args.arch == "matryoshka-batchtopk" else None,
                           sparse_path=args.path == "sparse")
    d = Dictionary(cfg)
    d.set_scales(float(x.norm(dim=1).mean()))
    d.initialize(x[:1024])
    d.tokens_since_fired[: int(args.width * args.dead)] = cfg.dead_tokens
    d.count_dead()  # what the trainer does when it logs: sizes aux-k's candidates

    def step() -> None:
        training_loss(d, x).loss.backward()
        d.zero_grad(set_to_none=True)
    return step


def run_case(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d)
    step = saelens_step(args, x) if args.path == "saelens" else kukla_step(args, x)
    wall, cpu = [], []
    for i in range(args.steps + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        if i:  # the first step warms up allocators and kernels
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    cpu_s, wall_s = sorted(cpu)[len(cpu) // 2], sorted(wall)[len(wall) // 2]
    return {"arch": args.arch, "path": args.path, "tokens_per_cpu_s": args.batch / cpu_s, "cpu_s": cpu_s,
            "wall_s": wall_s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = dictionary_parser(__doc__.splitlines()[0], d=640, width=10240, k=64, batch=4096, steps=3)
    parser.add_argument("--dead", type=float, default=0.25, help="fraction of latents marked dead (aux-k work)")
    parser.add_argument("--arch", default=None)
    parser.add_argument("--path", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.arch:  # one case, in this process
        print(json.dumps(run_case(args)))
        return
    print(f"d={args.d} F={args.width} k={args.k} batch={args.batch} dead={args.dead} threads={args.threads} "
          f"torch={torch.__version__}")
    for arch in ("batchtopk", "matryoshka-batchtopk"):
        results = {}
        for path in ("reference", "sparse", "saelens"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--arch", arch, "--path", path]
            results[path] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            r = results[path]
            print(f"{arch:22s} {path:9s} {r['tokens_per_cpu_s']:7.0f} tok/CPU-s  {r['cpu_s']:6.2f} CPU-s/step  "
                  f"({r['wall_s']:6.2f} s wall)  peak RSS {r['peak_rss_mb']:6.0f} MB")
        speed = {path: r["tokens_per_cpu_s"] for path, r in results.items()}
        print(f"{arch:22s} sparse/reference {speed['sparse'] / speed['reference']:.2f}x, "
              f"sparse/SAELens {speed['sparse'] / speed['saelens']:.2f}x")


if __name__ == "__main__":
    main()
