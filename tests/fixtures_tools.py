"""Tiny random checkpoints for the tool backends, built locally (no hub) and saved under pytest's tmp dir.

Test modules load this file with `pytest_plugins = ["fixtures_tools"]` (tests/conftest.py belongs to the agent
tests). Each builder runs once per test session (also cached at module level). Tokenizers are built from in-memory vocabularies: a
byte-level CLIP BPE (no merges; specials at the end so that BOS > 0, as OWL's query mask expects) and a small
WordPiece vocabulary for BERT-style text towers.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

_BUILT: dict[str, Path] = {}
WORDS = ["a", "an", "the", "person", "people", "tree", "dog", "red", "car", "photo", "of", "with", "."]


def clip_tokenizer(max_length: int = 16):
    """A byte-level CLIP tokenizer: every byte, every byte + '</w>', then BOS and EOS."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.clip import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = max_length
    return tokenizer


def clip_text_config(tokenizer, **extra) -> dict:
    """A tiny CLIP text tower matching the tokenizer."""
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        **extra,
    )


def bert_tokenizer(**kwargs):
    """A WordPiece tokenizer over a few words, letters and '##' letters."""
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    letters = list(string.ascii_lowercase) + ["##" + c for c in string.ascii_lowercase]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + WORDS + letters))}
    return BertTokenizer(vocab=vocab, **kwargs)


def _owl(folder: Path, v2: bool) -> Path:
    import transformers as tf

    tokenizer = clip_tokenizer()
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    vision.update(image_size=64, patch_size=16)
    config_cls = tf.Owlv2Config if v2 else tf.OwlViTConfig
    config = config_cls(text_config=clip_text_config(tokenizer), vision_config=vision, projection_dim=32)
    torch.manual_seed(0)
    model = (tf.Owlv2ForObjectDetection if v2 else tf.OwlViTForObjectDetection)(config)
    with torch.no_grad():  # boxes = the grid prior boxes, so a random model gives sensible boxes
        model.box_head.dense2.weight.zero_()
        model.box_head.dense2.bias.zero_()
    model.save_pretrained(folder)
    if v2:
        from transformers.models.owlv2 import Owlv2ImageProcessorPil

        images = Owlv2ImageProcessorPil(size={"height": 64, "width": 64})
        tf.Owlv2Processor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    else:
        from transformers.models.owlvit import OwlViTImageProcessorPil

        images = OwlViTImageProcessorPil(
            size={"height": 64, "width": 64}, crop_size={"height": 64, "width": 64}
        )
        tf.OwlViTProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _grounding_dino(folder: Path) -> Path:
    import transformers as tf
    from transformers.models.grounding_dino import GroundingDinoImageProcessorPil

    tokenizer = bert_tokenizer()
    backbone = tf.SwinConfig(
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        image_size=64,
        out_features=["stage2", "stage3", "stage4"],
    )
    text = tf.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    config = tf.GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,  # 1 fails to build its tied box heads
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=10,
        max_text_len=32,
        encoder_n_points=1,
        decoder_n_points=1,
    )
    torch.manual_seed(0)
    tf.GroundingDinoForObjectDetection(config).save_pretrained(folder)
    images = GroundingDinoImageProcessorPil(size={"shortest_edge": 128, "longest_edge": 192})
    tf.GroundingDinoProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _blip(folder: Path) -> Path:
    import transformers as tf
    from transformers.models.blip import BlipImageProcessorPil

    tokenizer = bert_tokenizer(bos_token="[DEC]")
    vocab = tokenizer.get_vocab()
    text = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    text.update(intermediate_size=37, max_position_embeddings=64, pad_token_id=0)
    text.update(bos_token_id=vocab["[DEC]"], sep_token_id=vocab["[SEP]"], eos_token_id=vocab["[SEP]"])
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    vision.update(image_size=32, patch_size=8)
    torch.manual_seed(0)
    tf.BlipForConditionalGeneration(
        tf.BlipConfig(text_config=text, vision_config=vision, projection_dim=32)
    ).save_pretrained(folder)
    images = BlipImageProcessorPil(size={"height": 32, "width": 32})
    tf.BlipProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _blip2(folder: Path) -> Path:
    import transformers as tf
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.blip import BlipImageProcessorPil

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for special in ["</s>", "<pad>", "<unk>"]:
        vocab[special] = len(vocab)
    tokenizer = tf.GPT2Tokenizer(
        vocab=vocab, merges=[], bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    images = BlipImageProcessorPil(size={"height": 32, "width": 32})
    processor = tf.Blip2Processor(image_processor=images, tokenizer=tokenizer, num_query_tokens=4)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    vision.update(image_size=32, patch_size=8)
    qformer = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    qformer.update(intermediate_size=37, encoder_hidden_size=32)
    text = tf.OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        ffn_dim=37,
        num_attention_heads=2,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
        bos_token_id=vocab["</s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
    )
    config = tf.Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text.to_dict(),
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    tf.Blip2ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _stable_diffusion(folder: Path, gligen: bool) -> Path:
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionGLIGENPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip_text_config(tokenizer, projection_dim=32)))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
        attention_head_dim=8,
        **({"attention_type": "gated"} if gligen else {}),
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    cls = StableDiffusionGLIGENPipeline if gligen else StableDiffusionPipeline
    parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(
        folder
    )
    return folder


