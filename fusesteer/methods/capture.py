"""Activation capture at a site for all layers (hooks on the HF modules; read-only).

`capture_last_token` yields the activation of the last real token of every sequence, batch by batch,
so callers can stream statistics over thousands of prompts without holding them all.
`capture_span_mean` averages a site over a token span per sequence (Fusion Steering).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from ..errors import FuseSteerError
from ..runtime import tp
from ..runtime.backends.base import model_device
from ..runtime.families import model_parts
from ..runtime.plan import ModelSpec
from ..runtime.sites import SITES, hook_site


@contextmanager
def site_recorder(model, site: str, layers: Sequence[int] | None = None, before_maps: bool = False):
    """Context manager yielding a dict {layer: tensor} filled by each forward with the site's activation (as steered
    by an attached plan). ``before_maps``: entered while a plan is attached with the ``reference`` backend, record the
    site's value before that plan's map instead (the recorder's hook then runs first)."""
    if site not in SITES:
        raise FuseSteerError(f"unknown site {site!r}; expected one of {', '.join(SITES)}")
    parts = model_parts(model)
    n = len(parts.layers)
    layers = list(range(n)) if layers is None else list(layers)
    for l in layers:
        if not 0 <= l < n:
            raise FuseSteerError(f"layer {l} is out of range; the model has {n} layers (0..{n - 1})")
        parts.check_site(l, site)  # e.g. Qwen3-MoE: no mlp.down_proj.in on a sparse layer (PlanError)
    store: dict[int, torch.Tensor] = {}
    handles = []
    width = ModelSpec.from_model(model).site_width(site)
    for l in layers:
        shard = tp.site_shard(parts.layers[l], l, site)  # tensor parallelism: this rank's columns of the site

        def record(x, l=l, shard=shard):
            x = x.detach()
            store[l] = x if shard is None else tp.gather_last_dim(x, shard, width)  # full width on every rank
        handles.append(hook_site(parts.layers[l], site, record, first=before_maps))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _batches(seq, size):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def _encode(tokenizer, texts, device):
    old = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = old
    return {k: v.to(device) for k, v in enc.items()}


def capture_last_token(model, tokenizer, texts: Sequence[str], site: str, layers: Sequence[int] | None = None,
                       batch_size: int = 8, progress: bool = False) -> Iterator[torch.Tensor]:
    """Yield fp32 tensors [b, L, W]: the site's activation at the last token of each text (left padded)."""
    from tqdm.auto import tqdm

    device = model_device(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    it = _batches(list(texts), batch_size)
    if progress:
        it = tqdm(it, total=(len(texts) + batch_size - 1) // batch_size, desc=f"capture {site}", leave=False)
    # hooks and inference mode only around each forward: a suspended generator must not leak either
    # into the caller (inference mode is thread-local state; tensors made under it cannot be updated later)
    for chunk in it:
        enc = _encode(tokenizer, chunk, device)
        with site_recorder(model, site, layers) as store, torch.inference_mode():
            model(**enc, use_cache=False)
            acts = torch.stack([store[k][:, -1, :].float().cpu() for k in sorted(store)], dim=1)
        yield acts.clone()


def capture_ids_last_token(model, input_ids: torch.Tensor, site: str, attention_mask=None,
                           layers: Sequence[int] | None = None) -> torch.Tensor:
    """Same as capture_last_token for pre-tokenised, left-padded ids: returns [B, L, W] fp32."""
    with site_recorder(model, site, layers) as store, torch.inference_mode():
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return torch.stack([store[k][:, -1, :].float().cpu() for k in sorted(store)], dim=1)


def capture_span_mean(model, input_ids: torch.Tensor, spans: Sequence[tuple[int, int]], site: str = "layer.out",
                      attention_mask=None, layers: Sequence[int] | None = None) -> torch.Tensor:
    """Mean of the site's activation over token span [start, end) of each row: returns [B, L, W] fp32."""
    with site_recorder(model, site, layers) as store, torch.inference_mode():
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        out = []
        for k in sorted(store):
            x = store[k].float()
            rows = []
            for r, (s, e) in enumerate(spans):
                if not 0 <= s < e <= x.shape[1]:
                    raise FuseSteerError(f"row {r}: span [{s}, {e}) is empty or outside the sequence of "
                                         f"length {x.shape[1]}")
                rows.append(x[r, s:e].mean(0))
            out.append(torch.stack(rows))
        return torch.stack(out, dim=1).cpu()
