"""Absorption and recovery on a toy tree: plain BatchTopK against the Matryoshka variants.

    python benchmarks/science.py [--seeds 10 --steps 2000 --variants batchtopk,levels,levels-spread,sampled,all,saelens]

Each seed draws its own tree directions, data and initialisation. Rows come straight from the
toy-tree generator in memory (`kukla.pipeline.toy.ToyTree.sample`, the same generator
`kukla harvest --source toy-tree` writes to a store; skipping the store keeps a run to seconds).
Training is the trainer's own step (`kukla.pipeline.train.sweep.train_step`: lr schedule, clip,
decoder projection, dead latents, reordering, snap loss); scores are evaluate's toy truth
(absorption holes, max cosine to the true features). The anchor `saelens` is SAELens' own
Matryoshka BatchTopK on the same batches. Prints, per seed, what bounds max-cos given the true codes
(`max_cos_ceilings`), one line per (variant, seed) and a summary: mean ± sd of absorption holes,
the worst parent, mean and min max-cosine, and the features unrecovered (max cosine < 0.9).
`--refit` adds, per Matryoshka variant with a closed-form objective, whether the trainer or the
objective holds max-cos down (`refit_check`). `--rotation` prints, per seed, what each objective
charges for a parent+child rotated pair against the true codes (`rotation_check`).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's kukla, not an installed one

from dictionary_flags import dictionary_parser  # noqa: E402

from kukla.pipeline.dictionary import calibrate_threshold  # noqa: E402
from kukla.pipeline.dictionary.prefixes import all_prefix_cdf, cumulative_weight, spread_cumulative_weight  # noqa: E402
from kukla.pipeline.toy import ToyTree, ToyTruth  # noqa: E402
from kukla.pipeline.train.config import TrainConfig  # noqa: E402
from kukla.pipeline.train.distributed import Ranks  # noqa: E402
from kukla.pipeline.train.sweep import build_trainees, train_step  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "batchtopk": dict(arch="batchtopk"),
    "levels": dict(arch="matryoshka-batchtopk"),  # levels from --levels
    "levels-reorder": dict(arch="matryoshka-batchtopk", reorder_latents=True),  # a tried fix for levels
    "levels-spread": dict(arch="matryoshka-batchtopk", spread_levels=True, reorder_latents=True),  # the fix
    "sampled": dict(arch="matryoshka-prefix", prefixes="sampled", reorder_latents=True),
    "all": dict(arch="matryoshka-prefix", prefixes="all", reorder_latents=True),
    "all-fixed-order": dict(arch="matryoshka-prefix", prefixes="all"),
}


def toy_data(args: argparse.Namespace, seed: int) -> tuple[ToyTree, torch.Tensor, tuple[np.ndarray, np.ndarray]]:
    """The seed's tree, a pool of training rows (cycled, in a fresh order each pass) and held-out rows."""
    tree = ToyTree.build(args.tree, dim=args.d, p_root=args.p_root, p_child=args.p_child,
                         noise=args.noise, magnitude_std=args.magnitude_std, seed=seed)
    pool = torch.from_numpy(tree.sample(args.pool, np.random.default_rng([seed, 1]))[0])
    return tree, pool, tree.sample(args.eval_rows, np.random.default_rng([seed, 2]))


def _batches(args: argparse.Namespace, pool: torch.Tensor, seed: int):
    """The training batches of a seed: the pool in a fresh order each pass (the same for every variant)."""
    order = torch.Generator().manual_seed(seed)
    per_pass = args.pool // args.batch
    for step in range(args.steps):
        if step % per_pass == 0:
            batches = torch.randperm(args.pool, generator=order)[:per_pass * args.batch].view(per_pass, args.batch)
        yield step, pool[batches[step % per_pass]]


