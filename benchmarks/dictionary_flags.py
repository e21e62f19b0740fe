"""The flags every dictionary benchmark takes, spelt and meant the same in each: the dictionary's
shape, the batch, the steps measured and torch's threads (1 on a shared machine)."""

from __future__ import annotations

import argparse


def dictionary_parser(description: str | None, *, d: int | None, width: int | None, k: float,
                      batch: int | None, steps: int | None) -> argparse.ArgumentParser:
    """A parser with --d --width --k --batch --steps --threads at these defaults; add the benchmark's own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--d", type=int, default=d, help="input width d_in")
    parser.add_argument("--width", type=int, default=width, help="latents F")
    parser.add_argument("--k", type=float, default=k, help="active latents per token (mean, for BatchTopK)")
    parser.add_argument("--batch", type=int, default=batch, help="tokens per step")
    parser.add_argument("--steps", type=int, default=steps, help="steps measured (or trained)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    return parser