def _inhouse_generator(folder: Path) -> Path:
    from toolvlm.tools.layout_diffusion import LayoutDiffusion, LayoutDiffusionConfig

    config = LayoutDiffusionConfig(
        categories=["person", "tree", "dog"], image_size=32, block_out_channels=[16, 32], norm_num_groups=8
    )
    torch.manual_seed(0)
    LayoutDiffusion.build(config).save_pretrained(folder)
    return folder


BUILDERS = {
    "owlv2": lambda d: _owl(d, v2=True),
    "owlvit": lambda d: _owl(d, v2=False),
    "grounding_dino": _grounding_dino,
    "blip": _blip,
    "blip2": _blip2,
    "sd": lambda d: _stable_diffusion(d, gligen=False),
    "gligen": lambda d: _stable_diffusion(d, gligen=True),
    "inhouse_generator": _inhouse_generator,
}


def tiny_model(kind: str, factory: pytest.TempPathFactory) -> Path:
    """The folder of a tiny checkpoint of `kind`, built on first use in this session."""
    if kind not in _BUILT:
        _BUILT[kind] = BUILDERS[kind](factory.mktemp(kind))
    return _BUILT[kind]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory):
    """A function kind -> folder of a tiny random checkpoint (owlv2, owlvit, grounding_dino, blip, ...)."""
    return lambda kind: tiny_model(kind, tmp_path_factory)


def draw_scene(width: int = 160, height: int = 120, people: int = 3) -> Image.Image:
    """A small synthetic picture: sky, grass, a tree and a few stick people."""
    image = Image.new("RGB", (width, height), (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, height * 0.6, width, height], fill=(80, 160, 70))
    draw.rectangle([width * 0.1, height * 0.3, width * 0.15, height * 0.7], fill=(100, 60, 30))
    draw.ellipse([width * 0.03, height * 0.1, width * 0.22, height * 0.4], fill=(30, 120, 40))
    for i in range(people):
        x = width * (0.35 + 0.6 * i / max(1, people))
        draw.ellipse([x - 3, height * 0.45, x + 3, height * 0.52], fill=(240, 200, 160))
        draw.rectangle([x - 3, height * 0.52, x + 3, height * 0.7], fill=(200, 40, 40))
    return image


@pytest.fixture()
def scene():
    """The scene drawer: scene(width, height, people) -> a PIL image."""
    return draw_scene


@pytest.fixture()
def scene_path(tmp_path: Path) -> Path:
    """A 160x120 scene saved as PNG."""
    path = tmp_path / "scene.png"
    draw_scene().save(path)
    return path
