"""Speculative decoding with n-gram drafts: the drafter's guesses, and the engine keeping exactly greedy text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures_vlm import chat, make_tokenizer, random_image, save_wide_llama, tiny_lm_dir, tiny_spec  # noqa: F401
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor

from toolvlm.vlm import build_vlm, load_vlm
from toolvlm.vlm.drafting import CORPUS_FILE, DraftConfig, NgramDrafter, read_corpus, write_corpus
from toolvlm.vlm.engine import SamplingConfig

WIDE_INIT = 0.15


def test_drafter_continues_the_corpus_and_the_sequence_itself():
    corpus = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [1, 2, 3, 9]]
    drafter = NgramDrafter(corpus, DraftConfig(max_n=3, max_draft=4))
    assert drafter.propose([7, 1, 2]) == [3, 4, 5, 6]  # the most frequent continuation, up to max_draft
    assert drafter.propose([7, 1, 2], limit=2) == [3, 4]
    assert drafter.propose([40, 41]) == []  # nothing known
    # the sequence's own n-grams: a reply copying numbers from earlier in the prompt
    assert drafter.propose([40, 41, 42, 43, 0, 40, 41]) == [42, 43, 0, 40]
    # a longer context in the sequence wins over a shorter one in the corpus
    assert drafter.propose([8, 2, 3, 77, 8, 2, 3]) == [77, 8, 2, 3]


def test_drafter_stops_at_uncertain_contexts_and_stop_tokens():
    corpus = [[1, 2, 3], [1, 2, 4], [1, 2, 5], [6, 7, 0, 8]]
    drafter = NgramDrafter(corpus, DraftConfig(max_n=2, min_share=0.5), stop_token_ids=[0])
    assert drafter.propose([1, 2]) == []  # 3, 4 and 5 each follow (1, 2) a third of the time
    assert drafter.propose([6]) == [7]  # 0 is a stop token: never proposed
    assert NgramDrafter(corpus, DraftConfig(max_n=2, min_share=0.3)).propose([1]) == [2, 3]


def test_corpus_file_round_trip(tmp_path):
    texts = ["Here is the tree: [1, 2, 3, 4].", "two\nlines and a \\ backslash", "  ", "naïve ünïcode"]
    path = write_corpus(texts, tmp_path / CORPUS_FILE)
    assert read_corpus(path) == [texts[0], texts[1], texts[3]]  # blank texts dropped
    path.write_text('"fine"\n{"not": "a string"}\n')
    with pytest.raises(ValueError, match=":2: a draft corpus line must be a JSON string"):
        read_corpus(path)


class _Oracle:
    """Proposes the given continuation of a prompt, with every `wrong`-th guess replaced by a wrong token."""

    def __init__(self, prompt_length: int, continuation: list[int], wrong: int, vocab: int, most: int = 6):
        self.start, self.continuation, self.wrong, self.vocab = prompt_length, continuation, wrong, vocab
        self.most, self.proposed = most, 0

    def propose(self, sequence: list[int], limit: int | None = None) -> list[int]:
        done = len(sequence) - self.start
        guess = self.continuation[done : done + min(limit or self.most, self.most)]
        guess = [(t + 1) % self.vocab if (done + i) % self.wrong == 0 else t for i, t in enumerate(guess)]
        self.proposed += len(guess)
        return guess


class _Ban:
    """A logits processor that forbids one token."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, self.token] = float("-inf")
        return scores


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir):  # noqa: F811
    return build_vlm(tiny_spec(tiny_lm_dir), dtype="float32")


def test_engine_keeps_greedy_tokens_with_right_and_wrong_drafts(tiny):
    engine = tiny.engine
    r = tiny.render(chat(1), [random_image(3)], add_generation_prompt=True)
    vocab = tiny.model.config.text_config.vocab_size

    def run(drafter=None, procs=None, **config) -> list[int]:
        engine.reset()
        cfg = SamplingConfig(**{"max_new_tokens": 24, **config})
        return list(engine.generate(r.input_ids, r.images, r.image_spans, cfg, procs, drafter=drafter))

    plain = run()
    assert len(plain) == 24 and engine.stats.forward_passes == 23  # the last token needs no pass
    oracle = _Oracle(len(r.input_ids), plain, wrong=4, vocab=vocab)
    assert run(oracle) == plain
    stats = engine.stats
    assert 0 < stats.accepted_tokens < stats.drafted_tokens == oracle.proposed
    assert stats.forward_passes < 23 and stats.generated_tokens == 24
    # the cache holds exactly the kept tokens: the next turn's reuse matches a recompute
    follow = r.input_ids + plain + r.input_ids[-3:]
    cached = list(engine.generate(follow, r.images, r.image_spans, SamplingConfig(max_new_tokens=8)))
    assert engine.stats.reused_tokens >= len(r.input_ids) + len(plain) - 1  # (the last one if it was a guess)
    engine.reset()
    assert cached == list(engine.generate(follow, r.images, r.image_spans, SamplingConfig(max_new_tokens=8)))
    # budget and stop tokens hold with drafts
    assert run(_Oracle(len(r.input_ids), plain, 4, vocab), max_new_tokens=7) == plain[:7]
    assert (
        run(_Oracle(len(r.input_ids), plain, 9, vocab), stop_token_ids=[plain[10]])
        == plain[: plain.index(plain[10])]
    )

    # logits processors apply at drafted positions: a ban rejects the guesses it forbids
    def banned():
        return LogitsProcessorList([_Ban(plain[5]), NoRepeatNGramLogitsProcessor(3)])

    constrained = run(procs=banned())
    assert plain[5] not in constrained
    assert run(_Oracle(len(r.input_ids), plain, 1000, vocab), procs=banned()) == constrained


