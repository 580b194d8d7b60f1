"""What every backend is, and what it installs against.

A backend installs its patches (forwards, hooks, folded weights) through an :class:`InstallContext`: the model's
parts, the tables it runs (all of the handle's, or the subset ``auto`` did not fold), the patcher its changes go
to (restored on detach), the router and the per-forward lifecycle of the handle. It may refuse or adapt to a
routing (``on_route``) and react to values changed in place (``on_update``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch


def model_device(model) -> torch.device:
    """The device a model's input ids go to: its input embeddings' (the first parameter's for a model without
    them, CPU for a model without parameters). The one rule every part of fusesteer uses."""
    try:
        emb = model.get_input_embeddings()
        return emb.weight.device
    except Exception:  # noqa: BLE001 - not an HF model, or embeddings without a weight
        return next((p.device for p in model.parameters()), torch.device("cpu"))


def fused_backend_name(device) -> str:
    """The fused backend ``auto`` (and the server) runs on ``device``: ``triton`` on CUDA when Triton is
    installed, ``torch`` otherwise."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "torch"


@dataclass
class InstallContext:
    handle: object  # the SteeringHandle
    tables: dict = None  # {(layer, site): SiteTable} this backend runs
    patcher: object = None
    parts: object = field(init=False)
    router: object = field(init=False)

    def __post_init__(self):
        h = self.handle
        self.tables = h.tables if self.tables is None else self.tables
        self.patcher = h.patcher if self.patcher is None else self.patcher
        self.parts, self.router = h.parts, h.router

    def checker(self, layer: int, site: str):
        return self.handle.checker(layer, site)

    def begin_forward(self) -> None:
        self.handle._begin_forward()

    def end_forward(self, failed: bool = False) -> None:
        self.handle._end_forward(failed=failed)


class Backend:
    name = "backend"
    static = False  # True: values live in the weights, so update()/add_plan() need a new attach

    @staticmethod
    def support(family) -> str:
        """What this backend does on a family (a :class:`~..families.Family`; ``family.generic``: a model
        without an adapter), in a few words: the matrix ``fs.supported_models()`` and the README show."""
        raise NotImplementedError

    def install(self, ctx: InstallContext) -> None:
        raise NotImplementedError

    def check(self, handle) -> None:
        """Called at attach before anything is patched (and before the contract probe): raise AttachError for
        a model this backend cannot steer as the reference would."""

    def holds_weights(self) -> bool:
        """Whether steering values are folded into the model's weights now (so loading a state dict while
        attached would be lost or corrupted at detach)."""
        return False

    def on_route(self, handle, ids) -> None:
        """Called before a routing takes effect: raise to refuse it, or re-plan."""

    def on_update(self, handle) -> None:
        """Called after the handle's tables got new values in place."""
