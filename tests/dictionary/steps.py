"""One training step of a bare `Dictionary`, as the trainer takes it (loss, backward, decoder
projection, Adam, renormalisation, dead-latent update), for tests that train without a store."""

from __future__ import annotations

import torch

from kukla.pipeline.dictionary import Dictionary, training_loss
from kukla.pipeline.dictionary.loss import TrainOutput


def adam_step(d: Dictionary, optimizer: torch.optim.Adam, x: torch.Tensor) -> TrainOutput:
    out = training_loss(d, x)
    optimizer.zero_grad()
    out.loss.backward()
    d.project_decoder_grads()
    optimizer.step()
    d.normalize_decoder()
    d.update_dead(out.fired, x.shape[0])
    return out
