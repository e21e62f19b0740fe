"""Hook activations of single-token words in a spelling prompt, for the absorption probes.

SAEBench's prompt: a few in-context examples "{word} has the first letter: {LETTER}", then
"{word} has the first letter:", read at the word's token. Attention is causal, so the
activation at the word never sees the text after it: each prompt here stops at the word.
The examples are one fixed, seeded set shared by every word (SAEBench shuffles them per
word), so the prefix runs once into a key-value cache and each word costs one token.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from kukla.pipeline.evaluate.absorption import LETTERS
from kukla.pipeline.hooks import stop_at_layer
from kukla.progress import progress

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
                     seed: int = 0) -> tuple[Tensor, Tensor] | None:
    """(activations [N, d] at the word token, first-letter index [N]) for `n_words` words sampled
    from the vocabulary (SAEBench takes them all); None without enough words."""
    tokenizer = model.tokenizer
    words = alphabetic_words(tokenizer, model.cfg.d_vocab)
    if len(words) < 10 * len(LETTERS):
        return None
    rng = random.Random(seed)
    rng.shuffle(words)
    examples, words = words[:ICL_EXAMPLES], words[ICL_EXAMPLES:ICL_EXAMPLES + n_words]
    prefix_text = "".join(f"{w}{TEMPLATE} {w[0].upper()}\n" for _, w in examples)
    prefix = tokenizer(prefix_text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prefix = [tokenizer.bos_token_id, *prefix]
    acts = prompt_activations(model, hook, prefix, [token_id for token_id, _ in words])
    return acts, torch.tensor([LETTERS.index(w[0].lower()) for _, w in words])
