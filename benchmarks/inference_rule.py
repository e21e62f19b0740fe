"""Which BatchTopK inference rule: one threshold, per-latent thresholds, a per-token L0 cap?

    python benchmarks/inference_rule.py STORE DICTIONARY [DICTIONARY ...] [--caps 2,4,8]

For each trained BatchTopK dictionary, recalibrates every rule on the store's calibration split
(in the training batch size) and scores it on the evaluation split, as `kukla evaluate` does:
EV, EV without the massive-activation rows (norm > 5× the median, or the store's flags), the
mean L0, the L0 of the massive rows and the L0 tail, and for a Matryoshka the EV of the full
width against its largest proper prefix (the full width should not lose to its own prefix).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from kukla.pipeline.dictionary import calibrate_threshold, calibration_rows, evaluation_rows, load_dictionary
from kukla.pipeline.evaluate.reconstruction import ReconstructionStats
from kukla.pipeline.evaluate.run import eval_batches
from kukla.pipeline.massive import has_flags, massive_by_norm, massive_ratio, massive_rows
from kukla.storage import open_store


def score(dictionary, store, hook: str, batch: int) -> dict:
    """The evaluate figures of one inference rule on the evaluation split."""
    stats = ReconstructionStats(dictionary.width, dictionary.levels)
    scored = evaluation_rows(store)
    with torch.no_grad():
        for acts, rows in eval_batches(store, [hook], scored, batch, "cpu"):
            z = dictionary.encode(acts[hook])
            levels = dictionary.decode_prefixes(z, dictionary.levels)
            stats.update(acts[hook], levels[-1], z, levels, rows)
    rows, norm_sq, _, l0 = stats.per_row()
    massive = (massive_rows(store, scored.start, scored.stop) if has_flags(store)
               else rows[massive_by_norm(norm_sq.sqrt(), massive_ratio(store))])
    total = store.read_rows(hook, massive.numpy()).double().sum(0) if massive.numel() else torch.zeros(1)
    tails = stats.tails(massive, total)
    summary = stats.summary()
    flagged = torch.isin(rows, massive)
    return {"ev": summary["explained_variance"], "ev_wo": tails["explained_variance_without_massive"],
            "l0": summary["l0"], "l0_massive": float(l0[flagged].float().mean()) if flagged.any() else float("nan"),
            "p999": tails["l0_tail"]["p99.9"], "max": tails["l0_tail"]["max"], "n_massive": int(massive.numel()),
            "share": tails["massive_variance_share"],
            "prefix_ev": summary["levels"][-2]["explained_variance"] if len(dictionary.levels) > 1 else None,
            "dead": summary["dead_latents"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("dictionaries", nargs="+")
    parser.add_argument("--caps", default="2,4,8", help="L0 caps to try, as multiples of k")
    args = parser.parse_args()
    torch.set_num_threads(1)
    store = open_store(args.store)
    cal = calibration_rows(store)
    print(f"store {args.store}: calibration rows {cal.start}-{cal.stop}, "
          f"evaluation rows {evaluation_rows(store).start}-{store.n_rows}")
    caps = [float(c) for c in args.caps.split(",")]
    for path in args.dictionaries:
        dictionary = load_dictionary(path).eval()
        meta = dictionary.metadata
        hook = meta["hooks"]["input"]
        batch = int((meta.get("metadata") or {}).get("training", {}).get("batch_size", 4096))
        k = float(dictionary.cfg.k)
        calibration = [store.read(hook, lo, min(lo + batch, cal.stop)) for lo in range(cal.start, cal.stop, batch)]
        rules = [("one threshold", False, 0.0)] + [(f"one threshold, cap {c:g}k", False, c) for c in caps]
        rules += [("per-latent thresholds", True, 0.0), (f"per-latent, cap {caps[len(caps) // 2]:g}k", True,
                                                          caps[len(caps) // 2])]
        print(f"\n{path} (k = {k:g}, width {dictionary.width}, calibration batch {batch})")
        print("| rule | EV | EV without massive | full − prefix EV | L0 | L0 on massive rows | L0 p99.9 | L0 max "
              "| dead | CPU s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, per_latent, cap in rules:
            start = time.process_time()
            calibrate_threshold(dictionary, calibration, per_latent=per_latent, l0_cap=int(-(-cap * k // 1)))
            r = score(dictionary, store, hook, batch)
            gap = "n/a" if r["prefix_ev"] is None else f"{r['ev'] - r['prefix_ev']:+.4f}"
            print(f"| {name} | {r['ev']:.4f} | {r['ev_wo']:.4f} | {gap} | {r['l0']:.2f} | {r['l0_massive']:.0f} "
                  f"| {r['p999']} | {r['max']} | {r['dead']} | {time.process_time() - start:.1f} |")
        print(f"({r['n_massive']} massive rows of {len(evaluation_rows(store))} scored, holding "
              f"{r['share']:.1%} of the variance)")
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
