"""attach(model, plan(s), backend=...) -> SteeringHandle (also a context manager)."""

from __future__ import annotations

import logging
from typing import Mapping

import torch

from ..errors import AttachError, NonFiniteActivationError, PlanError
from .families import layer_device, model_parts
from .backends.base import InstallContext
from .patching import Patcher
from .plan import SITES, ModelSpec, SteeringPlan
from .tables import Router, build_tables, plan_keys

log = logging.getLogger("fusesteer")

BACKENDS = ("auto", "reference", "torch", "triton", "fold")
_HANDLE_ATTR = "_fusesteer_handle"


def _get_backend(name: str, model):
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
            dev = next((p.device for p in model.parameters()), torch.device("cpu"))
            return _get_backend("triton" if dev.type == "cuda" else "torch", model)
    raise AttachError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def _check_length(v, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise AttachError(f"{where}: expected a prompt length as a non-negative integer, got {v!r}")
    return v


class SteeringHandle:
    """A live attachment of one or more plans to a model. Use as a context manager or call detach()."""

    def __init__(self, model, plans: Mapping[str, SteeringPlan], default: str | None, backend: str,
                 check_finite: bool = True, capacity: int | None = None, sites=None, verify: bool = True):
        self.model = model
        self.parts = model_parts(model)
        self.spec = ModelSpec.from_model(model)
        self.backend_name = backend
        self.plans = {}
        for name, p in plans.items():
            self.plans[name] = self._bound(name, p)
        self.plan_names = list(self.plans)
        self.capacity = len(self.plans) if capacity is None else capacity
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or self.capacity < max(1, len(plans)):
            raise AttachError(f"capacity={capacity!r}: expected an integer >= the number of plans "
                              f"({max(1, len(plans))})")
        self._ids = {n: i + 1 for i, n in enumerate(self.plan_names)}
        default_id = self._ids[default] if default is not None else None
        self._devices = {i: layer_device(l) for i, l in enumerate(self.parts.layers)}
        first = next((d for d in self._devices.values() if d is not None), torch.device("cpu"))
        self.router = Router(self.capacity, default_id, device=first)
        self.patcher = Patcher()
        self.check_finite = check_finite
        self.verify = verify
        self._checking = False
        self._checked = not check_finite
        self.attached = False
        self._depth = 0
        self.keys = plan_keys(self.plans.values()) | self._extra_keys(sites)
        self.tables = build_tables(self._by_id(self.plans), self.spec, self._devices, self.keys, self.capacity)
        self.backend = _get_backend(backend, model)
        self.report: dict = {}
        self.contract_ms: float | None = None

    def _bound(self, name, p) -> SteeringPlan:
        if not isinstance(p, SteeringPlan):
            raise PlanError(f"plan {name!r}: expected a SteeringPlan, got {type(p).__name__}")
        try:
            return p.bind(self.spec)
        except PlanError as e:
            raise PlanError(f"plan {name!r}: {e}") from None

    def _extra_keys(self, sites) -> set:
        if sites is None:
            return set()
        if sites == "all":
            return {(layer, site) for layer in range(self.spec.num_layers) for site in SITES}
        keys = set()
        for k in sites:
            if (not isinstance(k, tuple) or len(k) != 2 or not isinstance(k[0], int) or isinstance(k[0], bool)
                    or not 0 <= k[0] < self.spec.num_layers or k[1] not in SITES):
                raise AttachError(f"sites: expected 'all' or (layer, site) pairs with layer in "
                                  f"0..{self.spec.num_layers - 1} and site in {SITES}, got {k!r}")
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
        if self.verify:
            from .contract import verify_contract
            self.contract_ms = verify_contract(self)
        try:
            self.patcher.set_attr(self.model, _HANDLE_ATTR, self)
            self._wrap_generate()
            self.backend.install(InstallContext(self))
        except BaseException:
            self.patcher.restore()
            raise
        self.attached = True

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
        if not self.attached:
            return
        self.attached = False
        self.patcher.restore()

    def __enter__(self) -> "SteeringHandle":
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
        for what, t in (("plan_ids", plan_ids), ("prompt_lens", prompt_lens)):
            if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dim() > 2:
                raise AttachError(f"route_tokens: {what} must be an integer tensor of at most 2 dims")
        valid = sorted(set(self._ids.values()) | {0})
        bad = ~torch.isin(plan_ids.cpu(), torch.tensor(valid))
        if bool(bad.any()):
            raise AttachError(f"route_tokens: plan id {int(plan_ids.cpu()[bad][0])} is not attached; ids: {valid}")
        self._before_route(sorted(set(plan_ids.cpu().reshape(-1).tolist())))
        self.router.set_tokens(plan_ids, prompt_lens)
        return self

    def _before_route(self, ids) -> None:
        """Let the backend refuse (fold) or adapt to (auto) a routing before it takes effect."""
        self.backend.on_route(self, ids)

    def route_all(self, name: str | None) -> "SteeringHandle":
        """Every row uses the same plan (or None) whatever the batch size."""
        pid = self.plan_id(name)
        if pid == 0:
            self._before_route([0])
        self.router.set_default(pid)
        return self

    def set_prompt_length(self, n) -> None:
        """Override the prompt length used for gating: an int for every row, a list with one per batch row, or
        None to learn it again (at the first forward of each generate(), or of a sequence starting at
        position 0). Lengths count positions: row r's token at position p is generated iff p >= n[r]."""
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
        if not isinstance(name, str) or not name:
            raise AttachError(f"add_plan: expected a non-empty plan name, got {name!r}")
        if name in self._ids:
            raise AttachError(f"add_plan: a plan named {name!r} is attached already; use update()")
        if self.backend.static:
            raise AttachError(f"backend {self.backend_name!r} bakes values into weights; detach and attach again")
        plan = self._bound(name, plan)
        missing = sorted(plan_keys([plan]) - self.keys)
        if missing:
            raise PlanError(f"plan {name!r} acts at (layer, site) {missing[0]} which this handle does not patch; "
                            f"attach with sites='all' (or list the sites) to add plans there later")
        used = set(self._ids.values())
        free = next((i for i in range(1, self.capacity + 1) if i not in used), None)
        if free is None:
            raise AttachError(f"add_plan: all {self.capacity} plan slots are in use; remove_plan() one or attach "
                              f"with a larger capacity")
        self._ids[name] = free
        self.plans[name] = plan
        self.plan_names = sorted(self._ids, key=self._ids.get)
        try:
            self._write_plan(free, plan)
        except BaseException:
            del self._ids[name], self.plans[name]
            self.plan_names = sorted(self._ids, key=self._ids.get)
            self._write_plan(free, None)
            raise
        return free

    def remove_plan(self, name: str) -> None:
        """Detach one plan; its rows become the identity and its id can be reused."""
        pid = self.plan_id(name)
        if pid == 0:
            raise AttachError("remove_plan: expected a plan name, got None")
        if self.router.host_rows is not None and pid in self.router.host_rows:
            raise AttachError(f"remove_plan: plan {name!r} is routed to a batch row; route() without it first")
        if self.router.default_plan == pid:
            self.router.default_plan = None
            self.router.set_rows(self.router.host_rows)
        del self._ids[name], self.plans[name]
        self.plan_names = sorted(self._ids, key=self._ids.get)
        self._write_plan(pid, None)

    # ---- values ----------------------------------------------------------------------------------
    def update(self, name_or_plan, plan: SteeringPlan | None = None) -> None:
        """Change the values of an attached plan in place (same sites): no re-patching, no recompiles."""
        if plan is None:
            plan, name = name_or_plan, self.plan_names[0]
        else:
            name = name_or_plan
        if name not in self._ids:
            raise AttachError(f"unknown plan {name!r}; attached plans: {self.plan_names}")
        plan = self._bound(name, plan)
        if self.backend.static:
            raise AttachError(f"backend {self.backend_name!r} bakes values into weights; detach and attach again")
        new_plans = dict(self.plans)
        new_plans[name] = plan
        outside = sorted(plan_keys([plan]) - self.keys)
        if outside:
            raise AttachError(f"update() can only change values at the (layer, site) pairs this handle patches; "
                              f"{outside[0]} is not one of them: detach and attach again (or attach with sites=...) "
                              f"to change where the plan acts")
        self._write_plan(self._ids[name], plan)
        self.plans = new_plans
        self.backend.on_update(self)

    def _write_plan(self, plan_id: int, plan: SteeringPlan | None) -> None:
        """Only the rows of one plan id (add_plan / remove_plan): the other plans' rows are not touched."""
        maps = plan.phase_maps(self.spec) if plan is not None else {}
        for k, table in self.tables.items():
            table.write_plan(plan_id, maps.get(k))

    # ---- per-forward -----------------------------------------------------------------------------
    def _begin_forward(self) -> None:
        self.router.reset()
        if not self._checked and not torch.compiler.is_compiling():
            self._checking = True

    def _end_forward(self) -> None:
        self.router.reset()
        if self._checking:
            self._checking = False
            self._checked = True

    def checker(self, layer: int, site: str):
        """Returns f(x) -> x that, on the first forward only, raises if steering made x non-finite."""
        def check(y, _layer=layer, _site=site):
            if torch.compiler.is_compiling():
                return y
            if self._checking and not bool(torch.isfinite(y).all()):
                self._checking = False
                raise NonFiniteActivationError(
                    f"steering produced NaN/Inf activations at layer {_layer}, site {_site!r} on the first "
                    f"forward pass; the plan's values are too large for this model/dtype (pass "
                    f"check_finite=False to attach() to skip this check)")
            return y
        return check


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
