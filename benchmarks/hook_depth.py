"""How much of the forward a harvest pays for: each hook set's capture against the forward it needs.

    python benchmarks/hook_depth.py [--model google/gemma-3-270m] [--batch 4] [--context 128] [--repeat 5]

kukla's `capture` ends the forward where the last hook fires. The anchor is `run_with_cache`
(what SAELens' cache runs), which stops only at a block boundary, so an `ln_final` harvest pays
for the unembedding; the limit is the bare forward to the same point. Tokens per CPU-second,
best and median of `--repeat` interleaved rounds (the machine's noise shows in the gap).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from kukla.pipeline.harvest.forward import capture
from kukla.pipeline.hooks import stop_at_layer
from kukla.pipeline.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="google/gemma-3-270m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    model = load_model(args.model)
    tokens = torch.randint(0, model.cfg.d_vocab, (args.batch, args.context), generator=torch.Generator().manual_seed(0))
    n_layers = model.cfg.n_layers
    middle = f"blocks.{n_layers // 2}.hook_resid_post"
    cases: dict[str, Callable[[], object]] = {
        "ln_final: kukla capture": lambda: capture(model, tokens, ["ln_final.hook_normalized"], None),
        "ln_final: run_with_cache (anchor)": lambda: model.run_with_cache(tokens, names_filter=["ln_final.hook_normalized"]),
        "ln_final: bare forward to the last block (limit)": lambda: model(tokens, stop_at_layer=n_layers, return_type=None),
        f"{middle}: kukla capture": lambda: capture(model, tokens, [middle], stop_at_layer([middle], n_layers)),
        f"{middle}: run_with_cache (anchor)": lambda: model.run_with_cache(
            tokens, names_filter=[middle], stop_at_layer=stop_at_layer([middle], n_layers)),
    }
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    with torch.inference_mode():
        for name, run in cases.items():
            run()  # warm
        for _ in range(args.repeat):
            for name, run in cases.items():
                start = time.process_time()
                run()
                seconds[name].append(time.process_time() - start)
    n = tokens.numel()
    rate = {name: n / min(s) for name, s in seconds.items()}
    for name, s in seconds.items():
        print(f"{name:56s} best {rate[name]:7.0f}  median {n / sorted(s)[len(s) // 2]:7.0f} tok/CPU-s")
    print(f"ln_final: kukla / anchor {rate['ln_final: kukla capture'] / rate['ln_final: run_with_cache (anchor)']:.2f}x, "
          f"kukla / limit {rate['ln_final: kukla capture'] / rate['ln_final: bare forward to the last block (limit)']:.2f}x; "
          f"{middle}: kukla / anchor {rate[f'{middle}: kukla capture'] / rate[f'{middle}: run_with_cache (anchor)']:.2f}x")


if __name__ == "__main__":
    main()
