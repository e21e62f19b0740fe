"""The latent browser's logit lens (`browser.logit_lens`): ms a latent at Gemma-3-270m's and
Gemma-2-2B's shapes, beside the physical limit, the bare matmul of the same decoder rows through
W_U (F·d·vocab multiply-adds; the lens adds a top-k and a bottom-k per row), and what it means
at 65,536 latents. Random weights: the cost depends on the shapes only.

No anchor: SAELens has no logit lens (Neuronpedia computes one offline, outside the library).

    python benchmarks/logit_lens.py              # 256 latents per shape, 1 thread: ~30 s
    python benchmarks/logit_lens.py --threads 2 --latents 512
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kukla.pipeline.evaluate.browser import LENS_TOKENS, logit_lens  # noqa: E402

SHAPES = {"gemma-3-270m": (640, 262144), "gemma-2-2b": (2304, 256000)}
"""d_model and vocabulary of each model."""


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.latents} latents, {args.threads} thread(s), best of {args.repeat}")
    for name, (d, vocab) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        w_dec, w_u = torch.randn(args.latents, d, generator=g), torch.randn(d, vocab, generator=g)
        rows = max(1, (1 << 26) // vocab)  # the lens's own chunk of rows
        lens = _best(lambda: logit_lens(w_dec, w_u, LENS_TOKENS, desc=f"logit lens ({name})"), args.repeat)
        bare = _best(lambda: [w_dec[i:i + rows] @ w_u for i in range(0, args.latents, rows)], args.repeat)
        ms, bare_ms = 1e3 * lens / args.latents, 1e3 * bare / args.latents
        gflops = 2 * d * vocab / (bare / args.latents) / 1e9
        print(f"{name:14s} d {d:5d} vocab {vocab:6d}: lens {ms:6.2f} ms/latent, bare matmul {bare_ms:6.2f} ms/latent "
              f"({gflops:.0f} GFLOP/s), lens / matmul {lens / bare:.2f}x; at 65,536 latents {65536 * ms / 6e4:.1f} min")


if __name__ == "__main__":
    main()
