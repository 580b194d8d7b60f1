"""Per-family adapters: where each site lives and how a decoder layer is laid out.

Llama, Qwen2 and Qwen3 share the pre-norm layout (norm -> attn -> add, norm -> mlp -> add).
Gemma 2 and 3 add "sandwich" norms (post-attention and post-feedforward) and use RMSNorm with (1 + w)
in fp32 and a gelu_tanh GLU. Everything else is found through HF submodule names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..errors import AttachError


@dataclass(frozen=True)
class Family:
    name: str
    sandwich: bool  # Gemma: post_attention_layernorm / post_feedforward_layernorm on block outputs
    rms: str  # "llama" (w * x.to(dtype)) or "gemma" ((1 + w) in fp32)
    act: str  # "silu" or "gelu_tanh"

    @property
    def pre_attn_norm(self) -> str:
        return "input_layernorm"

    @property
    def post_attn_norm(self) -> str | None:
        return "post_attention_layernorm" if self.sandwich else None

    @property
    def pre_ffn_norm(self) -> str:
        return "pre_feedforward_layernorm" if self.sandwich else "post_attention_layernorm"

    @property
    def post_ffn_norm(self) -> str | None:
        return "post_feedforward_layernorm" if self.sandwich else None


@dataclass(frozen=True)
class LayerModules:
    """The HF submodules of one decoder layer that the fused layer skeleton calls, found by the family adapter."""

    attn: nn.Module
    mlp: nn.Module
    in_norm: nn.Module
    ffn_norm: nn.Module
    post_attn: nn.Module | None  # Gemma's sandwich norms, else None
    post_ffn: nn.Module | None
    gate: nn.Module
    up: nn.Module
    down: nn.Module
    act: object


def layer_modules(family: "Family", layer: nn.Module) -> LayerModules:
    mlp = layer.mlp
    return LayerModules(
        attn=layer.self_attn, mlp=mlp, in_norm=getattr(layer, family.pre_attn_norm),
        ffn_norm=getattr(layer, family.pre_ffn_norm),
        post_attn=getattr(layer, family.post_attn_norm) if family.post_attn_norm else None,
        post_ffn=getattr(layer, family.post_ffn_norm) if family.post_ffn_norm else None,
        gate=mlp.gate_proj, up=mlp.up_proj, down=mlp.down_proj, act=mlp.act_fn)


LLAMA = Family("llama", sandwich=False, rms="llama", act="silu")
QWEN2 = Family("qwen2", sandwich=False, rms="llama", act="silu")
QWEN3 = Family("qwen3", sandwich=False, rms="llama", act="silu")
GEMMA2 = Family("gemma2", sandwich=True, rms="gemma", act="gelu_tanh")
GEMMA3 = Family("gemma3", sandwich=True, rms="gemma", act="gelu_tanh")

_BY_MODEL_TYPE = {
    "llama": LLAMA,
    "qwen2": QWEN2,
    "qwen3": QWEN3,
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA3,
}
SUPPORTED_CLASSES = ("LlamaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Qwen2ForCausalLM",
                     "Qwen3ForCausalLM")


@dataclass
class ModelParts:
    family: Family
    model: nn.Module  # the *ForCausalLM
    base: nn.Module  # model.model (decoder stack)
    layers: list  # decoder layers
    final_norm: nn.Module


def model_parts(model: nn.Module) -> ModelParts:
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    fam = _BY_MODEL_TYPE.get(mt)
    if fam is None:
        raise AttachError(
            f"unsupported model {type(model).__name__} (config.model_type={mt!r}); fusesteer supports "
            f"{', '.join(SUPPORTED_CLASSES)} (model types {', '.join(sorted(_BY_MODEL_TYPE))})"
        )
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if base is None or layers is None:
        raise AttachError(f"{type(model).__name__}: expected the decoder stack at model.model.layers")
    layers = list(layers)[: cfg.num_hidden_layers]
    for i, layer in enumerate(layers):
        for name in ("self_attn", "mlp", fam.pre_attn_norm, fam.pre_ffn_norm):
            if not hasattr(layer, name):
                raise AttachError(f"layer {i} ({type(layer).__name__}) has no submodule {name!r}; "
                                  f"is this really a {fam.name} model?")
        for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
            if not hasattr(layer.mlp, name):
                raise AttachError(f"layer {i}: mlp has no {name!r}; fusesteer needs a gated (GLU) MLP")
        if not hasattr(layer.self_attn, "o_proj"):
            raise AttachError(f"layer {i}: self_attn has no 'o_proj'")
    return ModelParts(fam, model, base, layers, base.norm)


def layer_device(layer: nn.Module):
    for p in layer.parameters():
        return p.device
    return None
