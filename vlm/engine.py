"""The generation engine of LLaVA-family models: token ids and images in, streamed tokens out, with two caches.

- Image features: each image (by content hash) is encoded by the vision tower and projector once; later turns
  and tool steps reuse the features.
- KV cache of the conversation prefix: the engine keeps the cache of the last sequence it ran. A new request
  is compared with it position by position (image positions compare by image, not by placeholder id); the
  cache is cropped to the common prefix and only the rest is prefilled. Greedy output is the same as
  recomputing from scratch (a test and `bench/cache_reuse.py` check it).
- Forced tokens: a logits processor with `forced_tokens(sequence)` (the tool-call grammar) can name tokens that
  are the only continuation; they are fed in one forward pass instead of one decoding step each.
- Drafted tokens (greedy decoding, with a `drafter`, see `drafting.py`): guessed next tokens are fed with the
  decoded one in one forward pass; the longest prefix the model agrees with (its argmax after the logits
  processors, position by position) is kept, the rest is cropped from the cache. A pass over several tokens
  rounds differently from a one-token pass (other matmul blockings, a masked attention kernel), so a near-tie
  between the top two tokens can flip: a drafted position whose top two scores lie within `TIE_MARGINS[dtype]`
  is run again alone, as plain decoding runs it. In bf16 the rounding differences are as large as common
  margins, so bf16 (and fp16) decode without drafts unless `tie_margin` is set: the text is always the
  one-token greedy text (a bf16 test over many prompts compares them token by token). With `tie_margin` set,
  accepted drafted positions keep the multi-token pass's keys and values, so a later token can still differ,
  but only where one-token decoding chose between two scores within the margin (tested).
- One-token decode steps of a LLaMA language model run through `fast_decode.LlamaDecodeStep` (fused
  projections, a preallocated KV cache, no module overhead): the same logits, bit for bit, as the model's
  forward, which still runs the prefill and every pass over several tokens. Other models decode with their
  forward; `fast_decode=False` turns the step off. `decode_kernels="prepacked"` runs the step's linears on
  oneDNN weights reordered once and its attention in fp32 (faster on CPUs, a second copy of the weights; the
  logits round differently, so a near-tie may decode another token than the model's forward would).

The engine knows token ids, image spans and the model's forward; it knows nothing of chat formats or text.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import DynamicCache, LogitsProcessorList
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .drafting import Drafter
from .fast_decode import BufferLayer, LlamaDecodeStep, buffer_cache
from .images import image_key

logger = logging.getLogger(__name__)

# How close the top two scores of a drafted row may be before the row is run again alone, by the model's dtype
# (see `_verify`). Measured on SmolLM2-135M, a pass over 13 tokens and one-token passes differ by up to 5e-5 of
# a logit in fp32, but by up to 0.84 in bf16, where top-two margins of 0.125-0.375 are common: a safe margin
# would send most drafted rows back, so dtypes without an entry decode without drafts.
TIE_MARGINS: dict[torch.dtype, float] = {torch.float32: 0.01}


@dataclass
class SamplingConfig:
    """How the next token is chosen, and when to stop."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)


@dataclass
class EngineStats:
    """What the last `prefill` / `generate` call did: how many tokens were reused, prefilled and generated."""

    reused_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    forced_tokens: int = 0  # of the generated: fed together after a grammar forced them (no decoding step)
    drafted_tokens: int = 0  # guesses a drafter proposed (checked in the forward pass of the decoded token)
    accepted_tokens: int = 0  # of the generated: guesses the model agreed with
    rechecked_tokens: int = 0  # drafted positions run again alone: their top two scores were a near-tie
    forward_passes: int = 0  # after the prefill
    fast_steps: int = 0  # of the forward passes: one-token steps run by the LLaMA decode step
    encoded_images: int = 0
    cached_images: int = 0