def train_saelens(args: argparse.Namespace, seed: int, pool: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """The anchor: SAELens' MatryoshkaBatchTopKTrainingSAE, stepped as its SAETrainer does (Adam at the
    same lr, constant, grad clip 1, dead after 200 steps unfired); decoder rows and codes at its own
    inference rule (JumpReLU at its EMA threshold)."""
    from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                        MatryoshkaBatchTopKTrainingSAEConfig)
    from sae_lens.saes.sae import TrainStepInput

    torch.manual_seed(seed)
    sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=args.d, d_sae=args.width, k=args.k, matryoshka_widths=args.levels, aux_loss_coefficient=1 / 32))
    optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(args.width)
    for step, batch in _batches(args, pool, seed):
        out = sae.training_forward_pass(TrainStepInput(sae_in=batch, coefficients={},
                                                       dead_neuron_mask=since_fired > 200,
                                                       n_training_steps=step, is_logging_step=False))
        since_fired += 1
        since_fired[(out.feature_acts > 0).any(0)] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    def encode(x: torch.Tensor) -> torch.Tensor:
        pre = (sae.process_sae_in(x) @ sae.W_enc + sae.b_enc) * sae.W_dec.norm(dim=-1)
        return pre * (pre > sae.topk_threshold)
    return sae.W_dec.detach(), encode


