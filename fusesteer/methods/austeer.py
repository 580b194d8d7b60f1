"""AUSteer ("Fine-Grained Activation Steering: Steering Less, Achieving More", arXiv 2602.04428, §4).

An *atomic unit* (AU) is one dimension ``i`` of one site in one layer ``l``. From N contrastive pairs
(question + right answer vs question + wrong answer, :mod:`fusesteer.methods.pairs`):

1. **momentum** of AU (l, i) on pair j: ``m = x_pos - x_neg`` at the last token of each sequence;
2. ``r_pos = #(m > 0) / N``, ``r_neg = #(m < 0) / N``, score ``s = max(r_pos, r_neg)``;
3. rank all AUs of the site over **all layers at once** (global top-k; ties: stable, by (layer, dim));
4. ``γ = +α·r_pos`` if ``r_pos > r_neg`` else ``-α·r_neg`` (the paper's "otherwise" branch also takes ties);
5. the plan scales those dims: ``x̂ = x + γ·x``, i.e. a diagonal gain ``a = 1 + γ`` (sparse entries per layer).

Localization is streaming: :class:`MomentumStats` keeps per-AU running counts of ``m > 0`` and ``m < 0``
and the running sum of ``m`` (for the activation-difference and fixed-vector ablations), fed by an iterator
of ``(pos, neg)`` activation batches ``[b, L, W]`` (:func:`pair_activations`); no activation is kept once
its batch has been counted. Extra accumulators (e.g. ITI's per-head statistics) can ride on the same
forward passes.

Sites: ``head`` = ``attn.o_proj.in`` (the paper's AUSteer-Head), ``ffn`` = ``mlp.out`` (AUSteer-FFN; the
paper's FFN dims are block-output dims) and ``down`` = ``mlp.down_proj.in`` (an extra variant).

Validation sweeps of (k, α) live in :mod:`fusesteer.methods.sweep`.
"""

from __future__ import annotations

import hashlib
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

import torch

from ..errors import FuseSteerError
from ..runtime.backends.base import model_device
from ..runtime.plan import SITES, ModelSpec, SteeringPlan
from .capture import site_recorder
from .pairs import ContrastivePair, pair_token_ids, right_padded

__all__ = [
    "AUSteerError", "AU_SITES", "LOCALIZATIONS", "STEERINGS", "resolve_site", "MomentumStats",
    "accumulate", "pair_activations", "Localization", "localize", "localize_many", "rank_units", "select_units",
    "austeer_gammas", "units_plan", "build_plan", "austeer_plan", "provenance",
]

AU_SITES = {"head": "attn.o_proj.in", "ffn": "mlp.out", "down": "mlp.down_proj.in"}
LOCALIZATIONS = ("momentum", "random", "actdiff")
STEERINGS = ("adaptive", "fixed_strength", "fixed_vector")


class AUSteerError(FuseSteerError, ValueError):
    """Bad input to the AUSteer builder (shapes, k, alpha, sites...)."""


def resolve_site(site: str) -> str:
    """``head``/``ffn``/``down`` or a full site name -> the site name."""
    if site in AU_SITES:
        return AU_SITES[site]
    if site in SITES:
        return site
    raise AUSteerError(f"unknown site {site!r}; expected one of {', '.join(AU_SITES)} "
                       f"(= {', '.join(AU_SITES.values())}) or "
                       f"{', '.join(s for s in SITES if s not in AU_SITES.values())}")


def _variant(site: str) -> str:
    for k, v in AU_SITES.items():
        if v == site:
            return k
    return site


