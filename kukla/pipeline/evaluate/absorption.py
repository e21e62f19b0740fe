"""Feature absorption by SAEBench's first-letter method (Chanin et al.; fraction by Till).

1. A logistic probe per first letter (one-vs-rest) on the hook's activations of
   single-token words; letters whose probe scores below `min_probe_f1` on held-out words,
   or detects fewer than `min_positives` of them, are left out (SAEBench's gate).
2. k-sparse probing over the latents: an L1-penalised probe on the codes ranks latents per
   letter; k grows from 1 while each added latent raises the k-sparse probe's F1 by at
   least `f1_jump`. Those latents are the letter's *main latents*.
3. For every held-out word the probe detects correctly, with p the unit probe direction:
   act = x·p, main = Σ_main z_i (W_dec,i·p); absorbers = the 3 largest positive
   z_i (W_dec,i·p) among other latents with cos(W_dec,i, p) ≥ 0.1. W_dec is the decoder in the
   activations' units (a kukla SAE's rows have norm 1/scale there), so act and the latents'
   projections are in the same units; SAEBench's z_i·cos is the same for unit-norm rows only. The absorption fraction is 0
   when main ≥ act or the absorbers carry < 40 % of act, 1 when main ≤ 0, else
   a/(a + main) with a = min(absorbers, act − main). Full absorption: every main latent
   silent, and the top projecting latent (cos ≥ 0.025) carries ≥ 40 % of act.
Per letter: mean fraction and full-absorption rate over its correctly detected words.

The probes read the hook's activations of single-token words in a spelling prompt. SAEBench's prompt: a few in-context examples "{word} has the first letter: {LETTER}", then
"{word} has the first letter:", read at the word's token. Attention is causal, so the
activation at the word never sees the text after it: each prompt here stops at the word.
The examples are one fixed, seeded set shared by every word (SAEBench shuffles them per
word), so the prefix runs once into a key-value cache and each word costs one token.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import torch
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from kukla.pipeline.evaluate.config import AbsorptionConfig
from kukla.pipeline.hooks import stop_at_layer
from kukla.progress import progress


LETTERS = "abcdefghijklmnopqrstuvwxyz"
ABSORBER_COS = 0.1
FULL_ABSORBER_COS = 0.025
PROJECTION_SHARE = 0.4
MAX_ABSORBERS = 3


def _f1(pred: Tensor, truth: Tensor) -> float:
    tp = (pred & truth).sum().item()
    denom = pred.sum().item() + truth.sum().item()
    return 2 * tp / denom if denom else 0.0


def _fit(features: Tensor, y: Tensor, shared: bool, *, l1: float, epochs: int, seed: int) -> tuple[Tensor, Tensor]:
    """Class-balanced one-vs-rest logistic regression, full-batch Adam, standardised inputs.

    `features` is [N, d] shared by every class, or [N, C, d] with each class's own inputs.
    Returns weights [C, d] and biases [C] that act on the raw (unstandardised) inputs."""
    torch.manual_seed(seed)
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
    xs = (features - mean) / std
    y = y.float()
    pos = y.sum(0).clamp(min=1)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=(y.shape[0] - pos) / pos)
    w = torch.zeros(y.shape[1], xs.shape[-1], requires_grad=True)
    b = torch.zeros(y.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    with torch.enable_grad():
        for _ in range(epochs):
            opt.zero_grad()
            logits = xs @ w.T + b if shared else (xs * w).sum(-1) + b
            loss = loss_fn(logits, y) + l1 * w.abs().sum(1).mean()
            loss.backward()
            opt.step()
    w_raw = (w / std).detach()
    return w_raw, (b - (w * mean / std).sum(-1)).detach()


def train_probes(x: Tensor, targets: Tensor, *, l1: float = 0.0, epochs: int = 100, seed: int = 0) -> tuple[Tensor, Tensor]:
    """One-vs-rest logistic probes [n_classes, d] (+ bias [n_classes]) on shared inputs [N, d]."""
    return _fit(x.float(), targets, True, l1=l1, epochs=epochs, seed=seed)


def k_sparse_f1(z_train: Tensor, y_train: Tensor, z_test: Tensor, y_test: Tensor, ranking: Tensor,
                s: AbsorptionConfig, fitted: Callable[[int], Any] = lambda n: None) -> Tensor:
    """Test F1 [max_k, C] of each class's k-sparse probe on its k top-ranked latents, k = 1..max_k;
    `fitted(C)` hears of each k's C probes (a bar's `update`)."""
    rows = []
    for k in range(1, s.max_k + 1):
        feats = ranking[:, :k]  # [C, k]
        w, b = _fit(z_train[:, feats], y_train, False, l1=0.0, epochs=s.epochs, seed=s.seed)
        fitted(y_train.shape[1])
        pred = (z_test[:, feats] * w).sum(-1) + b > 0
        rows.append(torch.tensor([_f1(pred[:, c], y_test[:, c]) for c in range(y_test.shape[1])]))
    return torch.stack(rows)


def main_latents(f1: Tensor, ranking: Tensor, f1_jump: float) -> tuple[list[int], float]:
    """Grow k while each added latent raises F1 by more than `f1_jump`; those latents are the main ones."""
    best, chosen = -1.0, 0
    for k, value in enumerate(f1.tolist(), start=1):
        if value <= best + f1_jump:
            break
        best, chosen = value, k
    return ranking[:chosen].tolist(), best


def word_absorption(act_proj: Tensor, latent_proj: Tensor, main: list[int], cos: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """(absorption fraction, full absorption) per word, from x·p [N] and z_i·(W_dec,i·p) [N, F]."""
    main_mask = torch.zeros(latent_proj.shape[1], dtype=torch.bool)
    main_mask[main] = True
    main_proj = latent_proj[:, main_mask].sum(1)
    candidates = latent_proj.masked_fill(main_mask | (cos < ABSORBER_COS), 0).clamp(min=0)
    absorbers = candidates.topk(min(MAX_ABSORBERS, candidates.shape[1]), dim=1).values.sum(1)
    share = absorbers / act_proj
    a = torch.minimum(absorbers, act_proj - main_proj)
    partial = (a / (a + main_proj)).clamp(0, 1)
    fraction = torch.where(main_proj <= 0, torch.ones_like(partial), partial)
    fraction = torch.where((main_proj >= act_proj) | (share < PROJECTION_SHARE), torch.zeros_like(fraction), fraction)
    top_value, top_index = latent_proj.max(1)
    full = ((z[:, main_mask].abs() < 1e-8).all(1) & (cos[top_index] >= FULL_ABSORBER_COS)
            & (act_proj > 0) & (top_value / act_proj >= PROJECTION_SHARE))
    return fraction, full


def first_letter_absorption(acts: Tensor, letters: Tensor, encode: Callable[[Tensor], Tensor], w_dec: Tensor,
                            s: AbsorptionConfig, name: str = "") -> dict[str, Any]:
    """Absorption scores from word activations [N, d] and their first letters [N] (0–25); `w_dec`
    [F, d] holds the decoder rows in the activations' units (`Dictionary.output_directions`).
    `name` (the dictionary's) labels the bar over the probes: 26 per fit, 2 + max_k fits, the
    one on the codes [N, F] growing with the width."""
    g = torch.Generator().manual_seed(s.seed)
    order = torch.randperm(acts.shape[0], generator=g)
    n_train = int(0.8 * len(order))
    train, test = order[:n_train], order[n_train:]
    onehot = torch.nn.functional.one_hot(letters.long(), len(LETTERS)).bool()
    acts = acts.float()
    with progress((2 + s.max_k) * len(LETTERS), f"absorption probes ({name})" if name else "absorption probes",
                  unit="probe") as bar:
        with torch.no_grad():
            z = torch.cat([encode(chunk).float().cpu() for chunk in acts.split(1024)])
        probe_w, probe_b = train_probes(acts[train], onehot[train], epochs=s.epochs, seed=s.seed)
        bar.update(len(LETTERS))
        code_w, _ = train_probes(z[train], onehot[train], l1=s.l1, epochs=s.epochs, seed=s.seed)
        bar.update(len(LETTERS))
        ranking = code_w.argsort(dim=1, descending=True)[:, :s.max_k]
        sparse_f1 = k_sparse_f1(z[train], onehot[train], z[test], onehot[test], ranking, s, fitted=bar.update)
    w_dec = w_dec.detach().float().cpu()
    unit_dec = w_dec / w_dec.norm(dim=1, keepdim=True).clamp(min=1e-12)
    scores = acts[test] @ probe_w.T + probe_b
    per_letter: dict[str, dict[str, Any]] = {}
    for i, letter in enumerate(LETTERS):
        truth = onehot[test, i]
        detected = (scores[:, i] > 0) & truth
        probe_f1 = _f1(scores[:, i] > 0, truth)
        if probe_f1 < s.min_probe_f1 or int(detected.sum()) < s.min_positives:
            continue
        main, main_f1 = main_latents(sparse_f1[:, i], ranking[i], s.f1_jump)
        p = probe_w[i] / probe_w[i].norm()
        cos = unit_dec @ p
        words = test[detected]
        fraction, full = word_absorption(acts[words] @ p, z[words] * (w_dec @ p), main, cos, z[words])
        per_letter[letter] = {
            "mean_absorption_fraction": float(fraction.mean()),
            "full_absorption_rate": float(full.double().mean()),
            "probe_f1": probe_f1, "k_sparse_f1": main_f1, "main_latents": main,
            "probe_true_positives": int(detected.sum()),
        }
    kept = list(per_letter.values())
    return {
        "letters_total": len(LETTERS),
        "letters_kept": len(kept),
        "mean_absorption_fraction": sum(v["mean_absorption_fraction"] for v in kept) / len(kept) if kept else float("nan"),
        "mean_full_absorption_rate": sum(v["full_absorption_rate"] for v in kept) / len(kept) if kept else float("nan"),
        "per_letter": per_letter,
    }


ICL_EXAMPLES = 4
TEMPLATE = " has the first letter:"
WORD_MARKERS = ("▁", "Ġ", " ")
"""How tokenizers mark a word-initial token (SentencePiece, byte-level BPE, plain)."""


def alphabetic_words(tokenizer, d_vocab: int) -> list[tuple[int, str]]:
    """(token id, word) for word-initial tokens that are 2+ ASCII letters."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(d_vocab, len(tokenizer)))))
    words = []
    for token_id, piece in enumerate(pieces):
        if piece and piece[0] in WORD_MARKERS:
            word = piece[1:]
            if len(word) >= 2 and word.isascii() and word.isalpha():
                words.append((token_id, word))
    return words


@torch.no_grad()
def prompt_activations(model: HookedTransformer, hook: str, prefix: list[int], word_ids: list[int], *,
                       batch_size: int = 256) -> Tensor:
    """The hook's activation at each word appended to the shared `prefix` ([N, d]).

    The prefix runs once into a frozen key-value cache; each word then costs one token."""
    stop = stop_at_layer([hook], model.cfg.n_layers)
    device = model.cfg.device
    batch_size = min(batch_size, len(word_ids))
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, 1)
    model(torch.tensor([prefix], device=device), past_kv_cache=cache, stop_at_layer=stop)
    for entry in cache.entries:  # one prefix, seen by every word of a batch
        entry.past_keys = entry.past_keys.expand(batch_size, -1, -1, -1)
        entry.past_values = entry.past_values.expand(batch_size, -1, -1, -1)
    cache.previous_attention_mask = cache.previous_attention_mask.expand(batch_size, -1)
    cache.freeze()
    acts = []
    with progress(len(word_ids), f"absorption words ({hook})", unit="word") as bar:
        for start in range(0, len(word_ids), batch_size):
            ids = word_ids[start:start + batch_size]
            padded = ids + [ids[-1]] * (batch_size - len(ids))  # the frozen cache has a fixed batch
            tokens = torch.tensor(padded, device=device)[:, None]
            _, out = model.run_with_cache(tokens, names_filter=[hook], past_kv_cache=cache, stop_at_layer=stop)
            acts.append(out[hook][: len(ids), 0].float().cpu())
            bar.update(len(ids))
    return torch.cat(acts)


