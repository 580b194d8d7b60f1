"""Vectors made with other steering libraries -> fusesteer plans with the same effect.

Neither peer package is imported here: the converters read the objects' public fields (duck typing), so
they work with any version that keeps those fields, and fusesteer does not depend on the peers.

steering-vectors (0.12.2, ``steering_vectors/steering_vector.py``, ``layer_matching.py``)
    ``SteeringVector(layer_activations={layer: tensor}, layer_type="decoder_block")``.
    ``patch_activations`` guesses the module template from ``model.named_modules()`` (for HF decoder
    models ``"model.layers.{num}"`` for ``decoder_block``, ``"model.layers.{num}.mlp"`` for ``mlp``), takes
    ``matching_layers[layer_num]`` (plain Python indexing: negative keys count from the end) and registers a
    forward hook adding ``multiplier * vector`` IN PLACE to the module output on the selected tokens (all
    tokens by default). So ``decoder_block`` layer N -> ``(N, "layer.out", b = multiplier * v)`` and
    ``mlp`` layer N -> ``(N, "mlp.out", b = multiplier * v)`` (the MLP module output = ``down_proj``
    output, before Gemma's post-feedforward norm, which is fusesteer's ``mlp.out``). ``self_attn``,
    ``input_layernorm`` and ``post_attention_layernorm`` outputs are not fusesteer sites. Token selection
    (``min_token_index`` / ``token_indices``) is an argument of ``apply()``, not part of the vector; the
    plan steers every token (the peer's default).

repeng (0.4.0, ``repeng/control.py``, ``extract.py``)
    ``ControlVector(model_type, directions={layer: np.ndarray})``. ``ControlModel(model, layer_ids)``
    wraps ``model.model.layers[i]`` for each id (negative ids count from the end) and ``set_control(cv,
    coeff)`` adds ``torch.tensor(coeff * directions[i]).to(model.dtype)`` to that layer's output (masked
    to 0 only on left-padding tokens when ``position_ids`` is passed). Directions are fit on
    ``hidden_states[i + 1]``, the output of layer i. So direction i -> ``(i, "layer.out", b = coeff * d_i)``,
    for the layers the ControlModel controls (default: every layer in ``directions``). ``normalize=True``
    (rescale to the pre-steering norm) is not an affine map and is not supported.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping

import numpy as np
import torch

from ..errors import PlanError
from ..runtime.plan import ModelSpec, SteeringPlan

log = logging.getLogger("fusesteer")

#: steering-vectors layer_type -> fusesteer site
SV_LAYER_TYPES = {"decoder_block": "layer.out", "mlp": "mlp.out"}


def _spec(model) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    if hasattr(model, "config"):
        return ModelSpec.from_model(model)
    raise PlanError(f"expected a Hugging Face model or a ModelSpec, got {type(model).__name__}")


def _layer_index(key, n_layers: int, where: str) -> int:
    if isinstance(key, torch.Tensor) and key.numel() == 1:
        key = int(key)
    if isinstance(key, np.integer):
        key = int(key)
    if isinstance(key, bool) or not isinstance(key, int):
        raise PlanError(f"{where}: layer keys must be integers, got {key!r}")
    layer = key + n_layers if key < 0 else key
    if not 0 <= layer < n_layers:
        raise PlanError(f"{where}: layer {key} is out of range for a model with {n_layers} layers")
    return layer


def _vector(x, width: int, where: str) -> torch.Tensor:
    try:
        t = x.detach().to("cpu", torch.float32) if isinstance(x, torch.Tensor) else torch.as_tensor(
            np.asarray(x, dtype=np.float32))
    except (TypeError, ValueError) as e:
        raise PlanError(f"{where}: cannot read the vector ({type(x).__name__}: {e})") from None
    if t.numel() != width:
        raise PlanError(f"{where}: vector has {t.numel()} elements (shape {tuple(t.shape)}), expected the "
                        f"model width {width}")
    t = t.reshape(width).contiguous()
    if not bool(torch.isfinite(t).all()):
        raise PlanError(f"{where}: vector contains NaN or Inf")
    return t


def from_steering_vector(sv, model, multiplier: float = 1.0, name: str | None = None) -> SteeringPlan:
    """A steering-vectors ``SteeringVector`` -> plan with the same effect as ``sv.apply(model, multiplier=...)``.

    ``decoder_block`` vectors become ``layer.out`` additions, ``mlp`` vectors ``mlp.out`` additions; other
    layer types raise :class:`~fusesteer.errors.PlanError`. Negative layer keys count from the end, as in
    the peer. ``model``: the HF model (or its :class:`ModelSpec`).
    """
    acts = getattr(sv, "layer_activations", None)
    layer_type = getattr(sv, "layer_type", None)
    if not isinstance(acts, Mapping):
        raise PlanError(f"expected a steering_vectors.SteeringVector (with a layer_activations dict), got "
                        f"{type(sv).__name__}")
    if layer_type not in SV_LAYER_TYPES:
        raise PlanError(f"steering vector layer_type {layer_type!r} has no fusesteer site: supported are "
                        f"{', '.join(f'{k!r} -> {v!r}' for k, v in SV_LAYER_TYPES.items())} (self_attn is the "
                        "o_proj output and the layernorm types are norm outputs, which fusesteer does not steer)")
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not np.isfinite(multiplier):
        raise PlanError(f"multiplier must be a finite number, got {multiplier!r}")
    if not acts:
        raise PlanError("steering vector has no layers (layer_activations is empty)")
    spec = _spec(model)
    site = SV_LAYER_TYPES[layer_type]
    width = spec.site_width(site)
    layers: dict[int, torch.Tensor] = {}
    for key, vec in acts.items():
        where = f"steering vector layer {key!r}"
        layer = _layer_index(key, spec.num_layers, where)
        if layer in layers:
            raise PlanError(f"{where}: layer {layer} appears twice (once as a negative index)")
        # the peer computes multiplier * vector in the vector's dtype, then adds it to the activation
        v = vec.detach().to("cpu") * multiplier if isinstance(vec, torch.Tensor) else vec
        layers[layer] = _vector(v, width, where)
    plan = SteeringPlan(spec, name=name or "steering-vectors",
                        metadata={"source": "steering-vectors", "layer_type": layer_type,
                                  "multiplier": float(multiplier), "layers": sorted(layers)})
    for layer in sorted(layers):
        plan.add(layer=layer, site=site, b=layers[layer])
    return plan


def from_repeng(cv, model, coeff: float = 1.0, layer_ids: Iterable[int] | None = None,
                name: str | None = None) -> SteeringPlan:
    """A repeng ``ControlVector`` -> plan with the same effect as ``ControlModel(model, layer_ids)`` +
    ``set_control(cv, coeff)``.

    ``layer_ids``: the layers the ControlModel controls (negative ids count from the end); default: every
    layer in ``cv.directions``. Each becomes a ``layer.out`` addition of ``coeff * direction``.
    """
    dirs = getattr(cv, "directions", None)
    if not isinstance(dirs, Mapping):
        raise PlanError(f"expected a repeng.ControlVector (with a directions dict), got {type(cv).__name__}")
    if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or not np.isfinite(coeff):
        raise PlanError(f"coeff must be a finite number, got {coeff!r}")
    spec = _spec(model)
    ids = list(dirs) if layer_ids is None else list(layer_ids)
    if not ids:
        raise PlanError("repeng control vector has no directions" if layer_ids is None else "layer_ids is empty")
    hint = getattr(cv, "model_type", None)
    if isinstance(hint, str) and hint != spec.model_type:
        log.warning("fusesteer: repeng control vector was made for model_type %r, the model is %r", hint,
                    spec.model_type)
    layers: dict[int, torch.Tensor] = {}
    for key in ids:
        where = f"repeng direction for layer {key!r}"
        layer = _layer_index(key, spec.num_layers, where)
        # ControlModel normalises negative ids first, then set_control reads directions[normalised id]
        if layer not in dirs:
            raise PlanError(f"{where}: the control vector has no direction for layer {layer} (it has "
                            f"{sorted(dirs)}); repeng's set_control would fail with a KeyError")
        if layer in layers:
            raise PlanError(f"{where}: layer {layer} is listed twice")
        # repeng: torch.tensor(coeff * directions[i]).to(dtype): the product is taken in numpy
        d = dirs[layer]
        d = d.detach().cpu().numpy() if isinstance(d, torch.Tensor) else np.asarray(d)
        layers[layer] = _vector(coeff * d, spec.hidden_size, where)
    plan = SteeringPlan(spec, name=name or "repeng",
                        metadata={"source": "repeng", "model_type": hint, "coeff": float(coeff),
                                  "layers": sorted(layers)})
    for layer in sorted(layers):
        plan.add(layer=layer, site="layer.out", b=layers[layer])
    return plan


def import_repeng():
    """Import repeng, applying its numpy-2 workaround first (repeng 0.4.0 uses the removed ``np.float_``).

    Raises ImportError (with the install command) when repeng or its scikit-learn dependency is missing.
    """
    if not hasattr(np, "float_"):
        np.float_ = np.float64  # type: ignore[attr-defined]
    try:
        import repeng
    except ImportError as e:
        raise ImportError(f"repeng is not importable ({e}); install it with "
                          "`pip install --no-deps repeng && pip install scikit-learn`") from e
    return repeng


__all__ = ["SV_LAYER_TYPES", "from_steering_vector", "from_repeng", "import_repeng"]
