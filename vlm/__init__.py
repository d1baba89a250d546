"""toolvlm.vlm: the controller model. Build or load a VLM, render chats to ids, generate (cached), LoRA.

Modules: `config` (typed specs), `architecture` (LLaVA + pooling projector), `base_lm` (LLMs, GGUF, SmolLM2),
`builder` (assemble from parts), `chat` (render conversations), `engine` (cached streaming generation),
`drafting` (n-gram drafts for speculative greedy decoding), `generic` (other image-text-to-text models),
`model` (the `VLM` interface), `lora` (LoRA / QLoRA), `images` (loading images with clear errors).
"""

from .config import VisionSpec, VLMSpec
from .model import VLM, UnsupportedCheckpointError, load_vlm


def build_vlm(*args, **kwargs):
    """Assemble a VLM from parts; see `toolvlm.vlm.builder.build_vlm`."""
    from .builder import build_vlm as _build

    return _build(*args, **kwargs)


__all__ = ["VLM", "VLMSpec", "VisionSpec", "UnsupportedCheckpointError", "build_vlm", "load_vlm"]
