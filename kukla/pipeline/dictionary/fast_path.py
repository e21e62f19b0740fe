"""Which training path a device runs faster: measured once per (device, shapes), then cached.

On CPU the sparse path (gathered encoder backward, `embedding_bag` decode) beats the dense
reference 2–2.7× at every size measured (benchmarks/RESULTS.md), so CPUs take it unmeasured.
On a GPU the dense path's matmuls run on tensor cores and the gathers do not, so either can
win depending on d, F, k and the batch: the trainer times both there before its first step.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import torch
from torch import Tensor

from kukla.pipeline.dictionary.loss import training_loss
from kukla.pipeline.dictionary.model import Dictionary

_MEASURED: dict[tuple[Any, ...], bool] = {}
_REPEATS = 3


def choose_sparse_path(dictionary: Dictionary, x: Tensor, y: Tensor | None = None, *, measure: bool | None = None,
                       precision: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext) -> bool:
    """Set and return `dictionary.use_sparse_path`: the faster path on x's device at x's batch size.

    Only a dictionary configured with `sparse_path` is measured (False always runs the dense
    reference). `measure` defaults to: on CUDA. `precision` is the step's autocast context.
    The weights, gradients and random state are left as they were.
    """
    cfg = dictionary.cfg
    if not cfg.sparse_path or not dictionary.rule.selects:
        dictionary.use_sparse_path = cfg.sparse_path
        return dictionary.use_sparse_path
    if not (x.device.type == "cuda" if measure is None else measure):
        dictionary.use_sparse_path = True
        return True
    device = torch.cuda.get_device_name(x.device) if x.device.type == "cuda" else x.device.type
    key = (device, cfg.activation, cfg.prefixes, cfg.d_in, dictionary.d_out, cfg.width, cfg.k, cfg.aux_k, tuple(cfg.levels or ()),
           x.shape[0], x.dtype)
    if key not in _MEASURED:
        _MEASURED[key] = _seconds(dictionary, x, y, True, precision) <= _seconds(dictionary, x, y, False, precision)
    dictionary.use_sparse_path = _MEASURED[key]
    return dictionary.use_sparse_path


def _seconds(dictionary: Dictionary, x: Tensor, y: Tensor | None, sparse: bool,
             precision: Callable[[], contextlib.AbstractContextManager[Any]]) -> float:
    """Median seconds of one forward + backward on this path (after one warm-up)."""
    dictionary.use_sparse_path = sparse
    generator = torch.Generator(device=x.device).manual_seed(0)  # sampled prefixes: leave the global RNG alone
    times = []
    for _ in range(_REPEATS + 1):
        _wait(x)
        start = time.perf_counter()
        with precision():
            loss = training_loss(dictionary, x, y, generator).loss
        loss.backward()
        _wait(x)
        times.append(time.perf_counter() - start)
        dictionary.zero_grad(set_to_none=True)
    return sorted(times[1:])[len(times[1:]) // 2]


def _wait(x: Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
