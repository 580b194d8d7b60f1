"""attach(model, plan(s), backend=...) -> SteeringHandle (also a context manager).

The handle keeps the lifecycle (install, the guards against moves and state loads, detach) and the routing
API; the plans, their ids and their tables belong to its :class:`~.tables.PlanTable`, the per-token routing to
its :class:`~.routing.Router`, the non-finite check to its :class:`~.guard.FiniteGuard`.
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch

from ..errors import AttachError, PlanError
from . import tp
from .backends import BACKENDS, make, resolve
from .backends.base import InstallContext
from .families import layer_device, model_parts
from .guard import FiniteGuard
from .patching import Patcher, guard_model
from .plan import ModelSpec, SteeringPlan
from .routing import Router, prompt_lengths, row_ids, token_ids
from .tables import PlanTable

log = logging.getLogger("fusesteer")

_HANDLE_ATTR = "_fusesteer_handle"
MAX_CAPACITY = 2 ** 16  # plans one handle can hold


class SteeringHandle:
    """A live attachment of one or more plans to a model. Use as a context manager or call detach()."""

    def __init__(self, model, plans: Mapping[str, SteeringPlan], default: str | None, backend: str,
                 check_finite: bool = True, capacity: int | None = None, sites=None, verify: bool = True):
        self.model = model
        self.parts = model_parts(model)
        self.spec = ModelSpec.from_model(model)
        self.backend_name = backend
        cap = len(plans) if capacity is None else capacity
        if isinstance(cap, bool) or not isinstance(cap, int) or not max(1, len(plans)) <= cap <= MAX_CAPACITY:
            raise AttachError(f"capacity={capacity!r}: expected an integer from the number of plans "
                              f"({max(1, len(plans))}) to {MAX_CAPACITY}")
        bound = {name: self._bound(name, p) for name, p in plans.items()}
        devices = {i: layer_device(l) for i, l in enumerate(self.parts.layers)}
        self.table = PlanTable(self.spec, cap, bound, devices, self.parts.site_keys(sites),
                               shards=lambda keys: tp.shards(self.parts, keys))
        first = next((d for d in devices.values() if d is not None), torch.device("cpu"))
        self.router = Router(cap, self.table.ids[default] if default is not None else None, device=first)
        self.router.plan_names = self.table.names
        self.patcher = Patcher()
        self.check_finite, self.verify = check_finite, verify
        self.guard = FiniteGuard(check_finite, self.spec, parallel=tp.is_parallel(model))
        for name, p in bound.items():
            self.guard.arm(name, p, "attach", maps=self.table.maps(p))
        self.attached = False
        self.backend = make(resolve(backend, model, self.parts))
        self.report: dict = {}
        self.contract_ms: float | None = None

    # what the plan table holds, under the names backends and callers read
    capacity = property(lambda self: self.table.capacity)
    tables = property(lambda self: self.table.tables)
    keys = property(lambda self: self.table.keys)
    plans = property(lambda self: self.table.plans)
    plan_names = property(lambda self: self.table.names)
    _ids = property(lambda self: self.table.ids)

    def _bound(self, name, p) -> SteeringPlan:
        """A private copy of ``p`` bound to the model: the caller's plan is never bound in place, and editing
        it after attach() / update() changes nothing until it is passed to update() again."""
        if not isinstance(p, SteeringPlan):
            raise PlanError(f"plan {name!r}: expected a SteeringPlan, got {type(p).__name__}")
        try:
            bound = p.copy().bind(self.spec)  # bind() validates every entry of the copy
            for i, e in enumerate(bound.entries):  # every site exists on its layer (MoE: no down_proj on sparse ones)
                why = self.parts.site_problem(e.layer, e.site)
                if why is not None:
                    raise PlanError(f"{e.describe(i)}: {why}")
            return bound
        except PlanError as e:
            raise PlanError(f"plan {name!r}: {e}") from None

    # ---- lifecycle -------------------------------------------------------------------------------
    def install(self) -> None:
        """Check the backend and the layer contract, then patch the model (undone by detach())."""
        if getattr(self.model, _HANDLE_ATTR, None) is not None:
            raise AttachError("this model already has a fusesteer plan attached; detach it first, or combine "
                              "plans into one with plan.extend(other) (entries compose in order) or attach "
                              "them together as {name: plan} with per-row routing")
        self.backend.check(self)
        if self.verify:
            from .contract import verify_contract
            self.contract_ms = verify_contract(self)
        try:
            self.patcher.set_attr(self.model, _HANDLE_ATTR, self)
            self.router.wrap_generate(self.model, self.patcher)
            self.backend.install(InstallContext(self))
            guard_model(self.patcher, self.model, lambda: self.attached, self.backend.holds_weights,
                        self.backend_name)
        except BaseException:
            self.patcher.restore()
            raise
        self.attached = True

    def _live(self, what: str) -> None:
        if not self.attached:
            retry = " (its detach() failed part-way: call detach() again)" if self.patcher.pending else ""
            raise AttachError(f"{what}: this handle is detached{retry}; a detached handle never touches the model "
                              f"again: attach anew with fs.attach(model, plan)")

    def detach(self) -> None:
        """Restore the model exactly. Detaching again is a no-op; if an undo step failed, the error names it and
        a second detach() retries what is left."""
        if not self.attached and not self.patcher.pending:
            return
        if not self.attached:
            other = getattr(self.model, _HANDLE_ATTR, None)
            if other is not None and other is not self:
                raise AttachError("detach() retry: another plan has been attached to this model since; detach that "
                                  "one first")
        self.attached = False
        self.patcher.restore()

    def __enter__(self) -> "SteeringHandle":
        self._live("with handle")
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # ---- routing ---------------------------------------------------------------------------------
    def plan_id(self, name: str | None) -> int:
        """The id of an attached plan (0 for None = unsteered)."""
        if name is None:
            return 0
        if name not in self._ids:
            raise AttachError(f"unknown plan {name!r}; attached plans: {self.plan_names}")
        return self._ids[name]

    def route(self, rows) -> "SteeringHandle":
        """One entry per batch row: a plan name, None (unsteered), or a plan id (0 = unsteered)."""
        self._live("route()")
        ids = row_ids(rows, self._ids, self.plan_names)
        self._before_route(ids)
        self.router.set_rows(ids)
        return self

    def route_tokens(self, plan_ids: torch.Tensor, prompt_lens: torch.Tensor) -> "SteeringHandle":
        """Per-token routing for packed batches: int tensors broadcastable to the [batch, seq] of the next
        forwards; token t uses plan ``plan_ids[t]`` (0 = unsteered) and is generated iff its position >=
        ``prompt_lens[t]``."""
        self._live("route_tokens()")
        self._before_route(token_ids(plan_ids, prompt_lens, self._ids))
        self.router.set_tokens(plan_ids, prompt_lens)
        return self

    def _before_route(self, ids) -> None:
        """Let the backend refuse (fold) or adapt to (auto) a routing before it takes effect."""
        self.backend.on_route(self, ids)

    def route_all(self, name: str | None) -> "SteeringHandle":
        """Every row uses the same plan (or None) whatever the batch size."""
        self._live("route_all()")
        if name is not None and not isinstance(name, str):
            raise AttachError(f"route_all() expects a plan name or None, got {type(name).__name__} {name!r}")
        pid = self.plan_id(name)
        self._before_route([pid])
        self.router.set_default(pid)
        return self

    def set_prompt_length(self, n) -> None:
        """Override the prompt length used for gating: an int for every row, a list with one per batch row, or
        None to learn it again (at the first forward of each generate(), or of a sequence starting at
        position 0). Lengths count positions: row r's token at position p is generated iff p >= n[r]."""
        self._live("set_prompt_length()")
        self.router.set_prompt_length(prompt_lengths(n))

    # ---- plans -----------------------------------------------------------------------------------
    def add_plan(self, name: str, plan: SteeringPlan) -> int:
        """Attach one more plan without re-patching (its sites must be patched already: see attach(sites=...)).
        Returns its plan id."""
        self._live("add_plan()")
        if not isinstance(name, str) or not name:
            raise AttachError(f"add_plan: expected a non-empty plan name, got {name!r}")
        if name in self._ids:
            raise AttachError(f"add_plan: a plan named {name!r} is attached already; use update()")
        if self.backend.static:
            raise AttachError(f"backend {self.backend_name!r} bakes values into weights; detach and attach again")
        plan = self._bound(name, plan)
        missing = self.table.outside(plan)
        if missing:
            raise PlanError(f"plan {name!r} acts at (layer, site) {missing[0]} which this handle does not patch; "
                            f"attach with sites='all' (or list the sites) to add plans there later")
        free = self.table.free_id()
        if free is None:
            raise AttachError(f"add_plan: all {self.capacity} plan slots are in use; remove_plan() one or attach "
                              f"with a larger capacity")
        old = dict(self.plans)
        self._commit({**old, name: plan}, ids={**self._ids, name: free})
        self.guard.arm(name, plan, "add_plan()", maps=self.table.maps(plan))
        return free

    def remove_plan(self, name: str) -> None:
        """Detach one plan; its rows become the identity and its id can be reused."""
        self._live("remove_plan()")
        pid = self.plan_id(name)
        if pid == 0:
            raise AttachError("remove_plan: expected a plan name, got None")
        r = self.router
        if (r.tokens is not None or r.host_rows is not None) and pid in r.plans_in_use():
            how = "route_tokens()" if r.tokens is not None else "route()"
            raise AttachError(f"remove_plan: plan {name!r} is routed to by {how}; route without it first (its id "
                              f"would be reused by the next add_plan(), and those rows would run that plan)")
        if self.router.default_plan == pid:
            self.router.default_plan = None
            self.router.set_rows(self.router.host_rows)
        old = dict(self.plans)
        self._commit({k: v for k, v in old.items() if k != name},
                     ids={k: v for k, v in self._ids.items() if k != name})
        self.guard.forget(name)

    # ---- values ----------------------------------------------------------------------------------
    def update(self, name_or_plan, plan: SteeringPlan | None = None) -> None:
        """Change the values of an attached plan in place (same sites): no re-patching, no recompiles.

        ``update(plan)`` changes the only attached plan; ``update(name, plan)`` names one. The new values are
        checked like attach's (see attach(check_finite=...)); values that are rejected, here or at the first
        forward that runs them, leave the previous values in place."""
        self._live("update()")
        if plan is None:
            plan = name_or_plan
            if len(self.plan_names) != 1:
                raise AttachError(f"update(plan): {len(self.plan_names)} plans are attached "
                                  f"({self.plan_names}); name the one to change: update(name, plan)")
            name = self.plan_names[0]
        else:
            name = name_or_plan
        if not isinstance(name, str):
            raise AttachError(f"update(): expected a plan name, got {type(name).__name__} {name!r}")
        if name not in self._ids:
            raise AttachError(f"unknown plan {name!r}; attached plans: {self.plan_names}")
        if self.backend.static:
            raise AttachError(f"backend {self.backend_name!r} bakes values into weights; detach and attach again")
        plan = self._bound(name, plan)
        outside = self.table.outside(plan)
        if outside:
            raise AttachError(f"update() can only change values at the (layer, site) pairs this handle patches; "
                              f"{outside[0]} is not one of them: detach and attach again (or attach with sites=...) "
                              f"to change where the plan acts")
        old = dict(self.plans)
        self._commit({**old, name: plan})
        self.guard.arm(name, plan, "update()", previous=old[name], maps=self.table.maps(plan))

    def _commit(self, plans: dict, ids: dict | None = None) -> None:
        """Make ``plans`` the handle's plans (ids ``ids``; default unchanged): the table writes the rows that
        changed and the backend re-plans; if the backend refuses (e.g. auto's fold finds non-finite weights), the
        previous plans are put back and the error re-raised."""
        self.table.commit(plans, ids, on_change=lambda: self.backend.on_update(self))

    # ---- per-forward -----------------------------------------------------------------------------
    def _begin_forward(self) -> None:
        self.router.reset()
        self.guard.begin(self._ids, self.router)

    def _end_forward(self, failed: bool = False) -> None:
        slots = self.router.slots
        self.router.reset()
        bad = self.guard.end(slots, 1 + 2 * self.capacity, self._ids, failed)
        if bad is not None:
            self._reject(*bad)

    def checker(self, layer: int, site: str):
        """Returns f(y) -> y that records whether y is finite while the guard checks this forward."""
        guard = self.guard

        def check(y, _layer=layer, _site=site):
            guard.mark(_layer, _site, y)
            return y
        return check

    def _reject(self, layer: int, site: str, names: list) -> None:
        """A checked forward went non-finite: the guard puts back the previous values of the plans it ran that
        came from update() (through this handle's commit), then raises."""
        raise self.guard.reject(layer, site, names, self.plans, self._commit)


