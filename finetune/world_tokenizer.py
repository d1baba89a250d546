"""An open-vocabulary byte-level BPE tokenizer for the world models (CLIP's tokenizer format, small vocabulary).

Every byte is in the vocabulary (alone and word-final, as in CLIP's tokenizer), so any text encodes: the
tokenizer is open-vocabulary. On top of the 512 byte tokens, BPE merges are learned from world text (captions,
paragraphs, phrases and referring expressions of training scenes) so that world words are one token each and
sequences stay short. Specials: `<pad>`, `<|startoftext|>` and `<|endoftext|>`, placed last in this order: BOS > 0 (the OWL-ViT
query mask treats a query whose first id is 0 as padding) and EOS is the highest id (OWL-ViT's text tower pools
the hidden state at the argmax id of each sequence, meant to be EOS).

The result is a transformers `CLIPTokenizer` (the tokenizers-library backend), saved with the model folders.
The vocabulary is a few hundred tokens above 512, so the text embedding tables stay small (the bundle budget);
SmolLM2's 49k-token table would dominate an 80 MB bundle. This module knows nothing about models.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from functools import lru_cache
from typing import Any

from toolvlm.world import annotate, sample_scene, vocabulary

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<|startoftext|>", "<|endoftext|>", "<pad>"
# the word split of CLIP's pre-tokenizer (letters, single digits, runs of other symbols)
_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+")
TOKENIZER_SEED_BASE = 7_000_000  # scenes used to learn merges (training seeds; any scene would do)


def world_corpus(n_scenes: int = 400) -> list[str]:
    """World texts to learn merges from: the vocabulary plus captions, paragraphs and expressions of scenes."""
    texts = list(vocabulary())
    for i in range(n_scenes):
        a = annotate(sample_scene(TOKENIZER_SEED_BASE + i))
        texts += [a["caption"], a["paragraph"], *(r["text"] for r in a["referring"])]
    texts += [f"there is no {w}" for w in vocabulary()] + [str(n) for n in range(100)]
    return texts


def learn_merges(texts: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE merges over the word counts of `texts` (words end with '</w>', as in CLIP)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_char = bytes_to_unicode()
    words = Counter()
    for text in texts:
        for w in _WORDS.findall(text.lower()):
            chars = [byte_char[b] for b in w.encode("utf-8")]
            chars[-1] += "</w>"
            words[tuple(chars)] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for word, n in words.items():
            for a, b in zip(word, word[1:], strict=False):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), _n = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append((a, b))
        merged: Counter = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


@lru_cache(maxsize=4)
def _merges(num_merges: int, n_scenes: int) -> tuple[tuple[str, str], ...]:
    return tuple(learn_merges(world_corpus(n_scenes), num_merges))


def build_tokenizer(max_length: int = 64, num_merges: int = 600, n_scenes: int = 400):
    """A CLIPTokenizer: 512 byte tokens, learned merges, then BOS, EOS and PAD (deterministic)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.clip import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = list(_merges(num_merges, n_scenes))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for special in (PAD, BOS, EOS):  # EOS highest: OWL-ViT's text tower pools at the argmax id
        vocab[special] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=PAD)
    tokenizer.model_max_length = max_length
    log.info("world tokenizer: %d tokens (%d merges)", len(tokenizer), len(merges))
    return tokenizer


def special_ids(tokenizer) -> dict[str, int]:
    """bos/eos/pad token ids for model configs."""
    return {
        "bos_token_id": tokenizer.convert_tokens_to_ids(BOS),
        "eos_token_id": tokenizer.convert_tokens_to_ids(EOS),
        "pad_token_id": tokenizer.convert_tokens_to_ids(PAD),
    }


def reorder_specials(tokenizer: Any, embeddings: Any) -> Any:
    """A tokenizer with the specials in today's order (EOS highest) for a model trained with an older order:
    the same words and merges, and the embedding rows of the specials moved to their new ids (in place).
    Returns the tokenizer to use (the given one when it is in order already)."""
    import torch

    old = {name: tokenizer.convert_tokens_to_ids(name) for name in (PAD, BOS, EOS)}
    if old[EOS] == len(tokenizer) - 1:
        return tokenizer
    vocab = dict(tokenizer.get_vocab())
    first = min(old.values())
    for i, name in enumerate((PAD, BOS, EOS)):
        vocab[name] = first + i
    from transformers.models.clip import CLIPTokenizer

    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _backend_merges(tokenizer)]
    fixed = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=PAD)
    fixed.model_max_length = tokenizer.model_max_length
    with torch.no_grad():
        rows = {name: embeddings.weight[old[name]].clone() for name in old}
        for name, row in rows.items():
            embeddings.weight[vocab[name]] = row
    log.info("reordered the tokenizer's specials: %s -> %s", old, {n: vocab[n] for n in old})
    return fixed


def _backend_merges(tokenizer: Any) -> list:
    import json

    return json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
