"""Benchmark: decode speed of the controller's LM against the machine's memory-bandwidth limit.

    python bench/decode_speed.py [--n 4] [--dtype auto] [--bundle DIR] [--max-new-tokens 160]

Decoding one token of a small LM reads every weight of the LM once (and the KV cache), so its speed is bounded
by bandwidth / bytes read per token. The bench measures the read bandwidth (a 1 GB tensor summed, best of 3)
before the first request and after each one and takes the median (a shared machine's bandwidth moves: 24-59
GB/s on the 2-core dev VM within an hour; the spread is reported), counts the bytes one decode step reads (the
LM's weights without the input embedding, whose one row is negligible; the lm head, tied or not; the KV cache
at the mean context), and times, on the same describe requests of the world (`toolvlm eval controller`'s
held-out phrasings, another seed), side by side:

- toolvlm's engine, greedy, drafts off (plain: one-token steps by `toolvlm.vlm.fast_decode.LlamaDecodeStep`, the
  model forward's logits bit for bit), drafts off with the step's oneDNN prepacked kernels
  (`decode_kernels="prepacked"`: a few logits differ in the last bit; the share of replies equal to plain is
  reported), and drafts on (the controller's n-gram draft corpus; the engine decodes without drafts in bf16,
  where they could change the text, so compare with `--dtype float32`);
- transformers' `generate` on the same model, greedy, the same number of new tokens;
- llama.cpp (llama-cpp-python), when `llama_cpp` imports: by default on the GGUF the base LM comes from (its
  quantized weights, not the merged controller: its limit is counted from its own file); with `--gguf` on a GGUF
  of the controller's own LM at the engine's dtype, made by `--save-lm DIR` and llama.cpp's converter, so the
  weights and the limit are the engine's:

      python bench/decode_speed.py --save-lm /tmp/controller_lm
      python llama.cpp/convert_hf_to_gguf.py /tmp/controller_lm --outtype bf16 --outfile /tmp/controller.gguf
      python bench/decode_speed.py --gguf /tmp/controller.gguf

Decode seconds exclude the prefill (timed apart: the engine's prefill alone, `generate` with one new token,
llama.cpp's `eval` of the prompt). Runs alternate per request, so load on the machine hits all alike. Last line:
one JSON object with each figure in tokens per second and its ratio to the limit.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from toolvlm.bundle import bundle_dir
from toolvlm.evaluation.controller import plan_eval
from toolvlm.vlm import load_vlm
from toolvlm.vlm.engine import SamplingConfig
from toolvlm.world import render_scene

BENCH_SEED = 616161  # not the eval's seed
MIN_TIMED_TOKENS = 32  # replies shorter than this are checked for equal tokens but not timed


def read_bandwidth(gigabytes: float = 1.0, repeats: int = 5) -> float:
    """Memory read bandwidth in GB/s: the best of `repeats` sums of a tensor of `gigabytes`."""
    x = torch.ones(int(gigabytes * 1e9 / 4), dtype=torch.float32)
    x.sum()  # touch the pages
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack of a causal LM or of a LLaVA-style model's language model."""
    lm = model.get_decoder() if hasattr(model, "get_decoder") else model
    return getattr(lm, "language_model", lm)


def decode_bytes(model: torch.nn.Module, context: float) -> tuple[int, int]:
    """Bytes one decode step reads: (weights of the LM and lm head, KV cache at `context` positions)."""
    lm = language_model(model)
    embedding = lm.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in lm.parameters() if p is not embedding)
    weights += head.numel() * head.element_size()  # read whole for the logits, tied to the embedding or not
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_per_position = (
        2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * head.element_size()
    )
    return weights, int(kv_per_position * context)


