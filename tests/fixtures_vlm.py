"""Tiny random language and vision-language models built locally for the VLM tests (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from toolvlm.vlm import VisionSpec, VLMSpec

CORPUS = [
    "What do you see in the image? I see people on the grass and a tree.",
    "Put a box around the tree. How many people are there? About 85 people.",
    '<tool_call>{"name": "counter", "arguments": {"image": "img_0", "phrase": "person"}}</tool_call>',
    "The capital of France is Paris. Generate a similar image with double the people.",
    "a dog lying on the grass next to a red frisbee; the sky is blue and the sun is yellow.",
] * 20

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML special tokens, trained in memory on a small corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )


def save_tiny_lm(folder: Path, seed: int = 0, hidden: int = 32) -> Path:
    """Save a 2-layer, `hidden`-wide (32) random LLaMA with its tokenizer to `folder`."""
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.5,  # large random weights: greedy outputs vary from token to token
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_spec(lm: Path, pooling: int = 1, kind: str = "clip") -> VLMSpec:
    """A spec for a tiny VLM: a 2-layer 32-wide vision encoder at 32 px with 8 px patches (16 patches)."""
    vision = VisionSpec(
        kind=kind, image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4,
    )  # fmt: skip
    return VLMSpec(lm=str(lm), vision=vision, image_token_pooling=pooling)


def random_image(seed: int, size: int = 40) -> Image.Image:
    """A random RGB picture."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def chat(n_turns: int = 1) -> list[dict]:
    """A conversation with images in user and tool messages and an assistant tool call."""
    messages = [
        {"role": "system", "content": "You are a helpful assistant with tools."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What do you see?"}]},
    ]
    for turn in range(n_turns - 1):
        messages += [
            {"role": "assistant", "content": f"I see people on the grass and a tree {turn}."},
            {"role": "user", "content": "How many people?"},
            {
                "role": "assistant",
                "content": '<tool_call>{"name": "counter", "arguments": {"phrase": "person"}}</tool_call>',
            },
            {"role": "tool", "content": [{"type": "text", "text": "about 85 people"}, {"type": "image"}]},
        ]
    return messages


def n_images(messages: list[dict]) -> int:
    """Image parts in a conversation."""
    return sum(
        1 for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image"
    )


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A saved tiny LLaMA + tokenizer folder."""
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def save_wide_llama(folder: Path, seed: int = 0, init: float = 0.15) -> Path:
    """A 2-layer random LLaMA with grouped keys and values (4 heads, 2 kv heads) and SmolLM2's MLP width, wide
    enough at init (`init`) that bf16 rounding decides near-ties between its top logits; saved with a tokenizer."""
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, initializer_range=init,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