def train_kukla(args: argparse.Namespace, variant: str, seed: int, pool: torch.Tensor,
                held_out: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """The trainer's own step on the seed's batches; codes at the threshold calibrated on the held-out rows."""
    settings = dict(VARIANTS[variant])
    if variant.startswith("levels"):
        settings["levels"] = args.levels
    config = TrainConfig(store=Path("in-memory"), out=Path("unused"), hook="toy", width=[args.width], k=[args.k],
                         seed=[seed], batch_size=args.batch, tokens=args.batch * args.steps, lr=args.lr,
                         dead_tokens=args.batch * 200, n_prefixes=args.n_prefixes,
                         snap_fraction=args.snap, resample_at=args.resample, **settings)
    ranks = Ranks(rank=0, world=1, device=torch.device("cpu"))
    init = pool[:4096]
    members = config.members(args.d, args.d)
    [trainee] = build_trainees(config, members, ranks, (float(init.norm(dim=1).mean()), None), (init,))
    for step, batch in _batches(args, pool, seed):
        train_step([trainee], (batch,), step, args.steps, config, ranks)
    calibrate_threshold(trainee.dictionary, [held_out])
    return trainee.dictionary.W_dec.detach(), trainee.dictionary.encode


def run_one(args: argparse.Namespace, variant: str, seed: int,
            data: tuple[ToyTree, torch.Tensor, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    tree, pool, (rows, activity) = data
    x, activity = torch.from_numpy(rows), torch.from_numpy(activity)
    if variant == "saelens":
        w_dec, encode = train_saelens(args, seed, pool)
    else:
        w_dec, encode = train_kukla(args, variant, seed, pool, x)
    truth = ToyTruth(tree.directions, tree.parent, w_dec)
    with torch.no_grad():
        truth.update(encode(x), activity)
    summary = truth.summary()
    cdf = objective_cdfs(args).get(variant) if args.refit else None
    holes = summary["absorption_holes"]
    worst = max(holes, key=holes.get)
    return {"absorption": summary["mean_absorption_holes"], "worst": holes[worst], "worst_parent": worst,
            "mean_cos": summary["mean_max_cosine"], "min_cos": min(summary["max_cosine"]),
            "unrecovered": summary["n_true_features"] - summary["recovered_above_0.9"],
            "diagnosis": _diagnose(tree, w_dec, worst, summary["matched_latent"])
            + (f"; {refit_check(args, tree, x, activity.numpy(), encode(x).detach(), cdf)}" if cdf is not None else "")}


def objective_cdfs(args: argparse.Namespace) -> dict[str, Any]:
    """C(l) of each objective with a closed form (None: least squares, the full width only)."""
    equal = [1 / len(args.levels)] * len(args.levels)
    return {"least squares": None, "levels": cumulative_weight(args.levels, equal, args.width),
            "levels-spread": spread_cumulative_weight(args.levels, equal, args.width),
            "all": all_prefix_cdf(args.width, args.n_prefixes)}


def optimal_decoder(codes: torch.Tensor, x: torch.Tensor, cdf: torch.Tensor | None) -> torch.Tensor:
    """The decoder minimising Σ_l w_l‖x − Σ_{i<l} a_i D_i‖² given the codes (centred: the decoder bias
    takes the means). Latent i is in every prefix longer than i, so the normal equations are
    Σ_j (AᵀA)_ij T(max(i, j)) D_j = T(i)(AᵀX)_i with T(i) = C(F) − C(i), the tail mass."""
    a, x = codes.double(), x.double()
    a, x = a - a.mean(0), x - x.mean(0)
    n = a.shape[1]
    tail = torch.ones(n, dtype=torch.float64) if cdf is None else (cdf[-1] - cdf[:n])
    at = torch.arange(n)
    weight = tail[torch.maximum(at[:, None], at[None, :])]
    return torch.linalg.solve((a.T @ a) * weight + 1e-9 * torch.eye(n, dtype=torch.float64), tail[:, None] * (a.T @ x))


def objective(codes: torch.Tensor, x: torch.Tensor, decoder: torch.Tensor, cdf: torch.Tensor) -> float:
    """Σ_l w_l‖x − Σ_{i<l} a_i D_i‖² per row (centred, as `optimal_decoder`)."""
    a, x = codes.double(), x.double()
    a, x = a - a.mean(0), x - x.mean(0)
    partial, total = torch.zeros_like(x), 0.0
    for length, w in enumerate((cdf[1:] - cdf[:-1]).tolist(), start=1):
        partial += a[:, length - 1:length] * decoder[length - 1]
        total += w * float((x - partial).pow(2).sum(1).mean())
    return total


def true_codes(tree: ToyTree, activity: np.ndarray, width: int) -> tuple[torch.Tensor, np.ndarray]:
    """The true codes with parents first, padded with unused latents to the width; and that order."""
    order = np.argsort(tree.parent >= 0, kind="stable")
    a = torch.zeros(activity.shape[0], width, dtype=torch.float64)
    a[:, :len(order)] = torch.from_numpy(activity[:, order]).double()
    return a, order


def max_cos_ceilings(args: argparse.Namespace, tree: ToyTree, rows: np.ndarray, activity: np.ndarray) -> str:
    """What bounds max-cos, from the true codes (parents first): the least-squares decoder (noise and
    sampling only), and the decoder minimising each Matryoshka objective (`optimal_decoder`)."""
    a, order = true_codes(tree, activity, args.width)
    truth = torch.from_numpy(tree.directions[order]).double()
    out = []
    for name, cdf in objective_cdfs(args).items():
        d = optimal_decoder(a, torch.from_numpy(rows), cdf)[:len(order)]
        out.append(f"{name} {float(torch.nn.functional.cosine_similarity(d, truth).mean()):.4f}")
    return "max-cos ceiling from the true codes: " + ", ".join(out)


def refit_check(args: argparse.Namespace, tree: ToyTree, x: torch.Tensor, activity: np.ndarray,
                codes: torch.Tensor, cdf: torch.Tensor) -> str:
    """Whether the trainer or the objective limits max-cos: the max-cos of the decoder refit to the
    learned codes, and the objective at the learned codes against the true codes (each with its
    optimal decoder). Learned below true: the objective itself prefers the non-true dictionary."""
    refit = optimal_decoder(codes, x, cdf)
    cos = ToyTruth(tree.directions, tree.parent, refit.float()).best_cosine.mean()
    a, _ = true_codes(tree, activity, args.width)
    return (f"refit max-cos {float(cos):.4f}, objective learned {objective(codes, x, refit, cdf):.4f} "
            f"vs true {objective(a, x, optimal_decoder(a, x, cdf), cdf):.4f}")


def rotation_check(args: argparse.Namespace, tree: ToyTree, rows: np.ndarray, activity: np.ndarray) -> str:
    """The objective's change when the last parent and its last child (the latest in the true order)
    become a rotated pair: latents u = (p + c)/√2 in the parent's slot and v = (p − c)/√2 (its code
    clipped at 0) in the first child slot, each objective at its optimal decoder for the codes. Near
    zero: nothing in the loss pushes a trained dictionary out of such a pair (the pair costs L0,
    which BatchTopK's budget does not charge while the codes' L0 is below k)."""
    a, order = true_codes(tree, activity, args.width)
    x = torch.from_numpy(rows)
    n_parents = int((tree.parent < 0).sum())
    parent, child = n_parents - 1, len(order) - 1
    u, v = (a[:, parent] + a[:, child]) / 2 ** 0.5, ((a[:, parent] - a[:, child]) / 2 ** 0.5).clamp_min(0)
    kept = [i for i in range(args.width) if i != child]
    rotated = a[:, kept].clone()
    rotated[:, parent] = u
    rotated = torch.cat([rotated[:, :n_parents], v[:, None], rotated[:, n_parents:]], dim=1)
    out = []
    for name, cdf in objective_cdfs(args).items():
        if cdf is not None:
            change = [objective(c, x, optimal_decoder(c, x, cdf), cdf) for c in (a, rotated)]
            out.append(f"{name} {change[1] - change[0]:+.4f} of {change[0]:.4f}")
    l0 = [float((c > 0).sum(1).double().mean()) for c in (a, rotated)]
    return f"rotated pair f{order[parent]}+f{order[child]} (L0 {l0[0]:.3f} -> {l0[1]:.3f}): " + ", ".join(out)


def _diagnose(tree: ToyTree, w_dec: torch.Tensor, parent: int, matched: list[int]) -> str:
    """Where the worst parent's latent sits and whether it is a parent+child mixture."""
    rows = w_dec / w_dec.norm(dim=1, keepdim=True)
    latent = matched[parent]
    cos = torch.from_numpy(tree.directions) @ rows[latent]
    children = np.flatnonzero(tree.parent == parent)
    child = int(children[int(cos[children].argmax())])
    return (f"parent f{parent} -> latent {latent}: cos parent {float(cos[parent]):.2f}, "
            f"best child f{child} {float(cos[child]):.2f}")


def main() -> None:
    # k 1.5: the default tree fires 1.28 features per row
    parser = dictionary_parser(__doc__.splitlines()[0], d=48, width=48, k=1.5, batch=256, steps=2000)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--variants", default="batchtopk,levels,levels-spread,sampled,all,saelens")
    parser.add_argument("--tree", type=lambda s: [int(v) for v in s.split(",")], default=[8, 4])
    parser.add_argument("--p-root", type=float, default=0.1)
    parser.add_argument("--p-child", type=float, default=0.15)
    parser.add_argument("--noise", type=float, default=0.01)
    parser.add_argument("--magnitude-std", type=float, default=0.1)
    parser.add_argument("--levels", type=lambda s: [int(v) for v in s.split(",")], default=[4, 16, 48])
    parser.add_argument("--n-prefixes", type=int, default=9)
    parser.add_argument("--snap", type=float, default=None, help="snap loss from this fraction of training")
    parser.add_argument("--resample", type=lambda s: [float(v) for v in s.split(",")], default=None,
                        help="restart latents at these fractions of training (resample_at), e.g. 0.25,0.5")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--refit", action="store_true",
                        help="also print the decoder refit to the learned codes and the objective "
                             "(levels, levels-spread, all)")
    parser.add_argument("--rotation", action="store_true",
                        help="also print what each objective charges for a parent+child rotated pair")
    parser.add_argument("--pool", type=int, default=131072, help="training rows generated per seed")
    parser.add_argument("--eval-rows", type=int, default=32768)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    print(f"tree {args.tree}, dim {args.d}, width {args.width}, k {args.k}, levels {args.levels}, "
          f"{args.steps} steps x {args.batch} rows, lr {args.lr}, snap {args.snap}, resample {args.resample}")
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for seed in seeds:
        data = toy_data(args, seed)
        print(f"seed {seed:2d}: {max_cos_ceilings(args, data[0], *data[2])}", flush=True)
        if args.rotation:
            print(f"seed {seed:2d}: {rotation_check(args, data[0], *data[2])}", flush=True)
        for variant in variants:
            start = time.process_time()
            r = run_one(args, variant, seed, data)
            results[variant].append(r)
            print(f"{variant:12s} seed {seed:2d}: absorption {r['absorption']:.3f}  worst {r['worst']:.2f}  "
                  f"max-cos mean {r['mean_cos']:.3f} min {r['min_cos']:.3f}  unrecovered {r['unrecovered']}  "
                  f"({time.process_time() - start:.1f} CPU-s)  {r['diagnosis']}", flush=True)
    print("\n| variant | absorption (mean ± sd) | worst parent | max-cos mean | max-cos min | unrecovered | "
          "seeds meeting the goal |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for variant, rs in results.items():
        a = np.array([r["absorption"] for r in rs])
        ok = sum(r["absorption"] <= 0.05 and r["worst"] < 0.99 and r["mean_cos"] >= 0.99 for r in rs)
        print(f"| {variant} | {a.mean():.3f} ± {a.std():.3f} | {max(r['worst'] for r in rs):.2f} | "
              f"{np.mean([r['mean_cos'] for r in rs]):.3f} | {min(r['min_cos'] for r in rs):.3f} | "
              f"{sum(r['unrecovered'] for r in rs)} | {ok}/{len(rs)} |")
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB, "
          f"{time.process_time():.0f} CPU-s in all")


if __name__ == "__main__":
    main()
