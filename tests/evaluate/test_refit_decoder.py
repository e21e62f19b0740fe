"""`benchmarks/science.py --refit` reads a trained dictionary against the decoder that minimises each
Matryoshka objective given the codes (`optimal_decoder`, closed-form normal equations). Its verdict
is only as good as that decoder being the minimiser, so it is checked here against the objective
written out prefix by prefix, with autograd for the gradient."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kukla.pipeline.dictionary.prefixes import all_prefix_cdf, cumulative_weight, spread_cumulative_weight

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # the script under test
import science  # noqa: E402

WIDTH, LEVELS = 12, [3, 6, 12]


def _prefix_objective(codes: torch.Tensor, x: torch.Tensor, decoder: torch.Tensor, cdf: torch.Tensor) -> torch.Tensor:
    """Σ_l (C(l) − C(l−1)) · mean_n ‖x − a[:, :l] D[:l]‖², centred, one full reconstruction per length."""
    a, x = codes - codes.mean(0), x - x.mean(0)
    return sum((cdf[length] - cdf[length - 1]) * (x - a[:, :length] @ decoder[:length]).pow(2).sum(1).mean()
               for length in range(1, WIDTH + 1))


def _correlated_codes(generator: torch.Generator) -> torch.Tensor:
    """Sparse non-negative codes whose latents co-fire (a latent's later neighbours share its gate),
    so the prefixes' weights matter: with uncorrelated codes any weighting has the same minimiser."""
    gate = torch.rand(4000, WIDTH, generator=generator) < 0.3
    gate[:, 1:] |= gate[:, :-1] & (torch.rand(4000, WIDTH - 1, generator=generator) < 0.5)
    return (gate * torch.rand(4000, WIDTH, generator=generator)).double()


@pytest.mark.parametrize("scheme", ["levels", "levels-spread", "all"])
def test_refit_decoder_is_the_minimiser_of_the_prefix_objective(scheme: str) -> None:
    equal = [1 / len(LEVELS)] * len(LEVELS)
    cdf = {"levels": cumulative_weight(LEVELS, equal, WIDTH),
           "levels-spread": spread_cumulative_weight(LEVELS, equal, WIDTH),
           "all": all_prefix_cdf(WIDTH, 4)}[scheme]
    generator = torch.Generator().manual_seed(0)
    codes = _correlated_codes(generator)
    x = codes @ torch.randn(WIDTH, 5, generator=generator, dtype=torch.float64) \
        + 0.3 * torch.randn(4000, 5, generator=generator, dtype=torch.float64)

    decoder = science.optimal_decoder(codes, x, cdf).requires_grad_()
    value = _prefix_objective(codes, x, decoder, cdf)
    [gradient] = torch.autograd.grad(value, decoder)
    least_squares = science.optimal_decoder(codes, x, None).requires_grad_()  # the full-width fit only
    [away] = torch.autograd.grad(_prefix_objective(codes, x, least_squares, cdf), least_squares)

    assert science.objective(codes, x, decoder.detach(), cdf) == pytest.approx(float(value.detach()), rel=1e-9)
    assert float(away.norm()) > 1e-3  # the weighting moves the minimiser, so the check below has teeth
    assert float(gradient.norm()) < 1e-6 * float(away.norm())


def test_refit_decoder_without_prefixes_is_least_squares() -> None:
    generator = torch.Generator().manual_seed(1)
    codes = _correlated_codes(generator)
    x = torch.randn(4000, 5, generator=generator, dtype=torch.float64)
    a, y = codes - codes.mean(0), x - x.mean(0)
    torch.testing.assert_close(science.optimal_decoder(codes, x, None), torch.linalg.lstsq(a, y).solution,
                               rtol=1e-6, atol=1e-8)
