"""Contrastive Activation Addition (CAA): mean difference of `layer.out` at the last token.

v_l = mean_j (x_pos_j - x_neg_j) at layer l; the plan adds s * v_l to layer l's output (a = 1, b = s*v).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import FuseSteerError
from ..runtime.plan import SteeringPlan
from .capture import capture_last_token


def mean_difference(model, tokenizer, positives: Sequence[str], negatives: Sequence[str], site: str = "layer.out",
                    layers: Sequence[int] | None = None, batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """[L, W] mean over pairs of (pos - neg) last-token activations (streamed, fp32)."""
    if len(positives) != len(negatives) or not positives:
        raise FuseSteerError(f"need the same non-zero number of positive and negative texts, got "
                             f"{len(positives)} and {len(negatives)}")
    total = None
    for pos, neg in zip(capture_last_token(model, tokenizer, positives, site, layers, batch_size, progress),
                        capture_last_token(model, tokenizer, negatives, site, layers, batch_size, progress)):
        d = (pos - neg).sum(0)
        total = d if total is None else total + d
    return total / len(positives)


def caa_plan(model, tokenizer, positives, negatives, layers: Sequence[int], scale: float = 1.0,
             batch_size: int = 8, gating: str = "all", name: str | None = None,
             provenance: dict | None = None) -> SteeringPlan:
    """Plan adding scale * mean(pos - neg) to the output of each of `layers`."""
    layers = list(layers)
    diff = mean_difference(model, tokenizer, positives, negatives, "layer.out", layers, batch_size)
    plan = SteeringPlan.for_model(model, name=name or "caa")
    for i, l in enumerate(layers):
        plan.add(layer=l, site="layer.out", b=scale * diff[i], gating=gating)
    plan.metadata = {"method": "caa", "layers": layers, "scale": scale, "n_pairs": len(positives),
                     "vector_norms": [float(diff[i].norm()) for i in range(len(layers))],
                     **({"data": provenance} if provenance else {})}
    return plan
