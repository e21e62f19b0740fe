"""The global batch a training step belongs to: so the number of processes cannot change the loss.

Under data parallelism each rank holds an equal share of every global batch. The statistics
that define the loss are taken over the whole global batch, never over one share: the target's
variance (FVU's and aux-k's denominators) and BatchTopK's cutoff. A rank's loss is then its
rows' squared errors over the global variance per row, and the mean of the ranks' losses (what
averaged gradients descend) is exactly the loss one process computes on the global batch.

`GlobalBatch()` is one process holding the whole batch (every reduction is the identity);
`kukla.pipeline.train.distributed.RankShare` reduces over torch.distributed ranks. Reductions
only ever see detached tensors: they shape the loss, gradients never flow through them.
"""

from __future__ import annotations

from torch import Tensor


class GlobalBatch:
    """One process holding the whole batch."""

    world: int = 1
    """How many equal shares the global batch is cut into."""

    def sum(self, t: Tensor) -> Tensor:
        """Elementwise sum of `t` over every share."""
        return t

    def gather(self, t: Tensor) -> Tensor:
        """Every share's `t` concatenated along dim 0 (same shape on every share)."""
        return t

    def deviations(self, t: Tensor) -> tuple[Tensor, int]:
        """This share's t − t̄ (t̄ the global batch's mean; detached, float32) and N, the global batch's rows."""
        t = t.detach().float()
        n = t.shape[0] * self.world
        return t - self.sum(t.sum(dim=0)) / n, n

    def variance_per_row(self, t: Tensor) -> Tensor:
        """Σ_b ‖t_b − t̄‖² / N over the global batch: FVU's denominator per row."""
        deviation, n = self.deviations(t)
        return self.sum(deviation.pow(2).sum()) / n


ONE_PROCESS = GlobalBatch()