def test_sampling_ignores_the_drafter(tiny):
    r = tiny.render(chat(1), [random_image(3)], add_generation_prompt=True)
    cfg = SamplingConfig(max_new_tokens=10, do_sample=True, seed=3)
    oracle = _Oracle(len(r.input_ids), [1] * 10, wrong=1000, vocab=10)
    with_drafts = list(tiny.engine.generate(r.input_ids, r.images, r.image_spans, cfg, drafter=oracle))
    assert oracle.proposed == 0
    assert with_drafts == list(tiny.engine.generate(r.input_ids, r.images, r.image_spans, cfg))


def test_a_saved_corpus_gives_the_loaded_vlm_its_drafter(tiny, tmp_path):
    images = [random_image(3)]
    plain = tiny.generate(chat(1), images, max_new_tokens=20)
    tiny.save(tmp_path / "vlm")
    assert load_vlm(tmp_path / "vlm").drafter is None
    write_corpus([plain, plain[: len(plain) // 2]], tmp_path / "vlm" / CORPUS_FILE)
    loaded = load_vlm(tmp_path / "vlm", dtype="float32")
    assert isinstance(loaded.drafter, NgramDrafter)
    assert loaded.generate(chat(1), images, max_new_tokens=20) == plain
    assert loaded.engine.stats.accepted_tokens > 0
    assert json.loads((tmp_path / "vlm" / CORPUS_FILE).read_text().splitlines()[0]) == plain


def _save_wide_tiny_lm(folder: Path) -> Path:
    """The wide random LLaMA of fixtures_vlm (bf16 rounding decides its near-ties; the down projection's blocking
    and the masked attention kernel differ between one-token and many-token passes)."""
    return save_wide_llama(folder, seed=0, init=WIDE_INIT)


@pytest.fixture(scope="module")
def wide_bf16(tmp_path_factory):
    return build_vlm(tiny_spec(_save_wide_tiny_lm(tmp_path_factory.mktemp("wide_lm"))), dtype="bfloat16")


def _plain_margin(engine, ids: list[int], tokens: list[int]) -> float:
    """The top-two score gap of one-token greedy decoding at the position after `ids + tokens`."""
    engine.reset()
    logits = engine.prefill(ids)
    for token in tokens:
        logits = engine._step([token])
    top = logits.topk(2, dim=-1).values[0]
    return float(top[0] - top[1])


@pytest.mark.parametrize(
    ("tie_margin", "kernels"), [(None, "exact"), (0.1, "exact"), (None, "prepacked"), (0.1, "prepacked")]
)
def test_drafts_in_bf16_change_no_token_or_only_near_ties(wide_bf16, tie_margin, kernels):
    # None: bf16's default, no drafts: the text is the one-token greedy text. A margin set: drafts run, and a
    # position whose drafted scores are within it runs again alone; but accepted drafted positions keep the
    # keys and values of the multi-token pass, so later steps can round differently too: a token may then
    # differ from one-token decoding only where that decoding chose between two scores within the margin
    # (bf16 logits tie exactly often: a gap of 0.0 or one bf16 step)
    engine, generator = wide_bf16.engine, torch.Generator().manual_seed(0)
    engine.tie_margin, engine.decode_kernels = tie_margin, kernels
    drafted_tokens, accepted, rechecked, changed = 0, 0, 0, 0
    for prompt in range(20):
        ids = torch.randint(3, 380, (16,), generator=generator).tolist()
        cfg = SamplingConfig(max_new_tokens=24)
        engine.reset()
        plain = list(engine.generate(ids, config=cfg))
        engine.reset()
        drafter = _Oracle(len(ids), plain, wrong=7, vocab=300, most=12)  # (the old engine changed prompt 11)
        drafted = list(engine.generate(ids, config=cfg, drafter=drafter))
        assert engine._fast is not None and engine._fast.kernels == kernels
        drafted_tokens += engine.stats.drafted_tokens
        accepted += engine.stats.accepted_tokens
        rechecked += engine.stats.rechecked_tokens
        if drafted != plain:
            assert tie_margin is not None, f"prompt {prompt}: drafts changed the greedy tokens"
            first = next(i for i, (a, b) in enumerate(zip(plain, drafted, strict=False)) if a != b)
            gap = _plain_margin(engine, ids, plain[:first])
            assert gap <= tie_margin, f"prompt {prompt}: token {first} changed, not a near-tie ({gap})"
            changed += 1
    if tie_margin is None:
        assert drafted_tokens == 0
    else:  # guesses were kept, near-ties were decided by one-token passes, most replies are the plain ones
        assert accepted > 0 and rechecked > 0 and changed <= 5
