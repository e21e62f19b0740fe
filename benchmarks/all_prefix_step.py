"""Cost of one all-prefix Matryoshka training step against plain BatchTopK (goal ≤ 1.3×).

    python benchmarks/all_prefix_step.py [--d 512 --width 8192 --k 32 --batch 2048 --steps 5]

One thread; CPU seconds per forward + backward (median of --steps, after one warm-up round, the
cases taking turns), for plain BatchTopK, fixed levels, sampled prefixes and all prefixes (all
sparse path, a quarter of the latents dead so aux-k runs), the anchor: SAELens' Matryoshka BatchTopK
training forward pass + backward on the same batch (levels F·{1/32, 3/32, 7/32, 15/32, 1}, the same
quarter dead for its aux loss; built by `train_bench`; timed after kukla's rounds, half as many),
and the physical floor: the encoder's dense
forward matmul B·d·F, which every one of them must do. Ratios are to plain BatchTopK, to SAELens
(its time over ours: > 1 is faster) and to the floor, all from the same run. Last, one restart
(`resample_at`: co-firing pairs merged, the dead quarter restarted) on the same batch, in plain
BatchTopK steps and floors; SAELens has no restart to compare with.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's kukla, not an installed one

from kukla.pipeline.dictionary import Dictionary, DictionaryConfig, training_loss  # noqa: E402
from kukla.pipeline.dictionary.model import resample_latents  # noqa: E402
from dictionary_flags import dictionary_parser  # noqa: E402
from train_bench import saelens_forward, saelens_sae  # noqa: E402  (this script's folder is on sys.path)

CASES = {
    "batchtopk": dict(arch="batchtopk"),
    "levels": dict(arch="matryoshka-batchtopk"),
    "sampled": dict(arch="matryoshka-prefix", prefixes="sampled"),
    "all": dict(arch="matryoshka-prefix", prefixes="all"),
    "all (topk)": dict(arch="matryoshka-prefix", prefixes="all", activation="topk"),
}


def _median_cpu(steps: dict[str, Callable[[], object]], n: int) -> dict[str, float]:
    """Median CPU-s of each step over n rounds (after a warm-up round); the cases take turns
    within a round, so a change in the machine's load hits them all alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(n + 1):
        for name, step in steps.items():
            start = time.process_time()
            step()
            if i:
                times[name].append(time.process_time() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def saelens_step(args: argparse.Namespace, x: torch.Tensor) -> Callable[[], object]:
    """SAELens' Matryoshka BatchTopK forward + backward on x, a quarter of its latents dead."""
    sae = saelens_sae(argparse.Namespace(d=args.d, width=args.width, k=args.k, arch="matryoshka-batchtopk"),
                      x.device)
    sae.train()
    dead = torch.zeros(args.width, dtype=torch.bool)
    dead[: args.width // 4] = True

    def step() -> None:
        saelens_forward(sae, x, 1, dead).loss.backward()
        sae.zero_grad(set_to_none=True)
    return step


def restart_step(args: argparse.Namespace, x: torch.Tensor) -> Callable[[], object]:
    """One restart of a BatchTopK dictionary whose first quarter of latents is dead again each time."""
    d = Dictionary(DictionaryConfig(d_in=args.d, width=args.width, k=args.k, arch="batchtopk", resample_at=[0.5]))
    d.set_scales(float(x.norm(dim=1).mean()))
    d.initialize(x[:1024])
    optimizer = torch.optim.Adam(d.parameters())
    training_loss(d, x).loss.backward()
    optimizer.step()  # Adam moments exist, as mid-training

    def step() -> None:
        d.tokens_since_fired[: args.width // 4] = d.cfg.dead_tokens
        resample_latents(d, optimizer, x, None, torch.Generator().manual_seed(0))
    return step


def main() -> None:
    args = dictionary_parser(__doc__.splitlines()[0], d=512, width=8192, k=32, batch=2048, steps=5).parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d) + 0.5
    print(f"d={args.d} F={args.width} k={args.k} batch={args.batch}, {args.threads} thread(s), torch {torch.__version__}")
    w = torch.randn(args.d, args.width)
    steps: dict[str, Callable[[], object]] = {"floor": lambda: x @ w}
    for name, settings in CASES.items():
        d = Dictionary(DictionaryConfig(d_in=args.d, width=args.width, k=args.k, **settings))
        d.set_scales(float(x.norm(dim=1).mean()))
        d.initialize(x[:1024])
        d.tokens_since_fired[: args.width // 4] = d.cfg.dead_tokens
        generator = torch.Generator().manual_seed(0)

        def step(d: Dictionary = d, generator: torch.Generator = generator) -> None:
            training_loss(d, x, generator=generator).loss.backward()
            d.zero_grad(set_to_none=True)
        steps[name] = step
    steps["restart"] = restart_step(args, x)
    costs = _median_cpu(steps, args.steps)
    restart = costs.pop("restart")
    # after kukla's rounds, not among them: its 10× larger temporaries would change their allocations
    costs.update(_median_cpu({"saelens matryoshka": saelens_step(args, x)}, max(1, args.steps // 2)))
    floor = costs.pop("floor")
    print(f"{'encoder matmul (floor)':24s} {floor:6.3f} CPU-s")
    for name, cost in costs.items():
        print(f"{name:24s} {cost:6.3f} CPU-s/step  {args.batch / cost:8.0f} tok/CPU-s  "
              f"{cost / costs['batchtopk']:.2f}x batchtopk  {costs['saelens matryoshka'] / cost:.2f}x SAELens speed  "
              f"{cost / floor:.2f}x floor")
    print(f"{'one restart':24s} {restart:6.3f} CPU-s = {restart / costs['batchtopk']:.2f} batchtopk steps  "
          f"{restart / floor:.2f}x floor")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