# --------------------------------------------------------------------------------------------
# Streaming statistics
# --------------------------------------------------------------------------------------------
class MomentumStats:
    """Running per-AU statistics of the momentum ``m = x_pos - x_neg`` over pairs.

    ``pos_count[l, i]`` / ``neg_count[l, i]``: number of pairs with m > 0 / m < 0 (int64);
    ``sum_m[l, i]``: running sum of m (float64). Axis 0 indexes ``layers`` (model layer numbers).
    """

    def __init__(self, layers: Sequence[int] | None = None, width: int | None = None):
        self.layers = None if layers is None else [int(l) for l in layers]
        self.width = width
        self.n = 0
        self.pos_count: torch.Tensor | None = None
        self.neg_count: torch.Tensor | None = None
        self.sum_m: torch.Tensor | None = None

    def _init(self, L: int, W: int) -> None:
        if self.layers is None:
            self.layers = list(range(L))
        if len(self.layers) != L:
            raise AUSteerError(f"activation batches have {L} layers but the statistics were set up for "
                               f"{len(self.layers)} layers {self.layers}")
        if self.width is not None and self.width != W:
            raise AUSteerError(f"activation batches have width {W}, expected {self.width}")
        self.width = W
        self.pos_count = torch.zeros(L, W, dtype=torch.int64)
        self.neg_count = torch.zeros(L, W, dtype=torch.int64)
        self.sum_m = torch.zeros(L, W, dtype=torch.float64)

    def update(self, pos: torch.Tensor, neg: torch.Tensor) -> None:
        """Add a batch: ``pos``, ``neg`` are [b, L, W] activations of the positive / negative samples."""
        if not isinstance(pos, torch.Tensor) or not isinstance(neg, torch.Tensor):
            raise AUSteerError("update() expects two tensors (pos, neg) of shape [b, L, W]")
        if pos.dim() != 3 or pos.shape != neg.shape:
            raise AUSteerError(f"pos and neg must both have shape [b, L, W]; got {tuple(pos.shape)} and "
                               f"{tuple(neg.shape)}")
        if pos.shape[0] == 0:
            return
        if self.pos_count is None:
            self._init(pos.shape[1], pos.shape[2])
        elif tuple(pos.shape[1:]) != tuple(self.pos_count.shape):
            raise AUSteerError(f"batch has [L, W] = {list(pos.shape[1:])}, earlier batches had "
                               f"{list(self.pos_count.shape)}")
        m = pos.float() - neg.float()
        if not bool(torch.isfinite(m).all()):
            raise AUSteerError("activations contain NaN or Inf; cannot compute the momentum")
        self.pos_count += (m > 0).sum(0)
        self.neg_count += (m < 0).sum(0)
        self.sum_m += m.sum(0, dtype=torch.float64)
        self.n += pos.shape[0]

    def _check(self) -> None:
        if self.n == 0 or self.pos_count is None:
            raise AUSteerError("no pairs have been accumulated yet")

    @property
    def r_pos(self) -> torch.Tensor:
        self._check()
        return self.pos_count.double() / self.n

    @property
    def r_neg(self) -> torch.Tensor:
        self._check()
        return self.neg_count.double() / self.n

    @property
    def score_counts(self) -> torch.Tensor:
        """``max(#(m>0), #(m<0))`` as integers: the score times N, exact for ranking."""
        self._check()
        return torch.maximum(self.pos_count, self.neg_count)

    @property
    def scores(self) -> torch.Tensor:
        return self.score_counts.double() / self.n

    @property
    def mean_m(self) -> torch.Tensor:
        self._check()
        return self.sum_m / self.n

    @property
    def shape(self) -> tuple[int, int]:
        self._check()
        return tuple(self.pos_count.shape)


def accumulate(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], stats: MomentumStats | None = None,
               extra: Sequence = ()) -> MomentumStats:
    """Feed ``(pos, neg)`` batches [b, L, W] into ``stats`` (a new :class:`MomentumStats` if None) and into
    every accumulator of ``extra`` (objects with ``update(pos, neg)``). Returns the stats."""
    stats = stats if stats is not None else MomentumStats()
    for item in batches:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise AUSteerError("each batch must be a (pos, neg) pair of [b, L, W] tensors")
        pos, neg = item
        stats.update(pos, neg)
        for acc in extra:
            acc.update(pos, neg)
    return stats


# --------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------
def pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


