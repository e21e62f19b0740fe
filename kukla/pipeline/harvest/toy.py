"""A hierarchical toy source with known ground truth (`kukla harvest --source toy-tree`).

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

TOY_HOOK = "toy"
"""The hook name of the toy rows in the store (`acts/toy`)."""


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
    return {f"acts/{TOY_HOOK}": rows, "truth/toy_activity": activity,
            "tokens/token_id": missing, "tokens/sequence": missing, "tokens/position": missing}


def toy_metadata(branching: list[int], **params: Any) -> dict[str, Any]:
    """The store metadata entry describing the generator."""
    return {"tree": list(branching), **params,
            "truth": {"activity": "truth/toy_activity", "directions": "static/toy_directions",
                      "parent": "static/toy_parent", "level": "static/toy_level",
                      "probability": "static/toy_probability"}}
