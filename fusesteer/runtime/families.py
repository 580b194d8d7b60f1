"""Per-family adapters: how a decoder layer of each supported architecture is laid out.

This is the one place that knows architectures. An adapter says which HF submodules a decoder layer has and
in which order they run; the site registry (:mod:`fusesteer.runtime.sites`) says where each site lives inside
a layer; the backends read both. Three layer layouts cover every family:

* ``pre`` (Llama, Mistral, Qwen2/3, Qwen3-MoE, Gemma 1, Granite, Phi-3):
  ``s = x + attn(norm1(x))``, ``out = s + mlp(norm2(s))``;
* ``sandwich`` (Gemma 2/3): the block outputs are normed before each add
  (``post_attention_layernorm`` / ``post_feedforward_layernorm``), the pre-FFN norm is
  ``pre_feedforward_layernorm``;
* ``post`` (OLMo-2): no pre-norms; ``s = x + norm1(attn(x))``, ``out = s + norm2(mlp(s))``.

Variants within a layout: RMSNorm weight convention (``w`` or Gemma's ``1 + w``), the GLU's projections (separate
``gate_proj``/``up_proj`` or Phi-3's fused ``gate_up_proj``, split in halves), Granite's residual multiplier
(``s = x + m * block(x)``), and Qwen3-MoE's sparse layers (the MLP is a routed expert block without a single
``down_proj``). The GLU activation is identified by evaluating the module, not by its name.

A model with no adapter but the usual skeleton (``model.model.layers[i]`` with ``self_attn.o_proj`` and an
``mlp``) gets the generic family: the ``reference`` backend (hooks at the registry's module paths) works on it,
with a warning naming what is unverified; the fused backends refuse it.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import AttachError, PlanError
from .sites import SITES, module_at, site

log = logging.getLogger("fusesteer")
_WARNED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # generic models already warned about

LAYOUTS = ("pre", "sandwich", "post")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    classes: tuple[str, ...]  # the *ForCausalLM classes of transformers it covers
    layout: str = "pre"  # one of LAYOUTS
    rms: str = "llama"  # "llama" (weight w) or "gemma" ((1 + w), in fp32)
    mlp: str = "glu"  # "glu" (gate_proj, up_proj), "fused_glu" (gate_up_proj), "moe" (sparse layers + dense GLU ones)
    residual_multiplier: bool = False  # Granite: s = x + layer.residual_multiplier * block(x)
    generic: bool = False  # no adapter: reference backend only
    notes: str = ""

    @property
    def sandwich(self) -> bool:
        return self.layout == "sandwich"

    @property
    def pre_attn_norm(self) -> str | None:
        return None if self.layout == "post" else "input_layernorm"

    @property
    def post_attn_norm(self) -> str | None:
        return None if self.layout == "pre" else "post_attention_layernorm"

    @property
    def pre_ffn_norm(self) -> str | None:
        return {"pre": "post_attention_layernorm", "sandwich": "pre_feedforward_layernorm", "post": None}[self.layout]

    @property
    def post_ffn_norm(self) -> str | None:
        return None if self.layout == "pre" else "post_feedforward_layernorm"

    def norm_names(self) -> list[str]:
        return [n for n in (self.pre_attn_norm, self.post_attn_norm, self.pre_ffn_norm, self.post_ffn_norm) if n]


FAMILIES = (
    Family("llama", ("llama",), ("LlamaForCausalLM",)),
    Family("mistral", ("mistral",), ("MistralForCausalLM",), notes="sliding-window attention (inside HF attention)"),
    Family("qwen2", ("qwen2",), ("Qwen2ForCausalLM",)),
    Family("qwen3", ("qwen3",), ("Qwen3ForCausalLM",)),
    Family("qwen3_moe", ("qwen3_moe",), ("Qwen3MoeForCausalLM",), mlp="moe",
           notes="sparse layers: mlp.out is the combined expert output; mlp.down_proj.in only on dense layers"),
    Family("gemma", ("gemma",), ("GemmaForCausalLM",), rms="gemma", notes="(1 + w) RMSNorm, GELU-tanh GLU"),
    Family("gemma2", ("gemma2",), ("Gemma2ForCausalLM",), layout="sandwich", rms="gemma"),
    Family("gemma3", ("gemma3_text",), ("Gemma3ForCausalLM",), layout="sandwich", rms="gemma"),
    Family("granite", ("granite",), ("GraniteForCausalLM",), residual_multiplier=True,
           notes="mlp.out is the MLP output before the residual multiplier; layer.out the layer's output"),
    Family("phi3", ("phi3",), ("Phi3ForCausalLM",), mlp="fused_glu",
           notes="fused qkv_proj / gate_up_proj: mlp.down_proj.in is act(gate) * up after the split"),
    Family("olmo2", ("olmo2",), ("Olmo2ForCausalLM",), layout="post",
           notes="norms after attention and after the MLP, before each residual add"),
)
_BY_MODEL_TYPE = {mt: f for f in FAMILIES for mt in f.model_types}
_BY_NAME = {f.name: f for f in FAMILIES}
SUPPORTED_CLASSES = tuple(c for f in FAMILIES for c in f.classes)
LLAMA, GEMMA2, GEMMA3 = _BY_NAME["llama"], _BY_NAME["gemma2"], _BY_NAME["gemma3"]


def family(name: str) -> Family:
    f = _BY_NAME.get(name)
    if f is None:
        raise AttachError(f"unknown family {name!r}; expected one of {', '.join(_BY_NAME)}")
    return f


# --------------------------------------------------------------------------------------------------
# the GLU activation, identified by what it computes
# --------------------------------------------------------------------------------------------------
_ACT_CACHE: dict[type, str | None] = {}


def activation_kind(act) -> str | None:
    """"silu", "gelu_tanh" (the activations the fused GLU kernel computes) or None, found by evaluating ``act``
    on a fixed grid and comparing with torch's own functions bit for bit."""
    cls = type(act)
    if cls in _ACT_CACHE:
        return _ACT_CACHE[cls]
    x = torch.linspace(-8.0, 8.0, 257, dtype=torch.float32)
    kind = None
    try:
        with torch.no_grad():
            y = act(x)
        if isinstance(y, torch.Tensor) and y.shape == x.shape:
            for name, ref in (("silu", torch.nn.functional.silu(x)),
                              ("gelu_tanh", torch.nn.functional.gelu(x, approximate="tanh"))):
                if torch.equal(y, ref):
                    kind = name
                    break
    except Exception:  # noqa: BLE001 - an activation we cannot evaluate is one we do not fuse
        kind = None
    if not list(getattr(act, "parameters", lambda: [])()):  # stateless activations only are cached by class
        _ACT_CACHE[cls] = kind
    return kind


