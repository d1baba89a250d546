"""A one-token decode step for LLaMA-family language models that computes what transformers computes, faster.

`LlamaDecodeStep` runs the decode step of one token of a `LlamaModel` and its head by hand:

- the q, k and v projections as one matmul over their concatenated weights, gate and up as another, where
  that gives the separate matmuls' bits (checked on random inputs when the step is built; else separate);
- every other operation exactly as transformers' `modeling_llama` does it (RMSNorm in fp32, the same rotary
  cos/sin, the same `scaled_dot_product_attention` call), without the module, hook and mask overhead, so
  the logits are the same bits as the model's forward and greedy text is unchanged (the tests compare logits
  bit for bit over many steps, and tokens with transformers' `generate`);
- the KV cache is a `DynamicCache` whose layers write into preallocated buffers (`BufferLayer`) instead of
  concatenating a new tensor every token; the model's own forward (prefill, drafted or forced tokens) uses the
  same cache and sees the same keys and values.

`kernels="prepacked"` (opt-in) trades the forward's bits for speed on CPUs: every linear runs on oneDNN weights
reordered once for it (`torch.ops.mkldnn._reorder_linear_weight` + `_linear_pointwise`, the kernels of
`torch.compile`'s CPU freezing pass; 1.3-3x faster per bf16 linear on the 2-core dev machine, the 49152 x 576
head 1.8 ms instead of 4.5 ms), the residual adds of the o and down projections fused into them, and attention as
plain fp32 matmuls (the CPU SDPA kernels are tiled for many queries: 3x slower on one). The cost is a second copy
of the weights and the last bits: in bf16 the logits are no further from the fp32 model's than the forward's
(a test), but a near-tie can decode another token than transformers' `generate` does.

The step knows LLaMA's decoder layer and nothing else: other architectures, LoRA layers not merged, a model in
training mode or another attention implementation get `None` from `LlamaDecodeStep.build` (with the reason
logged), and the engine decodes with the model's forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

logger = logging.getLogger(__name__)

# Rotary embeddings whose cos/sin depend on the position only (not on the sequence length): memoized per position.
STATIC_ROPE_TYPES = ("default", "linear", "llama3")
INITIAL_CAPACITY = 512  # positions a KV buffer holds before it doubles
KERNELS = ("exact", "prepacked")  # the linears: the model forward's bits, or oneDNN prepacked weights


class BufferLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in buffers that grow by doubling: `keys`/`values` are views of
    the first `length` positions, and a new token is written in place instead of concatenated."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._key_buffer = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[3]))
        self._value_buffer = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[3]))
        self.keys, self.values = self._key_buffer, self._value_buffer
        self.is_initialized = True

    def _reserve(self, needed: int) -> None:
        capacity = self._key_buffer.shape[2]
        if needed <= capacity:
            return
        capacity = max(needed, 2 * capacity, INITIAL_CAPACITY)
        length = self.keys.shape[2]
        for name in ("_key_buffer", "_value_buffer"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:2], capacity, old.shape[3]))
            new[:, :, :length] = old[:, :, :length]
            setattr(self, name, new)

    def append(
        self, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new positions after the cached ones; the keys and values of all positions (views)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.keys.shape[2]
        end = start + key_states.shape[2]
        self._reserve(end)
        self._key_buffer[:, :, start:end] = key_states
        self._value_buffer[:, :, start:end] = value_states
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        return self.keys, self.values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' cache update: append and return all positions."""
        return self.append(key_states, value_states)

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` positions (a negative count, as `DynamicLayer.crop` takes)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of positions to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        end = max(self.keys.shape[2] + tokens_to_remove, 0)
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]


def buffer_cache(config: object) -> DynamicCache:
    """A `DynamicCache` for `config` whose full-attention layers are `BufferLayer`s."""
    cache = DynamicCache(config=config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        raise ValueError("buffer_cache needs a model whose layers all use full attention")
    cache.layers = [BufferLayer() for _ in cache.layers]
    return cache


@dataclass
class _Layer:
    """One decoder layer's tensors and weights, ready for the step (`o` and `down` add the residual they get)."""

    norm1: torch.Tensor
    eps1: float
    qkv: Callable[[torch.Tensor], torch.Tensor]
    o: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    norm2: torch.Tensor
    eps2: float
    gate_up: Callable[[torch.Tensor], torch.Tensor]
    down: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    act: nn.Module


class _Linears:
    """Builds the step's linears: one matmul over concatenated weights where that gives the separate matmuls'
    bits on this machine (checked on random inputs), else the separate matmuls."""

    def __init__(self, dtype: torch.dtype, samples: int = 4, prepacked: bool = False):
        self.dtype, self.samples, self.prepacked = dtype, samples, prepacked
        self.generator = torch.Generator().manual_seed(0)
        self.fused = self.separate = 0

    def _same(self, weights: tuple[torch.Tensor, ...], fused: torch.Tensor) -> bool:
        for _ in range(self.samples):
            x = torch.randn(1, 1, fused.shape[1], generator=self.generator).to(self.dtype)
            if not torch.equal(F.linear(x, fused), torch.cat([F.linear(x, w) for w in weights], dim=-1)):
                return False
        return True

    def __call__(self, *weights: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """One function giving the outputs of `weights` concatenated on the last dimension."""
        if self.prepacked:  # the bits differ from F.linear's anyway: always one matmul
            packed = self._packed(*weights)
            return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        if len(weights) == 1:
            weight = weights[0]
            return lambda x: F.linear(x, weight)
        fused = torch.cat(weights)
        if self._same(weights, fused):
            self.fused += 1
            return lambda x: F.linear(x, fused)
        self.separate += 1
        return lambda x: torch.cat([F.linear(x, w) for w in weights], dim=-1)

    def residual(self, weight: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """One function giving `residual + linear(x)`: the add fused into the prepacked kernel (summed in fp32
        before the one rounding), else the model's own add of the rounded product."""
        if self.prepacked:
            packed = self._packed(weight)
            return lambda x, residual: torch.ops.mkldnn._linear_pointwise.binary(
                x, residual, packed, None, "add"
            )
        return lambda x, residual: residual + F.linear(x, weight)

    def _packed(self, *weights: torch.Tensor) -> torch.Tensor:
        self.fused += len(weights) > 1
        return torch.ops.mkldnn._reorder_linear_weight(torch.cat(weights), 1)


def _unsupported(lm: nn.Module, head: nn.Module | None, model: nn.Module) -> str | None:
    """Why the step cannot run this language model, or None when it can."""
    from transformers.models.llama import modeling_llama as llama

    if type(lm) is not llama.LlamaModel:
        return f"the language model is {type(lm).__name__}, not LlamaModel"
    if type(head) is not nn.Linear or head.bias is not None:
        return "the output head is not a plain nn.Linear without bias"
    if model.training:
        return "the model is in training mode"
    config = lm.config
    if config._attn_implementation != "sdpa":
        return f"attention implementation {config._attn_implementation!r}, not 'sdpa'"
    if config.hidden_act != "silu" or getattr(config, "mlp_bias", False) or config.attention_bias:
        return "the layers have biases or an activation other than SiLU"
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope type {rope_type!r} depends on the sequence length"
    for layer in lm.layers[: config.num_hidden_layers]:
        if type(layer) is not llama.LlamaDecoderLayer or type(layer.self_attn) is not llama.LlamaAttention:
            return f"a decoder layer is {type(layer).__name__}"
        if type(layer.mlp) is not llama.LlamaMLP:
            return f"an MLP is {type(layer.mlp).__name__}"
        linears = [
            layer.self_attn.q_proj,
            layer.self_attn.k_proj,
            layer.self_attn.v_proj,
            layer.self_attn.o_proj,
        ]
        linears += [layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
        if any(type(m) is not nn.Linear or m.bias is not None for m in linears):
            return "a projection is not a plain nn.Linear without bias (LoRA not merged?)"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if type(norm) is not llama.LlamaRMSNorm:
                return f"a norm is {type(norm).__name__}"
    if type(lm.norm) is not llama.LlamaRMSNorm:
        return f"the final norm is {type(lm.norm).__name__}"
    return None


def _weights_signature(model: nn.Module) -> tuple:
    return tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters())


class LlamaDecodeStep:
    """Logits of the next position after one token, for a LLaMA `LlamaModel` and its head, on a `BufferLayer`
    cache; the same bits as the model's own forward with `kernels="exact"` (see the module docstring)."""

    def __init__(self, lm: nn.Module, head: nn.Linear, model: nn.Module, kernels: str = "exact"):
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        config = lm.config
        self.model, self.kernels = model, kernels
        self.signature = _weights_signature(model)
        self.rotary = lm.rotary_emb
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        dtype = head.weight.dtype
        linears = _Linears(dtype, prepacked=kernels == "prepacked")
        self.layers = []
        for layer in lm.layers[: config.num_hidden_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                _Layer(
                    norm1=layer.input_layernorm.weight,
                    eps1=layer.input_layernorm.variance_epsilon,
                    qkv=linears(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight),
                    o=linears.residual(attn.o_proj.weight),
                    norm2=layer.post_attention_layernorm.weight,
                    eps2=layer.post_attention_layernorm.variance_epsilon,
                    gate_up=linears(mlp.gate_proj.weight, mlp.up_proj.weight),
                    down=linears.residual(mlp.down_proj.weight),
                    act=mlp.act_fn,
                )
            )
        self.scaling = lm.layers[0].self_attn.scaling
        self.norm, self.eps = lm.norm.weight, lm.norm.variance_epsilon
        self.head = linears(head.weight)
        self.intermediate = config.intermediate_size
        self.fused = linears.fused, linears.separate
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        logger.debug("decode step: %d layers, %d fused matmuls, %d not", len(self.layers), *self.fused)

    @classmethod
    def build(cls, model: nn.Module, kernels: str = "exact") -> LlamaDecodeStep | None:
        """The step for a causal LM or LLaVA-style model whose language model is a LLaMA, or None (logged why)."""
        lm = model.get_decoder() if hasattr(model, "get_decoder") else None
        lm = getattr(lm, "language_model", lm)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        reason = "the model has no decoder" if lm is None else _unsupported(lm, head, model)
        if reason is None and kernels == "prepacked" and not torch.backends.mkldnn.is_available():
            reason = "prepacked kernels need oneDNN (mkldnn), absent from this torch build"
        if reason is None and kernels == "prepacked" and head.weight.device.type != "cpu":
            reason = "prepacked kernels run on the CPU only"
        if reason is not None:
            logger.info("decoding with the model's forward: %s", reason)
            return None
        return cls(lm, head, model, kernels)

    def is_current(self) -> bool:
        """Whether the model's weights are still the ones the step copied (not replaced or changed in place)."""
        return not self.model.training and _weights_signature(self.model) == self.signature

    def _rotary(self, x: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin of `position`: `rotate_half(v) * sin == halves_swapped(v) * signed_sin` bit
        for bit (a negation is exact), one swap instead of transformers' two slices, negation and cat."""
        if position not in self._rope:
            cos, sin = self.rotary(x, position_ids=torch.tensor([[position]], device=x.device))
            half = sin.shape[-1] // 2
            signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
            self._rope[position] = cos.unsqueeze(1), signed.unsqueeze(1)
        return self._rope[position]

    @staticmethod
    def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)

    @staticmethod
    def _swap_halves(x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Attention of the one query (1, heads, 1, dim) over the cache, as (1, 1, heads * dim)."""
        if self.kernels == "exact":  # transformers' call, for its bits
            gqa = self.n_heads != self.n_kv
            attn = F.scaled_dot_product_attention(
                q, keys, values, dropout_p=0.0, scale=self.scaling, enable_gqa=gqa
            )
            return attn.transpose(1, 2).reshape(1, 1, -1)
        # prepacked: plain fp32 matmuls, each key/value head against its group of query heads (the CPU SDPA
        # kernels are tiled for many queries: 3x slower on one)
        grouped = q.reshape(1, self.n_kv, self.n_heads // self.n_kv, self.head_dim).float()
        scores = torch.matmul(grouped, keys.float().transpose(-1, -2)).mul_(self.scaling)
        attn = torch.matmul(torch.softmax(scores, dim=-1), values.float())
        return attn.to(q.dtype).reshape(1, 1, -1)

    @torch.inference_mode()
    def __call__(self, embeds: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Logits (1, vocab) after the one token whose input embedding is `embeds` (1, 1, hidden); the token's
        keys and values are appended to `cache` (made by `buffer_cache`)."""
        position = cache.get_seq_length()
        cos, sin = self._rotary(embeds, position)
        heads, kv, dim = self.n_heads, self.n_kv, self.head_dim
        x = embeds
        for layer, cached in zip(self.layers, cache.layers, strict=True):
            h = self._rms_norm(x, layer.norm1, layer.eps1)
            qkv = layer.qkv(h).view(1, 1, heads + 2 * kv, dim).transpose(1, 2)
            qk = qkv[:, : heads + kv]
            qk = (qk * cos) + (self._swap_halves(qk) * sin)  # q and k rotated as transformers does
            keys, values = cached.append(qk[:, heads:], qkv[:, heads + kv :])
            x = layer.o(self._attend(qk[:, :heads], keys, values), x)
            h = self._rms_norm(x, layer.norm2, layer.eps2)
            gate, up = layer.gate_up(h).split(self.intermediate, dim=-1)
            x = layer.down(layer.act(gate) * up, x)
        x = self._rms_norm(x, self.norm, self.eps)
        return self.head(x)[0]
