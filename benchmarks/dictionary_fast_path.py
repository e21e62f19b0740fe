"""Sparse fast path vs dense reference for one training step (forward + backward).

    python benchmarks/dictionary_fast_path.py [--d 640 --width 10240 --k 64 --batch 4096 --steps 3]

Prints tokens/s and peak RSS for each (arch, path), and the fast/reference ratio. Each case
runs in its own process so the peak memory is its own. A quarter of the latents are marked
dead so the aux-k term (k_aux = d/2 per token) is part of the work, as mid-training.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def run_case(args: argparse.Namespace) -> dict:
    from kukla.pipeline.dictionary import Dictionary, DictionaryConfig

    torch.manual_seed(0)
    levels = [args.width // 32, 3 * args.width // 32, 7 * args.width // 32, 15 * args.width // 32, args.width]
    cfg = DictionaryConfig(d_in=args.d, width=args.width, k=args.k, arch=args.arch,
                           levels=levels if args.arch == "matryoshka-batchtopk" else None,
                           sparse_path=args.path == "sparse")
    d = Dictionary(cfg)
    x = torch.randn(args.batch, args.d)
    d.set_scales(float(x.norm(dim=1).mean()))
    d.initialize(x[:1024])
    d.tokens_since_fired[: args.width // 4] = cfg.dead_tokens
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        out = d.training_loss(x)
        out.loss.backward()
        d.zero_grad(set_to_none=True)
        if step:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    return {"arch": args.arch, "path": args.path, "tokens_per_s": args.batch / seconds, "step_s": seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d", type=int, default=640)
    parser.add_argument("--width", type=int, default=10240)
    parser.add_argument("--k", type=float, default=64)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arch", default=None)
    parser.add_argument("--path", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.arch:  # one case, in this process
        print(json.dumps(run_case(args)))
        return
    print(f"d={args.d} F={args.width} k={args.k} batch={args.batch} threads={args.threads} "
          f"torch={torch.__version__}")
    for arch in ("batchtopk", "matryoshka-batchtopk"):
        results = {}
        for path in ("reference", "sparse"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--arch", arch, "--path", path]
            results[path] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            r = results[path]
            print(f"{arch:22s} {path:9s} {r['tokens_per_s']:9.0f} tok/s  {r['step_s']:6.2f} s/step  "
                  f"peak RSS {r['peak_rss_mb']:6.0f} MB")
        ratio = results["sparse"]["tokens_per_s"] / results["reference"]["tokens_per_s"]
        print(f"{arch:22s} sparse/reference speed ratio: {ratio:.2f}x")


if __name__ == "__main__":
    main()
