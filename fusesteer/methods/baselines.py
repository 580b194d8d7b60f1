"""Baselines and ablations for AUSteer, all as plans in the same runtime and evaluation harness.

* **CAA** — mean difference of ``layer.out`` at the last token (:mod:`fusesteer.methods.caa`), added with a
  multiplier at one layer; the layer and multiplier are chosen on validation data (:func:`caa_vectors`,
  :func:`caa_layer_plan`).
* **ITI-style head shifts** — on ``attn.o_proj.in`` (the concatenated head outputs): for every head h the
  mean paired difference ``θ_h = E[x_pos,h - x_neg,h]`` (ITI's "mass mean shift" direction), normalised;
  heads are ranked by the *paired separation* ``‖E[m_h]‖² / E[‖m_h‖²]`` (in [0, 1]; 1 when every pair moves
  the head by the same vector), and the top-K heads get ``x_h += α·σ_h·θ̂_h`` with ``σ_h`` the standard
  deviation of the head's activations (positives and negatives pooled) along ``θ̂_h``, as in ITI.
  ITI itself ranks heads by the held-out accuracy of a linear probe per head; that needs every activation
  in memory and a train/validation split of the pairs. The separation score is computed from streaming
  sums on the same forward passes as the AUSteer statistics (:class:`HeadStats`), and plays the same role
  (how consistently a head separates right from wrong answers).
* **Ablations of AUSteer** (paper Table 3): random localization, activation-difference localization
  (top-k by ``|mean m|``), fixed vector (``b = α·mean m`` on AUSteer's units instead of gains) and fixed
  strength (``γ = ±α`` regardless of r). They reuse the AUSteer statistics (:func:`build_plan`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..runtime.plan import ModelSpec, SteeringPlan
from .austeer import AUSteerError, Localization, build_plan
from .caa import mean_difference
from .pairs import ContrastivePair

__all__ = ["HeadStats", "iti_plan", "caa_vectors", "caa_layer_plan", "random_localization_plan",
           "actdiff_plan", "fixed_vector_plan", "fixed_strength_plan", "ABLATIONS"]


# --------------------------------------------------------------------------------------------
# AUSteer ablations
# --------------------------------------------------------------------------------------------
def random_localization_plan(loc: Localization, k: int, alpha: float, seed: int = 0) -> SteeringPlan:
    """k AUs drawn at random at the site, same adaptive γ rule (from their own r_pos / r_neg)."""
    return build_plan(loc, k, alpha, localization="random", seed=seed)


def actdiff_plan(loc: Localization, k: int, alpha: float) -> SteeringPlan:
    """Top-k AUs by |mean activation difference| (SADI-style localization), same adaptive γ rule."""
    return build_plan(loc, k, alpha, localization="actdiff")


def fixed_vector_plan(loc: Localization, k: int, alpha: float) -> SteeringPlan:
    """AUSteer's top-k AUs, but an input-independent shift b = α·mean m instead of gains."""
    return build_plan(loc, k, alpha, steering="fixed_vector")


def fixed_strength_plan(loc: Localization, k: int, alpha: float) -> SteeringPlan:
    """AUSteer's top-k AUs with γ = +α (promoting) or -α (suppressing), not scaled by r."""
    return build_plan(loc, k, alpha, steering="fixed_strength")


ABLATIONS = {
    "random": random_localization_plan,
    "actdiff": actdiff_plan,
    "fixed_vector": fixed_vector_plan,
    "fixed_strength": fixed_strength_plan,
}