def time_engine(
    vlm, rendered, n_tokens: int, drafts: bool, kernels: str = "exact"
) -> tuple[list[int], float, float]:
    """Greedy reply of the engine: (tokens, decode seconds, prefill seconds)."""
    engine = vlm.engine
    engine.decode_kernels = kernels
    cfg = SamplingConfig(max_new_tokens=n_tokens, stop_token_ids=vlm.stop_token_ids)
    engine.reset()
    t0 = time.perf_counter()
    engine.prefill(rendered.input_ids, rendered.images, rendered.image_spans)
    prefill = time.perf_counter() - t0
    engine.reset()
    t0 = time.perf_counter()
    args = (rendered.input_ids, rendered.images, rendered.image_spans, cfg)
    tokens = list(engine.generate(*args, drafter=vlm.drafter if drafts else None))
    return tokens, time.perf_counter() - t0 - prefill, prefill


@torch.inference_mode()
def time_hf_generate(vlm, rendered, n_tokens: int) -> tuple[list[int], float]:
    """transformers' greedy `generate` of exactly `n_tokens`: (tokens, decode seconds)."""
    inputs = {
        "input_ids": torch.tensor([rendered.input_ids]),
        "pixel_values": vlm.pixel_values(rendered.images).to(vlm.engine.dtype),
    }
    seconds = []
    for new in (1, n_tokens):
        t0 = time.perf_counter()
        out = vlm.model.generate(
            **inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
        )
        seconds.append(time.perf_counter() - t0)
    return out[0, len(rendered.input_ids) :].tolist(), seconds[1] - seconds[0]


def save_language_model(vlm, folder: str) -> None:
    """The controller's (merged) language model and tokenizer as a plain transformers causal LM folder."""
    from transformers import AutoModelForCausalLM

    lm = language_model(vlm.model)
    causal = AutoModelForCausalLM.from_config(lm.config, dtype=vlm.engine.dtype)
    causal.model.load_state_dict(lm.state_dict())
    causal.get_output_embeddings().load_state_dict(vlm.model.get_output_embeddings().state_dict())
    causal.save_pretrained(folder)
    vlm.tokenizer.save_pretrained(folder)


