"""First-letter absorption on constructed activations whose absorption is known by design."""

from __future__ import annotations

import pytest
import torch

from kukla.pipeline.evaluate.absorption import first_letter_absorption
from kukla.pipeline.evaluate.config import AbsorptionConfig


def _absorbing_dictionary():
    """Word activations with 40 % of the 'a' words absorbed by design, and a dictionary for them."""
    g = torch.Generator().manual_seed(0)
    d, n_absorbers = 96, 40
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0].T  # orthonormal rows
    letter_dir, token_dir = basis[:26], basis[26:26 + n_absorbers]
    letters, acts, absorbed = [], [], []
    for letter in range(25):  # 'z' (25) gets pure-noise words: its probe must fail the gate
        for i in range(200 if letter == 0 else 60):
            x = 2.0 * letter_dir[letter] + 0.15 * torch.randn(d, generator=g)
            hit = letter == 0 and i < 80  # 40 % of 'a' words carry a token-specific direction
            if hit:
                x = x + 2.0 * token_dir[i % n_absorbers]
            letters.append(letter), acts.append(x), absorbed.append(hit)
    for _ in range(60):
        letters.append(25), acts.append(0.15 * torch.randn(d, generator=g)), absorbed.append(False)
    x_all, y_all = torch.stack(acts), torch.tensor(letters)

    # The dictionary: one latent per letter (silent on absorbed 'a' words) and one absorbing
    # latent per token direction whose decoder is the letter direction plus the token's.
    w_dec = torch.cat([letter_dir, (letter_dir[0] + token_dir) / 2 ** 0.5])

    def encode(x: torch.Tensor) -> torch.Tensor:
        letter_codes = torch.relu(x @ letter_dir.T - 1.0)
        token_proj = x @ token_dir.T
        carries_token = (token_proj > 1.0).any(1, keepdim=True)
        letter_codes[:, :1] = letter_codes[:, :1] * ~carries_token
        absorber_codes = torch.relu(x @ w_dec[26:].T - 1.0) * (token_proj > 1.0)
        return torch.cat([letter_codes, absorber_codes], dim=1)

    settings = AbsorptionConfig(min_probe_f1=0.6, min_positives=5, max_k=10, f1_jump=0.03, seed=0, epochs=60)
    return x_all, y_all, encode, w_dec, settings


@pytest.mark.slow
def test_absorbed_words_are_scored_and_weak_letters_are_gated_out() -> None:
    out = first_letter_absorption(*_absorbing_dictionary())
    assert out["letters_kept"] == 25 and "z" not in out["per_letter"]
    a = out["per_letter"]["a"]
    assert a["main_latents"][0] == 0
    assert 0.25 < a["mean_absorption_fraction"] < 0.55, a
    assert 0.25 < a["full_absorption_rate"] < 0.55, a
    others = [v["mean_absorption_fraction"] for k, v in out["per_letter"].items() if k != "a"]
    assert max(others) < 0.02


@pytest.mark.slow
def test_absorption_reads_each_latents_output_not_its_code_alone() -> None:
    """Codes ÷c with decoder rows ×c is the same dictionary (a kukla SAE's saved rows have norm
    1/scale), so absorption must not change: x·p is compared with z_i·(W_dec,i·p)."""
    x_all, y_all, encode, w_dec, settings = _absorbing_dictionary()
    plain = first_letter_absorption(x_all, y_all, encode, w_dec, settings)
    for c in (0.25, 4.0):
        scaled = first_letter_absorption(x_all, y_all, lambda x: encode(x) / c, w_dec * c, settings)
        assert scaled["letters_kept"] == plain["letters_kept"]
        for letter, scores in plain["per_letter"].items():
            for key in ("mean_absorption_fraction", "full_absorption_rate"):
                assert scaled["per_letter"][letter][key] == pytest.approx(scores[key], abs=1e-6), (c, letter, key)