def attach(model, plan, backend: str = "auto", check_finite: bool = True, capacity: int | None = None,
           sites=None, verify: bool = True) -> SteeringHandle:
    """Attach a plan (or {name: plan} for per-row routing) to a HF causal LM.

    backend: "auto" (fold what folds, fuse the rest; triton on CUDA, torch on CPU), "torch", "triton",
    "fold", or "reference" (hooks, the oracle). Returns a handle usable as a context manager.
    capacity: how many plans the handle can hold (default: the plans given; more for add_plan()).
    sites: "all" or (layer, site) pairs to patch up front so later plans can act there without re-patching.
    verify: check the patched layer forwards against the originals and the reference once per layer class.
    """
    if backend not in BACKENDS:
        raise AttachError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if isinstance(plan, SteeringPlan):
        plans, default = {"plan": plan}, "plan"
    elif isinstance(plan, Mapping):
        if not plan and not capacity:
            raise PlanError("attach() got an empty dict of plans (pass capacity=N to add plans later)")
        for k in plan:
            if not isinstance(k, str):
                raise PlanError(f"plan names must be strings, got {k!r}")
        plans = dict(plan)
        default = next(iter(plans)) if len(plans) == 1 else None
    else:
        raise PlanError(f"attach() expects a SteeringPlan or a dict of them, got {type(plan).__name__}")
    h = SteeringHandle(model, plans, default, backend, check_finite=check_finite, capacity=capacity, sites=sites,
                       verify=verify)
    h.install()
    return h