# --------------------------------------------------------------------------------------------------
# one decoder layer's modules
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerModules:
    """The HF submodules of one decoder layer that the fused layer skeleton calls, found by the family adapter."""

    attn: nn.Module
    mlp: nn.Module
    in_norm: nn.Module | None  # pre-attention norm (None: post layout)
    ffn_norm: nn.Module | None  # pre-FFN norm (None: post layout)
    post_attn: nn.Module | None  # norm of the attention output before the add (sandwich / post layouts)
    post_ffn: nn.Module | None  # norm of the MLP output before the add (sandwich / post layouts)
    gate: nn.Module | None  # GLU projections (None on a sparse MoE layer or with a fused gate_up)
    up: nn.Module | None
    gate_up: nn.Module | None  # Phi-3's fused projection: its output splits in halves (gate, up)
    down: nn.Module | None  # None on a sparse MoE layer
    act: object
    act_kind: str | None  # "silu" / "gelu_tanh" when the fused GLU kernel computes it, else None
    multiplier: float | None  # Granite's residual multiplier

    @property
    def sparse(self) -> bool:
        return self.down is None

    def norms(self) -> list[nn.Module]:
        return [n for n in (self.in_norm, self.ffn_norm, self.post_attn, self.post_ffn) if n is not None]


def _opt(mod, name):
    return getattr(mod, name, None) if name else None


