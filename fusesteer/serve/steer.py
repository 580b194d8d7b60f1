"""The engine's view of the steering runtime: one attachment for the server's lifetime, plans added and
removed between forward passes, per-row routing and per-row prompt lengths set before each forward.

With the capacity API of :func:`fusesteer.attach` (``capacity=N, sites="all"``) every (layer, site) is
patched once at start-up and the plan table has N plan slots reserved up front, so a plan uploaded while
others decode is written into a free slot: nothing is re-patched and a compiled model sees the same
tensors. On a runtime without that API the adapter falls back to detaching and attaching again between
two forwards when the set of plans in use changes (correct, since the KV cache does not depend on the
attachment, but it re-patches), and encodes the phase of a forward in one global prompt length (every
forward the engine runs is all-prompt or all-generated).
"""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict

from ..errors import AttachError
from ..runtime.attach import attach
from ..runtime.backends import resolve
from ..runtime.plan import SteeringPlan

log = logging.getLogger("fusesteer.serve")

_ALL_PROMPT = 1 << 40  # a prompt length no position reaches: every token is a prompt token


class CapacityFull(RuntimeError):
    """Every plan slot holds a plan some running request uses."""


def resolve_backend(backend: str, model) -> str:
    """The runtime's rule with per-row plans: 'auto' -> triton on CUDA (when importable), torch otherwise,
    reference hooks on a model without a family adapter; folding cannot serve per-row plans."""
    return resolve(backend, model, per_row=True)


class Steerer:
    def __init__(self, model, backend: str = "auto", capacity: int = 16):
        self.model = model
        self.backend = resolve_backend(backend, model)
        self.capacity = int(capacity)
        params = inspect.signature(attach).parameters
        self.dynamic = "capacity" in params
        self._kw = {"check_finite": False} if "check_finite" in params else {}
        self.held: OrderedDict[str, SteeringPlan] = OrderedDict()  # key -> plan, least recently used first
        self.handle = None
        if self.dynamic:
            self.handle = attach(model, {}, backend=self.backend, capacity=self.capacity, sites="all", **self._kw)
        log.info("steering runtime: backend %s, %s, %d plan slots", self.backend,
                 "capacity API (no re-patching)" if self.dynamic else "re-attach fallback", self.capacity)

    # ---- plans -----------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.held

    def touch(self, key: str) -> None:
        self.held.move_to_end(key)

    def ensure(self, wanted: dict[str, SteeringPlan], in_use: set[str]) -> None:
        """Make every plan in ``wanted`` available; evict least recently used plans not in ``in_use``.
        Raises CapacityFull if that is impossible, PlanError if a plan does not fit the model."""
        for key in wanted:
            if key in self.held:
                self.held.move_to_end(key)
        missing = {k: p for k, p in wanted.items() if k not in self.held}
        if not missing:
            return
        keep = set(in_use) | set(wanted)
        if len(keep) > self.capacity:
            raise CapacityFull(f"{len(keep)} plans needed at once, {self.capacity} slots")
        if self.dynamic:
            for key, plan in missing.items():
                while len(self.held) >= self.capacity:
                    victim = next((k for k in self.held if k not in keep), None)
                    if victim is None:
                        raise CapacityFull(f"all {self.capacity} plan slots are in use")
                    self.handle.route([None])  # the last forward's routing may still name it
                    self.handle.remove_plan(victim)
                    del self.held[victim]
                try:
                    self.handle.add_plan(key, plan)
                except AttachError as e:
                    raise CapacityFull(str(e)) from None
                self.held[key] = plan
            return
        # fallback: one attachment holding exactly the plans to keep
        plans = OrderedDict((k, self.held[k]) for k in self.held if k in keep)
        plans.update(missing)
        self._reattach(plans)

    def _reattach(self, plans: OrderedDict[str, SteeringPlan]) -> None:
        if self.handle is not None:
            self.handle.detach()
            self.handle = None
        self.held = OrderedDict()
        if plans:
            self.handle = attach(self.model, dict(plans), backend=self.backend, **self._kw)
            self.held = plans

    def release_unused(self, in_use: set[str], keep_cached: int) -> None:
        """Fallback mode only: drop plans no row uses once more than ``keep_cached`` idle ones pile up."""
        if self.dynamic:
            return
        idle = [k for k in self.held if k not in in_use]
        if len(idle) > keep_cached:
            self._reattach(OrderedDict((k, p) for k, p in self.held.items() if k in in_use))

    # ---- per forward -----------------------------------------------------------------------------
    def prepare(self, row_keys: list, prompt_lens: list[int], phase: str) -> None:
        """Route the rows of the next forward and set their prompt lengths (``phase`` is what every token of
        the forward is: "prompt" for a prefill, "generated" for a decode step)."""
        h = self.handle
        if h is None:
            return
        h.route(list(row_keys))
        if self.dynamic:
            h.set_prompt_length([int(n) for n in prompt_lens])
        else:
            h.set_prompt_length(_ALL_PROMPT if phase == "prompt" else 0)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.detach()
            self.handle = None
        self.held = OrderedDict()
