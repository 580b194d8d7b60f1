"""attach(model, plan(s), backend=...) -> SteeringHandle (also a context manager)."""

from __future__ import annotations

import logging
from typing import Mapping

import torch

from ..errors import AttachError, NonFiniteActivationError, PlanError
from .families import layer_device, model_parts
from .patching import Patcher
from .plan import ModelSpec, SteeringPlan
from .tables import Router, batch_shape_and_past, build_tables

log = logging.getLogger("fusesteer")

BACKENDS = ("auto", "reference", "torch", "triton", "fold")
_HANDLE_ATTR = "_fusesteer_handle"


def _get_backend(name: str, model):
    if name == "reference":
        from .backends.reference import ReferenceBackend
        return ReferenceBackend()
    if name == "torch":
        from .backends.fused import TorchBackend
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


class SteeringHandle:
    """A live attachment of one or more plans to a model. Use as a context manager or call detach()."""

    def __init__(self, model, plans: Mapping[str, SteeringPlan], default: str | None, backend: str,
                 check_finite: bool = True):
        self.model = model
        self.parts = model_parts(model)
        self.spec = ModelSpec.from_model(model)
        self.backend_name = backend
        self.plan_names = list(plans)
        self.plans = dict(plans)
        for name, p in self.plans.items():
            if not isinstance(p, SteeringPlan):
                raise PlanError(f"plan {name!r}: expected a SteeringPlan, got {type(p).__name__}")
            try:
                p.bind(self.spec)
            except PlanError as e:
                raise PlanError(f"plan {name!r}: {e}") from None
        self._ids = {n: i + 1 for i, n in enumerate(self.plan_names)}
        default_id = self._ids[default] if default is not None else None
        self.router = Router(len(self.plan_names), default_id)
        self.patcher = Patcher()
        self.check_finite = check_finite
        self._checking = False
        self._checked = not check_finite
        self.attached = False
        self._depth = 0
        self._devices = {i: layer_device(l) for i, l in enumerate(self.parts.layers)}
        self.tables = build_tables([self.plans[n] for n in self.plan_names], self.spec, self._devices)
        self.backend = _get_backend(backend, model)
        self.report: dict = {}

    # ---- lifecycle -------------------------------------------------------------------------------
    def _install(self) -> None:
        if getattr(self.model, _HANDLE_ATTR, None) is not None:
            raise AttachError("this model already has a fusesteer plan attached; detach it first, or combine "
                              "plans into one with plan.extend(other) (entries compose in order) or attach "
                              "them together as {name: plan} with per-row routing")
        try:
            self.patcher.set_attr(self.model, _HANDLE_ATTR, self)
            self.backend.install(self)
        except BaseException:
            self.patcher.restore()
            raise
        self.attached = True

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
    def route(self, rows) -> "SteeringHandle":
        """One entry per batch row: a plan name, None (unsteered), or a plan id (0 = unsteered)."""
        ids = []
        for i, r in enumerate(rows):
            if r is None:
                ids.append(0)
            elif isinstance(r, str):
                if r not in self._ids:
                    raise AttachError(f"route row {i}: unknown plan {r!r}; attached plans: {self.plan_names}")
                ids.append(self._ids[r])
            elif isinstance(r, int) and not isinstance(r, bool) and 0 <= r <= len(self.plan_names):
                ids.append(r)
            else:
                raise AttachError(f"route row {i}: expected a plan name, None or an id in 0..{len(self.plan_names)},"
                                  f" got {r!r}")
        self._before_route(ids)
        self.router.set_rows(ids)
        return self

    def _before_route(self, ids) -> None:
        """Let the backend refuse (fold) or adapt to (auto) a routing before it takes effect."""
        if hasattr(self.backend, "on_route"):
            self.backend.on_route(self, ids)

    def route_all(self, name: str | None) -> "SteeringHandle":
        """Every row uses the same plan (or None) whatever the batch size."""
        if name is None:
            self._before_route([0])
            self.router.default_plan = 0
        elif name in self._ids:
            self.router.default_plan = self._ids[name]
        else:
            raise AttachError(f"unknown plan {name!r}; attached plans: {self.plan_names}")
        self.router.set_rows(None)
        return self

    def set_prompt_length(self, n: int | None) -> None:
        """Override the prompt length used for gating (default: learnt at the first forward)."""
        self.router.set_prompt_length(n)

    # ---- values ----------------------------------------------------------------------------------
    def update(self, name_or_plan, plan: SteeringPlan | None = None) -> None:
        """Change the values of an attached plan in place (same sites): no re-patching, no recompiles."""
        if plan is None:
            plan, name = name_or_plan, self.plan_names[0]
        else:
            name = name_or_plan
        if name not in self._ids:
            raise AttachError(f"unknown plan {name!r}; attached plans: {self.plan_names}")
        plan.bind(self.spec)
        new_plans = dict(self.plans)
        new_plans[name] = plan
        new = build_tables([new_plans[n] for n in self.plan_names], self.spec, self._devices)
        if set(new) != set(self.tables):
            raise AttachError("update() needs the same (layer, site) set as the attached plans; detach and "
                              "attach again to change where the plan acts")
        if getattr(self.backend, "static", False):
            raise AttachError(f"backend {self.backend_name!r} bakes values into weights; detach and attach again")
        for k, t in new.items():
            old = self.tables[k]
            old.A.copy_(t.A)
            old.B.copy_(t.B)
            old.identity_rows[:] = t.identity_rows
            old.additive_rows[:] = t.additive_rows
        self.plans = new_plans
        if hasattr(self.backend, "on_update"):
            self.backend.on_update(self)

    # ---- per-forward -----------------------------------------------------------------------------
    def _begin_forward(self, args, kwargs) -> None:
        batch, seqlen, past, device = batch_shape_and_past(args, kwargs)
        self.router.begin(batch, seqlen, past, device)
        if not self._checked:
            self._checking = True

    def _end_forward(self) -> None:
        if self._checking:
            self._checking = False
            self._checked = True

    def checker(self, layer: int, site: str):
        """Returns f(x) -> x that, on the first forward only, raises if steering made x non-finite."""
        def check(y, _layer=layer, _site=site):
            if self._checking and not bool(torch.isfinite(y).all()):
                self._checking = False
                raise NonFiniteActivationError(
                    f"steering produced NaN/Inf activations at layer {_layer}, site {_site!r} on the first "
                    f"forward pass; the plan's values are too large for this model/dtype (pass "
                    f"check_finite=False to attach() to skip this check)")
            return y
        return check


def attach(model, plan, backend: str = "auto", check_finite: bool = True) -> SteeringHandle:
    """Attach a plan (or {name: plan} for per-row routing) to a HF causal LM.

    backend: "auto" (fold what folds, fuse the rest; triton on CUDA, torch on CPU), "torch", "triton",
    "fold", or "reference" (hooks, the oracle). Returns a handle usable as a context manager.
    """
    if backend not in BACKENDS:
        raise AttachError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if isinstance(plan, SteeringPlan):
        plans, default = {"plan": plan}, "plan"
    elif isinstance(plan, Mapping):
        if not plan:
            raise PlanError("attach() got an empty dict of plans")
        for k in plan:
            if not isinstance(k, str):
                raise PlanError(f"plan names must be strings, got {k!r}")
        plans = dict(plan)
        default = next(iter(plans)) if len(plans) == 1 else None
    else:
        raise PlanError(f"attach() expects a SteeringPlan or a dict of them, got {type(plan).__name__}")
    h = SteeringHandle(model, plans, default, backend, check_finite=check_finite)
    h._install()
    return h