def time_llama_cpp(n_tokens: int, prompt: str, path: Path | None) -> tuple[float, int] | str:
    """llama.cpp's greedy decode of `n_tokens` on a GGUF (None: the base LM's): (decode seconds, file bytes), or
    why not."""
    if importlib.util.find_spec("llama_cpp") is None:
        binaries = [b for b in ("llama-bench", "llama-cli") if shutil.which(b)]
        found = (
            f"; {', '.join(binaries)} on PATH (not driven by this bench)" if binaries else ", nor llama-bench"
        )
        return f"llama_cpp (llama-cpp-python) is not installed{found}"
    import llama_cpp

    from toolvlm.vlm.base_lm import smollm2_gguf

    path = path or smollm2_gguf()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    ids = llm.tokenize(prompt.encode(), special=True)
    llm.reset()
    llm.eval(ids)
    t0 = time.perf_counter()
    for _ in range(n_tokens - 1):
        token = llm.sample(top_k=1, temp=0.0)
        llm.eval([token])
    return time.perf_counter() - t0, path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its JSON figures last."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4, help="describe requests")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--bundle", default=str(bundle_dir()))
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--seed", type=int, default=BENCH_SEED)
    parser.add_argument(
        "--gguf", type=Path, help="llama.cpp runs this GGUF of the controller's LM (--save-lm)"
    )
    parser.add_argument(
        "--save-lm", metavar="DIR", help="save the controller's LM for llama.cpp's converter, exit"
    )
    args = parser.parse_args(argv)
    if args.gguf is not None and not args.gguf.is_file():
        parser.error(f"--gguf: no such file {args.gguf}")
    if args.save_lm:
        save_language_model(load_vlm(f"{args.bundle}/controller", dtype=args.dtype, merge=True), args.save_lm)
        print(json.dumps({"saved": args.save_lm}))
        return 0

    bandwidths = [read_bandwidth(repeats=3)]
    vlm = load_vlm(f"{args.bundle}/controller", dtype=args.dtype, merge=True)
    if vlm.drafter is None:
        parser.error(f"{args.bundle}'s controller has no draft corpus")
    rates: dict[str, list[float]] = {name: [] for name in ("plain", "prepacked", "drafts", "hf_generate")}
    rates["llama_cpp"] = []
    same, drafts_used, contexts, notes, gguf_bytes, same_as_generate, fast_steps = 0, 0, [], [], 0, 0, 0
    prepacked_same = 0
    for i, (scene, turn) in enumerate(plan_eval(args.n, args.seed, tasks=("describe",))):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": turn.text}]}]
        rendered = vlm.render(messages, [render_scene(scene)], add_generation_prompt=True)
        plain, plain_s, prefill_s = time_engine(vlm, rendered, args.max_new_tokens, drafts=False)
        fast_steps += vlm.engine.stats.fast_steps
        packed, packed_s, _ = time_engine(vlm, rendered, args.max_new_tokens, False, kernels="prepacked")
        prepacked_same += packed == plain
        drafted, drafts_s, _ = time_engine(vlm, rendered, args.max_new_tokens, drafts=True)
        same += drafted == plain
        drafts_used += vlm.engine.stats.drafted_tokens > 0
        n = len(plain)
        contexts.append(len(rendered.input_ids) + n / 2)
        hf_tokens, hf_s = time_hf_generate(vlm, rendered, n)
        same_as_generate += hf_tokens == plain
        if n >= MIN_TIMED_TOKENS:  # (a short reply's decode time is mostly the noise of its prefill's)
            rates["plain"].append((n - 1) / plain_s)  # the first token comes with the prefill
            rates["prepacked"].append((len(packed) - 1) / packed_s)
            rates["drafts"].append((len(drafted) - 1) / drafts_s)
            rates["hf_generate"].append((n - 1) / hf_s)
            llama = time_llama_cpp(n, vlm.tokenizer.decode(rendered.input_ids), args.gguf)
            if isinstance(llama, str):
                notes = [f"llama.cpp skipped: {llama}"]
            else:
                rates["llama_cpp"].append((n - 1) / llama[0])
                gguf_bytes = llama[1]
        bandwidths.append(read_bandwidth(repeats=3))
        print(f"[{i + 1}/{args.n}] {n} tokens, prefill {prefill_s:.2f} s; tokens/s: "
              + (", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items() if v) if n >= MIN_TIMED_TOKENS
                 else "not timed (short)")
              + f"; generate same as the engine: {hf_tokens == plain}", file=sys.stderr)  # fmt: skip

    weights, kv = decode_bytes(vlm.model, statistics.mean(contexts))
    bandwidth = statistics.median(bandwidths)
    limit = bandwidth * 1e9 / (weights + kv)
    figures: dict[str, object] = {"bandwidth_gb_s": round(bandwidth, 1)}
    figures["bandwidth_spread_gb_s"] = [round(min(bandwidths), 1), round(max(bandwidths), 1)]
    figures["bytes_per_token"] = weights + kv
    if gguf_bytes:  # the base LM's quantized file (its own limit) or, with --gguf, the controller's LM
        figures["llama_cpp_gguf"] = {"file": (args.gguf or Path("base LM")).name, "bytes": gguf_bytes}
    figures["limit_tokens_s"] = round(limit, 1)
    for name, values in rates.items():
        if values:
            rate = statistics.median(values)
            own_limit = bandwidth * 1e9 / gguf_bytes if name == "llama_cpp" and not args.gguf else limit
            figures[f"{name}_tokens_s"] = round(rate, 1)
            figures[f"{name}_vs_limit"] = round(rate / own_limit, 3)
    figures.update(
        identical_drafted_replies=round(same / args.n, 4),
        plain_same_as_generate=round(same_as_generate / args.n, 4),
        prepacked_same_as_plain=round(prepacked_same / args.n, 4),
        fast_decode_steps=fast_steps,  # plain steps run by the LLaMA decode step (0: the model's forward)
        drafts_used=drafts_used,  # replies whose decoding drafted (none in bf16: see toolvlm.vlm.engine.TIE_MARGINS)
        dtype=str(vlm.engine.dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        load_average=round(os.getloadavg()[0], 2),
        n=args.n,
        notes=notes,
    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