class LlavaEngine:
    """Cached, streaming generation for a `LlavaForConditionalGeneration`-compatible model (peft-wrapped too)."""

    def __init__(
        self,
        model: torch.nn.Module,
        image_processor: object,
        image_token_id: int,
        max_cached_images: int = 64,
        tie_margin: float | None = None,
        fast_decode: bool = True,
        decode_kernels: str = "exact",
    ):
        self.model = model
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.max_cached_images = max_cached_images
        self.tie_margin = tie_margin  # None: by the model's dtype (TIE_MARGINS; no entry: no drafts)
        self._features: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache: DynamicCache | None = None
        self._cache_keys: list[object] = []
        self.stats = EngineStats()
        self.fast_decode = fast_decode  # one-token steps of a LLaMA LM by `LlamaDecodeStep` (same logits)
        self.decode_kernels = decode_kernels  # the step's linears: fast_decode.KERNELS
        self._fast: LlamaDecodeStep | None = None
        self._fast_checked = False

    # -- caches -------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget cached image features and the KV cache."""
        self._features.clear()
        self._cache, self._cache_keys = None, []

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @torch.inference_mode()
    def image_features(
        self, images: Sequence[Image.Image], keys: Sequence[str] | None = None
    ) -> list[torch.Tensor]:
        """Projected features of each image, (n_tokens, hidden), computed once per distinct image."""
        keys = [image_key(im) for im in images] if keys is None else list(keys)
        missing = [(k, im) for k, im in zip(keys, images, strict=True) if k not in self._features]
        missing = list(dict(missing).items())
        if missing:
            pixels = self.image_processor(images=[im for _, im in missing], return_tensors="pt")[
                "pixel_values"
            ]
            pixels = pixels.to(self.device, self.dtype)
            feats = self.model.get_image_features(pixel_values=pixels).pooler_output
            for (key, _), feat in zip(missing, feats, strict=True):
                self._features[key] = feat
        self.stats.encoded_images += len(missing)
        self.stats.cached_images += len(keys) - len(missing)
        for key in keys:
            self._features.move_to_end(key)
        while len(self._features) > self.max_cached_images:
            self._features.popitem(last=False)
        return [self._features[k] for k in keys]

    def _keys(self, ids: Sequence[int], image_spans: Sequence[tuple[int, int]], keys: Sequence[str]) -> list:
        seq: list[object] = list(ids)
        for (start, end), key in zip(image_spans, keys, strict=True):
            for offset in range(end - start):
                seq[start + offset] = (key, offset)
        return seq

    # -- forward ------------------------------------------------------------------------------------------

    def _embed(
        self,
        ids: Sequence[int],
        start: int,
        image_spans: Sequence[tuple[int, int]],
        features: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Input embeddings of ids[start:], with image features placed at their spans."""
        tail = torch.tensor([ids[start:]], device=self.device)
        embeds = self.model.get_input_embeddings()(tail)
        for (a, b), feat in zip(image_spans, features, strict=True):
            if feat.shape[0] != b - a:
                raise ValueError(
                    f"Image features and image tokens do not match: tokens: {b - a}, features: {feat.shape[0]}"
                )
            lo, hi = max(a, start), b
            if lo < hi:
                embeds[0, lo - start : hi - start] = feat[lo - a : hi - a].to(embeds.dtype)
        return embeds

    def _decode_step(self) -> LlamaDecodeStep | None:
        """The LLaMA decode step for the model's current weights, built at first use; None where it does not apply."""
        if not self.fast_decode:
            return None
        if self._fast is not None and (
            not self._fast.is_current() or self._fast.kernels != self.decode_kernels
        ):
            self._fast, self._fast_checked = None, False  # weights or kernels changed: build again
        if not self._fast_checked:
            self._fast, self._fast_checked = LlamaDecodeStep.build(self.model, self.decode_kernels), True
        return self._fast

    def _forward(self, embeds: torch.Tensor, keep: int = 1) -> torch.Tensor:
        """Logits of the last `keep` positions, (keep, vocab)."""
        out = self.model(inputs_embeds=embeds, cache=self._cache, use_cache=True, logits_to_keep=keep)
        self._cache = out.cache
        return out.logits[0, -keep:, :].float()

    @torch.inference_mode()
    def prefill(
        self,
        ids: Sequence[int],
        images: Sequence[Image.Image] = (),
        image_spans: Sequence[tuple[int, int]] = (),
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Run the prompt through the model, reusing the cached prefix; return the last position's logits."""
        self.stats = EngineStats()
        if len(images) != len(image_spans):
            raise ValueError(f"{len(images)} images for {len(image_spans)} image token runs")
        if not ids:
            raise ValueError("cannot generate from an empty prompt")
        image_tokens = sum(1 for i in ids if i == self.image_token_id)
        span_tokens = sum(b - a for a, b in image_spans)
        if image_tokens != span_tokens:
            raise ValueError(
                f"Image features and image tokens do not match: tokens: {image_tokens}, "
                f"features: {span_tokens} (the prompt's image placeholders and its images disagree)"
            )
        image_keys = [image_key(im) for im in images]
        features = self.image_features(images, image_keys)
        keys = self._keys(ids, image_spans, image_keys)
        reuse = 0
        if use_cache and self._cache is not None:
            limit = min(len(keys), len(self._cache_keys), len(ids) - 1)  # at least one token must run
            while reuse < limit and keys[reuse] == self._cache_keys[reuse]:
                reuse += 1
        fast = self._decode_step()
        if reuse > 0 and (fast is not None) != self._buffered():
            reuse = 0  # the step appeared or went: start a cache of the kind it needs
        if reuse == 0:
            self._cache = (
                buffer_cache(self.model.config)
                if fast is not None
                else DynamicCache(config=self.model.config)
            )
        elif reuse < len(self._cache_keys):
            self._cache.crop(reuse - len(self._cache_keys))
        self.stats.reused_tokens, self.stats.prefilled_tokens = reuse, len(ids) - reuse
        try:
            logits = self._forward(self._embed(ids, reuse, image_spans, features))
        except BaseException:  # an interrupted forward leaves layers half-updated: drop the cache
            self._cache, self._cache_keys = None, []
            raise
        self._cache_keys = keys
        return logits

    def _step(self, tokens: list[int], keep: int = 1) -> torch.Tensor:
        """Run new tokens (one decoded, several forced, or decoded + drafted) through the model on the cache;
        logits of the last `keep` positions."""
        embeds = self.model.get_input_embeddings()(torch.tensor([tokens], device=self.device))
        fast = self._fast if len(tokens) == 1 and self._buffered() else None
        try:
            if fast is not None:
                logits = fast(embeds, self._cache).float()
                self.stats.fast_steps += 1
            else:
                logits = self._forward(embeds, keep)
        except BaseException:  # e.g. Ctrl-C mid-token
            self._cache, self._cache_keys = None, []
            raise
        self._cache_keys.extend(tokens)
        self.stats.forward_passes += 1
        return logits

    def _buffered(self) -> bool:
        return self._cache is not None and isinstance(self._cache.layers[0], BufferLayer)

    def _drop(self, n: int) -> None:
        """Forget the cache's last `n` positions (rejected drafts)."""
        if n > 0:
            self._cache.crop(-n)
            del self._cache_keys[-n:]

    # -- decoding -----------------------------------------------------------------------------------------

    def _processors(self, cfg: SamplingConfig, extra: LogitsProcessorList | None) -> LogitsProcessorList:
        procs = LogitsProcessorList(extra or [])
        if cfg.do_sample:
            if cfg.temperature <= 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {cfg.temperature}")
            if cfg.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(cfg.temperature))
            if cfg.top_k > 0:
                procs.append(TopKLogitsWarper(cfg.top_k))
            if cfg.top_p < 1.0:
                procs.append(TopPLogitsWarper(cfg.top_p))
        return procs

    @torch.inference_mode()
    def generate(
        self,
        ids: Sequence[int],
        images: Sequence[Image.Image] = (),
        image_spans: Sequence[tuple[int, int]] = (),
        config: SamplingConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        use_cache: bool = True,
        should_stop: Callable[[list[int]], bool] | None = None,
        drafter: Drafter | None = None,
    ) -> Iterator[int]:
        """Yield generated token ids one by one; stops at a stop token (not yielded) or `max_new_tokens`.
        A `drafter` speeds up greedy decoding without changing its tokens (ignored when sampling, and in dtypes
        without a `TIE_MARGINS` entry unless the engine's `tie_margin` is set)."""
        cfg = config or SamplingConfig()
        generator = None
        if cfg.do_sample and cfg.seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        procs = self._processors(cfg, logits_processor)
        if cfg.do_sample or (self.tie_margin is None and self.dtype not in TIE_MARGINS):
            drafter = None  # (drafts could change the text: see TIE_MARGINS)
        logits = self.prefill(ids, images, image_spans, use_cache=use_cache)
        history = list(ids)  # prompt + generated ids, as logits processors read them
        generated: list[int] = []
        while len(generated) < cfg.max_new_tokens:
            token = self._choose(procs, history, logits, cfg.do_sample, generator)
            if token in cfg.stop_token_ids:
                break
            forced = self._forced(procs, [*history, token])
            new = [token, *forced][: cfg.max_new_tokens - len(generated)]
            ended = next((i for i, t in enumerate(new) if t in cfg.stop_token_ids), None)
            if ended is not None:  # a forced end of turn: the reply is complete
                new = new[:ended]
            if (yield from self._emit(new, generated, should_stop)):
                return
            if ended is not None or len(generated) >= cfg.max_new_tokens:
                return
            self.stats.forced_tokens += len(new) - 1
            history.extend(new)
            draft = []
            if drafter is not None and not forced:
                draft = drafter.propose(history, cfg.max_new_tokens - len(generated))
            logits = self._step(new + draft, keep=len(draft) + 1)
            accepted: list[int] = []
            if draft:
                accepted, logits = self._verify(procs, history, draft, logits, cfg.stop_token_ids)
            if (yield from self._emit(accepted, generated, should_stop)):
                return
            history.extend(accepted)

    def _verify(
        self,
        procs: LogitsProcessorList,
        history: list[int],
        draft: list[int],
        rows: torch.Tensor,
        stop_token_ids: Sequence[int],
    ) -> tuple[list[int], torch.Tensor]:
        """The drafted guesses one-token greedy decoding keeps, and the logits of the position after them.

        Row i of the drafted pass scores the token after `history + draft[:i]`. A row whose top two scores are
        within `tie_margin` is not trusted: the pass over several tokens rounds differently from a one-token
        pass, so a near-tie may flip. Such a row's position is run again alone, as plain decoding runs it."""
        margin = TIE_MARGINS[self.dtype] if self.tie_margin is None else self.tie_margin
        accepted: list[int] = []
        self.stats.drafted_tokens += len(draft)
        for i in range(len(draft) + 1):
            scores = self._scores(procs, history + accepted, rows[i : i + 1])
            top = scores.topk(2, dim=-1).values[0]
            if float(top[0] - top[1]) <= margin:  # a near-tie: decide it with a one-token pass
                self._drop(len(draft) - len(accepted) + 1)
                self.stats.rechecked_tokens += 1
                return accepted, self._step([(history + accepted)[-1]])
            if i == len(draft) or draft[i] in stop_token_ids or int(scores.argmax(dim=-1)[0]) != draft[i]:
                break  # (the loop decodes the end of turn itself)
            accepted.append(draft[i])
            self.stats.accepted_tokens += 1
        self._drop(len(draft) - len(accepted))
        return accepted, rows[len(accepted) : len(accepted) + 1]

    def _emit(
        self, tokens: list[int], generated: list[int], should_stop: Callable[[list[int]], bool] | None
    ) -> Generator[int, None, bool]:
        """Yield tokens as generated; True when the caller's `should_stop` ends the reply."""
        for t in tokens:
            generated.append(t)
            self.stats.generated_tokens += 1
            yield t
            if should_stop is not None and should_stop(generated):
                return True
        return False

    @staticmethod
    def _choose(
        procs: LogitsProcessorList,
        history: list[int],
        logits: torch.Tensor,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> int:
        """The next token after `history`: sampled, or the argmax (greedy)."""
        scores = LlavaEngine._scores(procs, history, logits)
        if sample:
            probs = torch.softmax(scores, dim=-1).cpu()
            return int(torch.multinomial(probs, 1, generator=generator)[0, 0])
        return int(scores.argmax(dim=-1)[0])

    @staticmethod
    def _scores(procs: LogitsProcessorList, history: list[int], logits: torch.Tensor) -> torch.Tensor:
        """The logits after the processors (a grammar, a ban on repeats, sampling warpers)."""
        return procs(torch.tensor([history]), logits) if procs else logits

    @staticmethod
    def _forced(procs: LogitsProcessorList, sequence: list[int]) -> list[int]:
        """Tokens a processor forces after `sequence`, fed in one forward pass instead of decoded one by one:
        a grammar's fast-forward, the bytes it allows as the only continuation in their canonical tokens (the
        split the model was trained on)."""
        for proc in procs:
            forced = getattr(proc, "forced_tokens", None)
            if forced is not None:
                tokens = forced(sequence)
                if tokens:
                    return tokens
        return []
