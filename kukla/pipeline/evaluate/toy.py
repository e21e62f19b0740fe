"""Ground-truth scores on toy-tree stores (see `kukla.pipeline.harvest.toy` for the layout).

Recovery: each true feature's matched latent is the one whose decoder row has the largest
cosine with the feature's direction; that cosine is its recovery score.

Absorption holes, per parent feature p with matched latent m(p):

    holes(p) = #{rows: p active, some child of p active, z[m(p)] = 0} / #{rows: p and a child active}

A hole means a child's latent has absorbed the parent: the parent is present but its
latent stays silent. Vanilla (BatchTop)K dictionaries show holes; Matryoshka ones should not.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from kukla.pipeline.evaluate.geometry import best_match, cosine_matrix

TOY_ACTIVITY = "truth/toy_activity"
TOY_DIRECTIONS = "static/toy_directions"
TOY_PARENT = "static/toy_parent"
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
