"""Hook activations of single-token words in a spelling prompt, for the absorption probes.

SAEBench's prompt: a few in-context examples "{word} has the first letter: {LETTER}", then
"{word} has the first letter:", read at the word's token. Here the examples are one fixed,
seeded set shared by every word, so all prompts have the same length and batch without
padding (SAEBench shuffles them per word).
"""

from __future__ import annotations

import random

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from kukla.pipeline.evaluate.absorption import LETTERS
from kukla.pipeline.hooks import stop_at_layer

MAX_WORDS = 3000
"""Words sampled from the vocabulary (SAEBench uses every alphabetic token)."""
ICL_EXAMPLES = 6
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
def word_activations(model: HookedTransformer, hook: str, *, seed: int = 0,
                     batch_size: int = 64) -> tuple[Tensor, Tensor] | None:
    """(activations [N, d] at the word token, first-letter index [N]); None without enough words."""
    tokenizer = model.tokenizer
    words = alphabetic_words(tokenizer, model.cfg.d_vocab)
    if len(words) < 10 * len(LETTERS):
        return None
    rng = random.Random(seed)
    rng.shuffle(words)
    examples, words = words[:ICL_EXAMPLES], words[ICL_EXAMPLES:ICL_EXAMPLES + MAX_WORDS]
    prefix_text = "".join(f"{w}{TEMPLATE} {w[0].upper()}\n" for _, w in examples)
    prefix = tokenizer(prefix_text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prefix = [tokenizer.bos_token_id, *prefix]
    suffix = tokenizer(TEMPLATE, add_special_tokens=False)["input_ids"]
    position = len(prefix)
    stop = stop_at_layer([hook], model.cfg.n_layers)
    acts = []
    for start in range(0, len(words), batch_size):
        ids = [[*prefix, token_id, *suffix] for token_id, _ in words[start:start + batch_size]]
        tokens = torch.tensor(ids, device=model.cfg.device)
        _, cache = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=stop)
        acts.append(cache[hook][:, position].float().cpu())
    letters = torch.tensor([LETTERS.index(w[0].lower()) for _, w in words])
    return torch.cat(acts), letters