def pair_activations(model, tokenizer, pairs: Sequence[ContrastivePair], site, *, batch_size: int = 8,
                     layers: Sequence[int] | None = None, add_special_tokens: bool = True,
                     progress: bool = False) -> Iterator:
    """Yield ``(pos, neg)`` fp32 CPU tensors [b, L, W]: the site's activation at the last token of each
    positive / negative sequence, for ``batch_size`` pairs per forward (both members in one batch of 2b
    rows, right-padded with an attention mask; tokenized as the evaluation harness does).

    ``site`` may also be a list of sites: then every forward records all of them and each item is
    ``{site: (pos, neg)}``.
    """
    single = isinstance(site, str)
    sites = [resolve_site(site)] if single else [resolve_site(s) for s in site]
    if not sites or len(set(sites)) != len(sites):
        raise AUSteerError(f"need one or more distinct sites, got {site!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AUSteerError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not pairs:
        raise AUSteerError("no contrastive pairs")
    device = model_device(model)
    pad = pad_id(tokenizer)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs), desc=f"localize {', '.join(sites)}", unit="pair", leave=False)
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            seqs_pos, seqs_neg = [], []
            for p in chunk:
                a, b = pair_token_ids(tokenizer, p, add_special_tokens)
                seqs_pos.append(a)
                seqs_neg.append(b)
            seqs = seqs_pos + seqs_neg
            ids, mask = right_padded(seqs, pad)
            last = torch.tensor([len(q) - 1 for q in seqs], dtype=torch.long)
            rows = torch.arange(len(seqs))
            n = len(chunk)
            item = {}
            # hooks live for this forward only: nothing stays installed while the caller holds the generator
            with ExitStack() as stack, torch.inference_mode():
                stores = {s: stack.enter_context(site_recorder(model, s, layers)) for s in sites}
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                      logits_to_keep=1)
                for s, st in stores.items():
                    acts = torch.stack([st[k][rows.to(st[k].device), last.to(st[k].device)].float().cpu()
                                        for k in sorted(st)], dim=1)  # [2b, L, W]
                    st.clear()
                    item[s] = (acts[:n], acts[n:])
            if bar is not None:
                bar.update(n)
            yield item[sites[0]] if single else item
    finally:
        if bar is not None:
            bar.close()


