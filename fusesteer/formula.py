"""The one steering formula, ``x' = a ⊙ x + b``, in float32 with one rounding, cast back to x's dtype.

Every torch path computes it here: the reference backend (the oracle), the torch backend and the kernels'
torch references. ``torch.addcmul`` is a fused multiply-add (one rounding of ``a·x + b``), which is what
the Triton kernels compute too (``tl.fma`` in :mod:`fusesteer.kernels._device`; on a GPU, and in Triton's
interpreter, which implements fma with one rounding), so all of them agree bit for bit in float32.
"""

from __future__ import annotations

import torch


def affine(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a * x + b`` in float32 with one rounding (addcmul), returned in ``x``'s dtype; a, b broadcast."""
    if x.dtype == torch.float32:
        return torch.addcmul(b, x, a)
    return torch.addcmul(b, x.float(), a).to(x.dtype)


def shift(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``affine(x, 1, b)``, bit for bit, with one op: ``x + b`` in float32, returned in ``x``'s dtype."""
    return x + b if x.dtype == torch.float32 else (x.float() + b).to(x.dtype)


def is_identity(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether the map (a, b) is exactly x' = x (None: the default, a = 1 or b = 0)."""
    return is_gain_free(a) and (b is None or bool((b == 0).all()))


def is_gain_free(a: torch.Tensor | None) -> bool:
    """Whether a == 1 everywhere (the map is x + b: one add suffices)."""
    return a is None or bool((a == 1).all())
