"""The running batch's KV cache as left-padded rows: merge newly prefilled rows in, keep some rows, zero padding.

Every row ends at the last column (left padding), so one decode forward appends one column to all of them. The
cache object itself is built and read through :mod:`fusesteer.runtime.compat` (``new_cache``,
``cache_tensors``, ``cache_from_tensors``); this module only handles the per-layer ``[batch, heads, time, dim]``
tensors and the ``[batch, time]`` attention mask.
"""

from __future__ import annotations

import torch

from ..runtime.compat import cache_from_tensors, cache_tensors, new_cache

__all__ = ["Batch", "merge_batches", "new_cache", "select_rows", "zero_padding"]


def _left_pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def merge_batches(kv_a, mask_a, kv_b, mask_b):
    """Concatenate two left-padded batches along the batch dimension (left-padding the shorter one)."""
    if kv_a is None:
        return kv_b, mask_b
    ta, tb = mask_a.shape[1], mask_b.shape[1]
    t = max(ta, tb)
    kv = [(torch.cat([_left_pad(ka, t - ta, 2), _left_pad(kb, t - tb, 2)]),
           torch.cat([_left_pad(va, t - ta, 2), _left_pad(vb, t - tb, 2)]))
          for (ka, va), (kb, vb) in zip(kv_a, kv_b)]
    return kv, torch.cat([_left_pad(mask_a, t - ta, 1), _left_pad(mask_b, t - tb, 1)])


def select_rows(kv, mask, keep: list[int], n_cached: list[int]):
    """Keep batch rows ``keep`` and cut the leading columns that are padding in every kept row."""
    if not keep:
        return None, None
    t = mask.shape[1]
    cut = t - max(n_cached)
    idx = torch.tensor(keep, device=mask.device)
    full = len(keep) == mask.shape[0]
    kv = [((k if full else k.index_select(0, idx))[:, :, cut:], (v if full else v.index_select(0, idx))[:, :, cut:])
          for k, v in kv]
    mask = (mask if full else mask.index_select(0, idx))[:, cut:]
    return kv, mask


def zero_padding(kv, mask):
    """Zero the pad columns of a freshly prefilled batch, so masked garbage (a pad token's steered activations
    may be Inf/NaN) can never leak as 0 * NaN through an attention weight of zero. A finite pad entry becomes
    ``x * 0`` (a signed zero, as before), a non-finite one 0; real columns are untouched."""
    if not bool((mask == 0).any()):
        return kv
    real = mask[:, None, :, None].bool()
    m = real.to(kv[0][0].dtype)

    def zero(t):
        return torch.where(real, t, (t * m).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0))

    return [(zero(k), zero(v)) for k, v in kv]


class Batch:
    """The running rows' KV cache and attention mask (None while no row runs). Row ``i`` of the cache is row
    ``i`` of the engine's row list; callers keep the two in the same order."""

    def __init__(self):
        self.cache = None  # DynamicCache, left-padded: every row ends at the last column
        self.mask = None  # [rows, time] attention mask (1 = a real token)

    def clear(self) -> None:
        self.cache, self.mask = None, None

    def append(self, cache, mask, keep: list[int], n_cached: list[int]) -> None:
        """Add rows ``keep`` of a prefilled ``cache`` (with its ``mask``) after the running rows; ``n_cached``: the
        real tokens of each kept row."""
        kv, mask = select_rows(zero_padding(cache_tensors(cache), mask), mask, keep, n_cached)
        kv, self.mask = merge_batches(None if self.cache is None else cache_tensors(self.cache), self.mask, kv, mask)
        self.cache = cache_from_tensors(kv)

    def keep(self, keep: list[int], n_cached: list[int]) -> None:
        """Keep only rows ``keep`` (in that order); ``n_cached``: the real tokens of each kept row."""
        kv, self.mask = select_rows(cache_tensors(self.cache), self.mask, keep, n_cached)
        self.cache = None if kv is None else cache_from_tensors(kv)

    def next_mask(self) -> torch.Tensor:
        """The mask of the next decode forward: one more real column for every row."""
        return torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
