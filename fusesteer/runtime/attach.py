"""attach(model, plan(s), backend=...) -> SteeringHandle (also a context manager)."""

from __future__ import annotations

import logging
import numbers
from typing import Mapping

import torch

from ..errors import AttachError, NonFiniteActivationError, PlanError
from .backends.base import InstallContext, fused_backend_name, model_device
from .families import SUPPORTED_CLASSES, layer_device, model_parts
from .guard import FiniteGuard
from .patching import Patcher
from .plan import SITES, ModelSpec, SteeringPlan
from .tables import Router, build_tables, map_keys

log = logging.getLogger("fusesteer")

BACKENDS = ("auto", "reference", "torch", "triton", "fold")
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_HANDLE_ATTR = "_fusesteer_handle"


def _get_backend(name: str, model, parts=None):
    fam = parts.family if parts is not None else None
    if fam is not None and fam.generic and name != "reference":
        if name == "auto":
            log.info("fusesteer: auto backend on %s (no family adapter): reference hooks", type(model).__name__)
            return _get_backend("reference", model)
        raise AttachError(
            f"backend {name!r} needs a family adapter, and {type(model).__name__} (model_type "
            f"{fam.model_types[0]!r}) has none: fusesteer has adapters for {', '.join(SUPPORTED_CLASSES)}. "
            f"Use backend='reference' (generic hooks, unverified on this architecture) or add an adapter in "
            f"fusesteer/runtime/families.py")
    if name == "reference":
        from .backends.reference import ReferenceBackend
        return ReferenceBackend()
    if name == "torch":
        from .backends.torch import TorchBackend
        return TorchBackend()
    if name == "triton":
        try:
            from .backends.triton import TritonBackend
        except ImportError as e:
            raise AttachError(f"backend 'triton' is not available: {e}") from None
        return TritonBackend()
    if name == "fold":
        try:
            from .backends.fold import FoldBackend
        except ImportError as e:
            raise AttachError(f"backend 'fold' is not available: {e}") from None
        return FoldBackend()
    if name == "auto":
        try:
            from .backends.auto import AutoBackend
            return AutoBackend()
        except ImportError:
            return _get_backend(fused_backend_name(model_device(model)), model, parts)
    raise AttachError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


MAX_LENGTH = 2 ** 62  # prompt lengths and positions are int64 on the device
MAX_CAPACITY = 2 ** 16  # plans one handle can hold


def _check_length(v, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v < MAX_LENGTH:
        raise AttachError(f"{where}: expected a prompt length as an integer in [0, 2**62), got {v!r}")
    return int(v)


def _move_problem(module, fn) -> str | None:
    """What ``module._apply(fn)`` (model.to / .half / .cuda ...) would change: a dtype or a device, or None."""
    seen = set()
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.dtype, t.device)
        if key in seen:
            continue
        seen.add(key)
        try:
            out = fn(torch.empty(0, dtype=t.dtype, device=t.device))
        except Exception:  # noqa: BLE001 - the move itself will raise the same error
            return None
        if isinstance(out, torch.Tensor) and (out.dtype, out.device) != key:
            return f"{t.dtype} on {t.device} -> {out.dtype} on {out.device}"
    return None