# --------------------------------------------------------------------------------------------
# ITI-style head shifts
# --------------------------------------------------------------------------------------------
class HeadStats:
    """Streaming per-head statistics of ``attn.o_proj.in`` activations over contrastive pairs.

    Feed it ``(pos, neg)`` batches [b, L, H·d] (e.g. as an ``extra`` accumulator of
    :func:`fusesteer.methods.austeer.localize` at the head site). Keeps, per (layer, head):
    the sum of m = pos - neg, the sum of ‖m‖², and the first and second moments of the pooled activations.
    """

    def __init__(self, n_heads: int, layers: Sequence[int] | None = None):
        if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
            raise AUSteerError(f"n_heads must be a positive integer, got {n_heads!r}")
        self.n_heads = n_heads
        self.layers = None if layers is None else [int(l) for l in layers]
        self.n = 0
        self.sum_m = self.sum_sq_m = self.sum_x = self.sum_xx = None
        self.head_dim = None

    def update(self, pos: torch.Tensor, neg: torch.Tensor) -> None:
        if pos.dim() != 3 or pos.shape != neg.shape:
            raise AUSteerError(f"pos and neg must both be [b, L, W], got {tuple(pos.shape)} and {tuple(neg.shape)}")
        b, L, W = pos.shape
        if W % self.n_heads:
            raise AUSteerError(f"width {W} is not a multiple of n_heads={self.n_heads}; HeadStats needs the "
                               f"attn.o_proj.in site")
        d = W // self.n_heads
        if self.sum_m is None:
            if self.layers is None:
                self.layers = list(range(L))
            if len(self.layers) != L:
                raise AUSteerError(f"batches have {L} layers, expected {len(self.layers)}")
            self.head_dim = d
            H = self.n_heads
            self.sum_m = torch.zeros(L, H, d, dtype=torch.float64)
            self.sum_sq_m = torch.zeros(L, H, dtype=torch.float64)
            self.sum_x = torch.zeros(L, H, d, dtype=torch.float64)
            self.sum_xx = torch.zeros(L, H, d, d, dtype=torch.float64)
        elif self.sum_m.shape[0] != L or self.head_dim != d:
            raise AUSteerError("batch shape differs from earlier batches")
        p = pos.double().reshape(b, L, self.n_heads, d)
        q = neg.double().reshape(b, L, self.n_heads, d)
        m = p - q
        self.sum_m += m.sum(0)
        self.sum_sq_m += (m * m).sum(-1).sum(0)
        x = torch.cat([p, q], 0)
        self.sum_x += x.sum(0)
        self.sum_xx += torch.einsum("blhi,blhj->lhij", x, x)
        self.n += b

    def _check(self):
        if self.n == 0:
            raise AUSteerError("HeadStats: no pairs accumulated")

    @property
    def mean_m(self) -> torch.Tensor:
        self._check()
        return self.sum_m / self.n

    @property
    def separation(self) -> torch.Tensor:
        """[L, H]: ‖E m_h‖² / E‖m_h‖² (0 when E‖m‖² = 0)."""
        mm = self.mean_m
        num = (mm * mm).sum(-1)
        den = self.sum_sq_m / self.n
        return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(den))

    @property
    def direction(self) -> torch.Tensor:
        """[L, H, d]: unit mean-difference direction per head (zeros where the mean difference is zero)."""
        mm = self.mean_m
        norm = mm.norm(dim=-1, keepdim=True)
        return torch.where(norm > 0, mm / norm.clamp_min(1e-300), torch.zeros_like(mm))

    @property
    def sigma(self) -> torch.Tensor:
        """[L, H]: std of the pooled activations projected on the head's direction."""
        self._check()
        nx = 2 * self.n
        mu = self.sum_x / nx
        cov = self.sum_xx / nx - mu[..., :, None] * mu[..., None, :]
        th = self.direction
        var = torch.einsum("lhi,lhij,lhj->lh", th, cov, th)
        return var.clamp_min(0).sqrt()

    def top_heads(self, K: int) -> list[tuple[int, int]]:
        """The K (layer, head) pairs with the highest separation (ties by (layer, head))."""
        sep = self.separation
        L, H = sep.shape
        if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= L * H:
            raise AUSteerError(f"K must be an integer in [1, {L * H}], got {K!r}")
        order = torch.sort(sep.reshape(-1), descending=True, stable=True).indices[:K]
        return [(self.layers[int(i) // H], int(i) % H) for i in order]


def iti_plan(stats: HeadStats, spec: ModelSpec, K: int, alpha: float, provenance: dict | None = None,
             name: str | None = None) -> SteeringPlan:
    """Shift the top-K heads by α·σ_h·θ̂_h on their slice of ``attn.o_proj.in`` (one entry per layer)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AUSteerError(f"alpha must be a finite number, got {alpha!r}")
    if spec.attn_width != stats.n_heads * (stats.head_dim or 0):
        raise AUSteerError(f"head statistics are for {stats.n_heads} heads of width {stats.head_dim}, but the "
                           f"model's attn.o_proj.in has width {spec.attn_width}")
    heads = stats.top_heads(K)
    d = stats.head_dim
    direction, sigma, sep = stats.direction, stats.sigma, stats.separation
    li = {l: i for i, l in enumerate(stats.layers)}
    per_layer: dict[int, list[tuple[int, torch.Tensor]]] = {}
    info = []
    for layer, h in heads:
        shift = float(alpha) * sigma[li[layer], h] * direction[li[layer], h]
        per_layer.setdefault(layer, []).append((h, shift))
        info.append({"layer": layer, "head": h, "separation": float(sep[li[layer], h]),
                     "sigma": float(sigma[li[layer], h])})
    plan = SteeringPlan(spec, name=name or "iti",
                        metadata={"method": "iti", "site": "attn.o_proj.in", "K": int(K), "alpha": float(alpha),
                                  "ranking": "paired separation |E m|^2 / E|m|^2", "heads": info,
                                  "n_pairs": stats.n, "data": dict(provenance or {})})
    for layer in sorted(per_layer):
        items = sorted(per_layer[layer])
        dims = torch.cat([torch.arange(h * d, (h + 1) * d) for h, _ in items])
        b = torch.cat([s for _, s in items]).float()
        plan.add(layer=layer, site="attn.o_proj.in", b=b, dims=dims)
    return plan


# --------------------------------------------------------------------------------------------
# CAA
# --------------------------------------------------------------------------------------------
def caa_vectors(model, tokenizer, pairs: Sequence[ContrastivePair], layers: Sequence[int] | None = None,
                batch_size: int = 8) -> torch.Tensor:
    """[L, hidden] CAA vectors: mean over pairs of layer.out(pos) - layer.out(neg) at the last token."""
    return mean_difference(model, tokenizer, [p.positive_text for p in pairs], [p.negative_text for p in pairs],
                           "layer.out", layers, batch_size)


def caa_layer_plan(spec: ModelSpec, layer: int, vector: torch.Tensor, scale: float,
                   provenance: dict | None = None, name: str | None = None) -> SteeringPlan:
    """Add ``scale * vector`` to layer ``layer``'s output (a = 1, b = scale·v)."""
    plan = SteeringPlan(spec, name=name or f"caa-l{layer}",
                        metadata={"method": "caa", "layers": [int(layer)], "scale": float(scale),
                                  "vector_norm": float(vector.norm()), "data": dict(provenance or {})})
    plan.add(layer=int(layer), site="layer.out", b=float(scale) * vector.float())
    return plan
