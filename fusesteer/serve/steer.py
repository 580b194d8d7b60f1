"""The engine's view of the steering runtime: one attachment for the server's lifetime, plans added and
removed between forward passes, per-row routing and per-row prompt lengths set before each forward.

The attachment uses the capacity API of :func:`fusesteer.attach` (``capacity=N, sites="all"``): every
(layer, site) is patched once at start-up and the plan table has N plan slots reserved up front, so a plan
uploaded while others decode is written into a free slot: nothing is re-patched and a compiled model sees the
same tensors. When every slot is taken, the least recently used plan no running request uses is removed.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from ..errors import AttachError
from ..runtime.attach import attach
from ..runtime.backends import resolve
from ..runtime.plan import SteeringPlan

log = logging.getLogger("fusesteer.serve")


class CapacityFull(RuntimeError):
    """Every plan slot holds a plan some running request uses."""


class Steerer:
    def __init__(self, model, backend: str = "auto", capacity: int = 16):
        self.model = model
        # the runtime's one rule, with per-row plans: 'auto' -> triton on CUDA (when importable), torch otherwise,
        # reference hooks on a model without a family adapter; folding cannot serve per-row plans
        self.backend = resolve(backend, model, per_row=True)
        self.capacity = int(capacity)
        self.held: OrderedDict[str, SteeringPlan] = OrderedDict()  # key -> plan, least recently used first
        self.handle = attach(model, {}, backend=self.backend, capacity=self.capacity, sites="all",
                             check_finite=False)
        log.info("steering runtime: backend %s, %d plan slots", self.backend, self.capacity)

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
        for key, plan in missing.items():
            while len(self.held) >= self.capacity:
                victim = next((k for k in self.held if k not in keep), None)
                if victim is None:
                    raise CapacityFull(f"all {self.capacity} plan slots are in use")
                self._remove(victim)
            try:
                self._add(key, plan)
            except AttachError as e:
                raise CapacityFull(str(e)) from None

    def _add(self, key: str, plan: SteeringPlan) -> None:
        """Write ``plan`` into a free slot of the plan table under ``key``."""
        self.handle.add_plan(key, plan)
        self.held[key] = plan

    def _remove(self, key: str) -> None:
        self.handle.route([None])  # the last forward's routing may still name it
        self.handle.remove_plan(key)
        del self.held[key]

    # ---- per forward -----------------------------------------------------------------------------
    def prepare(self, row_keys: list, prompt_lens: list[int]) -> None:
        """Route the rows of the next forward (a plan key or None per row) and set their prompt lengths."""
        h = self.handle
        if h is None:
            return
        h.route(list(row_keys))
        h.set_prompt_length([int(n) for n in prompt_lens])

    def close(self) -> None:
        if self.handle is not None:
            self.handle.detach()
            self.handle = None
        self.held = OrderedDict()
