"""A logits processor that stops a reply from looping: no n-gram of the reply's own tokens twice.

Small greedy controllers fall into loops ('red, white, blue, purple, red, white, blue, ...') that run to the
token limit. transformers' `NoRepeatNGramLogitsProcessor` reads the whole sequence, prompt included, so it would
also forbid copying the user's words into a tool call ('the red frisbee next to the dog'). This one looks only
at the tokens generated since its first call (the prompt length is taken then), and it never bans the last
token another processor (a tool-call grammar) left allowed.
"""

from __future__ import annotations

import torch


class NoRepeatReplyNGram:
    """Ban the token that would repeat an n-gram already in this reply (use one instance per reply)."""

    def __init__(self, n: int) -> None:
        if n < 2:
            raise ValueError(f"no_repeat_ngram must be >= 2, got {n}")
        self.n = n
        self.prompt_length: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Scores with the repeating tokens set to -inf (batch of one)."""
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        reply = input_ids[0, self.prompt_length :].tolist()
        k = self.n - 1
        if len(reply) < self.n:
            return scores
        tail = reply[-k:]
        banned = {reply[i + k] for i in range(len(reply) - k) if reply[i : i + k] == tail}
        if not banned:
            return scores
        out = scores.clone()
        out[0, list(banned)] = float("-inf")
        if not torch.isfinite(out).any():  # everything else was already excluded: keep the grammar's choice
            return scores
        return out
