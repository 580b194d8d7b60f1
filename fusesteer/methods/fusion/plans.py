"""Plans: full-layer and segmented (alpha, gamma) blends at layer.out."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from ...runtime.plan import ModelSpec, SteeringPlan
from .prompts import ALPHA_RANGE, BLENDS, FUSION_GATINGS, GAMMA_RANGE, MODES, SEGMENTS, FusionError
from .references import Reference


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------
def segment_bounds(num_layers: int) -> list[tuple[int, int]]:
    """[(start, end)] of the early / middle / late thirds; the first ``L mod 3`` segments get one more layer."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 3:
        raise FusionError(f"segmented steering needs at least 3 layers, got {num_layers!r}")
    base, extra = divmod(num_layers, 3)
    out, start = [], 0
    for i in range(3):
        n = base + (1 if i < extra else 0)
        out.append((start, start + n))
        start += n
    return out


def param_space(mode: str) -> dict[str, tuple[float, float, bool]]:
    """Search space {name: (low, high, log)}: α ∈ [0, 1] uniform, γ ∈ [0.01, 1] log-uniform (a scale), one pair
    ("alpha", "gamma") or one per segment ("alpha_early", "gamma_early", …)."""
    if mode == "full":
        return {"alpha": ALPHA_RANGE, "gamma": GAMMA_RANGE}
    if mode == "segmented":
        sp = {}
        for s in SEGMENTS:
            sp[f"alpha_{s}"] = ALPHA_RANGE
            sp[f"gamma_{s}"] = GAMMA_RANGE
        return sp
    raise FusionError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")


def _num(params: Mapping, key: str) -> float:
    if key not in params:
        raise FusionError(f"missing parameter {key!r}")
    v = params[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise FusionError(f"parameter {key!r} must be a finite number, got {v!r}")
    return float(v)


def layer_params(params: Mapping, mode: str, num_layers: int) -> list[tuple[float, float]]:
    """(α, γ) for every layer."""
    if not isinstance(params, Mapping):
        raise FusionError(f"params must be a dict, got {type(params).__name__}")
    space = param_space(mode)
    unknown = set(params) - set(space)
    if unknown:
        raise FusionError(f"unknown parameter(s) {sorted(unknown)} for mode {mode!r}; expected {sorted(space)}")
    vals = {k: _num(params, k) for k in space}
    for k, v in vals.items():
        if k.startswith("alpha") and not 0.0 <= v <= 1.0:
            raise FusionError(f"{k} must lie in [0, 1], got {v}")
        if k.startswith("gamma") and v < 0.0:
            raise FusionError(f"{k} must be >= 0, got {v}")
    if mode == "full":
        return [(vals["alpha"], vals["gamma"])] * num_layers
    out = []
    for (s, e), name in zip(segment_bounds(num_layers), SEGMENTS):
        out += [(vals[f"alpha_{name}"], vals[f"gamma_{name}"])] * (e - s)
    return out


def fusion_plan(reference: Reference, model_or_spec, params: Mapping, mode: str = "full", blend: str = "paper",
                gating: str = "all", name: str | None = None) -> SteeringPlan:
    """The steering plan of one prompt: ``layer.out`` of every layer, blend per the module docstring."""
    spec = model_or_spec if isinstance(model_or_spec, ModelSpec) else ModelSpec.from_model(model_or_spec)
    if blend not in BLENDS:
        raise FusionError(f"unknown blend {blend!r}; expected one of {', '.join(BLENDS)}")
    if gating not in FUSION_GATINGS:
        raise FusionError(f"gating must be one of {', '.join(FUSION_GATINGS)} for Fusion Steering, got {gating!r}")
    L, W = spec.num_layers, spec.hidden_size
    if tuple(reference.h.shape) != (L, W) or tuple(reference.mu.shape) != (L, W):
        raise FusionError(f"reference has shape {tuple(reference.h.shape)}, the model needs ({L}, {W}); it was "
                          f"computed on another model")
    per_layer = layer_params(params, mode, L)
    delta = reference.delta
    plan = SteeringPlan(spec, name=name or f"fusion-{mode}")
    for l, (alpha, gamma) in enumerate(per_layer):
        if blend == "paper":
            plan.add(layer=l, site="layer.out", b=(alpha * gamma) * delta[l], gating=gating)
        else:
            plan.add(layer=l, site="layer.out", a=torch.tensor(1.0 - alpha),
                     b=((1.0 - alpha) * gamma) * delta[l] + alpha * reference.h[l], gating=gating)
    plan.metadata = {
        "method": "fusion", "mode": mode, "blend": blend, "gating": gating, "variant": reference.variant,
        "params": {k: float(v) for k, v in params.items()},
        "segments": [list(b) for b in segment_bounds(L)] if mode == "segmented" else [[0, L]],
        "steer_from": "last_prompt_token" if gating == "generated" else "all_tokens",
        "question": reference.question, "truth": reference.truth,
        "explanation_source": reference.explanation_source,
    }
    return plan


def average_params(params_list: Sequence[Mapping], mode: str) -> dict[str, float]:
    """Dataset-average α/γ (per key) over per-prompt best parameters."""
    if not params_list:
        raise FusionError("average_params needs at least one parameter set")
    keys = list(param_space(mode))
    return {k: sum(_num(p, k) for p in params_list) / len(params_list) for k in keys}
