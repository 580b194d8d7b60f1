"""Steering plan IR: a set of diagonal affine maps x' = a*x + b at named sites of decoder layers.

This module knows nothing about torch modules: a plan is bound to a :class:`ModelSpec`
(model type, layer count, widths), validated against it, and composed into dense per-phase maps; the file
format (safetensors + a JSON header, never pickle) is in :mod:`.planfile`.
"""

from __future__ import annotations

import copy as _copy
import math
import numbers
import os
from typing import Iterable

import torch

from ..errors import PlanError
from ..formula import is_identity
from . import planfile
from .ir import F32_MAX, GATINGS, MAX_ENTRIES, PHASES, ModelSpec, PlanEntry, _as_tensor, compose
from .sites import SITES

__all__ = ["GATINGS", "PHASES", "SITES", "MAX_ENTRIES", "F32_MAX", "ModelSpec", "PlanEntry", "SteeringPlan",
           "compose"]


class SteeringPlan:
    """A list of :class:`PlanEntry` bound to a :class:`ModelSpec`.

    Entries at the same (layer, site) compose in the order they were added.
    """

    def __init__(self, spec: ModelSpec | None = None, entries: Iterable[PlanEntry] = (),
                 name: str | None = None, notes: str | None = None, metadata: dict | None = None):
        self.spec = spec
        self.entries: list[PlanEntry] = []
        self.name = name
        self.notes = notes
        self.metadata: dict = dict(metadata or {})
        for e in entries:
            self._append(e)

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def for_model(cls, model, **kw) -> "SteeringPlan":
        return cls(ModelSpec.from_model(model), **kw)

    @classmethod
    def for_spec(cls, spec: ModelSpec, **kw) -> "SteeringPlan":
        return cls(spec, **kw)

    def _append(self, e: PlanEntry) -> None:
        if len(self.entries) >= MAX_ENTRIES:
            raise PlanError(f"plan has too many entries (limit {MAX_ENTRIES})")
        e.validate(self.spec, len(self.entries))
        self.entries.append(e)

    def add(self, layer: int, site: str, a=None, b=None, dims=None, gating: str = "all") -> "SteeringPlan":
        """Add x' = a*x + b at (layer, site). a: scalar or vector; b: vector (or scalar); dims: sparse indices."""
        where = f"entry {len(self.entries)} (layer={layer}, site={site!r}, gating={gating!r})"
        if isinstance(layer, torch.Tensor) and layer.numel() == 1:
            layer = int(layer)
        try:
            import numpy as _np
            if isinstance(layer, _np.integer):
                layer = int(layer)
        except ImportError:  # pragma: no cover
            pass
        e = PlanEntry(layer=layer, site=site, gating=gating,
                      a=_as_tensor(a, "a", where), b=_as_tensor(b, "b", where),
                      dims=_as_tensor(dims, "dims", where, integer=True))
        if e.dims is not None and e.dims.dim() == 0:
            e.dims = e.dims.reshape(1)
        self._append(e)
        return self

    def extend(self, other: "SteeringPlan") -> "SteeringPlan":
        """Append all entries of ``other`` (they compose after this plan's entries). All or nothing: if one
        entry does not fit, the plan is left as it was. ``plan.extend(plan)`` appends its entries once."""
        if not isinstance(other, SteeringPlan):
            raise PlanError(f"extend() expects a SteeringPlan, got {type(other).__name__}")
        if self.spec is not None and other.spec is not None:
            other.spec.check_compatible(self.spec)
        new = [PlanEntry(e.layer, e.site, e.a, e.b, e.dims, e.gating) for e in list(other.entries)]
        if len(self.entries) + len(new) > MAX_ENTRIES:
            raise PlanError(f"extend(): the plan would have {len(self.entries) + len(new)} entries "
                            f"(limit {MAX_ENTRIES})")
        for i, e in enumerate(new):
            e.validate(self.spec, len(self.entries) + i)
        self.entries.extend(new)
        return self

    def copy(self) -> "SteeringPlan":
        p = SteeringPlan(self.spec, name=self.name, notes=self.notes, metadata=_copy.deepcopy(self.metadata))
        for e in self.entries:
            p.entries.append(PlanEntry(e.layer, e.site,
                                       None if e.a is None else e.a.clone(),
                                       None if e.b is None else e.b.clone(),
                                       None if e.dims is None else e.dims.clone(), e.gating))
        return p

    def scaled(self, s: float) -> "SteeringPlan":
        """Plan with every additive part multiplied by s and every gain moved to 1 + s*(a - 1). Raises
        PlanError if s is not a finite number or a scaled value leaves the float32 range."""
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(float(s)):
            raise PlanError(f"scaled(): the scale must be a finite number, got {s!r}")
        s = float(s)
        p = self.copy()
        for e in p.entries:
            if e.b is not None:
                e.b = (e.b.double() * s).float()
            if e.a is not None:
                e.a = (1.0 + s * (e.a.double() - 1.0)).float()
        for i, e in enumerate(p.entries):
            for what, t in (("a", e.a), ("b", e.b)):
                if t is not None and not bool(torch.isfinite(t).all()):
                    raise PlanError(f"scaled({s!r}): {e.describe(i)}: the scaled {what} leaves the float32 range "
                                    f"(|value| > {F32_MAX:.3g})")
        return p

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        fp = self.spec.fingerprint() if self.spec else "unbound"
        return f"SteeringPlan(name={self.name!r}, entries={len(self.entries)}, model={fp})"

    # ---- semantics ----------------------------------------------------------------------------
    def bind(self, spec: ModelSpec) -> "SteeringPlan":
        """Check this plan against a model spec (raising PlanError), bind it if unbound, return self."""
        if self.spec is not None:
            self.spec.check_compatible(spec)
        else:
            self.spec = spec
        self.validate()
        return self

    def validate(self) -> None:
        for i, e in enumerate(self.entries):
            e.validate(self.spec, i)

    def is_identity(self) -> bool:
        return all(is_identity(e.a, e.b) for e in self.entries)

    def phase_maps(
        self, spec: ModelSpec | None = None
    ) -> dict[tuple[int, str], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Dense composed maps: {(layer, site): {"prompt": (a, b), "generated": (a, b)}} (fp32, CPU)."""
        spec = spec or self.spec
        if spec is None:
            raise PlanError("plan is not bound to a model; call plan.bind(ModelSpec.from_model(model)) or "
                            "attach it to a model first")
        out: dict = {}
        for e in self.entries:
            key = (e.layer, e.site)
            width = spec.site_width(e.site)
            if key not in out:
                ident = (torch.ones(width), torch.zeros(width))
                out[key] = {ph: ident for ph in PHASES}
            m = e.dense(width)
            for ph in PHASES:
                if e.gating in ("all", ph):
                    out[key][ph] = compose(out[key][ph], m)
        return out

    # ---- file format (fusesteer.runtime.planfile) ------------------------------------------------
    def header(self) -> dict:
        return planfile.plan_header(self)

    def check_header(self) -> None:
        """What save() writes must load again (see :func:`fusesteer.runtime.planfile.check_header`)."""
        planfile.check_header(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan (safetensors + JSON header) atomically; a plan that would not load again, or a path
        that cannot be written, raises PlanError and leaves no file behind."""
        planfile.save_plan(self, path)

    def to_bytes(self) -> bytes:
        """The bytes of the plan file :meth:`save` writes (:meth:`from_bytes` reads them back)."""
        return planfile.plan_bytes(self)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SteeringPlan":
        """Read a plan file: data-only, bounded, every field validated (never pickle)."""
        return cls._from_record(planfile.load_plan(path))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> "SteeringPlan":
        return cls._from_record(planfile.plan_from_bytes(data, source))

    @classmethod
    def _from_record(cls, rec: "planfile.PlanRecord") -> "SteeringPlan":
        p = cls(rec.spec, name=rec.name, notes=rec.notes, metadata=rec.metadata)
        p.entries = list(rec.entries)  # validated by the loader, entry by entry
        return p
