"""TopK (per token): each row keeps its k largest pre-activations, at training and at inference."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kukla.errors import ConfigError
from kukla.pipeline.dictionary.loss import ONE_PROCESS, GlobalBatch
from kukla.pipeline.dictionary.rules import Rule

if TYPE_CHECKING:
    from kukla.pipeline.dictionary.config import DictionaryConfig
    from kukla.pipeline.dictionary.model import Dictionary


def select_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest pre-activations of every row."""
    cols = pre.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
    return rows, cols.reshape(-1)


def topk_codes(pre: Tensor, k: int) -> Tensor:
    """Dense TopK codes: relu of each row's k largest pre-activations (SAELens' TopK)."""
    top = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())


class TopK(Rule):
    name = "topk"
    saelens = ("topk", None)  # SAELens has no TopK transcoder
    loads_from = ("topk",)

    def validate(self, cfg: DictionaryConfig) -> None:
        super().validate(cfg)
        if not float(cfg.k or 0).is_integer():
            raise ConfigError("k", f"topk keeps a whole number of latents per token, got {cfg.k} "
                                   "(fractional k needs batchtopk)")

    def select(self, pre: Tensor, cfg: DictionaryConfig, batch: GlobalBatch = ONE_PROCESS) -> tuple[Tensor, Tensor]:
        return select_topk(pre, int(cfg.k or 0))

    def rows_per_token(self, cfg: DictionaryConfig) -> int | None:
        return int(cfg.k or 0)

    def encode(self, dictionary: Dictionary, pre: Tensor) -> Tensor:
        return topk_codes(pre, int(dictionary.cfg.k or 0))

    def saelens_fields(self, cfg: DictionaryConfig) -> dict[str, object]:
        return {"k": int(cfg.k or 0), "rescale_acts_by_decoder_norm": False}
