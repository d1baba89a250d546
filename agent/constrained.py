"""Constrained decoding of tool calls: the JSON inside `<tool_call>...</tool_call>` must fit a tool's schema.

Built on llguidance (the grammar engine behind structured outputs in llama.cpp, vLLM and SGLang): one Lark
grammar lets the model write free text, and once it writes `<tool_call>` (a lazy trigger) forces one JSON object
`{"name": <a tool>, "arguments": <that tool's schema>}` and the closing tag, any number of times. Image
arguments are narrowed to the handles that exist; strings and arrays without a bound get one, so a weak model
cannot run on forever inside a call. `ToolCallLogitsProcessor` applies the grammar as a transformers logits
processor (it works with `model.generate` and with toolvlm's cached engine); with the engine it also
fast-forwards: the parts of a call the grammar fixes (`{"name": "`, the rest of a tool's name, `", "arguments":
{"image": "img_0", ...`) are fed in one forward pass, not decoded token by token (24 of a box call's 35 tokens).

Why llguidance: one wheel with no Python dependencies that installs beside torch 2.13 CPU; it builds its token
tables from any HF fast tokenizer in milliseconds, has lazy triggers for calls inside free text, and computed a
mask in about 50 microseconds here (bench/tool_call_decoding.py). Of the others, xgrammar's install pulls
triton and apache-tvm-ffi on this CPU machine; lm-format-enforcer, outlines and transformers-cfg were not
needed once llguidance did all of the above, so they were not measured.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

import numpy as np
import torch

from .protocol import CALL_CLOSE, CALL_OPEN

logger = logging.getLogger(__name__)

IMAGE_FORMAT = "image"
MAX_NUMBER = 1_000_000  # numbers without bounds get these, so a weak model cannot write digits forever
KEY_PATTERN = '^[^"\\\\]{1,40}$'  # a free property name: 1-40 characters, no quote or backslash
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
    except ImportError as err:  # pragma: no cover - it is a dependency of toolvlm
        raise ImportError("constrained decoding needs llguidance: pip install llguidance") from err
    return llguidance


def call_schema(
    schemas: list[dict[str, Any]], handles: list[str], max_string: int = 200, max_items: int = 32
) -> dict[str, Any]:
    """The JSON schema of one call to any of the tools: {"name": const, "arguments": the tool's schema}."""
    if not schemas:
        raise ValueError("constrained decoding needs at least one tool schema")
    variants = []
    for schema in schemas:
        arguments = tighten(schema.get("parameters") or {"type": "object"}, handles, max_string, max_items)
        variants.append(
            {
                "type": "object",
                "properties": {"name": {"const": schema["name"]}, "arguments": arguments},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return {"anyOf": variants, "x-guidance": JSON_STYLE}


def tighten(schema: dict[str, Any], handles: list[str], max_string: int, max_items: int) -> dict[str, Any]:
    """A copy of an argument schema for decoding: image handles as an enum, bounded strings, numbers and
    arrays, no extra properties."""
    out = copy.deepcopy(schema)
    for key in ("description", "default", "title", "examples"):
        out.pop(key, None)
    if out.get("format") == IMAGE_FORMAT:
        if handles:
            return {"enum": list(handles)}
        return {"type": "string", "pattern": "^img_[0-9]{1,3}$"}
    kind = out.get("type")
    if kind == "object" or "properties" in out:
        out["properties"] = {
            k: tighten(v, handles, max_string, max_items) for k, v in out.get("properties", {}).items()
        }
        extra = out.get("additionalProperties")
        if isinstance(extra, dict):  # free keys (e.g. {"person": 2}): bounded names, a bounded number of them
            out["patternProperties"] = {KEY_PATTERN: tighten(extra, handles, max_string, max_items)}
            out["maxProperties"] = min(out.get("maxProperties", max_items), max_items)
        out["additionalProperties"] = False
    if kind == "string" and "enum" not in out and "pattern" not in out:
        out["maxLength"] = min(out.get("maxLength", max_string), max_string)
    if kind in ("number", "integer"):  # bounds the digits before the point (llguidance builds range regexes)
        out.setdefault("minimum", -MAX_NUMBER)
        out.setdefault("maximum", MAX_NUMBER)
    if kind == "array":
        out["maxItems"] = min(out.get("maxItems", max_items), max_items)
        if isinstance(out.get("items"), dict):
            out["items"] = tighten(out["items"], handles, max_string, max_items)
    for key in ("anyOf", "oneOf"):
        if key in out:
            out[key] = [tighten(s, handles, max_string, max_items) for s in out[key]]
    return out


def lark_grammar(schemas: list[dict[str, Any]], handles: list[str], mode: str = "auto", **bounds: Any) -> str:
    """The Lark grammar of a reply: free text with any number of calls ("auto"), or exactly one call and
    nothing else ("required")."""
    body = f"%json {json.dumps(call_schema(schemas, handles, **bounds))} {json.dumps(CALL_CLOSE)}"
    if mode == "auto":
        return (
            "%llguidance {}\n"
            "start: call* TEXT\n"
            f"call_open[lazy]: TEXT {json.dumps(CALL_OPEN)}\n"
            f"call: call_open {body}\n"
            "TEXT: /(.|\\n)*/\n"
        )
    if mode == "required":
        return f"%llguidance {{}}\nstart: {json.dumps(CALL_OPEN)} {body}\n"
    raise ValueError(f"unknown constraint mode {mode!r}; modes are 'auto' and 'required'")


class ToolCallGrammar:
    """Compiles tool-call grammars for one tokenizer (token tables built once, compiled grammars cached)."""

    def __init__(self, tokenizer: Any, stop_token_ids: list[int] | None = None, cache_size: int = 32):
        llg = _llguidance()
        self._llg = llg
        eos = list(stop_token_ids or []) or tokenizer.eos_token_id
        self.tokenizer = tokenizer
        self.ll_tokenizer = llg.hf.from_tokenizer(tokenizer, eos_token=eos)
        self.cache_size = cache_size
        self._compiled: dict[str, Any] = {}  # grammar text -> a fresh matcher to copy

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher for a Lark grammar (compiled once, then copied: compiling takes milliseconds)."""
        template = self._compiled.get(grammar)
        if template is None:
            template = self._llg.LLMatcher(self.ll_tokenizer, self._llg.LLMatcher.grammar_from_lark(grammar))
            if template.is_error():
                raise ValueError(f"invalid tool-call grammar: {template.get_error()}")
            if len(self._compiled) >= self.cache_size:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[grammar] = template
        return template.deep_copy()

    def logits_processor(
        self, schemas: list[dict[str, Any]], handles: list[str], mode: str = "auto", **bounds: Any
    ) -> ToolCallLogitsProcessor:
        """A fresh logits processor for one generation."""
        grammar = lark_grammar(schemas, handles, mode, **bounds)
        return ToolCallLogitsProcessor(self, grammar)


class ToolCallLogitsProcessor:
    """A transformers logits processor enforcing a tool-call grammar on the generated tokens (any batch).

    `forced_tokens` says which tokens the grammar allows as the only continuation (llguidance's fast-forward:
    inside a call, `{"name": "`, the rest of a tool's name, `", "arguments": {"image": "` ...), so that an
    engine can feed them in one forward instead of decoding them one by one."""

    def __init__(self, compiler: ToolCallGrammar, grammar: str):
        self.compiler = compiler
        self.grammar = grammar
        self.n_vocab = compiler.ll_tokenizer.vocab_size
        self.words = (self.n_vocab + 31) // 32
        self.matchers: list[Any] | None = None
        self._mask: np.ndarray | None = None  # one row of 32-bit words per sequence: bit i allows token i
        self._length = 0  # tokens of the sequences the matchers have seen (the prompt, then generated ones)

    def _consume(self, new: list[list[int]]) -> None:
        """Feed each matcher its row's tokens since the last call (`new`: one list per row, of equal length)."""
        assert self.matchers is not None
        for matcher, row in zip(self.matchers, new, strict=True):
            if matcher.is_stopped():
                continue
            for token in row:
                if not matcher.consume_token(int(token)):
                    raise RuntimeError(
                        f"constrained decoding: token {int(token)} was generated against the grammar "
                        f"({matcher.get_error()}); another logits processor may have undone the mask"
                    )
        self._length += len(new[0])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        batch = input_ids.shape[0]
        if self.matchers is None:
            self.matchers = [self.compiler.matcher(self.grammar) for _ in range(batch)]
            self._mask = np.zeros((batch, self.words), dtype=np.uint32)
            self._length = input_ids.shape[1]
        else:
            self._consume(input_ids[:, self._length :].tolist())
        for row, matcher in enumerate(self.matchers):
            matcher.unsafe_compute_mask_ptr(self._mask[row].ctypes.data, self.words * 4)
        allowed = np.unpackbits(self._mask.view(np.uint8), axis=1, bitorder="little")
        width = scores.shape[-1]
        if width > allowed.shape[1]:
            allowed = np.pad(allowed, ((0, 0), (0, width - allowed.shape[1])))
        blocked = torch.from_numpy(allowed[:, :width] == 0).to(scores.device)
        return scores.masked_fill(blocked, float("-inf"))

    def forced_tokens(self, sequence: list[int]) -> list[int]:
        """The tokens the grammar forces after `sequence` (prompt + generated so far; batch of one), [] when
        the next token is the model's choice."""
        if self.matchers is None or len(self.matchers) != 1 or self.matchers[0].is_stopped():
            return []
        self._consume([sequence[self._length :]])
        return list(self.matchers[0].compute_ff_tokens())