class SteeringHandle:
    """A live attachment of one or more plans to a model. Use as a context manager or call detach()."""

    def __init__(self, model, plans: Mapping[str, SteeringPlan], default: str | None, backend: str,
                 check_finite: bool = True, capacity: int | None = None, sites=None, verify: bool = True):
        self.model = model
        self.parts = model_parts(model)
        self.spec = ModelSpec.from_model(model)
        self.backend_name = backend
        self._compiled: dict[int, tuple] = {}  # id(bound plan) -> (plan, its phase maps): computed once per plan
        self.plans = {}
        for name, p in plans.items():
            self.plans[name] = self._bound(name, p)
        self.plan_names = list(self.plans)
        self.capacity = len(self.plans) if capacity is None else capacity
        if (isinstance(self.capacity, bool) or not isinstance(self.capacity, int)
                or not max(1, len(plans)) <= self.capacity <= MAX_CAPACITY):
            raise AttachError(f"capacity={capacity!r}: expected an integer from the number of plans "
                              f"({max(1, len(plans))}) to {MAX_CAPACITY}")
        self._ids = {n: i + 1 for i, n in enumerate(self.plan_names)}
        default_id = self._ids[default] if default is not None else None
        self._devices = {i: layer_device(l) for i, l in enumerate(self.parts.layers)}
        first = next((d for d in self._devices.values() if d is not None), torch.device("cpu"))
        self.router = Router(self.capacity, default_id, device=first)
        self.router.plan_names = self.plan_names
        self.patcher = Patcher()
        self.check_finite = check_finite
        self.verify = verify
        self.guard = FiniteGuard(check_finite, self.spec)
        for name, p in self.plans.items():
            self.guard.arm(name, p, "attach", maps=self._maps(p))
        self.attached = False
        self._depth = 0
        self.keys = map_keys(self._maps(p) for p in self.plans.values()) | self._extra_keys(sites)
        by_id = self._by_id(self.plans)
        self.tables = build_tables(by_id, self.spec, self._devices, self.keys, self.capacity,
                                   maps={i: self._maps(p) for i, p in by_id.items()})
        self._written = self._by_id(self.plans)  # plan id -> the plan whose values its table rows hold
        self.backend = _get_backend(backend, model, self.parts)
        self.report: dict = {}
        self.contract_ms: float | None = None

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
            self._compiled[id(bound)] = (bound, bound.phase_maps(self.spec))
            return bound
        except PlanError as e:
            raise PlanError(f"plan {name!r}: {e}") from None

    def _maps(self, plan: SteeringPlan) -> dict:
        """The phase maps of a plan bound by this handle (composed once, when it was bound)."""
        got = self._compiled.get(id(plan))
        if got is None or got[0] is not plan:
            got = self._compiled[id(plan)] = (plan, plan.phase_maps(self.spec))
        return got[1]

    def _extra_keys(self, sites) -> set:
        if sites is None:
            return set()
        if sites == "all":  # every site each layer has
            return {(layer, site) for layer in range(self.spec.num_layers) for site in self.parts.sites_of(layer)}
        if isinstance(sites, (str, bytes, Mapping)) or not hasattr(sites, "__iter__"):
            raise AttachError(f"sites: expected 'all' or a list of (layer, site) pairs, got {type(sites).__name__} "
                              f"{sites!r}")
        keys = set()
        for k in sites:
            if (not isinstance(k, tuple) or len(k) != 2 or not isinstance(k[0], int) or isinstance(k[0], bool)
                    or not 0 <= k[0] < self.spec.num_layers or k[1] not in SITES):
                raise AttachError(f"sites: expected 'all' or (layer, site) pairs with layer in "
                                  f"0..{self.spec.num_layers - 1} and site in {SITES}, got {k!r}")
            why = self.parts.site_problem(*k)
            if why is not None:
                raise AttachError(f"sites: {k!r}: {why}")
            keys.add(k)
        return keys

    def _by_id(self, plans: Mapping[str, SteeringPlan]) -> dict:
        return {self._ids[n]: p for n, p in plans.items()}

    # ---- lifecycle -------------------------------------------------------------------------------
    def _install(self) -> None:
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
            self._wrap_generate()
            self.backend.install(InstallContext(self))
            self._guard_moves()
        except BaseException:
            self.patcher.restore()
            raise
        self.attached = True

    def _guard_moves(self) -> None:
        """Refuse model.to(dtype/device), .half(), .cuda(), ... on the model or any of its modules while
        attached, before anything moves: the plan tables, the routing state and fold's restore data stay where
        they were made, so a moved model would be steered wrongly or not restored exactly."""
        for mod in self.model.modules():
            orig = mod._apply

            def guarded(fn, *args, _mod=mod, _orig=orig, **kwargs):
                if self.attached:
                    what = _move_problem(_mod, fn)
                    if what is not None:
                        raise AttachError(
                            f"cannot move {type(_mod).__name__} ({what}) while a fusesteer plan is attached: "
                            f"nothing was changed. Detach first (handle.detach() or leave the with block), move "
                            f"the model, then attach again")
                return _orig(fn, *args, **kwargs)
            self.patcher.set_attr(mod, "_apply", guarded)
            self.patcher.set_attr(mod, "load_state_dict", self._guarded_load(mod))

    def _guarded_load(self, mod):
        """``mod.load_state_dict`` refused, before anything is loaded, while plan values are folded into the
        weights: detach would put the pre-attach weights back over what was loaded."""
        orig = mod.load_state_dict

        def load_state_dict(*args, **kwargs):
            if self.attached and self.backend.holds_weights():
                raise AttachError(
                    f"cannot load a state dict into {type(mod).__name__} while a fusesteer plan is folded into the "
                    f"model's weights (backend {self.backend_name!r}): nothing was loaded. Detach first "
                    f"(handle.detach() or leave the with block), load, then attach again")
            return orig(*args, **kwargs)
        return load_state_dict

    def _live(self, what: str) -> None:
        if not self.attached:
            retry = " (its detach() failed part-way: call detach() again)" if self.patcher.pending else ""
            raise AttachError(f"{what}: this handle is detached{retry}; a detached handle never touches the model "
                              f"again: attach anew with fs.attach(model, plan)")

    def _wrap_generate(self) -> None:
        """generate() learns the prompt length at its first forward only (right with and without the cache)."""
        orig = getattr(self.model, "generate", None)
        if orig is None:
            return
        router = self.router

        def generate(*args, **kwargs):
            router.begin_generate()
            try:
                return orig(*args, **kwargs)
            finally:
                router.end_generate()
        generate.__wrapped__ = orig
        self.patcher.set_attr(self.model, "generate", generate)

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
        if isinstance(rows, (str, bytes, Mapping, set, frozenset)) or not hasattr(rows, "__iter__"):
            raise AttachError(f"route() expects a list with one entry per batch row (a plan name, None or a plan "
                              f"id), got {type(rows).__name__} {rows!r}; to use one plan (or None) for every row "
                              f"whatever the batch size, call route_all(name)")
        rows = list(rows)
        if not rows:
            raise AttachError("route() got no rows; give one entry per batch row")
        ids = []
        valid = set(self._ids.values()) | {0}
        for i, r in enumerate(rows):
            if r is None:
                ids.append(0)
            elif isinstance(r, str):
                if r not in self._ids:
                    raise AttachError(f"route row {i}: unknown plan {r!r}; attached plans: {self.plan_names}")
                ids.append(self._ids[r])
            elif isinstance(r, int) and not isinstance(r, bool) and r in valid:
                ids.append(r)
            else:
                raise AttachError(f"route row {i}: expected a plan name, None or an attached plan id "
                                  f"{sorted(valid)}, got {r!r}")
        self._before_route(ids)
        self.router.set_rows(ids)
        return self

    def route_tokens(self, plan_ids: torch.Tensor, prompt_lens: torch.Tensor) -> "SteeringHandle":
        """Per-token routing for packed batches: int tensors broadcastable to the [batch, seq] of the next
        forwards; token t uses plan ``plan_ids[t]`` (0 = unsteered) and is generated iff its position >=
        ``prompt_lens[t]``."""
        self._live("route_tokens()")
        for what, t in (("plan_ids", plan_ids), ("prompt_lens", prompt_lens)):
            if not isinstance(t, torch.Tensor) or t.dtype not in _INT_DTYPES or t.dim() > 2 or t.numel() == 0:
                got = f"{t.dtype} tensor of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else \
                    type(t).__name__
                raise AttachError(f"route_tokens: {what} must be a non-empty integer tensor (int8..int64 or "
                                  f"uint8) of at most 2 dims, broadcastable to [batch, seq]; got {got}")
        valid = sorted(set(self._ids.values()) | {0})
        bad = ~torch.isin(plan_ids.cpu().to(torch.int64), torch.tensor(valid))
        if bool(bad.any()):
            raise AttachError(f"route_tokens: plan id {int(plan_ids.cpu()[bad][0])} is not attached; ids: {valid}")
        lens = prompt_lens.cpu().to(torch.int64)
        if bool((lens < 0).any()) or bool((lens >= MAX_LENGTH).any()):
            raise AttachError("route_tokens: prompt_lens must be in [0, 2**62)")
        self._before_route(sorted(set(plan_ids.cpu().reshape(-1).tolist())))
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
        if n is not None:
            if isinstance(n, (list, tuple)):
                if not n:
                    raise AttachError("set_prompt_length: got an empty list; give one length per batch row")
                n = [_check_length(v, f"set_prompt_length row {i}") for i, v in enumerate(n)]
            else:
                n = _check_length(n, "set_prompt_length")
        self.router.set_prompt_length(n)

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
        missing = sorted(map_keys([self._maps(plan)]) - self.keys)
        if missing:
            raise PlanError(f"plan {name!r} acts at (layer, site) {missing[0]} which this handle does not patch; "
                            f"attach with sites='all' (or list the sites) to add plans there later")
        used = set(self._ids.values())
        free = next((i for i in range(1, self.capacity + 1) if i not in used), None)
        if free is None:
            raise AttachError(f"add_plan: all {self.capacity} plan slots are in use; remove_plan() one or attach "
                              f"with a larger capacity")
        old = dict(self.plans)
        self._commit({**old, name: plan}, old, ids={**self._ids, name: free})
        self.guard.arm(name, plan, "add_plan()", maps=self._maps(plan))
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
        self._commit({k: v for k, v in old.items() if k != name}, old,
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
        outside = sorted(map_keys([self._maps(plan)]) - self.keys)
        if outside:
            raise AttachError(f"update() can only change values at the (layer, site) pairs this handle patches; "
                              f"{outside[0]} is not one of them: detach and attach again (or attach with sites=...) "
                              f"to change where the plan acts")
        old = dict(self.plans)
        self._commit({**old, name: plan}, old)
        self.guard.arm(name, plan, "update()", previous=old[name], maps=self._maps(plan))

    def _set_plans(self, plans: dict, ids: dict) -> None:
        self._ids = ids
        self.plan_names = self.router.plan_names = sorted(ids, key=ids.get)
        self.plans = plans
        live = {id(p) for p in plans.values()}  # keep the compiled maps of attached plans only
        self._compiled = {k: v for k, v in self._compiled.items() if k in live}
        self._write_tables()

    def _commit(self, plans: dict, old: dict, ids: dict | None = None) -> None:
        """Make ``plans`` the handle's plans (with plan ids ``ids``; default unchanged): tables written in
        place, the backend re-planned. If the backend refuses them (e.g. auto's fold finds non-finite weights),
        ``old`` is put back and the error re-raised."""
        old_ids = dict(self._ids)
        self._set_plans(plans, dict(old_ids if ids is None else ids))
        try:
            self.backend.on_update(self)
        except BaseException as err:
            self._set_plans(old, old_ids)
            try:
                self.backend.on_update(self)
            except BaseException as e2:
                raise AttachError(f"the new values were refused ({err}) and the previous ones could not be "
                                  f"installed again ({type(e2).__name__}: {e2}); detach this handle") from err
            raise

    def _write_tables(self) -> None:
        """Write the rows of every plan id whose plan changed since the last write (only those)."""
        want = {self._ids[n]: p for n, p in self.plans.items()}
        for pid in sorted(set(want) | set(self._written)):
            if want.get(pid) is not self._written.get(pid):
                self._write_plan(pid, want.get(pid))
        self._written = want

    def _write_plan(self, plan_id: int, plan: SteeringPlan | None) -> None:
        """Only the rows of one plan id (add_plan / remove_plan): the other plans' rows are not touched."""
        maps = self._maps(plan) if plan is not None else {}
        for k, table in self.tables.items():
            table.write_plan(plan_id, maps.get(k))

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
        """A checked forward went non-finite: put back the previous values of the plans it ran that came from
        update(), then raise."""
        g = self.guard
        what = ", ".join(f"plan {n!r} (set by {g.origin.get(n, 'attach')})" for n in names) or "the attached plans"
        snaps = {n: g.snapshot(n) for n in names}
        undone = {n: prev for n in names if n in self.plans and (prev := g.rollback(n)) is not None}
        note = ""
        if undone:
            old = dict(self.plans)
            try:
                self._commit({**old, **undone}, old)
            except BaseException:
                for n, snap in snaps.items():
                    g.restore(n, snap)
                raise
            note = (f"; the update() of {', '.join(repr(n) for n in undone)} was undone: the previous values are "
                    f"in place")
        raise NonFiniteActivationError(
            f"steering produced NaN/Inf activations at layer {layer}, site {site!r} on the first forward that ran "
            f"{what}: the plan's values are too large for this model/dtype{note} (pass check_finite=False to "
            f"attach() to skip this check)")


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
    h._install()
    return h
