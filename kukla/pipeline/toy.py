"""The toy tree: a hierarchical source with known ground truth (`kukla harvest --source toy-tree`),
and the scores of a dictionary against that truth (`kukla evaluate` on a toy store).

Features form a tree given by branching factors, roots first: `toy.tree = [32, 4]` is 32
root (parent) features, each with 4 children; `[8, 3, 2]` adds 2 grandchildren under each
child. A root fires on a row with probability `p_root`; a child fires only on rows where
its parent fires, then with probability `p_child` (independently of its siblings). An
active feature has magnitude |1 + magnitude_std·N(0,1)|. Each row is

    x = Σ_f activity[f] · directions[f] + noise · N(0, I_dim)

with unit `directions`, exactly orthogonal when there are at most `dim` features, else
random Gaussian directions (nearly orthogonal in high dimension).

What the store holds (evaluation reads these; F = number of features, breadth-first
order: all roots, then the children of root 0, of root 1, …, then the next level):
- `acts/toy`                [n_rows, dim]  the rows x
- `truth/toy_activity`      [n_rows, F]    float32 magnitude of each feature on that row, 0 when silent
- `static/toy_directions`   [F, dim]       float32 unit direction of each feature
- `static/toy_parent`       [F]            int64 index of the parent feature, −1 for roots
- `static/toy_level`        [F]            int64 depth in the tree (roots 0)
- `static/toy_probability`  [F]            float32 firing probability given the parent fires
- `tokens/*`                −1 (no text behind toy rows)

Rows of segment s are drawn from a generator seeded by (seed, s), so the rows do not
depend on which rank makes them, and a resumed run remakes exactly the missing ones.

Scores. Recovery: each true feature's matched latent is the one whose decoder row has the largest
cosine with the feature's direction; that cosine is its recovery score.

Absorption holes, per parent feature p with matched latent m(p):

    holes(p) = #{rows: p active, some child of p active, z[m(p)] = 0} / #{rows: p and a child active}

A hole means a child's latent has absorbed the parent: the parent is present but its
latent stays silent. Vanilla (BatchTop)K dictionaries show holes; Matryoshka ones should not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

TOY_HOOK = "toy"
"""The hook name of the toy rows in the store (`acts/toy`)."""
TOY_ACTIVITY = "truth/toy_activity"
TOY_DIRECTIONS = "static/toy_directions"
TOY_PARENT = "static/toy_parent"


@dataclass(frozen=True)
class ToyTree:
    """The generator's fixed part: tree, directions and probabilities."""

    parent: np.ndarray
    level: np.ndarray
    probability: np.ndarray
    directions: np.ndarray
    noise: float
    magnitude_std: float

    @classmethod
    def build(cls, branching: list[int], *, dim: int, p_root: float, p_child: float,
              noise: float, magnitude_std: float, seed: int) -> "ToyTree":
        parents: list[int] = []
        levels: list[int] = []
        previous: list[int] = [-1]
        for depth, fan_out in enumerate(branching):
            current = []
            for p in previous:
                for _ in range(fan_out):
                    current.append(len(parents))
                    parents.append(p)
                    levels.append(depth)
            previous = current
        n = len(parents)
        rng = np.random.default_rng([seed, 2**31])
        gauss = rng.standard_normal((dim, n))
        if n <= dim:
            directions = np.linalg.qr(gauss)[0].T
        else:
            directions = (gauss / np.linalg.norm(gauss, axis=0)).T
        level = np.array(levels, dtype=np.int64)
        return cls(parent=np.array(parents, dtype=np.int64), level=level,
                   probability=np.where(level == 0, p_root, p_child).astype(np.float32),
                   directions=directions.astype(np.float32), noise=noise, magnitude_std=magnitude_std)

    @property
    def n_features(self) -> int:
        return len(self.parent)

    def sample(self, n_rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(rows [n, dim], activity [n, F]); features are visited parents-first, so a
        child's gate can read its parent's activity."""
        fires = rng.random((n_rows, self.n_features)) < self.probability
        for f in range(self.n_features):
            if self.parent[f] >= 0:
                fires[:, f] &= fires[:, self.parent[f]]
        magnitude = np.abs(1.0 + self.magnitude_std * rng.standard_normal((n_rows, self.n_features)))
        activity = (fires * magnitude).astype(np.float32)
        rows = activity @ self.directions + self.noise * rng.standard_normal((n_rows, self.directions.shape[1]))
        return rows.astype(np.float32), activity

    def statics(self) -> dict[str, np.ndarray]:
        return {"toy_directions": self.directions, "toy_parent": self.parent,
                "toy_level": self.level, "toy_probability": self.probability}


def toy_segment_rows(tree: ToyTree, segment_id: int, n_rows: int, seed: int) -> dict[str, np.ndarray]:
    """The rows of one segment, in the store's row layout."""
    rows, activity = tree.sample(n_rows, np.random.default_rng([seed, segment_id]))
    missing = np.full(n_rows, -1, dtype=np.int64)
    return {f"acts/{TOY_HOOK}": rows, TOY_ACTIVITY: activity,
            "tokens/token_id": missing, "tokens/sequence": missing, "tokens/position": missing}


def toy_metadata(branching: list[int], **params: Any) -> dict[str, Any]:
    """The store metadata entry describing the generator."""
    return {"tree": list(branching), **params,
            "truth": {"activity": TOY_ACTIVITY, "directions": TOY_DIRECTIONS, "parent": TOY_PARENT,
                      "level": "static/toy_level", "probability": "static/toy_probability"}}


MAX_HEATMAP_LATENTS = 64
"""Heatmap columns kept in metrics.json: the matched latents, then the closest others."""


class ToyTruth:
    """Accumulates the absorption-hole counts of one dictionary against the true features."""

    def __init__(self, directions: np.ndarray, parent: np.ndarray, w_dec: Tensor) -> None:
        self.directions = torch.as_tensor(directions, dtype=torch.float32)
        self.parent = np.asarray(parent)
        self.w_dec = w_dec.detach().float().cpu()
        self.best_cosine, self.matched = best_match(self.directions, self.w_dec)
        self.parents = np.array(sorted({int(p) for p in self.parent if p >= 0}), dtype=np.int64)
        children = [np.flatnonzero(self.parent == p) for p in self.parents]
        self.child_mask = torch.zeros(len(self.parents), len(self.parent), dtype=torch.bool)
        for i, kids in enumerate(children):
            self.child_mask[i, kids] = True
        self.both = torch.zeros(len(self.parents), dtype=torch.long)
        self.silent = torch.zeros(len(self.parents), dtype=torch.long)

    def update(self, z: Tensor, activity: Tensor) -> None:
        """Add a batch: codes [B, F] and the true feature activity [B, n_features] of the same rows."""
        if len(self.parents) == 0:
            return
        active = activity.cpu() > 0
        parent_active = active[:, self.parents]  # [B, P]
        child_active = (active.float() @ self.child_mask.float().T) > 0  # [B, P]
        both = parent_active & child_active
        latent_silent = z.detach().cpu()[:, self.matched[self.parents]] == 0
        self.both += both.sum(0)
        self.silent += (both & latent_silent).sum(0)

    def summary(self) -> dict[str, Any]:
        holes = (self.silent.double() / self.both.clamp(min=1).double()).tolist()
        counted = self.both > 0
        sims = cosine_matrix(self.directions, self.w_dec)
        columns = list(dict.fromkeys(self.matched.tolist()))
        others = [int(i) for i in sims.max(0).values.argsort(descending=True) if int(i) not in columns]
        columns = (columns + others)[:max(MAX_HEATMAP_LATENTS, len(set(columns)))]
        return {
            "n_true_features": len(self.parent),
            "mean_max_cosine": float(self.best_cosine.mean()),
            "recovered_above_0.9": int((self.best_cosine > 0.9).sum()),
            "max_cosine": self.best_cosine.tolist(),
            "matched_latent": self.matched.tolist(),
            "absorption_holes": {int(p): h for p, h, c in zip(self.parents, holes, counted) if c},
            "mean_absorption_holes": float(np.mean([h for h, c in zip(holes, counted) if c])) if counted.any() else float("nan"),
            "feature_names": [f"f{i}" + (f"<f{p}" if p >= 0 else "") for i, p in enumerate(self.parent)],
            "cosine_columns": columns,
            "cosine_matrix": sims[:, columns].tolist(),
        }


def best_match(truth: Tensor, w_dec: Tensor, chunk_elements: int = 1 << 24) -> tuple[Tensor, Tensor]:
    """For each true direction (rows of `truth`), its max cosine to the decoder rows and that latent."""
    t_unit = F.normalize(truth.detach().float(), dim=1)
    d_unit = F.normalize(w_dec.detach().float(), dim=1).to(truth.device)
    rows = max(1, chunk_elements // d_unit.shape[0])
    best, index = [], []
    for start in range(0, t_unit.shape[0], rows):
        sims = t_unit[start:start + rows] @ d_unit.T
        value, idx = sims.max(dim=1)
        best.append(value.cpu())
        index.append(idx.cpu())
    return torch.cat(best), torch.cat(index)


def cosine_matrix(truth: Tensor, w_dec: Tensor) -> Tensor:
    """Cosine of every true direction with every latent ([n_truth, F]); for small toy plots."""
    t_unit = F.normalize(truth.detach().float(), dim=1)
    return (t_unit @ F.normalize(w_dec.detach().float(), dim=1).to(truth.device).T).cpu()