# --------------------------------------------------------------------------------------------
# Localization
# --------------------------------------------------------------------------------------------
def provenance(dataset: str, pairs: Sequence[ContrastivePair], seed: int | None = None, **extra) -> dict:
    """Data provenance for plan metadata: dataset, number of pairs / distinct records, seed, ids digest."""
    ids = [p.id for p in pairs]
    records = {i.split("#", 1)[0] for i in ids}
    d = {"dataset": str(dataset), "n_pairs": len(ids), "n_records": len(records), "seed": seed,
         "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]}
    d.update(extra)
    return d


@dataclass
class Localization:
    """Momentum statistics of one site over all (selected) layers, plus where they came from."""

    stats: MomentumStats
    site: str
    spec: ModelSpec
    provenance: dict = field(default_factory=dict)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def n_pairs(self) -> int:
        return self.stats.n


def localize(model, tokenizer, pairs: Sequence[ContrastivePair], site: str = "head", *, batch_size: int = 8,
             layers: Sequence[int] | None = None, provenance: dict | None = None, extra: Mapping | None = None,
             progress: bool = False) -> Localization:
    """Stream the pairs through the model once and accumulate the momentum statistics at ``site``.

    ``extra``: {name: accumulator with update(pos, neg)} fed from the same forwards (kept in ``.extra``).
    """
    site = resolve_site(site)
    return localize_many(model, tokenizer, pairs, [site], batch_size=batch_size, layers=layers,
                         provenance=provenance, extra={site: extra or {}}, progress=progress)[site]


def localize_many(model, tokenizer, pairs: Sequence[ContrastivePair], sites: Sequence[str], *,
                  batch_size: int = 8, layers: Sequence[int] | None = None, provenance: dict | None = None,
                  extra: Mapping | None = None, progress: bool = False) -> dict[str, Localization]:
    """Like :func:`localize` for several sites from the same forward passes: {site: Localization}.

    ``extra``: {site: {name: accumulator}}. Every Localization's ``seconds`` is the shared wall time.
    """
    sites = [resolve_site(s) for s in sites]
    extra = {resolve_site(k): dict(v) for k, v in (extra or {}).items()}
    for k in extra:
        if k not in sites:
            raise AUSteerError(f"extra accumulators given for site {k!r}, which is not localized")
    spec = ModelSpec.from_model(model)
    t0 = time.perf_counter()
    stats = {s: MomentumStats(layers) for s in sites}
    for item in pair_activations(model, tokenizer, pairs, sites, batch_size=batch_size, layers=layers,
                                 progress=progress):
        for s, (pos, neg) in item.items():
            stats[s].update(pos, neg)
            for acc in extra.get(s, {}).values():
                acc.update(pos, neg)
    secs = time.perf_counter() - t0
    return {s: Localization(stats[s], s, spec, dict(provenance or {}), secs, extra.get(s, {})) for s in sites}


def rank_units(key: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k of a [L, W] key (larger first), ties broken by (layer index, dim) ascending.

    Returns (layer index into axis 0, dim), both int64 [k], in rank order.
    """
    if key.dim() != 2:
        raise AUSteerError(f"ranking key must be [L, W], got shape {tuple(key.shape)}")
    L, W = key.shape
    _check_k(k, L * W)
    order = torch.sort(key.reshape(-1), descending=True, stable=True).indices[:k]
    return order // W, order % W


def _check_k(k, total: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= total:
        raise AUSteerError(f"k must be an integer in [1, {total}] (the number of AUs at this site over the "
                           f"localized layers), got {k!r}")


def select_units(loc: Localization, k: int, localization: str = "momentum", seed: int = 0):
    """Indices (layer index, dim) of the k units chosen by ``localization``:

    * ``momentum`` — top-k by the discriminative score max(r_pos, r_neg) (AUSteer);
    * ``actdiff``  — top-k by |mean m| (activation-difference localization, as SADI);
    * ``random``   — k units drawn uniformly without replacement (``torch.Generator`` seeded by ``seed``),
      returned in (layer, dim) order.
    """
    st = loc.stats
    L, W = st.shape
    if localization == "momentum":
        return rank_units(st.score_counts, k)
    if localization == "actdiff":
        return rank_units(st.mean_m.abs(), k)
    if localization == "random":
        _check_k(k, L * W)
        g = torch.Generator().manual_seed(int(seed))
        flat = torch.randperm(L * W, generator=g)[:k].sort().values
        return flat // W, flat % W
    raise AUSteerError(f"unknown localization {localization!r}; expected one of {', '.join(LOCALIZATIONS)}")


def austeer_gammas(r_pos: torch.Tensor, r_neg: torch.Tensor, alpha: float, fixed: bool = False,
                   ties: str = "paper") -> torch.Tensor:
    """γ = +α·r_pos where r_pos > r_neg, else -α·r_neg (``fixed``: +α / -α regardless of the ratios).

    ``ties``: ``"paper"`` (eq. 4's "otherwise" branch: r_pos = r_neg steers negatively) or ``"code"`` (the
    authors' code flips the sign only when r_pos < r_neg, so ties steer positively)."""
    if ties not in ("paper", "code"):
        raise AUSteerError(f"ties must be 'paper' or 'code', got {ties!r}")
    up = r_pos > r_neg if ties == "paper" else r_pos >= r_neg
    if fixed:
        return torch.where(up, torch.full_like(r_pos, float(alpha)), torch.full_like(r_pos, -float(alpha)))
    return torch.where(up, float(alpha) * r_pos, -float(alpha) * r_neg)


def units_plan(spec: ModelSpec, site: str, layers: Sequence[int], dims: Sequence[int], a=None, b=None,
               name: str | None = None, metadata: dict | None = None) -> SteeringPlan:
    """A plan with one sparse entry per layer holding the given units' gains ``a`` and/or biases ``b``
    (values given per unit, in the same order as ``layers``/``dims``; dims sorted within an entry)."""
    layers = torch.as_tensor(layers, dtype=torch.int64).reshape(-1)
    dims = torch.as_tensor(dims, dtype=torch.int64).reshape(-1)
    if layers.numel() != dims.numel() or layers.numel() == 0:
        raise AUSteerError("units_plan needs the same non-zero number of layers and dims")
    vals = {}
    for what, v in (("a", a), ("b", b)):
        if v is not None:
            v = torch.as_tensor(v, dtype=torch.float32).reshape(-1)
            if v.numel() != dims.numel():
                raise AUSteerError(f"{what} has {v.numel()} values for {dims.numel()} units")
            vals[what] = v
    plan = SteeringPlan(spec, name=name, metadata=metadata)
    for l in sorted(set(layers.tolist())):
        sel = (layers == l).nonzero().reshape(-1)
        order = sel[torch.argsort(dims[sel])]
        plan.add(layer=int(l), site=site, dims=dims[order],
                 a=vals["a"][order] if "a" in vals else None,
                 b=vals["b"][order] if "b" in vals else None)
    return plan


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise AUSteerError(f"alpha must be a finite number >= 0, got {alpha!r}")
    return float(alpha)


def build_plan(loc: Localization, k: int, alpha: float, *, localization: str = "momentum",
               steering: str = "adaptive", seed: int = 0, name: str | None = None,
               ties: str = "paper") -> SteeringPlan:
    """The plan for k units at ``loc.site`` with strength α.

    ``localization``: ``momentum`` (AUSteer), ``actdiff`` or ``random`` (see :func:`select_units`).
    ``steering``: ``adaptive`` (AUSteer: a = 1 + γ, γ = ±α·r), ``fixed_strength`` (a = 1 ± α) or
    ``fixed_vector`` (a = 1, b = α·mean m on the same units: an additive, input-independent shift).
    Metadata holds the method, site, k, α, the chosen units with their scores, and the data provenance.
    """
    alpha = _check_alpha(alpha)
    if steering not in STEERINGS:
        raise AUSteerError(f"unknown steering {steering!r}; expected one of {', '.join(STEERINGS)}")
    st = loc.stats
    li, d = select_units(loc, k, localization, seed)
    r_pos, r_neg = st.r_pos[li, d], st.r_neg[li, d]
    mean_m = st.mean_m[li, d]
    layer_ids = torch.tensor([st.layers[i] for i in li.tolist()], dtype=torch.int64)
    a = b = None
    gam = None
    if steering == "fixed_vector":
        b = alpha * mean_m
    else:
        gam = austeer_gammas(r_pos, r_neg, alpha, fixed=steering == "fixed_strength", ties=ties)
        a = 1.0 + gam
    units = []
    for j in range(len(d)):
        u = {"layer": int(layer_ids[j]), "dim": int(d[j]), "score": float(max(r_pos[j], r_neg[j])),
             "r_pos": float(r_pos[j]), "r_neg": float(r_neg[j]), "mean_m": float(mean_m[j])}
        if gam is not None:
            u["gamma"] = float(gam[j])
        units.append(u)
    method = "austeer" if (localization, steering) == ("momentum", "adaptive") else "austeer-ablation"
    meta = {"method": method, "variant": _variant(loc.site), "site": loc.site, "k": int(k), "alpha": alpha,
            "localization": localization, "steering": steering, "n_pairs": st.n,
            "units": units, "data": dict(loc.provenance)}
    if ties != "paper":
        meta["ties"] = ties
    if localization == "random":
        meta["seed"] = int(seed)
    default = (f"austeer-{_variant(loc.site)}" if method == "austeer"
               else f"{localization}+{steering}-{_variant(loc.site)}")
    return units_plan(loc.spec, loc.site, layer_ids, d, a=a, b=b, name=name or default, metadata=meta)


def austeer_plan(loc: Localization, k: int, alpha: float, name: str | None = None, ties: str = "paper") -> SteeringPlan:
    """AUSteer: global top-k by momentum score, adaptive gains a = 1 + γ (``ties``: see :func:`austeer_gammas`)."""
    return build_plan(loc, k, alpha, name=name, ties=ties)