def word_activations(model: HookedTransformer, hook: str, *, n_words: int = 4000,
                     seed: int = 0) -> tuple[Tensor, Tensor] | str:
    """(activations [N, d] at the word token, first-letter index [N]) for `n_words` words sampled
    from the vocabulary (SAEBench takes them all); else why the probes cannot run."""
    tokenizer = model.tokenizer
    words = alphabetic_words(tokenizer, model.cfg.d_vocab)
    if len(words) < 10 * len(LETTERS):
        return "too few single-token alphabetic words in the vocabulary"
    rng = random.Random(seed)
    rng.shuffle(words)
    examples, words = words[:ICL_EXAMPLES], words[ICL_EXAMPLES:ICL_EXAMPLES + n_words]
    prefix_text = "".join(f"{w}{TEMPLATE} {w[0].upper()}\n" for _, w in examples)
    prefix = tokenizer(prefix_text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prefix = [tokenizer.bos_token_id, *prefix]
    if len(prefix) >= model.cfg.n_ctx:  # the word goes after it, and positions end at n_ctx
        return f"the spelling prompt ({len(prefix) + 1} tokens) is longer than the model's context ({model.cfg.n_ctx})"
    acts = prompt_activations(model, hook, prefix, [token_id for token_id, _ in words])
    return acts, torch.tensor([LETTERS.index(w[0].lower()) for _, w in words])
