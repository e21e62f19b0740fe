"""The Matryoshka variants on a real store: EV, EV per prefix and CE against mean ablation.

    python benchmarks/demo_variants.py [--out /tmp/demo-variants --tokens 40000 --epochs 3 --store STORE --snap 0.8
                                        --resample 0.25,0.5 --seeds 3 --ce-contexts 16]

The demo's run file (`kukla demo`: Gemma-3-270m, `resid_post:9`, Wikipedia lead paragraphs,
width 2048, k 32, the same tokens for every run) with five [[train]] runs instead of two:
plain BatchTopK, fixed levels, fixed levels spread (`spread_levels` + reordering), sampled
prefixes (Nabeshima, reordered) and all prefixes (reordered), all at equal tokens and k. Then
`kukla evaluate` on all five, and the EV of each at the fixed levels' prefixes 64/192/448/960
(every variant's first latents, scored the same way on the evaluation rows). Prints one table.
`--store` reuses a store an earlier run harvested (harvest is the slow part on a CPU). `--seeds N`
trains every variant from N initialisation seeds (1..N; one data order, the first seed's) and
prints each seed's row and the mean ± sd over seeds.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's kukla, not an installed one

from kukla.config import read_toml  # noqa: E402
from kukla.pipeline.dictionary import evaluation_rows  # noqa: E402
from kukla.pipeline.dictionary.directory import load_dictionary  # noqa: E402
from kukla.pipeline.run import DEMO_TOML, TRAIN_TABLE, build_pipeline, run_pipeline, write_demo_text  # noqa: E402
from kukla.storage import open_store  # noqa: E402

VARIANTS = {  # name: (arch, extra TOML lines)
    "batchtopk": ("batchtopk", ""),
    "levels": ("matryoshka-batchtopk", ""),
    "levels-spread": ("matryoshka-batchtopk", "spread_levels = true\nreorder_latents = true\n"),
    "sampled": ("matryoshka-prefix", 'prefixes = "sampled"\nreorder_latents = true\n'),
    "all": ("matryoshka-prefix", 'prefixes = "all"\nreorder_latents = true\n'),
}
PREFIXES = [64, 192, 448, 960]


def write_run_file(out: Path, tokens: int, epochs: int, device: str, snap: float | None, seeds: int,
                   resample: list[float] | None) -> Path:
    """The demo's run file with one [[train]] table per variant, each writing to its own folder."""
    text = write_demo_text(out / "text" / "wikipedia-en.jsonl")
    shared = (f"seed = {list(range(1, seeds + 1))}\n" + ("" if snap is None else f"snap_fraction = {snap}\n")
              + ("" if resample is None else f"resample_at = {resample}\n"))
    tables = "\n".join(TRAIN_TABLE.format(arch=arch, train_tokens=tokens * epochs)
                       + f'out = "{(out / "dictionaries" / name).as_posix()}"\n' + extra + shared
                       for name, (arch, extra) in VARIANTS.items())
    path = out / "pipeline.toml"
    path.write_text(DEMO_TOML.format(out=out.as_posix(), device=device, text=text.as_posix(), tokens=tokens,
                                     holdout_rows=tokens // 10, train_tables=tables))
    return path


def evaluation_activations(store_path: Path) -> torch.Tensor:
    """The store's evaluation rows (the rows evaluate scores), read once for every dictionary."""
    store = open_store(store_path)
    [hook] = store.hooks
    rows = evaluation_rows(store)
    return store.read(hook, rows.start, rows.stop).float()


@torch.no_grad()
def prefix_ev(directory: Path, x: torch.Tensor) -> list[float]:
    """EV = 1 − Σ‖x − x̂_p‖² / Σ‖x − x̄‖² of the first p latents, p in PREFIXES, on the evaluation rows x."""
    d = load_dictionary(directory)
    total = (x - x.mean(0)).pow(2).sum()
    prefixes = d.decode_prefixes(d.encode(x), PREFIXES)
    return [float(1 - (x - x_hat).pow(2).sum() / total) for x_hat in prefixes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/demo-variants"))
    parser.add_argument("--tokens", type=int, default=40_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--store", type=Path, help="train and evaluate on this store instead of harvesting one")
    parser.add_argument("--snap", type=float, help="every variant trains with the snap loss from this fraction")
    parser.add_argument("--resample", type=lambda s: [float(v) for v in s.split(",")],
                        help="every variant restarts latents at these fractions of training (resample_at)")
    parser.add_argument("--seeds", type=int, default=1, help="initialisation seeds per variant (1..N)")
    parser.add_argument("--ce-contexts", type=int, help="downstream CE windows (the demo's 4 by default)")
    args = parser.parse_args()
    start = time.time()
    path = write_run_file(args.out.absolute(), args.tokens, args.epochs, args.device, args.snap, args.seeds,
                          args.resample)
    data = read_toml(path)
    data["evaluate"]["absorption"] = {"enabled": False}  # first-letter absorption: not in this table
    if args.ce_contexts is not None:
        data["evaluate"]["downstream"]["contexts"] = args.ce_contexts
    if args.store is not None:
        data["harvest"]["output"] = str(args.store.absolute())
    pipeline = build_pipeline(data, source=str(path), stages=["train", "evaluate"] if args.store else None)
    report = run_pipeline(pipeline)
    assert report is not None
    metrics = json.loads((report / "metrics.json").read_text())["dictionaries"]
    print(f"\n{args.tokens} harvested tokens x {args.epochs} epochs, width 2048, k 32, seeds 1..{args.seeds}\n")
    header = "| variant | seed | L0 | EV | " + " | ".join(f"EV@{p}" for p in PREFIXES) + " | CE recovered (mean abl.) |"
    print(header + "\n" + "| --- " * 2 + "| ---: " * (3 + len(PREFIXES)) + "|")
    summary = {}
    x = evaluation_activations(pipeline.train[0].store)
    for config, name in zip(pipeline.train, VARIANTS):
        rows = []
        for member in config.members(d_in=1, d_out=1):
            directory = Path(config.out) / member.name
            m = next(v for v in metrics.values() if Path(v["path"]).resolve() == directory.resolve())
            r, down = m["reconstruction"], m.get("downstream") or {}
            rows.append([r["l0"], r["explained_variance"], *prefix_ev(directory, x),
                         down.get("ce_loss_recovered_mean_ablation", float("nan"))])
            print(f"| {name} | {member.seed} | {rows[-1][0]:.1f} | " + " | ".join(f"{v:.3f}" for v in rows[-1][1:]) + " |")
        summary[name] = torch.tensor(rows, dtype=torch.float64)
    if args.seeds > 1:
        print("\nmean ± sd over seeds\n\n" + header.replace("| seed ", "") + "\n" + "| --- " + "| ---: " * (3 + len(PREFIXES)) + "|")
        for name, t in summary.items():
            mean, sd = t.mean(0), t.std(0)
            print(f"| {name} | {mean[0]:.1f} | " + " | ".join(f"{a:.3f} ± {b:.3f}" for a, b in zip(mean[1:], sd[1:])) + " |")
    print(f"\n{time.time() - start:.0f} s wall, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