def layer_modules(fam: Family, layer: nn.Module) -> LayerModules:
    mlp = layer.mlp
    act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)
    down = getattr(mlp, "down_proj", None)
    if not isinstance(down, nn.Module):
        down = None
    mult = getattr(layer, "residual_multiplier", None) if fam.residual_multiplier else None
    return LayerModules(
        attn=layer.self_attn, mlp=mlp, in_norm=_opt(layer, fam.pre_attn_norm), ffn_norm=_opt(layer, fam.pre_ffn_norm),
        post_attn=_opt(layer, fam.post_attn_norm), post_ffn=_opt(layer, fam.post_ffn_norm),
        gate=getattr(mlp, "gate_proj", None) if down is not None else None,
        up=getattr(mlp, "up_proj", None) if down is not None else None,
        gate_up=getattr(mlp, "gate_up_proj", None) if down is not None else None,
        down=down, act=act, act_kind=activation_kind(act) if act is not None and down is not None else None,
        multiplier=None if mult is None else float(mult))


# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------
@dataclass
class ModelParts:
    family: Family
    model: nn.Module  # the *ForCausalLM
    base: nn.Module  # model.model (decoder stack)
    layers: list  # decoder layers
    final_norm: nn.Module | None
    unverified: list = field(default_factory=list)  # generic family: what nobody checked

    def site_problem(self, layer: int, name: str) -> str | None:
        """Why ``name`` does not exist on layer ``layer`` of this model, or None."""
        rec = site(name)
        try:
            mod = module_at(self.layers[layer], rec.path)
        except AttributeError:
            mod = None
        if isinstance(mod, nn.Module):
            return None
        lay = self.layers[layer]
        if self.family.mlp == "moe" and name == "mlp.down_proj.in" and not hasattr(lay.mlp, "down_proj"):
            return (f"layer {layer} of {type(self.model).__name__} is a sparse MoE layer "
                    f"({type(lay.mlp).__name__}): its routed experts have no single down_proj, so "
                    f"'mlp.down_proj.in' exists only on its dense layers; steer 'mlp.out' (the combined expert "
                    f"output) here instead")
        return (f"layer {layer} ({type(lay).__name__}) has no module {rec.path!r}, where site {name!r} lives "
                f"(family {self.family.name})")

    def sites_of(self, layer: int) -> tuple[str, ...]:
        return tuple(s for s in SITES if self.site_problem(layer, s) is None)

    def check_site(self, layer: int, name: str) -> None:
        why = self.site_problem(layer, name)
        if why is not None:
            raise PlanError(why)

    def site_keys(self, sites) -> set:
        """attach(sites=...) as (layer, site) pairs: "all" (every site each layer has) or a list of pairs."""
        n = len(self.layers)
        if sites is None:
            return set()
        if sites == "all":
            return {(layer, s) for layer in range(n) for s in self.sites_of(layer)}
        if isinstance(sites, (str, bytes, dict)) or not hasattr(sites, "__iter__"):
            raise AttachError(f"sites: expected 'all' or a list of (layer, site) pairs, got {type(sites).__name__} "
                              f"{sites!r}")
        keys = set()
        for k in sites:
            if (not isinstance(k, tuple) or len(k) != 2 or not isinstance(k[0], int) or isinstance(k[0], bool)
                    or not 0 <= k[0] < n or k[1] not in SITES):
                raise AttachError(f"sites: expected 'all' or (layer, site) pairs with layer in 0..{n - 1} and site "
                                  f"in {SITES}, got {k!r}")
            why = self.site_problem(*k)
            if why is not None:
                raise AttachError(f"sites: {k!r}: {why}")
            keys.add(k)
        return keys


