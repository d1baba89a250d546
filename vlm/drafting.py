"""Draft tokens for speculative decoding from n-gram statistics, with no draft model.

Decoding a small LM on a CPU is memory-bound: a forward pass over 13 tokens costs about 1.8 times one over a
single token (SmolLM2-135M, fp32, 2 cores), so checking a guess of 12 tokens in one pass is nearly free when the
guess is good. The guesses come from two tables of n-gram continuations (the idea of prompt-lookup decoding and
of REST, He et al. 2023, retrieval-based speculative decoding):

- a corpus: texts like the model's replies (for toolvlm's bundle, the assistant turns of the controller's
  training set, `draft_corpus.jsonl` next to the weights);
- the running sequence itself: the prompt and what was generated so far (a reply copying a tool's boxes).

The longest context seen in either table proposes its most frequent next token, one token at a time up to
`max_draft`; a context whose top continuation has less than `min_share` of its occurrences stops the draft. The
engine keeps only the tokens the model would have chosen itself (greedy), so drafts change speed, never text.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

CORPUS_FILE = "draft_corpus.jsonl"  # one JSON string per line, next to a checkpoint's weights


@dataclass
class DraftConfig:
    """How far and how confidently the drafter guesses."""

    max_n: int = 6  # the longest context looked up
    max_draft: int = 12  # tokens proposed per forward pass
    min_share: float = 0.3  # a continuation seen less often than this share of its context stops the draft


class Drafter(Protocol):
    """What the engine asks of a drafter."""

    def propose(self, sequence: Sequence[int], limit: int | None = None) -> list[int]:
        """Guessed next tokens of `sequence` (at most `limit`), never a stop token."""
        ...


class _Table:
    """Counts of the token that follows each context of 1..max_n tokens."""

    def __init__(self, max_n: int):
        self.max_n = max_n
        self.counts: dict[tuple[int, ...], Counter] = defaultdict(Counter)

    def add(self, tokens: Sequence[int], start: int = 0) -> None:
        """Count the continuations of every context that ends before position i, for i >= start."""
        for i in range(max(start, 1), len(tokens)):
            for n in range(1, min(self.max_n, i) + 1):
                self.counts[tuple(tokens[i - n : i])][tokens[i]] += 1

    def lookup(self, tokens: Sequence[int]) -> tuple[int, Counter | None]:
        """The longest context ending `tokens` that the table has seen, and its counts."""
        for n in range(min(self.max_n, len(tokens)), 0, -1):
            counts = self.counts.get(tuple(tokens[-n:]))
            if counts:
                return n, counts
        return 0, None


class NgramDrafter:
    """Proposes the next tokens of a sequence from a corpus' n-grams and the sequence's own."""

    def __init__(
        self,
        corpus: Iterable[Sequence[int]] = (),
        config: DraftConfig | None = None,
        stop_token_ids: Iterable[int] = (),
    ):
        self.config = config or DraftConfig()
        self.stop_token_ids = set(stop_token_ids)
        self._pending: Iterable[Sequence[int]] | None = corpus  # counted at the first proposal, not at load
        self._corpus = _Table(self.config.max_n)
        self._history = _Table(self.config.max_n)
        self._indexed: list[int] = []

    @classmethod
    def from_texts(cls, tokenizer: Any, texts: Iterable[str], **kwargs: Any) -> NgramDrafter:
        """A drafter whose corpus is `texts`, tokenised as the model's replies are (no special tokens), lazily."""
        texts = [t for t in texts if t.strip()]
        return cls(_Tokenised(tokenizer, texts), **kwargs)

    @classmethod
    def from_file(cls, path: str | Path, tokenizer: Any, **kwargs: Any) -> NgramDrafter:
        """A drafter over a corpus file written by `write_corpus`."""
        return cls.from_texts(tokenizer, read_corpus(path), **kwargs)

    def _count_corpus(self) -> None:
        if self._pending is not None:
            for tokens in self._pending:
                self._corpus.add(list(tokens))
            self._pending = None
            logger.debug("draft corpus: %d contexts", len(self._corpus.counts))

    def _index(self, sequence: Sequence[int]) -> None:
        """Bring the sequence's own table up to `sequence`: extend it, or rebuild it for a new sequence."""
        known = len(self._indexed)
        if len(sequence) < known or list(sequence[:known]) != self._indexed:
            self._history, self._indexed, known = _Table(self.config.max_n), [], 0
        self._history.add(sequence, start=known)
        self._indexed.extend(sequence[known:])

    def _next(self, tokens: list[int]) -> int | None:
        n_seq, seen = self._history.lookup(tokens)
        n_corpus, counts = self._corpus.lookup(tokens)
        if counts is None or (seen is not None and n_seq >= n_corpus):
            counts = seen
        if counts is None:
            return None
        token, count = counts.most_common(1)[0]
        if count < self.config.min_share * sum(counts.values()) or token in self.stop_token_ids:
            return None
        return token

    def propose(self, sequence: Sequence[int], limit: int | None = None) -> list[int]:
        """Up to `limit` (default `max_draft`) guessed next tokens of `sequence`; never a stop token."""
        self._count_corpus()
        self._index(sequence)
        limit = self.config.max_draft if limit is None else min(limit, self.config.max_draft)
        tokens, draft = list(sequence), []
        while len(draft) < limit:
            token = self._next(tokens)
            if token is None:
                break
            draft.append(token)
            tokens.append(token)
        return draft


class _Tokenised:
    """Texts tokenised when first iterated."""

    def __init__(self, tokenizer: Any, texts: list[str]):
        self.tokenizer, self.texts = tokenizer, texts

    def __iter__(self):
        if not self.texts:
            return iter(())
        return iter(self.tokenizer(self.texts, add_special_tokens=False)["input_ids"])


def write_corpus(texts: Iterable[str], path: str | Path) -> Path:
    """Write texts as a draft corpus: JSON lines, one string each."""
    path = Path(path)
    path.write_text("".join(json.dumps(t) + "\n" for t in texts if t.strip()), encoding="utf-8")
    return path


def read_corpus(path: str | Path) -> list[str]:
    """The texts of a corpus file written by `write_corpus`."""
    texts = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), 1):
        if line.strip():
            text = json.loads(line)
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number}: a draft corpus line must be a JSON string")
            texts.append(text)
    return texts
