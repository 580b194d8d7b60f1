"""The backends, and the one rule for which of them runs on a model.

:func:`resolve` is that rule: attach, the ``auto`` backend, the layer contract probe, the server and the bench
all ask it (nothing else decides a backend). :func:`make` builds the backend object of a resolved name.
"""

from __future__ import annotations

import logging

from ...errors import AttachError
from .base import fused_backend_name, model_device

log = logging.getLogger("fusesteer")

BACKENDS = ("auto", "reference", "torch", "triton", "fold")


def _generic(model, parts) -> bool:
    if parts is None:
        from ..families import model_parts
        parts = model_parts(model)
    return parts.family.generic


def resolve(name: str, model, parts=None, per_row: bool = False) -> str:
    """The backend that runs when ``name`` is asked for on ``model`` (``parts``: its :class:`ModelParts`, if
    known).

    * a model without a family adapter (the generic path) runs ``reference`` hooks only: ``auto`` resolves to
      it, any other fused or folding backend is refused;
    * ``auto`` stays ``auto`` (fold what folds, fuse the rest) unless ``per_row``: a caller that routes
      several plans per batch row (the server) cannot fold, and gets the fused backend of the model's device
      (``triton`` on CUDA when Triton imports, else ``torch``);
    * any other name is itself.
    """
    if name not in BACKENDS:
        raise AttachError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if _generic(model, parts):
        if name in ("auto", "reference"):
            if name == "auto":
                log.info("fusesteer: auto backend on %s (no family adapter): reference hooks", type(model).__name__)
            return "reference"
        from ..families import SUPPORTED_CLASSES

        raise AttachError(
            f"backend {name!r} needs a family adapter, and {type(model).__name__} has none: fusesteer has adapters "
            f"for {', '.join(SUPPORTED_CLASSES)}. Use backend='reference' or 'auto' (generic hooks, unverified on "
            f"this architecture) or add an adapter in fusesteer/runtime/families.py")
    if name == "auto" and per_row:
        return fused_name(model, parts)
    return name


def fused_name(model, parts=None) -> str:
    """The fused (patched-forward) backend on ``model``: what ``auto`` runs the maps it does not fold with."""
    if _generic(model, parts):
        return "reference"
    return fused_backend_name(model_device(model))


def make(name: str):
    """A new backend object for a resolved name."""
    if name == "reference":
        from .reference import ReferenceBackend
        return ReferenceBackend()
    if name == "torch":
        from .torch import TorchBackend
        return TorchBackend()
    if name == "triton":
        try:
            from .triton import TritonBackend
        except ImportError as e:
            raise AttachError(f"backend 'triton' is not available: {e}") from None
        return TritonBackend()
    if name == "fold":
        from .fold import FoldBackend
        return FoldBackend()
    if name == "auto":
        from .auto import AutoBackend

        def fused(handle):
            fname = fused_name(handle.model, handle.parts)
            return fname, make(fname)
        return AutoBackend(fused)
    raise AttachError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