def _generic_problem(model, layers) -> str | None:
    for i, layer in enumerate(layers):
        for path in ("self_attn", "self_attn.o_proj", "mlp"):
            try:
                module_at(layer, path)
            except AttributeError:
                return f"layer {i} ({type(layer).__name__}) has no {path!r}"
    return None


def model_parts(model: nn.Module) -> ModelParts:
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    fam = _BY_MODEL_TYPE.get(mt)
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if fam is None:
        problem = ("it has no decoder stack at model.model.layers" if base is None or layers is None
                   else _generic_problem(model, list(layers)))
        if problem is not None:
            raise AttachError(
                f"unsupported model {type(model).__name__} (config.model_type={mt!r}): {problem}. fusesteer has "
                f"adapters for {', '.join(SUPPORTED_CLASSES)}, and a generic reference-hooks path for decoders "
                f"with model.model.layers[i].self_attn.o_proj and .mlp")
        fam = Family(f"generic:{mt}", (str(mt),), (type(model).__name__,), generic=True)
        unverified = ["that every site's module is where the registry says it is (paths are looked up, not checked "
                      "against the architecture)", "the layer layout (norm placement, residual multipliers)",
                      "capture and fold (fold refuses)", "the fused backends (they refuse)"]
        if model not in _WARNED:  # once per model, and nothing left on the model itself
            log.warning("fusesteer: %s (model_type %r) has no family adapter; only the 'reference' backend is "
                        "available, and it is unverified on this architecture: %s", type(model).__name__, mt,
                        "; ".join(unverified))
            _WARNED.add(model)
        return ModelParts(fam, model, base, list(layers)[: getattr(cfg, "num_hidden_layers", len(layers))],
                          getattr(base, "norm", None), unverified)
    if base is None or layers is None:
        raise AttachError(f"{type(model).__name__}: expected the decoder stack at model.model.layers")
    layers = list(layers)[: cfg.num_hidden_layers]
    for i, layer in enumerate(layers):
        for name in ["self_attn", "mlp"] + fam.norm_names():
            if not hasattr(layer, name):
                raise AttachError(f"layer {i} ({type(layer).__name__}) has no submodule {name!r}; "
                                  f"is this really a {fam.name} model?")
        if not hasattr(layer.self_attn, "o_proj"):
            raise AttachError(f"layer {i}: self_attn has no 'o_proj'")
        mlp = layer.mlp
        if hasattr(mlp, "down_proj"):
            need = ("gate_up_proj",) if fam.mlp == "fused_glu" else ("gate_proj", "up_proj")
            for name in need + ("down_proj",):
                if not hasattr(mlp, name):
                    raise AttachError(f"layer {i}: mlp has no {name!r}; the {fam.name} adapter expects a gated (GLU) "
                                      f"MLP with {', '.join(need)} and down_proj")
            if not (hasattr(mlp, "act_fn") or hasattr(mlp, "activation_fn")):
                raise AttachError(f"layer {i}: mlp has no activation module (act_fn / activation_fn)")
        elif fam.mlp != "moe":
            raise AttachError(f"layer {i}: mlp ({type(mlp).__name__}) has no 'down_proj'; the {fam.name} adapter "
                              f"expects a dense GLU MLP")
        if fam.residual_multiplier and not isinstance(getattr(layer, "residual_multiplier", None), (int, float)):
            raise AttachError(f"layer {i}: expected a numeric residual_multiplier on the {fam.name} decoder layer")
    return ModelParts(fam, model, base, layers, base.norm)


def model_sites(model) -> dict[int, tuple[str, ...]]:
    """{layer: the sites that layer has} (every site on dense models; Qwen3-MoE's sparse layers lack
    ``mlp.down_proj.in``)."""
    parts = model_parts(model)
    return {i: parts.sites_of(i) for i in range(len(parts.layers))}


def layer_device(layer: nn.Module):
    for p in layer.parameters():
        return p.device
    return None
